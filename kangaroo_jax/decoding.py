"""Plain autoregressive decoding: prefill, then one jitted `lax.while_loop` over tokens.

Prompts are right-padded into a length bucket and the cache size is derived from the
bucket and the token budget, so a new prompt in the same bucket reuses the compiled loop.
Each sequence keeps its own length: the batch may mix prompt lengths.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax import cache as kv
from kangaroo_jax.model import Llama
from kangaroo_jax.sampling import SamplingParams, init_seen, mark_seen, penalize, sample

MIN_BUCKET = 32
PAD_ID = 0


class PromptError(ValueError):
  """A prompt this call cannot decode (empty, or too long for the cache)."""


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """Smallest power of two >= n (and >= minimum): the padded prompt length."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def cache_size(prompt_bucket: int, max_new_tokens: int, extra: int = 0) -> int:
  """Slots per sequence: the prompt bucket, the new tokens and `extra`, rounded up to 128."""
  return -(-(prompt_bucket + max_new_tokens + extra) // 128) * 128


def place_batch(mesh, *arrays):
  """Puts [B, ...] arrays on the mesh's 'data' axis (replicated if B does not divide)."""
  if mesh is None:
    return tuple(jnp.asarray(a) for a in arrays)
  from kangaroo_jax.sharding import data_sharding
  if arrays[0].shape[0] % mesh.shape["data"]:
    return tuple(jnp.asarray(a) for a in arrays)
  return tuple(jax.device_put(a, data_sharding(mesh)) for a in arrays)


def pad_prompts(prompts: Sequence[Sequence[int]], max_positions: int,
                reserve: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into [B, bucket] int32 plus lengths [B]; checks the sizes."""
  if not prompts:
    raise PromptError("no prompts given")
  lens = [len(p) for p in prompts]
  if min(lens) == 0:
    raise PromptError("empty prompt: it must hold at least one token")
  if max(lens) + reserve > max_positions:
    raise PromptError(f"prompt of {max(lens)} tokens plus room for {reserve} new tokens "
                      f"exceeds the model's {max_positions} positions")
  width = bucket(max(lens))
  tokens = np.full((len(prompts), width), PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, np.asarray(lens, np.int32)


@dataclasses.dataclass
class DecodeResult:
  """Generated token ids per sequence (EOS included when hit) and timing/statistics."""
  tokens: list[list[int]]
  seconds: float
  stats: dict


# ---- streaming: the loop calls back into the host with each step's new tokens ----
# The callback runs on an XLA runtime thread, not the caller's, so the sink is a module
# global (a thread-local would be invisible there); the lock lets one decode stream at a time.
_sink: Optional[Callable] = None
_sink_lock = threading.Lock()


def _emit(tokens: np.ndarray, counts: np.ndarray) -> None:
  """Host callback: tokens [B, C] of which counts [B] are new for each sequence."""
  sink = _sink
  if sink is not None:
    sink(np.asarray(tokens), np.asarray(counts))


def emit(tokens: jax.Array, counts: jax.Array) -> None:
  """From inside a jitted loop: hands new tokens to the current host sink, in order."""
  jax.debug.callback(_emit, tokens, counts, ordered=True)


def run_with_sink(fn: Callable, sink: Optional[Callable], *args, **kwargs):
  """Runs fn with `sink(tokens [B, C], counts [B])` receiving streamed tokens."""
  global _sink
  with _sink_lock:
    _sink = sink
    try:
      # Dispatch is asynchronous: wait, or the sink is gone before the callbacks fire.
      return jax.block_until_ready(fn(*args, **kwargs))
    finally:
      _sink = None


def prefill(model: Llama, tokens: jax.Array, prompt_lens: jax.Array, cache: kv.KVCache,
            end_layer: Optional[int] = None):
  """Runs the padded prompts [B, P] through layers [0, end); returns (hidden, cache)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # [B, P]
  return model.run_layers(model.embed(tokens), positions, cache, 0, end_layer)


def last_hidden(hidden: jax.Array, prompt_lens: jax.Array) -> jax.Array:
  """Hidden state [B, 1, D] of each sequence's last prompt token."""
  return hidden[jnp.arange(hidden.shape[0]), prompt_lens - 1][:, None]


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[..., None] == eos_ids, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "max_new_tokens", "stream"))
def _plain_loop(graphdef, state, tokens, prompt_lens, rng, eos_ids, *,
                params: SamplingParams, max_new_tokens: int, stream: bool):
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]
  cache = kv.init_model_cache(model.cfg, b, cache_size(tokens.shape[1], max_new_tokens), model.dtype)
  hidden, cache = prefill(model, tokens, prompt_lens, cache)
  rng, sub = jax.random.split(rng)
  # Tokens seen so far, for the repetition penalty ([B, 1] placeholder without one).
  seen = init_seen(tokens, prompt_lens, model.cfg.vocab_size, params)
  logits = model.logits(last_hidden(hidden, prompt_lens))[:, 0]  # [B, V]
  first = sample(penalize(logits, seen, params), params, sub)  # [B]
  seen = mark_seen(seen, first[:, None], jnp.ones((b, 1), bool), params)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  if stream:
    emit(first[:, None], jnp.ones((b,), jnp.int32))
  done = is_eos(first, eos_ids) | (max_new_tokens <= 1)
  init = (jnp.int32(1), first, prompt_lens, out, done, cache, rng, seen)

  def cond(s):
    step, done = s[0], s[4]
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(s):
    step, tok, lens, out, done, cache, rng, seen = s
    logits, cache = model(tok[:, None], lens[:, None], cache)  # [B, 1, V]
    rng, sub = jax.random.split(rng)
    nxt = sample(penalize(logits[:, 0], seen, params), params, sub)
    nxt = jnp.where(done, PAD_ID, nxt)
    seen = mark_seen(seen, nxt[:, None], ~done[:, None], params)
    out = out.at[:, step].set(nxt)
    if stream:
      emit(nxt[:, None], (~done).astype(jnp.int32))
    lens = lens + (~done).astype(jnp.int32)
    done = done | is_eos(nxt, eos_ids) | (step + 1 >= max_new_tokens)
    return step + 1, nxt, lens, out, done, cache, rng, seen

  step, _, lens, out = jax.lax.while_loop(cond, body, init)[:4]
  return out, lens - prompt_lens + 1, step


def plain_decode(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 params: SamplingParams = SamplingParams(), seed: int = 0,
                 eos_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None,
                 mesh=None) -> DecodeResult:
  """Decodes token prompts with the target model alone.

  Args:
    model: the target model.
    prompts: token id lists, one per sequence (lengths may differ).
    max_new_tokens: new tokens per sequence at most.
    params: greedy when temperature is 0, else sampling; optional repetition penalty.
    seed: PRNG seed for sampling.
    eos_ids: generation of a sequence stops after any of these.
    on_tokens: optional streaming sink `fn(tokens [B, C], counts [B])`.
    mesh: optional ('data', 'model') mesh; shard the model with `shard_module` first.
  Returns:
    DecodeResult with each sequence's new tokens (EOS included) and timings.
  """
  if max_new_tokens < 1:
    raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokens, lens = pad_prompts(prompts, model.cfg.max_position_embeddings, max_new_tokens)
  graphdef, state = nnx.split(model)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  tokens, lens = place_batch(mesh, tokens, lens)
  start = time.perf_counter()
  out, counts, steps = run_with_sink(
      _plain_loop, on_tokens, graphdef, state, tokens, lens,
      jax.random.key(seed), eos, params=params, max_new_tokens=max_new_tokens,
      stream=on_tokens is not None)
  out, counts = np.asarray(out), np.asarray(counts)
  seconds = time.perf_counter() - start
  seqs = [out[i, :counts[i]].tolist() for i in range(len(prompts))]
  new = int(counts.sum())
  return DecodeResult(seqs, seconds, {
      "new_tokens": new, "seconds": seconds, "tokens_per_second": new / seconds,
      "steps": int(steps), "mean_accepted_tokens": 1.0})
