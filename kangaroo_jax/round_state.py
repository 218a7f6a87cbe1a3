"""The Kangaroo loop's state between rounds: one pytree, a new one per round."""
from __future__ import annotations

import jax
from flax import struct

from kangaroo_jax import cache as kv


@struct.dataclass
class RoundState:
  """Everything a round reads and the next round needs (per sequence unless noted).

  n [B]: position of the pending token y0 (= committed tokens before it).
  y0 [B]: the pending token: the target's own last token, committed, not yet in the
    deep layers' cache.
  h_prev [B, D]: layer-l state of the token before y0 (the adapter re-reads that slot).
  cache: the model's KV cache (shallow and deep layers); acache: the adapter's.
  rng: PRNG key (sampling and speculative acceptance).
  out [B, C]: tokens generated so far (C = the loop's static token capacity + gamma + 1;
    PAD after count).
  count [B]: tokens in `out`.
  done [B]: EOS seen or the token budget reached.
  rounds [B], drafts [B], drafts_verified [B]: rounds this sequence took part in, draft
    steps run, drafts sent to verification (statistics).
  total_rounds []: loop iterations run (the streaming loop stops at a given count).
  seen [B, V] (or a [B, 1] placeholder without a repetition penalty): tokens the sequence
    holds, y0 included.
  history [B, S]: the sequence's tokens by position up to y0 (prompt lookup, see
    `kangaroo_jax.lookup`; later slots are stale); lookup_rounds [B]: rounds that
    verified a lookup proposal (statistics).
  limit []: the token budget (max_new_tokens), traced so that budgets that fit the same
    cache share one compiled loop (`decoding.token_capacity`).
  """
  n: jax.Array
  y0: jax.Array
  h_prev: jax.Array
  cache: kv.KVCache
  acache: kv.KVCache
  rng: jax.Array
  out: jax.Array
  count: jax.Array
  done: jax.Array
  rounds: jax.Array
  drafts: jax.Array
  drafts_verified: jax.Array
  total_rounds: jax.Array
  seen: jax.Array
  history: jax.Array
  lookup_rounds: jax.Array
  limit: jax.Array


@struct.dataclass
class Verdict:
  """One round's outcome, the same for chain and tree drafting.

  tokens [B, K]: y0 then the accepted drafts (entries past `accepted` are unused),
  K = gamma + 1; hidden [B, K, D]: their layer-l states; accepted [B]: drafts accepted;
  next_token [B]: the target's own token after them; verified [B]: drafts verified;
  steps [B]: draft steps run; looked_up [B]: the drafts came from prompt lookup.
  """
  tokens: jax.Array
  hidden: jax.Array
  accepted: jax.Array
  next_token: jax.Array
  verified: jax.Array
  steps: jax.Array
  looked_up: jax.Array
