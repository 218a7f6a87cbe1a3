"""The notebook API: load a model, then `generate` or `stream` text.

    from kangaroo_jax import load_model, load_adapter_for, generate
    model, tokenizer = load_model()                 # the embedded SmolLM2-135M-Instruct
    drafter = load_adapter_for(model)               # the shipped adapter and its draft vocabulary
    out = generate(model, tokenizer, "Why is the sky blue?", adapter=drafter)
    print(out.text, out.stats["mean_accepted_tokens"])

The draft vocabulary travels with the adapter: `load_adapter_for` returns a `Drafter`
(adapter + stored draft ids) that `generate`/`stream` take whole, and an adapter unpacked
from it (`adapter, draft_ids = load_adapter_for(model)`) still drafts over its own stored
vocabulary when passed alone.
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kangaroo_jax import chat_templates, compile_cache, loading, memory, sharding, tuning, weights
from kangaroo_jax.adapter import Adapter, init_adapter, load_adapter
from kangaroo_jax.authors_adapter import NO_ADAPTER
from kangaroo_jax.decoding import MIN_BUCKET, PromptError, plain_decode, plain_stream
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode, kangaroo_stream
from kangaroo_jax.model import Llama
from kangaroo_jax.precision import activation_dtype, cache_dtype, default_dtypes
from kangaroo_jax.sampling import SamplingParams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ADAPTER_DIR = os.path.join(os.path.dirname(__file__), "adapters")
DEFAULT_ADAPTER = os.path.join(ADAPTER_DIR, "smollm2-135m-instruct.safetensors")
DEFAULT_EXIT_LAYER = 2

Messages = list[dict[str, str]]
PromptLike = Union[str, Messages]


@dataclasses.dataclass
class Generation:
  """Texts and token ids per prompt, plus decoding statistics.

  One prompt: read `.text`. A batch: iterate (or index) for one `Generation` per prompt,
  in prompt order: `for out in generate(model, tok, [a, b]): print(out.text)`. `stats`
  describe the whole call (the batch's tokens, rounds and seconds).
  """
  texts: list[str]
  token_ids: list[list[int]]
  prompt_token_ids: list[list[int]]
  stats: dict

  @property
  def text(self) -> str:
    """The first (for a single prompt: the only) text."""
    return self.texts[0]

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, i: int) -> "Generation":
    """The result of prompt i alone (stats stay the batch's)."""
    if not isinstance(i, int):
      raise TypeError(f"Generation indices must be integers, not {type(i).__name__}")
    return Generation([self.texts[i]], [self.token_ids[i]], [self.prompt_token_ids[i]],
                      self.stats)

  def __iter__(self) -> Iterator["Generation"]:
    return (self[i] for i in range(len(self)))


class Drafter(NamedTuple):
  """An adapter with the draft vocabulary stored next to it (None = the full vocabulary).

  A tuple, so `adapter, draft_ids = load_adapter_for(model)` still unpacks it; pass it
  whole as `generate(..., adapter=drafter)`.
  """
  adapter: Adapter
  draft_ids: Optional[np.ndarray]


# The stored draft vocabulary of every adapter `load_adapter_for` returned, so an adapter
# passed without its draft ids still drafts over them (weak: adapters are freed normally).
_STORED_DRAFT_IDS: "weakref.WeakKeyDictionary[Adapter, Optional[np.ndarray]]" = (
    weakref.WeakKeyDictionary())
# The default adapter per model, loaded once for calls that pass no adapter.
_DEFAULT_DRAFTERS: "weakref.WeakKeyDictionary[Llama, Drafter]" = weakref.WeakKeyDictionary()


def load_model(path: Optional[str] = None, dtype: Optional[str] = None,
               mesh: Union[Mesh, str, None] = "auto",
               activations: Optional[str] = None,
               step_width: Optional[int] = None, batch: int = 1,
               fsdp: bool = False, progress: bool = False) -> tuple[Llama, Any]:
  """Loads (model, tokenizer) from a Hugging Face folder or .gguf; None = embedded default.

  The checkpoint streams onto the devices one tensor at a time, cast on the host to
  `dtype` (see `kangaroo_jax.loading`): host memory peaks at about one layer.

  Args:
    path: a Hugging Face folder or a .gguf file; None = the embedded SmolLM2-135M.
    dtype: the weights' dtype, "float32" or "bfloat16"; None = this backend's
      (`precision.default_dtypes`: float32 on a CPU, bfloat16 on accelerators).
    mesh: a ('data', 'model') mesh (`sharding.make_mesh`) to shard the weights over;
      "auto" = on more than one accelerator, a mesh over all of them whose 'data' axis
      is the largest that divides `batch` and leaves the weights room
      (`memory.pick_mesh_shape`: batch 1 puts every device on 'model'), on CPUs one
      device (fake CPU devices share one host); None = one device. `generate`, `stream`
      and `load_adapter_for` then use the model's mesh. A model whose weights do not fit
      the devices is refused before any is read (`memory.DoesNotFit`, one line).
    activations: the hidden states' and KV caches' dtype; None = this backend's
      (`precision.default_dtypes`): float32 on a CPU (greedy Kangaroo equal to plain
      decoding with single-row steps), bfloat16 on accelerators (fixed-width steps keep
      it identical there; float32's HIGHEST products cost 30% of plain speed on an H200).
      See `kangaroo_jax.precision` and the README.
    batch: the sequences decoded at once, for the automatic mesh.
    step_width: rows per sequence of every decoding step (`kangaroo_jax.precision`):
      None = this backend's (1 on a CPU, 8 on accelerators, where fixed-width steps make
      greedy Kangaroo identical to plain decoding by construction).
    fsdp: also split the weights over the mesh's 'data' axis (`sharding.spec_for`): the
      training step's frozen weights, gathered a layer at a time.
    progress: a progress bar on stderr when loading the weights takes over a second or
      two (`loading.load_params`).

  Also turns on JAX's persistent compilation cache in the project's cache folder (see
  `kangaroo_jax.compile_cache`; KANGAROO_JAX_NO_COMPILE_CACHE=1 opts out), so a later
  process decoding the same shapes skips compilation.
  """
  default_weights, default_activations = default_dtypes()
  dtype, activations = dtype or default_weights, activations or default_activations
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  if isinstance(mesh, str) and mesh != "auto":
    raise ValueError(f"mesh must be a jax Mesh, 'auto' or None, got {mesh!r}")
  if step_width is not None and step_width < 1:
    raise ValueError(f"step width must be >= 1, got {step_width}")
  hidden_dtype = activation_dtype(activations)
  compile_cache.enable_compilation_cache()
  cfg, tensors = weights.open_checkpoint(path)
  tokenizer = weights.load_tokenizer(path)
  if mesh == "auto":
    mesh = memory.auto_mesh(cfg, DTYPES[dtype], batch)
  if not fsdp:  # fully sharded weights divide over every device (scripts/tpu_aot.py sizes them)
    memory.check_fits(cfg, DTYPES[dtype], mesh)  # before a byte of the weights is read
  model = loading.load_params(cfg, tensors, DTYPES[dtype], mesh, hidden_dtype, fsdp, progress)
  model.step_width = step_width or model.step_width
  return model, tokenizer


def memory_report(model: Llama, adapter: Union[Drafter, Adapter, None] = None, batch: int = 1,
                  slots: int = 2048) -> memory.MemoryReport:
  """Per-device bytes of the weights, KV cache and adapter on the model's mesh.

  `slots` = cache slots per sequence (prompt bucket + new tokens, rounded up to 128).
  Print `.summary()` for one line.
  """
  mesh = sharding.mesh_of(model)
  axis_sizes = dict(mesh.shape) if mesh is not None else {"data": 1, "model": 1}
  if isinstance(adapter, tuple):
    adapter = adapter[0]
  return memory.report(model.cfg, model.dtype, axis_sizes, batch, slots,
                       None if adapter is None else adapter.acfg,
                       cache_dtype=cache_dtype(model.activations, model.platform))


def load_adapter_for(model: Llama, path: Optional[str] = None, exit_layer: Optional[int] = None,
                     seed: int = 0, untrained: bool = False) -> Drafter:
  """The adapter at `path` (our file, or the authors' folder); else the shipped one if it
  fits `model`; else, when asked for (`untrained=True`), a fresh random one.

  A model with no adapter is an AdapterError (`NO_ADAPTER`), not a silent random
  drafter: an untrained adapter is still lossless but makes Kangaroo slower than plain
  decoding. `exit_layer` is the authors' folder's exit layer (default 2) or a fresh
  adapter's, and must match an adapter file's. Returns a `Drafter` (adapter, stored
  draft vocabulary ids or None): pass it whole to `generate`/`stream` as `adapter=`; it
  also unpacks as a pair. The adapter is placed on the model's mesh (`sharding.mesh_of`),
  sharded by the same rules as the model.
  """
  from kangaroo_jax.adapter import AdapterError
  mesh = sharding.mesh_of(model)
  adapter = None
  if path is not None:
    adapter, ids = load_adapter(path, model.cfg, model.dtype, mesh, exit_layer)
  elif os.path.isfile(DEFAULT_ADAPTER) and exit_layer is None and not untrained:
    try:
      adapter, ids = load_adapter(DEFAULT_ADAPTER, model.cfg, model.dtype, mesh)
    except ValueError:  # the shipped adapter belongs to another model
      pass
  if adapter is None:
    if not untrained:
      raise AdapterError(NO_ADAPTER)
    adapter, ids = init_adapter(model.cfg, exit_layer or DEFAULT_EXIT_LAYER, seed=seed,
                                dtype=model.dtype), None
  if mesh is not None and sharding.mesh_of(adapter) is None:  # a fresh one: onto the mesh
    sharding.shard_module(adapter, mesh)
  if exit_layer is not None and adapter.acfg.exit_layer != exit_layer:
    raise AdapterError(f"the adapter was trained for exit layer {adapter.acfg.exit_layer}, "
                       f"not {exit_layer}")
  _STORED_DRAFT_IDS[adapter] = ids
  return Drafter(adapter, ids)


def resolve_drafter(model: Llama, adapter: Union[Drafter, Adapter, None],
                    draft_ids: Optional[np.ndarray] = None,
                    draft_vocab: Optional[int] = None) -> tuple[Adapter, Optional[np.ndarray]]:
  """The adapter and draft vocabulary a Kangaroo call uses.

  Args:
    adapter: a `Drafter`, a bare adapter, or None (the shipped adapter, loaded once per
      model; an AdapterError for a model it does not fit: `load_adapter_for`).
    draft_ids: explicit draft token ids; they win over everything else.
    draft_vocab: None = the tuned size for this backend, else all the adapter stores;
      0 = the full vocabulary; N = the first N stored ids (most frequent first).
  """
  if adapter is None:
    if model not in _DEFAULT_DRAFTERS:
      _DEFAULT_DRAFTERS[model] = load_adapter_for(model)
    adapter = _DEFAULT_DRAFTERS[model]
  if isinstance(adapter, tuple):  # a Drafter, or a plain (adapter, ids) pair
    adapter, stored = adapter
  else:
    stored = _STORED_DRAFT_IDS.get(adapter)
  if draft_ids is not None:
    return adapter, np.asarray(draft_ids)
  tuned = tuning.tuned_settings()["draft_vocab"] if draft_vocab is None else draft_vocab
  # Tuned sizes may come from another adapter: fall back to what this one stores.
  return adapter, tuning.select_draft_ids(stored, tuned, strict=draft_vocab is not None)


def encode_prompt(tokenizer, prompt: PromptLike, chat: bool = True,
                  chat_template: Optional[str] = None) -> list[int]:
  """Token ids of a prompt: a user string or chat messages, through the chat template.

  `chat_template`: "vicuna", "chatml", a Jinja file or template text; None = the
  tokenizer's own, else Vicuna's for a checkpoint named Vicuna, else a ChatTemplateError
  naming the flag to pass (`chat_templates.for_tokenizer`). chat=False encodes a string
  as it is.
  """
  if isinstance(prompt, str):
    if not prompt.strip():
      raise PromptError("empty prompt")
    if not chat:
      return tokenizer.encode(prompt)
    prompt = [{"role": "user", "content": prompt}]
  ids = tokenizer.apply_chat_template(prompt, chat_template=chat_templates.for_tokenizer(
      tokenizer, chat_template), add_generation_prompt=True, tokenize=True)
  if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
    ids = ids["input_ids"]
  return list(ids)


def eos_ids(model: Llama, tokenizer) -> list[int]:
  ids = set(model.cfg.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return sorted(ids)


def _decoder(model, tokenizer, prompts, *, mode, adapter, draft_ids, draft_vocab, max_new_tokens,
             temperature, top_k, top_p, repetition_penalty, seed, eta, gamma, chat, chat_template,
             send_unconfident=None, tree_nodes=None, tree_topk=None, lookup=None,
             min_bucket=MIN_BUCKET):
  """Encodes the prompts and picks the decoder: returns (prompt ids, run).

  `run(stream=False)` decodes to a DecodeResult; `run(stream=True)` returns a generator
  of (tokens [B, C], counts [B]) whose return value is the DecodeResult.
  """
  if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
    prompts = [prompts]
  ids = [encode_prompt(tokenizer, p, chat, chat_template) for p in prompts]
  common = dict(max_new_tokens=max_new_tokens, seed=seed, eos_ids=eos_ids(model, tokenizer),
                mesh=sharding.mesh_of(model), min_bucket=min_bucket,
                params=SamplingParams(temperature, top_k, top_p, repetition_penalty))
  if mode == "plain":
    return ids, lambda stream=False: (plain_stream if stream else plain_decode)(model, ids,
                                                                                **common)
  if mode != "kangaroo":
    raise ValueError(f"mode must be 'kangaroo' or 'plain', got {mode!r}")
  tuned = tuning.resolve(eta=eta, gamma=gamma, send_unconfident=send_unconfident,
                         tree_nodes=tree_nodes, tree_topk=tree_topk, lookup=lookup)
  if not common["params"].greedy and tree_nodes is None:
    tuned["tree_nodes"] = 0  # a tuned tree is greedy only; sampling drafts a chain
  adapter, draft_ids = resolve_drafter(model, adapter, draft_ids, draft_vocab)
  common.update(kparams=KangarooParams(tuned["eta"], tuned["gamma"], tuned["send_unconfident"],
                                       tuned["tree_nodes"], tuned["tree_topk"],
                                       tuned["lookup"]),
                draft_ids=draft_ids)
  return ids, lambda stream=False: (kangaroo_stream if stream else kangaroo_decode)(
      model, adapter, ids, **common)


def generate(model: Llama, tokenizer, prompts: Union[PromptLike, Sequence[PromptLike]], *,
             mode: str = "kangaroo", adapter: Union[Drafter, Adapter, None] = None,
             draft_ids: Optional[np.ndarray] = None, draft_vocab: Optional[int] = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
             eta: Optional[float] = None, gamma: Optional[int] = None,
             send_unconfident: Optional[bool] = None, tree_nodes: Optional[int] = None,
             tree_topk: Optional[int] = None, lookup: Optional[int] = None,
             chat: bool = True, chat_template: Optional[str] = None,
             min_bucket: int = MIN_BUCKET) -> Generation:
  """Generates text for one prompt or a batch.

  Args:
    model, tokenizer: from `load_model`.
    prompts: a user string, a list of chat messages, or a list of either (a batch).
    mode: "kangaroo" (self-speculative, output identical to plain) or "plain".
    adapter: what `load_adapter_for` returns (its draft vocabulary comes along); None
      uses the default adapter.
    draft_ids: explicit draft token ids, overriding the adapter's stored ones.
    draft_vocab: draft over the first N stored ids; 0 = the full vocabulary; None = the
      tuned size for this backend, else all the adapter stores.
    max_new_tokens: new tokens per prompt at most.
    temperature, top_k, top_p, seed: sampling (temperature 0 = greedy).
    repetition_penalty: transformers' definition (logits of tokens already in the prompt
      or output divided by it when positive, multiplied when negative); 1.0 = none.
    eta, gamma: Kangaroo's early-exit threshold and maximum drafts per round; None takes
      the tuned setting for this backend (`kangaroo_jax/tuned/<backend>.json`), else 0.6 / 6.
    send_unconfident: verify the draft that fell below eta too (the paper's rule);
      None takes the tuned setting, else True.
    tree_nodes, tree_topk: tree drafting (greedy only): verify the best `tree_nodes` nodes
      of a draft tree whose nodes propose `tree_topk` children each; 0 nodes = a chain.
      None takes the tuned setting, else the chain (a tuned tree is not used when sampling).
    lookup: prompt-lookup drafting (beyond the paper): a round whose last 3 tokens occurred
      earlier in the sequence verifies up to `lookup` tokens that followed there instead
      of adapter drafts (chain only); 0 = off; None takes the tuned setting, else 0.
    chat: apply the chat template to string prompts (False: encode them as they are).
    chat_template: "vicuna" (Vicuna v1.1, as the paper's adapters were trained), "chatml",
      a Jinja file or template text; None = the tokenizer's own, else Vicuna's for a
      checkpoint whose folder names Vicuna, else an error naming this argument.
    min_bucket: pad prompts to at least this many tokens (a power of two). Each padded
      length (bucket) is a shape the loops compile once; a conversation that grows
      compiles again at each new bucket unless it started in a large enough one.
  Returns:
    A `Generation`: `.text` for one prompt; iterate it for one result per prompt of a
    batch. Stats: mean_accepted_tokens, rounds, draft_steps, tokens_per_second, ...
  """
  ids, run = _decoder(model, tokenizer, prompts, **_defaults(dict(
      mode=mode, adapter=adapter, draft_ids=draft_ids, draft_vocab=draft_vocab,
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      repetition_penalty=repetition_penalty, seed=seed, eta=eta, gamma=gamma, chat=chat,
      chat_template=chat_template,
      send_unconfident=send_unconfident, tree_nodes=tree_nodes, tree_topk=tree_topk,
      lookup=lookup, min_bucket=min_bucket)))
  result = run()
  texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
  return Generation(texts, result.tokens, ids, result.stats)


def stream(model: Llama, tokenizer, prompt: PromptLike, **kwargs) -> Iterator[str]:
  """Like `generate` for one prompt, but yields text pieces as tokens are accepted.

  Decoding runs in the caller's thread, a round (or plain step) per piece; leaving the
  loop early stops it. The generator's return value (StopIteration.value) is the
  finished `Generation`.
  """
  ids, run = _decoder(model, tokenizer, prompt, **_defaults(kwargs))
  steps = run(stream=True)
  tokens: list[int] = []
  shown = ""
  while True:
    try:
      new, counts = next(steps)
    except StopIteration as stop:
      result = stop.value
      break
    tokens.extend(new[0, :counts[0]].tolist())
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    # Hold back a trailing replacement char: a multi-byte character may be incomplete.
    if len(text) > len(shown) and not text.endswith("\ufffd"):
      yield text[len(shown):]
      shown = text
  return Generation([tokenizer.decode(result.tokens[0], skip_special_tokens=True)], result.tokens,
                    ids, result.stats)


def _defaults(kwargs: dict) -> dict:
  """`generate`'s keyword defaults with `kwargs` in place; unknown names raise TypeError."""
  out = dict(mode="kangaroo", adapter=None, draft_ids=None, draft_vocab=None, max_new_tokens=256,
             temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0, eta=None,
             gamma=None, send_unconfident=None, tree_nodes=None, tree_topk=None, lookup=None,
             chat=True, chat_template=None, min_bucket=MIN_BUCKET)
  unknown = set(kwargs) - set(out)
  if unknown:
    raise TypeError(f"unknown arguments: {', '.join(sorted(unknown))}")
  out.update(kwargs)
  return out
