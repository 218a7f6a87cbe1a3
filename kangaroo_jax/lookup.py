"""Prompt-lookup drafting: free drafts copied from the sequence's own earlier text.

Beyond the paper. Many answers repeat their prompt or themselves (extraction, RAG,
summaries, translations, code): when the last `ngram` tokens, ending at the pending
token y0, occurred earlier in the sequence, the tokens that followed that occurrence are
a draft that costs no draft step at all. A round with such a proposal for every live
sequence skips the adapter and verifies the proposal instead (see `kangaroo.py`); the
verification is the same, so the output is still exactly plain decoding's. Under
sampling the proposal is a draft whose distribution is one-hot, which speculative
sampling accepts with probability p(token): lossless too.

The sequence's tokens live in a history [B, S] indexed by position (prompt, committed
tokens, y0), written as rounds commit; positions past y0 hold stale tokens and are never
matched or proposed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_history(tokens: jax.Array, size: int) -> jax.Array:
  """History [B, size]: the right-padded prompts [B, P]; later positions are written by
  `record` (slots past each prompt hold padding until then, never read)."""
  return jnp.pad(tokens, ((0, 0), (0, size - tokens.shape[1])))  # [B, S]


def record(history: jax.Array, start: jax.Array, tokens: jax.Array, count: jax.Array) -> jax.Array:
  """Writes tokens[:, :count] [B, K] at positions start.. [B]; the rest are dropped."""
  k = tokens.shape[1]
  j = jnp.arange(k)[None]  # [1, K]
  # Unwritten entries go past the end, where mode="drop" ignores them.
  slots = jnp.where(j < count[:, None], start[:, None] + j, history.shape[1])  # [B, K]
  return history.at[jnp.arange(history.shape[0])[:, None], slots].set(tokens, mode="drop")


def propose(history: jax.Array, n: jax.Array, ngram: int, width: int):
  """The tokens that followed the latest earlier occurrence of the n-gram ending at n.

  history [B, S]: tokens by position, valid up to n [B] (the pending token).
  Returns (proposal [B, width], count [B]): count tokens proposed (0: no match), at most
  `width` and never past position n (only known tokens are copied).
  """
  b, s = history.shape
  starts = s - ngram + 1  # candidate match starts j = 0 .. S - ngram
  tail_pos = n[:, None] - ngram + 1 + jnp.arange(ngram)[None]  # [B, ngram]
  tail = jnp.take_along_axis(history, jnp.clip(tail_pos, 0, s - 1), axis=1)  # [B, ngram]
  match = jnp.ones((b, starts), bool)
  for i in range(ngram):  # window j matches when history[j + i] == tail[i] for every i
    match &= history[:, i:i + starts] == tail[:, i:i + 1]  # [B, S - ngram + 1]
  j = jnp.arange(starts)[None]  # [1, S - ngram + 1]
  # A match must end before the tail itself does (at n - 1 or earlier).
  match &= (j + ngram <= n[:, None]) & (n[:, None] >= ngram)
  latest = jnp.max(jnp.where(match, j, -1), axis=1)  # [B]: -1 when none
  first = latest + ngram  # [B]: position of the first proposed token
  count = jnp.where(latest >= 0, jnp.clip(n - first + 1, 0, width), 0)  # [B]
  pos = jnp.clip(first[:, None] + jnp.arange(width)[None], 0, s - 1)  # [B, width]
  return jnp.take_along_axis(history, pos, axis=1), count


def proposal_states(model, adapter, proposal: jax.Array, h0: jax.Array, h_prev: jax.Array,
                    n: jax.Array, cache: dict, acache: dict, t: int):
  """Layer-l states of a proposal's first t tokens and the keys/values its round must
  write; the caches are only read.

  proposal [B, W] at positions n + 1 .. n + W (y0 at n is already in the shallow cache,
  with layer-l state h0 [B, D]; h_prev [B, D] is the state before it). The adapter runs
  over positions n - 1 .. n + t, as its draft steps would have: a later adapter draft
  attends those slots. Everything is zero-padded to W positions (slots past the block,
  which later rounds overwrite before reading them).
  Returns (hidden [B, W, D], shallow {"k", "v": [l x [B, W, K, H]]} at n + 1 ..,
  adapter {"k", "v": [[B, W + 2, Ka, Ha]]} at n - 1 ..).
  """
  l = adapter.acfg.exit_layer
  w = proposal.shape[1]
  positions = n[:, None] + 1 + jnp.arange(t)[None]  # [B, t]
  hidden, shallow = model.run_layers_block(model.embed(proposal[:, :t]), positions, cache, 0, l)
  states = jnp.concatenate([h_prev[:, None], h0[:, None], hidden], axis=1)  # [B, t + 2, D]
  apos = n[:, None] - 1 + jnp.arange(t + 2)[None]  # [B, t + 2]
  _, adapter_kv = adapter(states, apos, acache, write=False)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, w - t)] + [(0, 0)] * (x.ndim - 2))  # [B, W(+2), ...]
  return pad(hidden), jax.tree.map(pad, shallow), jax.tree.map(pad, adapter_kv)


def cached_states(cache: dict, acache: dict, n: jax.Array, l: int, w: int, d: int, dtype):
  """What `proposal_states` returns when no proposal is verified: zero states and the
  keys/values the caches already hold at those slots, so writing them changes nothing."""
  s = cache["k"][0].shape[1]
  at = lambda x, pos: jnp.take_along_axis(x, jnp.clip(pos, 0, s - 1)[:, :, None, None], axis=1)
  positions = n[:, None] + 1 + jnp.arange(w)[None]  # [B, W]
  apos = n[:, None] - 1 + jnp.arange(w + 2)[None]  # [B, W + 2]
  shallow = {name: [at(x, positions) for x in cache[name][:l]] for name in ("k", "v")}
  adapter_kv = {name: [at(acache[name][0], apos)] for name in ("k", "v")}
  return jnp.zeros((n.shape[0], w, d), dtype), shallow, adapter_kv
