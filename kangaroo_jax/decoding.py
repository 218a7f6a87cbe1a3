"""Plain autoregressive decoding: prefill, then one jitted `lax.while_loop` over tokens.

Prompts are right-padded into a length bucket and the cache size is derived from the
bucket and the token budget (rounded up to 128 slots); the budget itself is a traced value,
so a new prompt in the same bucket, or a new max_new_tokens that fits the same cache,
reuses the compiled loop.
Each sequence keeps its own length: the batch may mix prompt lengths.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax import cache as kv
from kangaroo_jax.model import Llama
from kangaroo_jax.precision import as_computed, cache_dtype
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


def token_capacity(prompt_bucket: int, max_new_tokens: int, extra: int = 0) -> int:
  """The most new tokens the cache of `cache_size(prompt_bucket, max_new_tokens, extra)` holds.

  The decode loops are compiled for this capacity and take the budget itself as a traced
  value, so every budget that rounds to the same cache size runs the same compiled loop
  (changing max_new_tokens from 100 to 120 compiles nothing new)."""
  return cache_size(prompt_bucket, max_new_tokens, extra) - prompt_bucket - extra


def plain_capacity(model: Llama, prompt_bucket: int, max_new_tokens: int) -> int:
  """`token_capacity` for plain decoding, whose steps of `model.step_width` rows reach
  step_width - 1 slots past their token: the cache `_plain_start` makes for it is then
  `cache_size(prompt_bucket, max_new_tokens, step_width - 1)`, not 128 slots more."""
  return token_capacity(prompt_bucket, max_new_tokens, model.step_width - 1)


def on_mesh(mesh):
  """The context the decode loops run in: `jax.set_mesh(mesh)`, so caches shard; else none."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def place_batch(mesh, *arrays):
  """Puts [B, ...] arrays on the mesh's 'data' axis (replicated if B does not divide)."""
  if mesh is None:
    return tuple(jnp.asarray(a) for a in arrays)
  from kangaroo_jax.sharding import data_sharding
  if arrays[0].shape[0] % mesh.shape["data"]:
    return tuple(jnp.asarray(a) for a in arrays)
  return tuple(jax.device_put(a, data_sharding(mesh)) for a in arrays)


def pad_prompts(prompts: Sequence[Sequence[int]], max_positions: int,
                max_new_tokens: int, extra: int = 0,
                min_bucket: int = MIN_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into [B, bucket] int32 plus lengths [B]; checks the sizes.

  The longest prompt, `max_new_tokens` and `extra` positions (a Kangaroo round's block)
  must fit the model's `max_positions`. The bucket is at least `min_bucket` (a chat asks
  for room to grow: every new bucket is a new shape, compiled anew).
  """
  if not prompts:
    raise PromptError("no prompts given")
  lens = [len(p) for p in prompts]
  if min(lens) == 0:
    raise PromptError("empty prompt: it must hold at least one token")
  if max(lens) + max_new_tokens + extra > max_positions:
    raise PromptError(_too_long(max(lens), max_new_tokens, extra, max_positions))
  width = bucket(max(lens), min_bucket)
  tokens = np.full((len(prompts), width), PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, np.asarray(lens, np.int32)


def _too_long(prompt: int, max_new_tokens: int, extra: int, max_positions: int) -> str:
  """The error for a prompt that does not fit: the numbers the caller gave, and what fits.

  `extra` (slots the decoder adds itself) is named apart from the budget asked for, so
  that the message repeats the caller's max_new_tokens rather than a sum of both. Each
  suggestion fits as given: fewer new tokens with this prompt, or a prompt short enough
  for the max_new_tokens asked for.
  """
  kept = f" and {extra} positions a Kangaroo round needs" if extra else ""
  room = max_positions - prompt - extra  # new tokens that fit beside this prompt
  short = max_positions - extra - max_new_tokens  # prompt tokens that fit beside the budget
  fixes = []
  if room >= 1:
    fixes.append(f"ask for at most {room} new tokens")
  if short >= 1:
    fixes.append(f"shorten the prompt to at most {short} tokens")
  else:
    fixes.append(f"ask for at most {max_positions - extra - 1} new tokens and shorten the "
                 "prompt to fit beside them")
  return (f"prompt of {prompt} tokens plus {max_new_tokens} new tokens{kept} exceeds the "
          f"model's {max_positions} positions: {' or '.join(fixes)}")


@dataclasses.dataclass
class DecodeResult:
  """Generated token ids per sequence (EOS included when hit) and timing/statistics.

  `seconds` (and stats["seconds"], stats["tokens_per_second"]) time the decoding alone:
  the steps after the first token. The prompt pass that gives the first token is timed
  apart (stats["prefill_seconds"]), and so is compiling the loop for new shapes
  (stats["compile_seconds"]); see `timing_stats`.
  """
  tokens: list[list[int]]
  seconds: float
  stats: dict


def timing_stats(new_tokens: int, sequences: int, prefill_seconds: float, seconds: float,
                 compile_seconds: float) -> dict:
  """The timing part of a decode's stats.

  tokens_per_second is the decoding speed: the tokens the steps after the prefill made
  (each sequence's first token comes from the prompt pass) over their time, `seconds`.
  The prompt pass (prefill_seconds: the prompt through every layer, the first token)
  grows with the prompt and is the same work in every mode, so it is kept apart, as the
  time to first token; total_seconds (prefill and decoding) is the whole request,
  request_tokens_per_second all new tokens over it. Compiling is in none of them.
  """
  decoded = new_tokens - sequences
  total = prefill_seconds + seconds
  return {"new_tokens": new_tokens, "decoded_tokens": decoded, "seconds": seconds,
          "tokens_per_second": decoded / seconds if seconds > 0 else 0.0,
          "prefill_seconds": prefill_seconds, "total_seconds": total,
          "request_tokens_per_second": new_tokens / total if total > 0 else 0.0,
          "compile_seconds": compile_seconds}


def compile_ahead(jitted: Callable, *args, **kwargs) -> float:
  """Compiles `jitted` for these arguments without running it; returns the seconds it took.

  The call that follows with the same arguments finds the program in JAX's caches (the
  same ones a plain call fills: it is compiled once), so timing that call times decoding
  alone. About 0 s when the program is compiled already, the load time when it comes
  from the persistent compilation cache.
  """
  start = time.perf_counter()
  jitted.lower(*args, **kwargs).compile()
  return time.perf_counter() - start


NOTE_AFTER = 1.0  # seconds a compile runs before `compile_noted` says so on stderr


def compile_noted(what: str, jitted: Callable, *args, **kwargs) -> float:
  """`compile_ahead`, with one stderr line when it takes over NOTE_AFTER seconds:
  "compiling WHAT ..." as it starts to show, then the seconds it took on the same line.

  A compile on new shapes takes seconds to a minute on a CPU, and nothing else would
  say why the answer stalls; a program already compiled (or quickly loaded from the
  persistent cache) says nothing.
  """
  lock, state = threading.Lock(), {"done": False, "shown": False}

  def note():
    with lock:
      if not state["done"]:
        sys.stderr.write(f"compiling {what} ...")
        sys.stderr.flush()
        state["shown"] = True

  timer = threading.Timer(NOTE_AFTER, note)
  timer.daemon = True
  timer.start()
  try:
    seconds = compile_ahead(jitted, *args, **kwargs)
  finally:
    timer.cancel()
    with lock:
      state["done"] = True
  if state["shown"]:
    sys.stderr.write(f" {seconds:.1f} s\n")
    sys.stderr.flush()
  return seconds


# ---- streaming: the host steps the loop and reads new tokens between calls ----
# A loop that called back into Python (jax.debug.callback) could not be stored in JAX's
# persistent compilation cache, and its callbacks ran on an XLA thread that aborted the
# process when Python exited mid-decode. Instead a streamed decode runs in calls of a few
# steps each, in the caller's thread; the loop state stays on the device (donated).
STREAM_STEPS = 1  # loop iterations per call when streaming: one token (or round) each


def new_tokens(out: np.ndarray, count: np.ndarray,
               shown: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The tokens in out [B, N] past `shown` [B] up to `count` [B]: ([B, C], counts [B])."""
  n_new = count - shown
  width = max(1, int(n_new.max()))
  cols = np.minimum(shown[:, None] + np.arange(width)[None], out.shape[1] - 1)  # [B, C]
  return np.take_along_axis(out, cols, axis=1), n_new


def drain(steps, on_tokens: Optional[Callable]):
  """Runs a step generator to its end, handing each step's new tokens to `on_tokens`."""
  while True:
    try:
      tokens, counts = next(steps)
    except StopIteration as stop:
      return stop.value
    if on_tokens is not None:
      on_tokens(tokens, counts)


def timed_calls(mesh, start: Callable, start_args: tuple, start_static: dict, run: Callable,
                run_args: Callable, run_static: dict, read: Callable, per_call: Optional[int],
                name: str):
  """Runs a decode as a prefill call and loop calls, timed the way the stats report it.

  Args:
    name: what the compile notes call the decode (`compile_noted`), e.g. "Kangaroo".
    start: the jitted prefill, `start(*start_args, **start_static)` -> loop state.
    run: the jitted loop, `run(*run_args(state, until), **run_static)` -> loop state, stopping
      at step (or round) `until`, at the token budget, or when every sequence is done.
    read: loop state -> host dict with "out" [B, N], "count" [B], "done" [B] and
      "progress" (steps or rounds so far).
    per_call: loop iterations per `run` call (streaming), or None: to the end in one call.
  Yields (tokens [B, C], counts [B]) after the prefill and after each call; returns
  (the last host dict, {prefill_seconds, seconds, compile_seconds}): compiling (each
  program once, the loop's after the first token is out) is timed apart from both.
  """
  with on_mesh(mesh):
    compile_seconds = compile_noted(f"{name}'s prompt pass", start, *start_args, **start_static)
    began = time.perf_counter()
    st = start(*start_args, **start_static)
  host = read(st)  # reading the first token back waits for the prompt pass
  prefill_seconds = time.perf_counter() - began
  began, shown, run_compiled = time.perf_counter(), np.zeros_like(host["count"]), False
  compile_before = compile_seconds
  while True:
    yield new_tokens(host["out"], host["count"], shown)
    shown = host["count"]
    if host["done"].all():
      seconds = time.perf_counter() - began - (compile_seconds - compile_before)
      return host, dict(prefill_seconds=prefill_seconds, seconds=seconds,
                        compile_seconds=compile_seconds)
    until = UNTIL_DONE if per_call is None else int(host["progress"]) + per_call
    args = run_args(st, jnp.int32(until))
    with on_mesh(mesh):
      if not run_compiled:
        compile_seconds += compile_noted(f"{name}'s loop", run, *args, **run_static)
        run_compiled = True
      st = run(*args, **run_static)
    host = read(st)


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


def _own_top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The model's own top-k (ids [B, k], probabilities [B, k]) from raw logits [B, V].

  Temperature 1 and no truncation: a distillation teacher is the model itself, however
  its tokens were sampled.
  """
  probs_k, ids_k = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)  # [B, k] each
  return ids_k, probs_k


def _plain_start(model: Llama, tokens, prompt_lens, rng, eos_ids, limit, params: SamplingParams,
                 capacity: int, top_k: int = 0) -> dict:
  """Prefill and the first token: the loop state (see `_plain_run`).

  `capacity` (static) sizes the output and the cache; `limit` ([] int32, <= capacity) is
  the token budget. With `top_k` > 0 the state also records, per new token, the model's
  own top-k (`top_ids`, `top_probs`: [B, capacity, top_k]) for self-distillation.
  """
  b = tokens.shape[0]
  # A step's padding rows reach step_width - 1 slots past its token.
  cache = kv.init_model_cache(model.cfg, b, cache_size(tokens.shape[1], capacity,
                                                       model.step_width - 1),
                              cache_dtype(model.activations, model.platform))
  hidden, cache = prefill(model, tokens, prompt_lens, cache)
  rng, sub = jax.random.split(rng)
  # Tokens seen so far, for the repetition penalty ([B, 1] placeholder without one).
  seen = init_seen(tokens, prompt_lens, model.cfg.vocab_size, params)
  logits = model.logits(last_hidden(hidden, prompt_lens))[:, 0]  # [B, V]
  first = sample(penalize(logits, seen, params), params, sub)  # [B]
  seen = mark_seen(seen, first[:, None], jnp.ones((b, 1), bool), params)
  out = jnp.zeros((b, capacity), jnp.int32).at[:, 0].set(first)
  done = is_eos(first, eos_ids) | (limit <= 1)
  st = dict(step=jnp.int32(1), tok=first, lens=prompt_lens, out=out, done=done, cache=cache,
            rng=rng, seen=seen, count=jnp.ones((b,), jnp.int32), limit=jnp.asarray(limit, jnp.int32))
  if top_k:
    ids_k, probs_k = _own_top_k(logits, top_k)
    st["top_ids"] = jnp.zeros((b, capacity, top_k), jnp.int32).at[:, 0].set(ids_k)
    st["top_probs"] = jnp.zeros((b, capacity, top_k), jnp.float32).at[:, 0].set(probs_k)
  return st


def _plain_run(model: Llama, st: dict, eos_ids, until, params: SamplingParams) -> dict:
  """Decodes one token per step until step `until`, the token limit or every EOS.

  Records the model's own top-k per token when `_plain_start` was given a `top_k`.
  """

  def cond(s):
    return (s["step"] < jnp.minimum(until, s["limit"])) & ~jnp.all(s["done"])

  def body(s):
    done = s["done"]
    # The token, then step_width - 1 padding rows (copies of it; their results are
    # dropped and their cache slots rewritten before any position attends them): every
    # step has the shape a Kangaroo verification has (`precision`, fixed-width steps).
    w = model.step_width
    tokens = jnp.broadcast_to(s["tok"][:, None], (s["tok"].shape[0], w))  # [B, W]
    positions = s["lens"][:, None] + jnp.arange(w)[None]  # [B, W]
    logits, cache = model(tokens, positions, s["cache"])  # [B, W, V]
    if w > 1:  # every row stays computed: XLA could otherwise move the slice below into
      # the last products and run them over one row, not the W rows a verification runs.
      logits = jax.lax.optimization_barrier(logits)
    logits = logits[:, :1]  # [B, 1, V]: the token's row
    rng, sub = jax.random.split(s["rng"])
    nxt = sample(penalize(logits[:, 0], s["seen"], params), params, sub)
    nxt = jnp.where(done, PAD_ID, nxt)
    live = (~done).astype(jnp.int32)
    new = dict(step=s["step"] + 1, tok=nxt, lens=s["lens"] + live,
               out=s["out"].at[:, s["step"]].set(nxt),
               done=done | is_eos(nxt, eos_ids) | (s["step"] + 1 >= s["limit"]),
               cache=cache, rng=rng, seen=mark_seen(s["seen"], nxt[:, None], ~done[:, None], params),
               count=s["count"] + live, limit=s["limit"])
    if "top_ids" in s:
      ids_k, probs_k = _own_top_k(logits[:, 0], s["top_ids"].shape[-1])
      new["top_ids"] = s["top_ids"].at[:, s["step"]].set(ids_k)
      new["top_probs"] = s["top_probs"].at[:, s["step"]].set(probs_k)
    return new

  return jax.lax.while_loop(cond, body, st)


# The budget (`limit`) is traced, the capacity static: see `token_capacity`.
_STATIC = ("graphdef", "params", "capacity")
# `until` for a loop that runs to its end (EOS or the budget), not a streaming chunk.
UNTIL_DONE = jnp.iinfo(jnp.int32).max


@functools.partial(jax.jit, static_argnames=_STATIC)
def _plain_loop(graphdef, state, tokens, prompt_lens, rng, eos_ids, limit, *,
                params: SamplingParams, capacity: int):
  """The whole decode in one program: (out [B, capacity], new token counts [B], steps).

  Decoding does not run it: it runs the prompt pass (`_plain_stream_start`), then loop
  calls (`_plain_stream_run`) on the donated state, and the HLO checks read those. This
  one program remains for tests that lower a whole decode (tests/test_tensor_parallel.py,
  tests/test_decoding.py, tests/test_streaming.py).
  """
  model = nnx.merge(graphdef, state)
  st = _plain_start(model, tokens, prompt_lens, rng, eos_ids, limit, params, capacity)
  st = _plain_run(model, st, eos_ids, UNTIL_DONE, params)
  return st["out"], st["count"], st["step"]


@functools.partial(jax.jit, static_argnames=_STATIC + ("top_k",))
def plain_loop_with_top_k(graphdef, state, tokens, prompt_lens, rng, eos_ids, limit, *,
                          params: SamplingParams, capacity: int, top_k: int):
  """Plain decoding that also records the model's own top-k for every new token.

  Args as `_plain_loop` (device arrays; see `plain_decode` for the host side, and
  `token_capacity` for a `capacity` >= the budget `limit`), plus `top_k`. Returns
  (out [B, C], top ids [B, C, top_k], top probabilities [B, C, top_k], new token counts
  [B]) with C = capacity; row j of a sequence is the distribution its token j was drawn
  from, before the sampling's temperature / top-p.
  """
  model = nnx.merge(graphdef, state)
  st = _plain_start(model, tokens, prompt_lens, rng, eos_ids, limit, params, capacity, top_k)
  st = _plain_run(model, st, eos_ids, UNTIL_DONE, params)
  return st["out"], st["top_ids"], st["top_probs"], st["count"]


@functools.partial(jax.jit, static_argnames=_STATIC)
def _plain_stream_start(graphdef, state, tokens, prompt_lens, rng, eos_ids, limit, *,
                        params: SamplingParams, capacity: int) -> dict:
  return _plain_start(nnx.merge(graphdef, state), tokens, prompt_lens, rng, eos_ids, limit,
                      params, capacity)


# The state is donated: its KV cache is updated in place, not copied per call.
@functools.partial(jax.jit, static_argnames=("graphdef", "params"), donate_argnames=("st",))
def _plain_stream_run(graphdef, state, st, eos_ids, until, *, params: SamplingParams) -> dict:
  return _plain_run(nnx.merge(graphdef, state), st, eos_ids, until, params)


def _check_budget(max_new_tokens: int) -> None:
  if max_new_tokens < 1:
    raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def plain_decode(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 params: SamplingParams = SamplingParams(), seed: int = 0,
                 eos_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None,
                 mesh=None, min_bucket: int = MIN_BUCKET) -> DecodeResult:
  """Decodes token prompts with the target model alone.

  Args:
    model: the target model.
    prompts: token id lists, one per sequence (lengths may differ).
    max_new_tokens: new tokens per sequence at most.
    params: greedy when temperature is 0, else sampling; optional repetition penalty.
    seed: PRNG seed for sampling.
    eos_ids: generation of a sequence stops after any of these.
    on_tokens: optional streaming sink `fn(tokens [B, C], counts [B])`, called in this
      thread after each step (see `plain_stream`).
    mesh: optional ('data', 'model') mesh; shard the model with `shard_module` first.
    min_bucket: the smallest padded prompt length (`bucket`; a power of two).
  Returns:
    DecodeResult with each sequence's new tokens (EOS included) and timings: the prompt
    pass, then the loop to its end in one call (`timing_stats`).
  """
  steps = _plain_calls(model, prompts, max_new_tokens, params, seed, eos_ids, mesh,
                       None if on_tokens is None else STREAM_STEPS, min_bucket)
  return drain(steps, on_tokens)


def plain_stream(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 params: SamplingParams = SamplingParams(), seed: int = 0,
                 eos_ids: Sequence[int] = (), mesh=None, min_bucket: int = MIN_BUCKET):
  """Like `plain_decode`, as a generator: yields (tokens [B, C], counts [B]) per step.

  The generator's return value (StopIteration.value) is the DecodeResult. Closing it
  early stops decoding after the current step. The output equals `plain_decode`'s.
  """
  return _plain_calls(model, prompts, max_new_tokens, params, seed, eos_ids, mesh,
                      STREAM_STEPS, min_bucket)


def _plain_calls(model, prompts, max_new_tokens, params, seed, eos_ids, mesh, per_call,
                 min_bucket):
  """Plain decoding as `timed_calls`: the prefill, then `per_call` steps a call (None: all)."""
  _check_budget(max_new_tokens)
  tokens, lens = pad_prompts(prompts, model.cfg.max_position_embeddings, max_new_tokens,
                             min_bucket=min_bucket)
  graphdef, state = nnx.split(model)
  state = as_computed(state, model.platform)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  tokens, lens = place_batch(mesh, tokens, lens)
  first = (graphdef, state, tokens, lens, jax.random.key(seed), eos, jnp.int32(max_new_tokens))
  capacity = plain_capacity(model, tokens.shape[1], max_new_tokens)

  def read(st):
    host = jax.device_get({k: st[k] for k in ("out", "count", "done", "step")})
    return dict(host, progress=host["step"])

  host, timing = yield from timed_calls(
      mesh, _plain_stream_start, first, dict(params=params, capacity=capacity),
      _plain_stream_run, lambda st, until: (graphdef, state, st, eos, until),
      dict(params=params), read, per_call,
      f"plain decoding ({tokens.shape[1]}-token prompt bucket, room for {capacity} new tokens)")
  return _plain_result(host["out"], host["count"], int(host["step"]), len(prompts), timing)


def _plain_result(out: np.ndarray, counts: np.ndarray, steps: int, n: int,
                  timing: dict) -> DecodeResult:
  seqs = [out[i, :counts[i]].tolist() for i in range(n)]
  stats = timing_stats(int(counts.sum()), n, **timing)
  return DecodeResult(seqs, stats["seconds"], dict(stats, steps=steps, mean_accepted_tokens=1.0))
