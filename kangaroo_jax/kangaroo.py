"""Kangaroo decoding: double early-exit drafting and one-pass verification.

One round, per sequence, with pending token y0 at position n:

  draft (`_draft`, a `lax.while_loop`):  shallow layers [0, l) on y_i -> h_i;
      adapter + LM head on h_i -> q_i -> draft y_{i+1}; stop when max q_i < eta
      (second early exit) or after gamma drafts. The unconfident draft is verified too
      (the paper) or dropped (`send_unconfident=False`, cheaper where verifying one more
      position costs much). The shallow layers also run on the last draft, so the block
      [y_0 .. y_k] has all its layer-l states.
  verify (`_verify`): deep layers [l, L) once over a block of layer-l states (the
      shallow layers are not recomputed), accept the longest agreeing prefix (greedy:
      `_greedy_verdict`, the head one position at a time, as plain decoding computes it)
      or use speculative sampling (`_judge`), and append the target's own next token. On a
      CPU each row is computed with plain decoding's shapes, so the output equals plain
      decoding's by construction in float32 activations (`kangaroo_jax.precision`). With
      fixed-width steps (`Llama.step_width` > 1, the default off a CPU) `_verify_fixed`
      instead runs every layer over exactly step_width rows, as each plain step does, so
      the output equals plain decoding's by construction (`kangaroo_jax.precision`).
  roll back: the next round starts at n + accepted + 1. Every cache (shallow, deep,
      adapter) simply overwrites the stale slots; nothing is copied back.

The adapter always processes two positions per step, the previous and the current
state. Rewriting the previous slot is idempotent, and it fills the one slot a round
that accepted every draft left empty (the adapter never saw the last draft).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from kangaroo_jax import cache as kv
from kangaroo_jax.adapter import Adapter, check_draft_ids
from kangaroo_jax.decoding import (MIN_BUCKET, PAD_ID, STREAM_STEPS, DecodeResult, PromptError,
                                   cache_size,
                                   drain, is_eos, last_hidden, pad_prompts, place_batch, prefill,
                                   timed_calls, timing_stats, token_capacity, UNTIL_DONE)
from kangaroo_jax.lookup import cached_states, init_history, proposal_states, propose, record
from kangaroo_jax.model import Llama
from kangaroo_jax.precision import as_computed, cache_dtype
from kangaroo_jax.round_state import RoundState, Verdict
from kangaroo_jax.sampling import (SamplingParams, init_seen, mark_seen, penalize, probs,
                                   process_logits, sample)
from kangaroo_jax.tree import check_tree, tree_round


@dataclasses.dataclass(frozen=True)
class KangarooParams:
  """Drafting settings.

  eta: stop drafting when the draft's top-1 probability < eta (second early exit).
  gamma: drafts per round at most.
  send_unconfident: the paper sends the draft that fell below eta to verification too.
    False drops it, so a round whose first draft is unsure verifies the pending token
    alone, a plain step. Either way the output is lossless: which drafts are sent
    depends on the draft's own probabilities only. False pays where verifying one more
    position is expensive (on a CPU a block of 2 costs ~1.5 plain steps, of 1 about 1).
  tree_nodes: draft a token tree and verify its best `tree_nodes` nodes (greedy only;
    0 = the chain). gamma is then the tree's depth.
  tree_topk: children per expanded node and nodes expanded per depth (tree mode).
  lookup: prompt-lookup drafting (beyond the paper, see `kangaroo_jax.lookup`): a round
    in which every live sequence's last `lookup_ngram` tokens occurred earlier in it
    verifies up to `lookup` tokens that followed there instead of drafting with the
    adapter (0 = off; chain drafting only).
  lookup_ngram: tokens that must match for a lookup proposal.
  """
  eta: float = 0.6
  gamma: int = 6
  send_unconfident: bool = True
  tree_nodes: int = 0
  tree_topk: int = 4
  lookup: int = 0
  lookup_ngram: int = 3

  @property
  def tree(self) -> Optional[tuple[int, int]]:
    """(nodes, top-k) in tree mode, None for the chain: static under jit."""
    return (self.tree_nodes, self.tree_topk) if self.tree_nodes else None

  @property
  def lookup_setting(self) -> Optional[tuple[int, int]]:
    """(tokens, n-gram) with prompt lookup, None without: static under jit."""
    return (self.lookup, self.lookup_ngram) if self.lookup else None

  @property
  def block(self) -> int:
    """Most drafts one round can verify (adapter drafts or a lookup proposal)."""
    return max(self.gamma, self.lookup)

  def __post_init__(self):
    if not 0 < self.eta <= 1:
      raise ValueError(f"eta (--threshold) must be in (0, 1], got {self.eta}")
    if self.gamma < 1:
      raise ValueError(f"gamma (--max-draft) must be >= 1, got {self.gamma}")
    if self.tree_nodes < 0:
      raise ValueError(f"tree nodes (--tree-nodes) must be >= 0, got {self.tree_nodes}")
    if self.lookup < 0:
      raise ValueError(f"prompt lookup (--lookup) must be >= 0 tokens, got {self.lookup}")
    if self.lookup_ngram < 1:
      raise ValueError(f"prompt lookup n-gram (lookup_ngram) must be >= 1, got {self.lookup_ngram}")
    if self.lookup and self.tree_nodes:
      raise ValueError("prompt lookup (--lookup) works with chain drafting only: "
                       "use --tree-nodes 0 or --lookup 0")


def _draft_distribution(model, adapter_out, draft_head, draft_ids, seen, params):
  """Draft probabilities [B, V'] over the draft vocabulary (processed like the target's).

  `seen` [B, V] holds the tokens before this draft (prompt, output, earlier drafts), so
  the draft applies the same repetition penalty as the target will: that keeps its
  drafts acceptable. Losslessness itself depends only on the target side.
  """
  logits = model.project(adapter_out, draft_head)[:, 0]  # [B, V']
  if params.penalized and draft_ids is not None:
    seen = seen[:, draft_ids]  # [B, V']: the draft vocabulary's columns
  logits = penalize(logits, seen, params)
  if params.greedy:
    return jax.nn.softmax(logits, axis=-1)  # confidence only; the token is the argmax
  return jax.nn.softmax(process_logits(logits, params), axis=-1)


@struct.dataclass
class DraftChain:
  """The draft loop's state, and its result (K = gamma + 1 block positions).

  step []: draft steps taken so far; active [B]: still drafting (confident so far, not
  done); sent [B]: drafts to verify; steps [B]: draft steps run (sent, or sent + 1 when
  an unconfident draft was dropped); tokens [B, K]: the block, y0 then the drafts;
  hidden [B, K, D]: their layer-l states; q [B, gamma, V]: draft distributions over the
  full vocabulary (sampling only, else [B, gamma, 1]); cache, acache, rng, seen: as in
  RoundState, advanced by the drafts.
  """
  step: jax.Array
  active: jax.Array
  sent: jax.Array
  steps: jax.Array
  tokens: jax.Array
  hidden: jax.Array
  q: jax.Array
  cache: kv.KVCache
  acache: kv.KVCache
  rng: jax.Array
  seen: jax.Array


def _draft(model: Llama, adapter: Adapter, draft_head, draft_ids, st: RoundState, eta, *,
           gamma: int, params: SamplingParams, send_unconfident: bool = True,
           skip=False) -> DraftChain:
  """Drafts up to gamma tokens for every sequence (the first and second early exit).

  y0 always runs the shallow layers; `skip` (a lookup round) leaves the rest undone.
  """
  l = adapter.acfg.exit_layer
  b = st.y0.shape[0]
  n = st.n
  vocab = model.cfg.vocab_size
  h0, cache = model.run_layers(model.embed(st.y0[:, None]), n[:, None], st.cache, 0, l)
  zeros = jnp.zeros((b,), jnp.int32)
  init = DraftChain(
      step=jnp.int32(0), active=~st.done & ~skip, sent=zeros, steps=zeros,
      tokens=jnp.zeros((b, gamma + 1), jnp.int32).at[:, 0].set(st.y0),
      hidden=jnp.zeros((b, gamma + 1, h0.shape[-1]), h0.dtype).at[:, 0].set(h0[:, 0]),
      q=jnp.zeros((b, gamma, vocab if not params.greedy else 1), jnp.float32),
      cache=cache, acache=st.acache, rng=st.rng, seen=st.seen)

  def body(d: DraftChain) -> DraftChain:
    i = d.step
    prev = jnp.where(i == 0, st.h_prev, d.hidden[:, jnp.maximum(i - 1, 0)])  # [B, D]
    pair = jnp.stack([prev, d.hidden[:, i]], axis=1)  # [B, 2, D]
    pos = (n + i)[:, None] + jnp.arange(-1, 1)[None]  # [B, 2]
    a_out, acache = adapter(pair, pos, d.acache)
    q = _draft_distribution(model, a_out[:, 1:], draft_head, draft_ids, d.seen, params)  # [B, V']
    rng, sub = jax.random.split(d.rng)
    q_all = d.q
    if params.greedy:
      choice = jnp.argmax(q, axis=-1)
    else:
      choice = jax.random.categorical(sub, jnp.log(q), axis=-1)
      q_full = q if draft_ids is None else jnp.zeros((b, vocab), q.dtype).at[:, draft_ids].set(q)
      q_all = q_all.at[:, i].set(q_full)
    y = (choice if draft_ids is None else draft_ids[choice]).astype(jnp.int32)  # [B]
    h, cache = model.run_layers(model.embed(y[:, None]), (n + i + 1)[:, None], d.cache, 0, l)
    confident = jnp.max(q, axis=-1) >= eta
    return DraftChain(
        step=i + 1, active=d.active & confident,
        sent=jnp.where(d.active & (confident | send_unconfident), i + 1, d.sent),
        steps=jnp.where(d.active, i + 1, d.steps),
        tokens=d.tokens.at[:, i + 1].set(y), hidden=d.hidden.at[:, i + 1].set(h[:, 0]),
        q=q_all, cache=cache, acache=acache, rng=rng,
        seen=mark_seen(d.seen, y[:, None], jnp.ones((b, 1), bool), params))

  return jax.lax.while_loop(lambda d: (d.step < gamma) & jnp.any(d.active), body, init)


def verify_block_sizes(gamma: int, send_unconfident: bool = True) -> tuple[int, ...]:
  """Static verification block sizes: powers of two below gamma + 1, and gamma + 1.

  A round verifies the smallest block that holds every sequence's drafts. On a CPU a
  block of 2 costs far less than one of 7, and drafting often stops early; a few sizes
  keep compile time small. Size 1 (no draft sent) only occurs without send_unconfident.
  """
  sizes = {gamma + 1} | ({1} if not send_unconfident else set())
  t = 2
  while t < gamma + 1:
    sizes.add(t)
    t *= 2
  return tuple(sorted(sizes))


def _verify_switch(model: Llama, Y, H, Q, k, live, n, cache, rng, seen, *, l: int,
                   params: SamplingParams, send_unconfident: bool = True):
  """Verifies the smallest static block that holds y0 and every live sequence's drafts.

  The branches only read the cache and return the block's deep-layer keys/values, padded
  to gamma + 1 positions; they are written after the switch, outside it. A conditional
  that updated the cache would make XLA copy the deep layers' cache every round. The
  padding lands in slots past the block, which every later block overwrites before any
  position attends them (causal attention reads slots <= its own position only).
  """
  kmax = Y.shape[1]  # gamma + 1
  sizes = verify_block_sizes(kmax - 1, send_unconfident)
  need = jnp.max(jnp.where(live, k, 0)) + 1
  branch = jnp.searchsorted(jnp.asarray(sizes), need)

  def block(t):
    def run(Y, H, Q, k, n, rng, seen):
      a, z, block_kv, rng = _verify(model, Y[:, :t], H[:, :t], Q[:, :t - 1], k, n, cache, rng,
                                    seen, l=l, params=params)
      pad = lambda x: jnp.pad(x, ((0, 0), (0, kmax - t), (0, 0), (0, 0)))  # [B, K, Kv, Hd]
      return a, z, jax.tree.map(pad, block_kv), rng
    return run

  # Even one block size goes through the conditional: its reads of the cache then finish
  # before the writes below, and XLA updates the cache in place. Inlined, XLA keeps a copy
  # of the deep cache for the reads every round (the HLO test counts copies).
  branches = [block(t) for t in sizes] * (2 if len(sizes) == 1 else 1)
  a, z, block_kv, rng = jax.lax.switch(branch, branches, Y, H, Q, k, n, rng, seen)
  positions = n[:, None] + jnp.arange(kmax)[None]  # [B, K]
  return a, z, kv.write_layers(cache, block_kv, l, positions), rng


def _block_seen(seen, Y, params: SamplingParams):
  """Per block position j, the tokens seen before the token it predicts: [B, K, V].

  Position j (input Y[j]) predicts the token after Y[j]; the sequence then holds the
  committed tokens (`seen` [B, V], y0 included) and the drafts Y[1..j] before it.
  """
  if not params.penalized:
    return seen[:, None]  # [B, 1, 1] placeholder
  b, kb = Y.shape
  drafts = jax.nn.one_hot(Y[:, 1:], seen.shape[1], dtype=jnp.int32)  # [B, K-1, V]
  upto = jnp.cumsum(drafts, axis=1) > 0  # [B, K-1, V]: drafts 1..j+1 seen
  upto = jnp.concatenate([jnp.zeros((b, 1, seen.shape[1]), bool), upto], axis=1)  # [B, K, V]
  return seen[:, None] | upto[:, :kb]


def _verify(model: Llama, Y, H, Q, k, n, cache, rng, seen, *, l: int, params: SamplingParams):
  """Deep layers over the block, reading the cache only.

  Returns (accepted drafts a [B], next token z [B], the block's deep-layer keys/values
  {"k", "v": [L - l x [B, K, Kv, Hd]]}, rng).

  With a repetition penalty each position's logits are penalized with the tokens seen up
  to it, drafts included, so every accepted token and z are exactly what plain decoding
  would pick (greedy) or have the distribution it would sample from.
  """
  kb = Y.shape[1]
  positions = n[:, None] + jnp.arange(kb)[None]  # [B, K]
  h, block_kv = model.run_layers_block(H, positions, cache, l, None)
  if params.greedy:
    a, z = _greedy_verdict(model, h, Y, k, _block_seen(seen, Y, params), params)
    return a, z, block_kv, rng
  logits = penalize(model.logits(h), _block_seen(seen, Y, params), params)  # [B, K, V]
  a, z, rng = _judge(logits, Y, Q, k, rng, params)
  return a, z, block_kv, rng


def _greedy_verdict(model: Llama, h, Y, k, block_seen, params: SamplingParams):
  """Greedy `_judge` computing the head position by position: accepted drafts a [B] and
  the next token z [B] from the block's last hidden states h [B, K, D].

  Each position's logits come from `model.logits` of one position [B, 1, D], the very
  product plain decoding's step computes (`kangaroo_jax.precision`: a CPU's one-row and
  block kernels sum differently), and the loop stops once every sequence has met a
  rejected draft or its last one: one head per committed token, as plain decoding pays.
  """
  b, kb = Y.shape

  def body(c):
    t, undecided, a, z = c
    logits = model.logits(jax.lax.dynamic_slice_in_dim(h, t, 1, axis=1))[:, 0]  # [B, V]
    row_seen = jax.lax.dynamic_index_in_dim(block_seen, jnp.minimum(t, block_seen.shape[1] - 1),
                                            axis=1, keepdims=False)  # [B, V] (or placeholder)
    target = jnp.argmax(penalize(logits, row_seen, params), axis=-1).astype(jnp.int32)  # [B]
    draft = jax.lax.dynamic_index_in_dim(Y, jnp.minimum(t + 1, kb - 1), axis=1,
                                         keepdims=False)  # [B]: the draft position t judges
    accept = undecided & (t < k) & (t < kb - 1) & (draft == target)
    stop = undecided & ~accept
    return t + 1, accept, jnp.where(stop, t, a), jnp.where(stop, target, z)

  zeros = jnp.zeros((b,), jnp.int32)
  _, _, a, z = jax.lax.while_loop(lambda c: jnp.any(c[1]), body,
                                  (jnp.int32(0), jnp.ones((b,), bool), zeros, zeros))
  return a, z


def _verify_fixed(model: Llama, Y, Q, k, n, cache, rng, seen, *, params: SamplingParams):
  """Verification as a plain step of fixed width: every layer, from the tokens, over
  exactly `model.step_width` rows (the block, then padding), writing the cache in place.

  Each verified row is then computed as plain decoding's fixed-width step computes that
  position (`precision`, fixed-width steps): greedy output is identical by construction,
  whatever kernels the backend picks for the shape. The shallow layers run again (the
  draft's layer-l states are not reused): on an accelerator that re-reads l of L layers'
  weights. Returns (a [B], z [B], cache, rng).
  """
  kb = Y.shape[1]
  w = model.step_width
  rows = jnp.pad(Y, ((0, 0), (0, w - kb)))  # [B, W]: the block, then padding rows
  positions = n[:, None] + jnp.arange(w)[None]  # [B, W]
  logits, cache = model(rows, positions, cache)  # [B, W, V]
  # As in plain decoding's step: all W rows' products stay W rows wide (no slice sinks in).
  logits = jax.lax.optimization_barrier(logits)
  logits = penalize(logits[:, :kb], _block_seen(seen, Y, params), params)  # [B, K, V]
  a, z, rng = _judge(logits, Y, Q, k, rng, params)
  return a, z, cache, rng


def _judge(logits, Y, Q, k, rng, params: SamplingParams):
  """Accepted drafts a [B] and the next token z [B] from the target's block logits
  [B, K, V] for the block Y [B, K] (y0, then drafts), k [B] drafts sent, draft
  distributions Q [B, K - 1, V] (sampling); also the advanced rng.

  Greedy: the longest prefix of drafts equal to the target's argmax, then the target's
  token. Sampling: speculative sampling (accept with probability min(1, p/q), resample
  the first rejection from max(0, p - q)), the same distribution as plain sampling.
  """
  b, kb = Y.shape
  j = jnp.arange(kb - 1)[None]  # [1, K - 1]: draft y_{j+1} is judged by target position j
  rng, r_acc, r_res = jax.random.split(rng, 3)
  if params.greedy:
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, K]
    ok = (Y[:, 1:] == target[:, :-1]) & (j < k[:, None])
    a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # longest agreeing prefix
    z = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
    return a, z, rng
  p = probs(logits, params)  # [B, K, V]
  if kb == 1:  # no draft sent: a plain sampling step
    z = jax.random.categorical(r_res, jnp.log(p[:, 0]), axis=-1).astype(jnp.int32)
    return jnp.zeros((b,), jnp.int32), z, rng
  p_draft = jnp.take_along_axis(p[:, :-1], Y[:, 1:, None], axis=-1)[..., 0]  # [B, K-1]
  q_draft = jnp.take_along_axis(Q, Y[:, 1:, None], axis=-1)[..., 0]  # [B, K-1]
  u = jax.random.uniform(r_acc, p_draft.shape)
  ok = (u * q_draft < p_draft) & (j < k[:, None])  # accept with prob min(1, p/q)
  a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
  p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V]
  q_a = jnp.take_along_axis(Q, jnp.minimum(a, kb - 2)[:, None, None], axis=1)[:, 0]  # [B, V]
  # First rejection: sample from normalize(max(0, p - q)); all accepted: the bonus from p.
  residual = jnp.where((a < k)[:, None], jnp.maximum(p_a - q_a, 0.0), p_a)
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
  z = jax.random.categorical(r_res, jnp.log(residual), axis=-1).astype(jnp.int32)
  return a, z, rng


def _kangaroo_start(model: Llama, adapter: Adapter, tokens, prompt_lens, rng, eos_ids, limit, *,
                    params: SamplingParams, capacity: int, gamma: int,
                    lookup: Optional[tuple[int, int]] = None) -> RoundState:
  """Prefill (shallow layers, adapter, deep layers) and the first token: the round state.

  `capacity` (static, `decoding.token_capacity`) sizes the output and the caches; `limit` ([] int32,
  <= capacity) is the token budget."""
  l = adapter.acfg.exit_layer
  b = tokens.shape[0]
  block = max(gamma, lookup[0] if lookup else 0)  # most drafts a round verifies
  # A round writes block + 2 slots past its first position, a fixed-width one step_width.
  size = cache_size(tokens.shape[1], capacity, max(block + 2, model.step_width))
  cache = kv.init_model_cache(model.cfg, b, size, cache_dtype(model.activations, model.platform))
  h_l, cache = prefill(model, tokens, prompt_lens, cache, l)  # [B, P, D]
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  acache = adapter.init_cache(b, size, cache_dtype(h_l.dtype, model.platform))
  _, acache = adapter(h_l, positions, acache)
  h, cache = model.run_layers(h_l, positions, cache, l, None)
  rng, sub = jax.random.split(rng)
  # Tokens seen so far, for the repetition penalty ([B, 1] placeholder without one).
  seen = init_seen(tokens, prompt_lens, model.cfg.vocab_size, params)
  logits = model.logits(last_hidden(h, prompt_lens))[:, 0]  # [B, V]
  y0 = sample(penalize(logits, seen, params), params, sub)  # [B]
  seen = mark_seen(seen, y0[:, None], jnp.ones((b, 1), bool), params)
  out = jnp.zeros((b, capacity + block + 1), jnp.int32).at[:, 0].set(y0)
  history = record(init_history(tokens, size), prompt_lens, y0[:, None], jnp.ones((b,), jnp.int32))
  zeros = jnp.zeros((b,), jnp.int32)
  return RoundState(n=prompt_lens, y0=y0, h_prev=last_hidden(h_l, prompt_lens)[:, 0],
                    cache=cache, acache=acache, rng=rng, out=out, count=jnp.ones((b,), jnp.int32),
                    done=is_eos(y0, eos_ids) | (limit <= 1), rounds=zeros,
                    drafts=zeros, drafts_verified=zeros, total_rounds=jnp.int32(0), seen=seen,
                    history=history, lookup_rounds=zeros, limit=jnp.asarray(limit, jnp.int32))


def _chain_round(model: Llama, adapter: Adapter, draft_head, draft_ids, st: RoundState, eta, *,
                 gamma: int, params: SamplingParams, send_unconfident: bool,
                 lookup: Optional[tuple[int, int]] = None):
  """Drafts a chain, or takes a prompt-lookup proposal, and verifies it:
  (Verdict, cache, adapter cache, rng)."""
  live = ~st.done
  use = jnp.bool_(False)
  if lookup is not None:
    width, ngram = lookup
    proposal, count = propose(st.history, st.n, ngram, width)  # [B, W], [B]
    use = jnp.any(live) & jnp.all(~live | (count > 0))  # a lookup round: every live sequence
  d = _draft(model, adapter, draft_head, draft_ids, st, eta, gamma=gamma, params=params,
             send_unconfident=send_unconfident, skip=use)
  tokens, hidden, q, sent, cache, acache = d.tokens, d.hidden, d.q, d.sent, d.cache, d.acache
  if lookup is not None:
    tokens, hidden, q, sent, cache, acache = _with_proposal(
        model, adapter, st, d, proposal, count, use, params=params)
  if model.step_width > 1:
    a, z, cache, rng = _verify_fixed(model, tokens, q, sent, st.n, cache, d.rng, st.seen,
                                     params=params)
  else:
    a, z, cache, rng = _verify_switch(model, tokens, hidden, q, sent, live, st.n, cache, d.rng,
                                      st.seen, l=adapter.acfg.exit_layer, params=params,
                                      send_unconfident=send_unconfident)
  # The block's first a + 1 tokens are y0 and the accepted drafts.
  verdict = Verdict(tokens=tokens, hidden=hidden, accepted=a, next_token=z, verified=sent,
                    steps=d.steps, looked_up=live & use)
  return verdict, cache, acache, rng


def _with_proposal(model: Llama, adapter: Adapter, st: RoundState, d: DraftChain, proposal,
                   count, use, *, params: SamplingParams):
  """The block to verify: the lookup proposal when `use`, else the adapter's drafts,
  padded to one width K = max(gamma, W) + 1.

  Returns (tokens [B, K], hidden [B, K, D], q [B, K - 1, V or 1], drafts sent [B], cache,
  adapter cache). The proposal's shallow and adapter keys/values are computed in a
  conditional that only reads the caches, and written after it: a conditional that
  updated a cache would make XLA copy it every round. In an adapter round the slots get
  back what they hold.
  """
  l, w = adapter.acfg.exit_layer, proposal.shape[1]
  k = max(d.tokens.shape[1], w + 1)
  h0 = d.hidden[:, 0]  # [B, D]: y0's layer-l state; the draft loop wrote its shallow slots
  # The shallow layers and the adapter run over the smallest static width that holds every
  # live proposal: 1, powers of two, w (the verification's block sizes, one position less).
  sizes = verify_block_sizes(w - 1, send_unconfident=False)
  need = jnp.max(jnp.where(~st.done, count, 0))  # the longest live proposal
  branch = jnp.where(use, jnp.searchsorted(jnp.asarray(sizes), need) + 1, 0)
  hidden, shallow, adapter_kv = jax.lax.switch(branch, [
      lambda: cached_states(d.cache, d.acache, st.n, l, w, h0.shape[-1], h0.dtype)] + [
      functools.partial(proposal_states, model, adapter, proposal, h0, st.h_prev, st.n, d.cache,
                        d.acache, t) for t in sizes])
  cache = kv.write_layers(d.cache, shallow, 0, st.n[:, None] + 1 + jnp.arange(w)[None])
  acache = kv.write_layers(d.acache, adapter_kv, 0, st.n[:, None] - 1 + jnp.arange(w + 2)[None])
  widen = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  tokens = jnp.where(use, widen(jnp.concatenate([st.y0[:, None], proposal], 1), k),
                     widen(d.tokens, k))  # [B, K]
  hidden = jnp.where(use, widen(jnp.concatenate([h0[:, None], hidden], 1), k),
                     widen(d.hidden, k))  # [B, K, D]
  # A proposal is a draft whose distribution is one-hot (sampling only; greedy keeps [.., 1]).
  q_prop = (jax.nn.one_hot(proposal, d.q.shape[-1], dtype=d.q.dtype) if not params.greedy
            else jnp.zeros(proposal.shape + (1,), d.q.dtype))  # [B, W, V or 1]
  q = jnp.where(use, widen(q_prop, k - 1), widen(d.q, k - 1))  # [B, K - 1, V or 1]
  return tokens, hidden, q, jnp.where(use, count, d.sent), cache, acache


def _commit(st: RoundState, v: Verdict, cache, acache, rng, eos_ids, *,
            params: SamplingParams) -> RoundState:
  """Appends a round's accepted drafts and the target's token; the next round's state."""
  b, kb = v.tokens.shape
  live = ~st.done
  a = v.accepted
  j = jnp.arange(kb)[None]  # [1, K]
  # This round's new tokens: accepted drafts y_1..y_a, then z.
  new = jnp.where(j < a[:, None], jnp.roll(v.tokens, -1, axis=1), v.next_token[:, None])  # [B, K]
  n_new = a + 1
  # Cut at the first EOS (kept) and at the token budget.
  eos_at = jnp.where(is_eos(new, eos_ids) & (j < n_new[:, None]), j, kb)
  n_new = jnp.minimum(jnp.minimum(n_new, jnp.min(eos_at, axis=1) + 1), st.limit - st.count)
  n_new = jnp.where(live, n_new, 0)
  slots = st.count[:, None] + j  # [B, K]
  out = st.out.at[jnp.arange(b)[:, None], slots].set(
      jnp.where(j < n_new[:, None], new, PAD_ID), mode="drop")
  count = st.count + n_new
  last_h = jnp.take_along_axis(v.hidden, a[:, None, None], 1)[:, 0]  # [B, D]
  return RoundState(
      n=jnp.where(live, st.n + a + 1, st.n), y0=jnp.where(live, v.next_token, st.y0),
      h_prev=jnp.where(live[:, None], last_h, st.h_prev), cache=cache, acache=acache, rng=rng,
      out=out, count=count,
      done=st.done | (jnp.min(eos_at, axis=1) < a + 1) | (count >= st.limit),
      rounds=st.rounds + live, drafts=st.drafts + jnp.where(live, v.steps, 0),
      drafts_verified=st.drafts_verified + jnp.where(live, v.verified, 0),
      total_rounds=st.total_rounds + 1,
      seen=mark_seen(st.seen, new, j < n_new[:, None], params),
      history=record(st.history, st.n + 1, new, n_new),
      lookup_rounds=st.lookup_rounds + (live & v.looked_up), limit=st.limit)


def _kangaroo_rounds(model: Llama, adapter: Adapter, draft_ids, st: RoundState, eos_ids, eta,
                     until, *, params: SamplingParams, gamma: int,
                     send_unconfident: bool, tree: Optional[tuple[int, int]] = None,
                     lookup: Optional[tuple[int, int]] = None) -> RoundState:
  """Runs rounds (draft -> verify -> commit; a chain, or a tree of (nodes, top-k); prompt
  lookup of (tokens, n-gram) with the chain) until round `until` or every sequence is done."""
  # A reduced draft vocabulary scores only its rows of the head.
  draft_head = None if draft_ids is None else model.head_weight()[draft_ids]  # [N, D]

  def round_body(st: RoundState) -> RoundState:
    if tree is None:
      verdict, cache, acache, rng = _chain_round(
          model, adapter, draft_head, draft_ids, st, eta, gamma=gamma, params=params,
          send_unconfident=send_unconfident, lookup=lookup)
    else:
      nodes, topk = tree
      verdict, cache, acache = tree_round(
          model, adapter, draft_head, draft_ids, st, eta, gamma=gamma, topk=topk, nodes=nodes,
          sizes=verify_block_sizes(nodes), params=params)
      rng = st.rng
    return _commit(st, verdict, cache, acache, rng, eos_ids, params=params)

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.total_rounds < until),
                            round_body, st)


# The budget (`limit`) is traced, the capacity static: see `decoding.token_capacity`.
_STATIC = ("graphdef", "agraphdef", "params", "capacity", "gamma", "send_unconfident",
           "tree", "lookup")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _kangaroo_loop(graphdef, state, agraphdef, astate, draft_ids, tokens, prompt_lens, rng,
                   eos_ids, eta, limit, *, params: SamplingParams, capacity: int, gamma: int,
                   send_unconfident: bool, tree: Optional[tuple[int, int]] = None,
                   lookup: Optional[tuple[int, int]] = None):
  """The whole decode in one program: the final state's statistics (`_STATS`), as a dict.

  Decoding does not run it: it runs the prompt pass (`_kangaroo_stream_start`), then loop
  calls (`_kangaroo_stream_rounds`) on the donated state, and the HLO checks read those
  (tests/test_no_cache_copies.py, scripts/accelerator_check.py, `aot_decode`). This one
  program remains for tests that lower a whole decode (tests/test_tensor_parallel.py,
  tests/test_decoding.py, tests/test_streaming.py).
  """
  model = nnx.merge(graphdef, state)
  adapter = nnx.merge(agraphdef, astate)
  st = _kangaroo_start(model, adapter, tokens, prompt_lens, rng, eos_ids, limit, params=params,
                       capacity=capacity, gamma=gamma, lookup=lookup)
  st = _kangaroo_rounds(model, adapter, draft_ids, st, eos_ids, eta, UNTIL_DONE,
                        params=params, gamma=gamma, send_unconfident=send_unconfident, tree=tree,
                        lookup=lookup)
  return {name: getattr(st, name) for name in _STATS}


@functools.partial(jax.jit, static_argnames=_STATIC)
def _kangaroo_stream_start(graphdef, state, agraphdef, astate, tokens, prompt_lens, rng,
                           eos_ids, limit, *, params: SamplingParams, capacity: int, gamma: int,
                           send_unconfident: bool, tree: Optional[tuple[int, int]] = None,
                           lookup: Optional[tuple[int, int]] = None) -> RoundState:
  del send_unconfident, tree  # static for a uniform call; the prefill does not depend on them
  return _kangaroo_start(nnx.merge(graphdef, state), nnx.merge(agraphdef, astate), tokens,
                         prompt_lens, rng, eos_ids, limit, params=params, capacity=capacity,
                         gamma=gamma, lookup=lookup)


# The state is donated: its caches are updated in place, not copied per call.
@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("st",))
def _kangaroo_stream_rounds(graphdef, state, agraphdef, astate, draft_ids, st, eos_ids, eta,
                            until, *, params: SamplingParams, capacity: int, gamma: int,
                            send_unconfident: bool, tree: Optional[tuple[int, int]] = None,
                            lookup: Optional[tuple[int, int]] = None) -> RoundState:
  del capacity  # static for a uniform call; the state's shapes already carry it
  return _kangaroo_rounds(nnx.merge(graphdef, state), nnx.merge(agraphdef, astate), draft_ids,
                          st, eos_ids, eta, until, params=params, gamma=gamma,
                          send_unconfident=send_unconfident, tree=tree, lookup=lookup)


def kangaroo_decode(model: Llama, adapter: Adapter, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 128, kparams: KangarooParams = KangarooParams(),
                    params: SamplingParams = SamplingParams(), seed: int = 0,
                    eos_ids: Sequence[int] = (), draft_ids: Optional[np.ndarray] = None,
                    on_tokens: Optional[Callable] = None, mesh=None,
                    min_bucket: int = MIN_BUCKET) -> DecodeResult:
  """Decodes token prompts with Kangaroo self-speculation; output equals plain decoding.

  Args:
    model: the target model.
    adapter: the draft adapter (its exit layer selects the shallow sub-network).
    prompts: token id lists, one per sequence (lengths may differ).
    max_new_tokens: new tokens per sequence at most.
    kparams: eta (early-exit threshold), gamma (max drafts per round), send_unconfident.
    params: greedy when temperature is 0, else lossless speculative sampling; an optional
      repetition penalty (applied per block position, so output still equals plain's).
    seed: PRNG seed.
    eos_ids: generation of a sequence stops after any of these.
    draft_ids: optional reduced draft vocabulary (token ids) for the draft head.
    on_tokens: optional streaming sink `fn(tokens [B, C], counts [B])`, called in this
      thread after each round (see `kangaroo_stream`).
    mesh: optional ('data', 'model') mesh; shard model and adapter with `shard_module`.
    min_bucket: the smallest padded prompt length (`decoding.bucket`).
  Returns:
    DecodeResult with each sequence's tokens and stats: mean accepted tokens per
    verification step (the target's own token counted), rounds, draft steps run, drafts
    verified (fewer than the steps when unconfident drafts are dropped), and timings:
    tokens/s of the rounds after the first token, the prompt pass apart
    (`decoding.timing_stats`). The prefill and the rounds are two calls.
  """
  steps = _kangaroo_calls(model, adapter, prompts, max_new_tokens, kparams, params, seed,
                          eos_ids, draft_ids, mesh, None if on_tokens is None else STREAM_STEPS,
                          min_bucket)
  return drain(steps, on_tokens)


def kangaroo_stream(model: Llama, adapter: Adapter, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 128, kparams: KangarooParams = KangarooParams(),
                    params: SamplingParams = SamplingParams(), seed: int = 0,
                    eos_ids: Sequence[int] = (), draft_ids: Optional[np.ndarray] = None,
                    mesh=None, min_bucket: int = MIN_BUCKET):
  """Like `kangaroo_decode`, as a generator: yields (tokens [B, C], counts [B]) per round.

  The generator's return value (StopIteration.value) is the DecodeResult. Closing it
  early stops decoding after the current round. The output equals `kangaroo_decode`'s.
  """
  return _kangaroo_calls(model, adapter, prompts, max_new_tokens, kparams, params, seed,
                         eos_ids, draft_ids, mesh, STREAM_STEPS, min_bucket)


def _kangaroo_calls(model, adapter, prompts, max_new_tokens, kparams, params, seed, eos_ids,
                    draft_ids, mesh, per_call, min_bucket):
  """Kangaroo as `decoding.timed_calls`: the prefill, then `per_call` rounds a call (None: all)."""
  args, static = _prepare(model, adapter, prompts, max_new_tokens, kparams, params, seed,
                          eos_ids, draft_ids, mesh, min_bucket)
  graphdef, state, agraphdef, astate, draft_ids, tokens, lens, rng, eos, eta, limit = args
  first = (graphdef, state, agraphdef, astate, tokens, lens, rng, eos, limit)

  def read(st):
    host = jax.device_get({k: getattr(st, k) for k in _STATS + ("done",)})
    return dict(host, progress=host["total_rounds"])

  host, timing = yield from timed_calls(
      mesh, _kangaroo_stream_start, first, static, _kangaroo_stream_rounds,
      lambda st, until: (graphdef, state, agraphdef, astate, draft_ids, st, eos, eta, until),
      static, read, per_call, f"Kangaroo ({tokens.shape[1]}-token prompt bucket, "
      f"room for {static['capacity']} new tokens)")
  return _result(host, len(prompts), timing)


def _prepare(model, adapter, prompts, max_new_tokens, kparams, params, seed, eos_ids, draft_ids,
             mesh, min_bucket=MIN_BUCKET):
  """Checks the arguments; returns the loop's array arguments and its static ones."""
  adapter.acfg.check(model.cfg)
  if max_new_tokens < 1:
    raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokens, lens = pad_prompts(prompts, model.cfg.max_position_embeddings, max_new_tokens,
                             extra=kparams.block + 1, min_bucket=min_bucket)
  if draft_ids is not None:
    draft_ids = jnp.asarray(check_draft_ids(draft_ids, model.cfg.vocab_size))
  graphdef, state = nnx.split(model)
  agraphdef, astate = nnx.split(adapter)
  state, astate = as_computed(state, model.platform), as_computed(astate, model.platform)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  tokens, lens = place_batch(mesh, tokens, lens)
  if kparams.tree:
    check_tree(kparams.tree_nodes, kparams.tree_topk, kparams.gamma, params)
  elif model.step_width > 1 and kparams.block + 1 > model.step_width:
    raise ValueError(f"a round verifies at most {model.step_width - 1} drafts with this "
                     f"model's fixed-width steps (step width {model.step_width}): lower "
                     f"gamma (--max-draft) or --lookup to <= {model.step_width - 1}")
  # Every budget that fits the same caches (a round's block needs 2 more slots) shares the
  # compiled loops: the capacity is static, the budget `limit` traced.
  static = dict(params=params, capacity=token_capacity(tokens.shape[1], max_new_tokens,
                                                       kparams.block + 2),
                gamma=kparams.gamma, send_unconfident=kparams.send_unconfident,
                tree=kparams.tree, lookup=kparams.lookup_setting)
  return ((graphdef, state, agraphdef, astate, draft_ids, tokens, lens, jax.random.key(seed), eos,
           jnp.float32(kparams.eta), jnp.int32(max_new_tokens)), static)


# What a finished (or streamed) loop state hands back to the host.
_STATS = ("out", "count", "rounds", "drafts", "drafts_verified", "lookup_rounds", "total_rounds")


def _result(host: dict, n: int, timing: dict) -> DecodeResult:
  """The DecodeResult of a finished loop state read back to the host.

  `timing` (`decoding.timed_calls`): the prefill, the decoding after it and compiling,
  each apart (`decoding.timing_stats`).
  """
  out, counts = host["out"], host["count"]
  rounds, drafts, sent, looked_up = (int(host[k].sum()) for k in (
      "rounds", "drafts", "drafts_verified", "lookup_rounds"))
  seqs = [out[i, :counts[i]].tolist() for i in range(n)]
  # The first token comes from the prefill, not from a verification step.
  verified = int((counts - 1).sum())
  stats = timing_stats(int(counts.sum()), n, **timing)
  return DecodeResult(seqs, stats["seconds"], dict(
      stats, rounds=rounds, steps=int(host["total_rounds"]), draft_steps=drafts,
      drafts_verified=sent, lookup_rounds=looked_up,
      mean_accepted_tokens=verified / max(1, rounds),
      drafts_per_round=drafts / max(1, rounds),
      verified_drafts_per_round=sent / max(1, rounds)))
