"""The methods a benchmark compares: run(prompt ids) -> Output, plus a warm-up key.

This project's plain and Kangaroo decoding, and transformers' PyTorch peers (greedy
`generate`, LayerSkip-style early-exit assisted generation, prompt lookup).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Hashable, Optional, Sequence

from kangaroo_jax.cli import one_line

METHODS = ("plain", "kangaroo", "hf", "hf_early_exit", "hf_pld")
DESCRIPTIONS = {
    "plain": "kangaroo-jax plain greedy decoding (JAX)",
    "kangaroo": "kangaroo-jax Kangaroo self-speculative decoding (JAX)",
    "hf": "transformers greedy generate (PyTorch)",
    "hf_early_exit": "transformers assisted generation, assistant_early_exit (LayerSkip-style)",
    "hf_pld": "transformers prompt-lookup decoding (prompt_lookup_num_tokens=10)",
}
# Whose text each method must reproduce. The assisted peers are judged against
# transformers' own greedy output: PyTorch and XLA float32 can break near-ties differently.
REFERENCE = {"plain": "plain", "kangaroo": "plain", "hf": "plain", "hf_early_exit": "hf",
             "hf_pld": "hf"}


@dataclasses.dataclass
class Output:
  """One decoded turn: new tokens (EOS included when hit) and step counts.

  `verified` tokens came out of `steps` target forward passes (Spec-Bench's mean accepted
  tokens per step = verified / steps); `draft_steps` drafting passes were spent on them,
  and `drafts_verified` of their drafts were sent to verification (Kangaroo only).
  `first_token_seconds`: the prompt pass that gave the first token (the harness times the
  rest of the request as decoding).
  """
  tokens: list[int]
  verified: int
  steps: int
  draft_steps: int = 0
  drafts_verified: Optional[int] = None
  first_token_seconds: float = 0.0


@dataclasses.dataclass
class Method:
  name: str
  description: str
  reference: str
  run: Callable[[list[int]], Output]
  warm_key: Callable[[list[int]], Hashable]
  settings: dict = dataclasses.field(default_factory=dict)


class PeerUnavailable(Exception):
  """A peer that cannot load; the run reports it as skipped."""


def jax_plain(model, eos: Sequence[int], max_new_tokens: int) -> Method:
  """This project's plain greedy decoding."""
  from kangaroo_jax.decoding import bucket, plain_decode

  def run(ids):
    r = plain_decode(model, [ids], max_new_tokens=max_new_tokens, eos_ids=eos)
    tokens = r.tokens[0]
    # The first token comes from the prefill, as in Kangaroo's count.
    return Output(tokens, len(tokens) - 1, len(tokens) - 1,
                  first_token_seconds=r.stats["prefill_seconds"])

  return Method("plain", DESCRIPTIONS["plain"], "plain", run,
                lambda ids: ("plain", bucket(len(ids))))


def kangaroo_label(eta: float, gamma: int, draft_vocab: Optional[int],
                   send_unconfident: bool = True, tree_nodes: int = 0, tree_topk: int = 0,
                   lookup: int = 0, adapter: Optional[str] = None) -> str:
  """The method name of one sweep setting, e.g. kangaroo[eta=0.6,gamma=4,vocab=stored,send=yes]
  (a tree adds ",tree=NODES/TOPK", prompt lookup ",lookup=N"; a sweep over several adapters
  starts with "adapter=NAME,")."""
  vocab = "stored" if draft_vocab is None else ("full" if draft_vocab == 0 else draft_vocab)
  send = "yes" if send_unconfident else "no"
  tree = f",tree={tree_nodes}/{tree_topk}" if tree_nodes else ""
  lookup_part = f",lookup={lookup}" if lookup else ""
  which = f"adapter={adapter}," if adapter else ""
  return (f"kangaroo[{which}eta={eta:g},gamma={gamma},vocab={vocab},send={send}{tree}"
          f"{lookup_part}]")


def jax_kangaroo(model, adapter, draft_ids, eos: Sequence[int], max_new_tokens: int, eta: float,
                 gamma: int, name: str = "kangaroo", draft_vocab: Optional[int] = None,
                 send_unconfident: bool = True, tree_nodes: int = 0,
                 tree_topk: int = 4, lookup: int = 0) -> Method:
  """Kangaroo decoding with one (eta, gamma, draft vocabulary, send_unconfident, tree, lookup)
  setting."""
  from kangaroo_jax.decoding import bucket
  from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
  kparams = KangarooParams(eta, gamma, send_unconfident, tree_nodes, tree_topk, lookup)
  vocab = None if draft_ids is None else len(draft_ids)

  def run(ids):
    r = kangaroo_decode(model, adapter, [ids], max_new_tokens=max_new_tokens, kparams=kparams,
                        eos_ids=eos, draft_ids=draft_ids)
    tokens = r.tokens[0]
    return Output(tokens, len(tokens) - 1, r.stats["rounds"], r.stats["draft_steps"],
                  r.stats["drafts_verified"], r.stats["prefill_seconds"])

  # eta is a traced argument: settings that differ only in eta share compiled code.
  return Method(name, DESCRIPTIONS["kangaroo"], "plain", run,
                # Adapters of another shape (exit layer, FFN) compile their own code.
                lambda ids: ("kangaroo", adapter.acfg, gamma, send_unconfident, kparams.tree,
                             lookup, vocab, bucket(len(ids))),
                dict(eta=eta, gamma=gamma, draft_vocab=draft_vocab, draft_vocab_size=vocab,
                     send_unconfident=send_unconfident, tree_nodes=tree_nodes,
                     tree_topk=tree_topk, lookup=lookup, exit_layer=adapter.acfg.exit_layer,
                     adapter_ffn=adapter.acfg.ffn_size))


def load_hf_model(path: Optional[str], threads: int):
  """The same checkpoint as a transformers PyTorch float32 model (a .gguf or a folder)."""
  try:
    import torch
    import transformers
    from kangaroo_jax import weights
    torch.set_num_threads(threads)
    path = weights.default_model_path() if path is None else os.path.abspath(path)
    if path.endswith(".gguf"):
      model = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    else:
      model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
  except Exception as e:  # ImportError, OSError, ValueError... all mean "peer unavailable"
    raise PeerUnavailable(f"transformers cannot load {path}: {one_line(e)}") from e


def hf_method(name: str, hf_model, eos: Sequence[int], pad_id: int, max_new_tokens: int,
              **generate_kwargs) -> Method:
  """A transformers `generate` peer; counts target and early-exit draft forward passes."""
  import torch
  base = getattr(hf_model, hf_model.base_model_prefix)
  layers = base.config.num_hidden_layers
  counts = {"target": 0, "draft": 0}
  first = {}  # when the first target pass (the prompt's) started and ended

  def count(module, args, kwargs):
    # Early exit lowers num_hidden_layers while drafting (EarlyExitCandidateGenerator).
    target = base.config.num_hidden_layers >= layers
    counts["target" if target else "draft"] += 1
    if target and counts["target"] == 1:
      first["start"] = time.perf_counter()

  def passed(module, args, output):
    if counts["target"] == 1 and "end" not in first:
      first["end"] = time.perf_counter()

  hf_model.register_forward_pre_hook(count, with_kwargs=True)
  hf_model.register_forward_hook(passed)

  def run(ids):
    counts.update(target=0, draft=0)
    first.clear()
    x = torch.tensor([ids])
    with torch.inference_mode():
      out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=list(eos), pad_token_id=pad_id,
                              **generate_kwargs)
    tokens = out[0, len(ids):].tolist()
    # Every target pass, the first included, yields its own token plus accepted drafts.
    return Output(tokens, len(tokens), max(1, counts["target"]), counts["draft"],
                  first_token_seconds=first.get("end", 0.0) - first.get("start", 0.0))

  return Method(name, DESCRIPTIONS[name], REFERENCE[name], run, lambda ids: name,
                dict(generate_kwargs))
