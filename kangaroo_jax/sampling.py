"""Turning logits into tokens: repetition penalty, greedy, temperature, top-k, top-p.

`SamplingParams` is static under jit (a frozen dataclass), so each setting compiles once.
`probs` gives the processed distribution that both plain sampling and Kangaroo's
speculative acceptance use: draft and target must be processed identically.

The repetition penalty (transformers' `repetition_penalty`) depends on which tokens the
sequence already holds, so it is applied separately (`penalize`) with a [B, V] "seen" mask
that the decode loops keep (`init_seen`, `mark_seen`); it comes before temperature and
truncation, as in transformers' logits-processor order.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
  """Invalid sampling arguments; the message names the argument."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation.

  repetition_penalty: transformers' definition: the logit of every token the sequence
  already holds (prompt and generated) is divided by it when positive, multiplied by it
  when negative. 1.0 means none (and costs nothing); > 1 discourages repeats.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
    if not self.repetition_penalty > 0:
      raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def penalized(self) -> bool:
    return self.repetition_penalty != 1.0


def init_seen(tokens: jax.Array, lens: jax.Array, vocab: int,
              params: SamplingParams) -> jax.Array:
  """Which tokens each prompt holds: [B, V] bool from right-padded tokens [B, P], lens [B].

  Without a penalty the mask is never read, so a [B, 1] placeholder keeps loops cheap.
  """
  b, width = tokens.shape
  if not params.penalized:
    return jnp.zeros((b, 1), bool)
  real = jnp.arange(width)[None] < lens[:, None]  # [B, P]: padding is not part of the prompt
  return mark_seen(jnp.zeros((b, vocab), bool), tokens, real, params)


def mark_seen(seen: jax.Array, tokens: jax.Array, valid: jax.Array,
              params: SamplingParams) -> jax.Array:
  """Adds tokens [B, T] where valid [B, T] to the seen mask [B, V]."""
  if not params.penalized:
    return seen
  vocab = seen.shape[1]
  # Invalid entries point past the vocabulary and are dropped, so a duplicate invalid
  # index can never overwrite a valid one.
  cols = jnp.where(valid, tokens, vocab)  # [B, T]
  rows = jnp.arange(seen.shape[0])[:, None]  # [B, 1]
  return seen.at[rows, cols].set(True, mode="drop")


def penalize(logits: jax.Array, seen: jax.Array, params: SamplingParams) -> jax.Array:
  """transformers' repetition penalty on logits [..., V] given seen [..., V] (broadcast).

  Seen tokens' logits are divided by the penalty when positive and multiplied when
  negative, so a penalty > 1 always lowers them. Returns float32 logits.
  """
  if not params.penalized:
    return logits
  logits = logits.astype(jnp.float32)
  r = params.repetition_penalty
  return jnp.where(seen, jnp.where(logits < 0, logits * r, logits / r), logits)


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature, top-k and top-p on float32 logits [..., V]; removed tokens get -inf.

  Truncation picks tokens by their rank (the indices `top_k` and the sort return), never
  by comparing logits with a threshold value: a compiler may recompute the scaled logits
  in another fusion with other rounding (seen on a GPU, where every token then fell
  below its own k-th value and sampling returned token 0). By rank, top-k keeps exactly
  k tokens (ties toward the lower id) and top-p at least the most likely one.
  """
  logits = logits.astype(jnp.float32) / params.temperature
  # A top_k above the vocabulary keeps every token (as transformers does); the draft's
  # reduced vocabulary is often smaller than the top_k the target samples with.
  if 0 < params.top_k < logits.shape[-1]:
    ids = jax.lax.top_k(logits, params.top_k)[1]  # [..., k]
    logits = jnp.where(_mark(logits, ids, True), logits, -jnp.inf)
  if params.top_p < 1.0:
    sorted_logits, order = jax.lax.top_k(logits, logits.shape[-1])  # [..., V] each, descending
    mass = jax.nn.softmax(sorted_logits, axis=-1)  # [..., V]
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
    # strictly before it is < top_p; the most likely token always stays.
    keep = ((jnp.cumsum(mass, axis=-1) - mass) < params.top_p).at[..., 0].set(True)
    logits = jnp.where(_mark(logits, order, keep), logits, -jnp.inf)
  return logits


def _mark(logits: jax.Array, ids: jax.Array, values) -> jax.Array:
  """A [..., V] bool mask with `values` at token ids [..., N] (False elsewhere)."""
  return jnp.put_along_axis(jnp.zeros(logits.shape, bool), ids, values, axis=-1,
                            inplace=False)


def probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """The processed sampling distribution [..., V] (one-hot argmax when greedy)."""
  if params.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(process_logits(logits, params), axis=-1)


def sample(logits: jax.Array, params: SamplingParams, rng: jax.Array) -> jax.Array:
  """Draws tokens [...] from logits [..., V]."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, process_logits(logits, params), axis=-1).astype(jnp.int32)
