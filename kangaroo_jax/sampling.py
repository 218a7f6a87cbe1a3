"""Turning logits into tokens: greedy, temperature, top-k, top-p.

`SamplingParams` is static under jit (a frozen dataclass), so each setting compiles once.
`probs` gives the processed distribution that both plain sampling and Kangaroo's
speculative acceptance use: draft and target must be processed identically.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
  """Invalid sampling arguments; the message names the argument."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature, top-k and top-p on float32 logits [..., V]; removed tokens get -inf."""
  logits = logits.astype(jnp.float32) / params.temperature
  if params.top_k:
    kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]  # [..., 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if params.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [..., V], descending
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
    # strictly before it is < top_p. The cutoff is the last kept logit.
    keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < params.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


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
