"""The notebook API: load a model, then `generate` or `stream` text.

    from kangaroo_jax import load_model, load_adapter_for, generate
    model, tokenizer = load_model()                 # the embedded SmolLM2-135M-Instruct
    adapter, draft_ids = load_adapter_for(model)    # the shipped adapter (or a fresh one)
    out = generate(model, tokenizer, "Why is the sky blue?", adapter=adapter, draft_ids=draft_ids)
    print(out.texts[0], out.stats["mean_accepted_tokens"])
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Any, Iterator, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from kangaroo_jax import tuning, weights
from kangaroo_jax.adapter import Adapter, init_adapter, load_adapter
from kangaroo_jax.decoding import PromptError, plain_decode
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
from kangaroo_jax.model import Llama, from_hf_state_dict
from kangaroo_jax.sampling import SamplingParams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ADAPTER_DIR = os.path.join(os.path.dirname(__file__), "adapters")
DEFAULT_ADAPTER = os.path.join(ADAPTER_DIR, "smollm2-135m-instruct.safetensors")
DEFAULT_EXIT_LAYER = 2

Messages = list[dict[str, str]]
PromptLike = Union[str, Messages]


@dataclasses.dataclass
class Generation:
  """Texts and token ids per prompt, plus decoding statistics."""
  texts: list[str]
  token_ids: list[list[int]]
  prompt_token_ids: list[list[int]]
  stats: dict

  @property
  def text(self) -> str:
    return self.texts[0]


def load_model(path: Optional[str] = None, dtype: str = "float32") -> tuple[Llama, Any]:
  """Loads (model, tokenizer) from a Hugging Face folder or .gguf; None = embedded default."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  cfg, sd = weights.load_checkpoint(path)
  tokenizer = weights.load_tokenizer(path)
  return from_hf_state_dict(cfg, sd, DTYPES[dtype]), tokenizer


def load_adapter_for(model: Llama, path: Optional[str] = None, exit_layer: Optional[int] = None,
                     seed: int = 0) -> tuple[Adapter, Optional[np.ndarray]]:
  """The adapter at `path`; else the shipped one if it fits `model`; else a fresh one.

  A fresh (untrained) adapter is still lossless, only slower: few drafts are accepted.
  Returns (adapter, reduced draft vocabulary ids or None).
  """
  if path is not None:
    adapter, ids = load_adapter(path, model.cfg, model.dtype)
  elif os.path.isfile(DEFAULT_ADAPTER) and exit_layer is None:
    try:
      adapter, ids = load_adapter(DEFAULT_ADAPTER, model.cfg, model.dtype)
    except ValueError:  # the shipped adapter belongs to another model
      adapter, ids = init_adapter(model.cfg, DEFAULT_EXIT_LAYER, seed=seed, dtype=model.dtype), None
  else:
    adapter, ids = init_adapter(model.cfg, exit_layer or DEFAULT_EXIT_LAYER, seed=seed,
                                dtype=model.dtype), None
  if exit_layer is not None and adapter.acfg.exit_layer != exit_layer:
    from kangaroo_jax.adapter import AdapterError
    raise AdapterError(f"the adapter was trained for exit layer {adapter.acfg.exit_layer}, "
                       f"not {exit_layer}")
  return adapter, ids


def encode_prompt(tokenizer, prompt: PromptLike, chat: bool = True) -> list[int]:
  """Token ids of a prompt: a user string or chat messages, through the chat template."""
  if isinstance(prompt, str):
    if not prompt.strip():
      raise PromptError("empty prompt")
    if not chat or not getattr(tokenizer, "chat_template", None):
      return tokenizer.encode(prompt)
    prompt = [{"role": "user", "content": prompt}]
  ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
  if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
    ids = ids["input_ids"]
  return list(ids)


def eos_ids(model: Llama, tokenizer) -> list[int]:
  ids = set(model.cfg.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return sorted(ids)


def _decode(model, tokenizer, prompts, *, mode, adapter, draft_ids, max_new_tokens, temperature,
            top_k, top_p, seed, eta, gamma, chat, send_unconfident=None, on_tokens=None):
  if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
    prompts = [prompts]
  ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
  params = SamplingParams(temperature, top_k, top_p)
  common = dict(max_new_tokens=max_new_tokens, params=params, seed=seed,
                eos_ids=eos_ids(model, tokenizer), on_tokens=on_tokens)
  if mode == "plain":
    result = plain_decode(model, ids, **common)
  elif mode == "kangaroo":
    tuned = tuning.resolve(eta=eta, gamma=gamma, send_unconfident=send_unconfident)
    if adapter is None:
      adapter, stored = load_adapter_for(model)
      draft_ids = tuning.select_draft_ids(stored, tuned["draft_vocab"], strict=False)
    result = kangaroo_decode(model, adapter, ids, kparams=KangarooParams(
                                 tuned["eta"], tuned["gamma"], tuned["send_unconfident"]),
                             draft_ids=draft_ids, **common)
  else:
    raise ValueError(f"mode must be 'kangaroo' or 'plain', got {mode!r}")
  return ids, result


def generate(model: Llama, tokenizer, prompts: Union[PromptLike, Sequence[PromptLike]], *,
             mode: str = "kangaroo", adapter: Optional[Adapter] = None,
             draft_ids: Optional[np.ndarray] = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eta: Optional[float] = None, gamma: Optional[int] = None,
             send_unconfident: Optional[bool] = None, chat: bool = True) -> Generation:
  """Generates text for one prompt or a batch.

  Args:
    model, tokenizer: from `load_model`.
    prompts: a user string, a list of chat messages, or a list of either (a batch).
    mode: "kangaroo" (self-speculative, output identical to plain) or "plain".
    adapter, draft_ids: from `load_adapter_for`; None uses the default adapter.
    max_new_tokens: new tokens per prompt at most.
    temperature, top_k, top_p, seed: sampling (temperature 0 = greedy).
    eta, gamma: Kangaroo's early-exit threshold and maximum drafts per round; None takes
      the tuned setting for this backend (`kangaroo_jax/tuned/<backend>.json`), else 0.6 / 6.
    send_unconfident: verify the draft that fell below eta too (the paper's rule);
      None takes the tuned setting, else True.
    chat: apply the tokenizer's chat template to string prompts.
  Returns:
    A `Generation` with texts, token ids and stats (mean_accepted_tokens, rounds,
    draft_steps, tokens_per_second, ...).
  """
  ids, result = _decode(model, tokenizer, prompts, mode=mode, adapter=adapter, draft_ids=draft_ids,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eta=eta, gamma=gamma, chat=chat,
                        send_unconfident=send_unconfident)
  texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
  return Generation(texts, result.tokens, ids, result.stats)


def stream(model: Llama, tokenizer, prompt: PromptLike, **kwargs) -> Iterator[str]:
  """Like `generate` for one prompt, but yields text pieces as tokens are accepted.

  The generator's return value (StopIteration.value) is the finished `Generation`.
  """
  pieces: "queue.Queue" = queue.Queue()
  done = object()
  box: dict = {}

  def sink(tokens, counts):
    pieces.put(tokens[0, :counts[0]].tolist())

  def run():
    try:
      box["result"] = _decode(model, tokenizer, prompt, on_tokens=sink, **_defaults(kwargs))
    except BaseException as e:  # re-raised in the consumer
      box["error"] = e
    pieces.put(done)

  threading.Thread(target=run, daemon=True).start()
  tokens: list[int] = []
  shown = ""
  while (item := pieces.get()) is not done:
    tokens.extend(item)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    # Hold back a trailing replacement char: a multi-byte character may be incomplete.
    if len(text) > len(shown) and not text.endswith("\ufffd"):
      yield text[len(shown):]
      shown = text
  if "error" in box:
    raise box["error"]
  ids, result = box["result"]
  return Generation([tokenizer.decode(result.tokens[0], skip_special_tokens=True)], result.tokens,
                    ids, result.stats)


def _defaults(kwargs: dict) -> dict:
  out = dict(mode="kangaroo", adapter=None, draft_ids=None, max_new_tokens=256, temperature=0.0,
             top_k=0, top_p=1.0, seed=0, eta=None, gamma=None, send_unconfident=None, chat=True)
  unknown = set(kwargs) - set(out)
  if unknown:
    raise TypeError(f"unknown arguments: {', '.join(sorted(unknown))}")
  out.update(kwargs)
  return out
