"""Tree drafting (greedy): more accepted tokens from one verification pass.

One round, per sequence, with pending token y0 (the root) at position n:

  draft (`draft_tree`): the root runs the shallow layers and the adapter as in the chain;
      its top-K draft tokens are the first frontier. Per depth, the frontier's K nodes run
      the shallow layers and the adapter in one batched call that attends the committed
      cache plus each node's ancestors (tree mask); every node proposes its top-K tokens
      and the K best of those K*K children by cumulative draft log-probability become the
      next frontier. Drafting stops after gamma depths, or when no frontier node is
      confident (top-1 draft probability < eta: the second early exit).
  select: the N nodes of highest cumulative probability, best first. A child never
      outranks its parent, so every prefix of that list is a subtree.
  verify (`verify_tree`): the deep layers once over [root, N nodes] with the tree mask,
      the smallest static block that holds every valid node; greedy accepts the deepest
      node whose whole path agrees with the target's argmax, plus the target's own token.
  commit: the accepted path's keys/values (shallow, deep, adapter) are written at slots
      n .. n + a of the caches. During the round nothing but the root is written, so
      nothing has to be rolled back or copied.

Greedy only: sampling over a tree needs recursive rejection over siblings, which this
module does not implement (`check_tree` refuses it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kangaroo_jax import cache as kv
from kangaroo_jax.adapter import Adapter
from kangaroo_jax.model import BlockView, Llama
from kangaroo_jax.round_state import RoundState, Verdict
from kangaroo_jax.sampling import SamplingParams, penalize

# A child ranks strictly below its parent even when the draft gives it probability 1.
_DEPTH_TIEBREAK = 1e-6


@struct.dataclass
class DraftTree:
  """One round's draft tree. Node slots M = K * gamma, filled depth by depth, K per depth.

  tokens [B, M]: each node's token; parent [B, M]: its parent's slot (-1: the root);
  depth [B, M]: 1 for the root's children; score [B, M]: cumulative draft
  log-probability, -inf for a slot never filled; ancestors [B, M, M]: ancestor-or-self
  mask; hidden [B, M, D]: layer-l states; shallow {"k", "v": [l x [B, M, Kv, Hd]]} and
  adapter {"k", "v": [1 x [B, M, Ka, Ha]]}: the nodes' keys/values, in no cache yet.
  """
  tokens: jax.Array
  parent: jax.Array
  depth: jax.Array
  score: jax.Array
  ancestors: jax.Array
  hidden: jax.Array
  shallow: dict
  adapter: dict


def check_tree(nodes: int, topk: int, gamma: int, params: SamplingParams) -> None:
  """Raises ValueError naming the setting that tree drafting cannot use."""
  if topk < 1:
    raise ValueError(f"tree top-k (--tree-topk) must be >= 1, got {topk}")
  if not 1 <= nodes <= topk * gamma:
    raise ValueError(f"tree nodes (--tree-nodes) must be in [1, tree top-k x max drafts = "
                     f"{topk * gamma}], got {nodes}")
  if not params.greedy:
    raise ValueError("tree drafting is greedy only: use --temperature 0 or --tree-nodes 0")


def _draft_logprobs(model: Llama, adapter_out, draft_head, draft_ids, seen, params):
  """Draft log-probabilities [B, T, V'] over the draft vocabulary for adapter states [B, T, D]."""
  logits = model.project(adapter_out, draft_head)  # [B, T, V']
  if params.penalized and draft_ids is not None:
    seen = seen[:, draft_ids]  # [B, V']: the draft vocabulary's columns
  return jax.nn.log_softmax(penalize(logits, seen[:, None], params), axis=-1)


def _expand(tree: DraftTree, logq, frontier, new, topk: int, draft_ids, live):
  """Adds the `topk` best children of the frontier slots [K] at slots `new` [K].

  logq [B, K, V']: the frontier nodes' draft log-probabilities; live [B]: rows whose tree
  still grows (other rows get unused slots, score -inf).
  """
  b = logq.shape[0]
  child_logq, child_ids = jax.lax.top_k(logq, topk)  # [B, K, K] each
  parent_score = tree.score[:, frontier]  # [B, K]
  cand = (parent_score[:, :, None] + child_logq).reshape(b, topk * topk)  # [B, K*K]
  best, pick = jax.lax.top_k(cand, topk)  # [B, K]: best children over the whole frontier
  ids = jnp.take_along_axis(child_ids.reshape(b, topk * topk), pick, axis=1)  # [B, K]
  tokens = ids if draft_ids is None else draft_ids[ids]
  parent = frontier[pick // topk]  # [B, K]: slots
  rows = jnp.arange(b)[:, None]  # [B, 1]
  own = jax.nn.one_hot(new, tree.tokens.shape[1], dtype=bool)  # [K, M]
  ancestors = tree.ancestors[rows, parent] | own[None]  # [B, K, M]
  return tree.replace(
      tokens=tree.tokens.at[:, new].set(tokens.astype(jnp.int32)),
      parent=tree.parent.at[:, new].set(parent),
      depth=tree.depth.at[:, new].set(tree.depth[:, frontier[:1]] + 1),
      score=tree.score.at[:, new].set(jnp.where(live[:, None], best, -jnp.inf)),
      ancestors=tree.ancestors.at[:, new].set(ancestors))


def _node_pass(model: Llama, adapter: Adapter, tree: DraftTree, slots, n, cache, acache,
               run_adapter: bool = True):
  """Shallow layers (and the adapter) over the nodes at `slots` [K], reading the caches.

  The nodes sit at positions n + depth and attend the committed slots up to the root
  (slot n) plus their ancestors among the tree's nodes. Returns (tree with their states
  and keys/values, adapter output [B, K, D] or None).
  """
  l = adapter.acfg.exit_layer
  tokens = tree.tokens[:, slots]  # [B, K]
  positions = n[:, None] + tree.depth[:, slots]  # [B, K]
  mask = tree.ancestors[:, slots]  # [B, K, M]
  view = dict(slots=jnp.broadcast_to(slots, tokens.shape), mask=mask, limit=n + 1)
  h, shallow = model.run_layers_block(model.embed(tokens), positions, cache, 0, l,
                                      tree=dict(view, **tree.shallow))
  tree = tree.replace(hidden=tree.hidden.at[:, slots].set(h), shallow=shallow)
  if not run_adapter:
    return tree, None
  out, abuf = adapter(h, positions, acache,
                      view=BlockView(tree.adapter["k"][0], tree.adapter["v"][0], view["slots"],
                                     mask, n + 1))
  return tree.replace(adapter=abuf), out


def draft_tree(model: Llama, adapter: Adapter, draft_head, draft_ids, st: RoundState, eta, *,
               gamma: int, topk: int, params: SamplingParams):
  """Drafts a tree for every sequence. Returns (tree, root state h0 [B, D], draft steps
  [B], shallow cache with the root written, adapter cache with slots n-1, n written)."""
  l = adapter.acfg.exit_layer
  b, n = st.y0.shape[0], st.n
  m = topk * gamma
  # The root exactly as the chain's first step: shallow layers written at slot n, the
  # adapter over (previous state, root) at slots n-1, n.
  h0, cache = model.run_layers(model.embed(st.y0[:, None]), n[:, None], st.cache, 0, l)
  pair = jnp.stack([st.h_prev, h0[:, 0]], axis=1)  # [B, 2, D]
  a_out, acache = adapter(pair, n[:, None] + jnp.arange(-1, 1)[None], st.acache)
  logq = _draft_logprobs(model, a_out[:, 1:], draft_head, draft_ids, st.seen, params)

  shape_kv = lambda c: jnp.zeros((b, m) + c.shape[2:], c.dtype)  # [B, M, Kv, Hd]
  tree = DraftTree(
      tokens=jnp.zeros((b, m), jnp.int32), parent=jnp.full((b, m), -1, jnp.int32),
      depth=jnp.zeros((b, m), jnp.int32), score=jnp.full((b, m), -jnp.inf, jnp.float32),
      ancestors=jnp.zeros((b, m, m), bool), hidden=jnp.zeros((b, m, h0.shape[-1]), h0.dtype),
      shallow=jax.tree.map(shape_kv, {"k": cache["k"][:l], "v": cache["v"][:l]}),
      adapter=jax.tree.map(shape_kv, acache))
  live = ~st.done
  first = jnp.arange(topk)
  # The root's children: its top-K draft tokens at slots 0..K-1.
  child_logq, child_ids = jax.lax.top_k(logq[:, 0], topk)  # [B, K] each
  tokens = child_ids if draft_ids is None else draft_ids[child_ids]
  tree = tree.replace(
      tokens=tree.tokens.at[:, first].set(tokens.astype(jnp.int32)),
      depth=tree.depth.at[:, first].set(1),
      score=tree.score.at[:, first].set(jnp.where(live[:, None], child_logq, -jnp.inf)),
      ancestors=tree.ancestors.at[:, first, first].set(True))
  active = live & (jnp.max(logq[:, 0], axis=-1) >= jnp.log(eta))
  steps = live.astype(jnp.int32)

  def cond(s):
    d, active = s[0], s[1]
    return (d < gamma) & jnp.any(active)

  def body(s):
    d, active, steps, tree = s
    frontier = (d - 1) * topk + first  # [K]
    tree, out = _node_pass(model, adapter, tree, frontier, n, cache, acache)
    logq = _draft_logprobs(model, out, draft_head, draft_ids, st.seen, params)  # [B, K, V']
    tree = _expand(tree, logq, frontier, d * topk + first, topk, draft_ids, active)
    node_live = tree.score[:, frontier] > -jnp.inf  # [B, K]
    confident = jnp.any(node_live & (jnp.max(logq, axis=-1) >= jnp.log(eta)), axis=1)
    return d + 1, active & confident, steps + active, tree

  d, _, steps, tree = jax.lax.while_loop(cond, body, (jnp.int32(1), active, steps, tree))
  # The last frontier still needs its layer-l states (verification reads them).
  tree, _ = _node_pass(model, adapter, tree, (d - 1) * topk + first, n, cache, acache,
                       run_adapter=False)
  return tree, h0[:, 0], steps, cache, acache


def select_nodes(tree: DraftTree, nodes: int):
  """The `nodes` best slots [B, N] by cumulative draft probability, best first."""
  rank = tree.score - _DEPTH_TIEBREAK * tree.depth  # [B, M]
  return jax.lax.top_k(rank, nodes)[1]


def verification_block(tree: DraftTree, chosen, y0, h0):
  """The block [root, chosen nodes] (T = N + 1 positions) that the deep layers verify.

  Returns dict(tokens [B, T], hidden [B, T, D], depth [B, T], valid [B, T],
  parent [B, T] (block index; the root's is 0), mask [B, T, T] ancestor-or-self).
  """
  b, nodes = chosen.shape
  rows = jnp.arange(b)[:, None]  # [B, 1]
  parent_slot = jnp.take_along_axis(tree.parent, chosen, axis=1)  # [B, N]
  is_parent = chosen[:, None, :] == parent_slot[:, :, None]  # [B, N, N]: j is i's parent
  parent = jnp.where(jnp.any(is_parent, -1), jnp.argmax(is_parent, -1) + 1, 0)  # [B, N]
  among = tree.ancestors[rows[:, :, None], chosen[:, :, None], chosen[:, None, :]]  # [B, N, N]
  mask = jnp.ones((b, nodes + 1, nodes + 1), bool)  # every node sees the root (column 0)
  mask = mask.at[:, 0, 1:].set(False).at[:, 1:, 1:].set(among)
  cat = lambda root, rest: jnp.concatenate([root, rest], axis=1)
  return dict(
      tokens=cat(y0[:, None], jnp.take_along_axis(tree.tokens, chosen, 1)),
      hidden=cat(h0[:, None], tree.hidden[rows, chosen]),
      depth=cat(jnp.zeros((b, 1), jnp.int32), jnp.take_along_axis(tree.depth, chosen, 1)),
      valid=cat(jnp.ones((b, 1), bool), jnp.take_along_axis(tree.score, chosen, 1) > -jnp.inf),
      parent=cat(jnp.zeros((b, 1), jnp.int32), parent), mask=mask)


def _block_seen(seen, block, params: SamplingParams):
  """Per block node, the tokens seen before the token it predicts: [B, T, V].

  Node j predicts the token after itself, so the sequence then holds the committed tokens
  (`seen` [B, V], the root included) and the tokens of j's ancestors and j itself.
  """
  if not params.penalized:
    return seen[:, None]  # [B, 1, 1] placeholder
  onehot = jax.nn.one_hot(block["tokens"], seen.shape[1], dtype=jnp.float32)  # [B, T, V]
  # 0/1 sums: exact at any precision, named anyway.
  on_path = jnp.einsum("btj,bjv->btv", block["mask"].astype(jnp.float32), onehot,
                       precision=jax.lax.Precision.HIGHEST) > 0  # [B, T, V]
  return seen[:, None] | on_path


def verify_tree(model: Llama, block: dict, n, cache, seen, live, *, l: int, sizes,
                params: SamplingParams):
  """Deep layers over the smallest static block holding every live row's valid nodes.

  Returns (target argmax [B, T] (-1 past the block run), the block's deep keys/values
  {"k", "v": [L - l x [B, T, Kv, Hd]]} padded to T). Reads the cache only.
  """
  t_max = block["tokens"].shape[1]
  need = jnp.max(jnp.where(live, jnp.sum(block["valid"], axis=1), 1))
  branch = jnp.searchsorted(jnp.asarray(sizes), need)

  def run_block(t):
    def run(block, seen):
      sub = {key: value[:, :t] for key, value in block.items()}
      sub["mask"] = sub["mask"][:, :, :t]  # [B, t, t]
      positions = n[:, None] + sub["depth"]  # [B, t]
      empty = lambda c: jnp.zeros((c.shape[0], t) + c.shape[2:], c.dtype)  # [B, t, Kv, Hd]
      view = jax.tree.map(empty, {"k": cache["k"][l:], "v": cache["v"][l:]})
      view.update(slots=jnp.broadcast_to(jnp.arange(t), positions.shape), mask=sub["mask"],
                  limit=n)
      h, block_kv = model.run_layers_block(sub["hidden"], positions, cache, l, None, tree=view)
      logits = penalize(model.logits(h), _block_seen(seen, sub, params), params)  # [B, t, V]
      target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      pad = lambda x: jnp.pad(x, ((0, 0), (0, t_max - t), (0, 0), (0, 0)))  # [B, T, Kv, Hd]
      return (jnp.pad(target, ((0, 0), (0, t_max - t)), constant_values=-1),
              jax.tree.map(pad, block_kv))
    return run

  # One block size still goes through the conditional (see kangaroo._verify_switch).
  branches = [run_block(t) for t in sizes] * (2 if len(sizes) == 1 else 1)
  return jax.lax.switch(branch, branches, block, seen)


def accept_path(block: dict, target, gamma: int):
  """Greedy walk: the deepest node whose path from the root agrees with the target.

  Returns (accepted drafts a [B], next token z [B], path [B, gamma + 1]: block indices of
  the root and the accepted nodes by depth; entries past a repeat the root).
  """
  parent_target = jnp.take_along_axis(target, block["parent"], axis=1)  # [B, T]
  ok = block["valid"] & (block["tokens"] == parent_target)
  ok = ok.at[:, 0].set(True)
  path_ok = jnp.all(jnp.where(block["mask"], ok[:, None, :], True), axis=-1)  # [B, T]
  best = jnp.argmax(jnp.where(path_ok, block["depth"], -1), axis=1)  # [B]
  a = jnp.take_along_axis(block["depth"], best[:, None], 1)[:, 0]
  z = jnp.take_along_axis(target, best[:, None], 1)[:, 0]
  on_path = jnp.take_along_axis(block["mask"], best[:, None, None], 1)[:, 0]  # [B, T]
  at_depth = on_path[:, None, :] & (block["depth"][:, None, :]
                                    == jnp.arange(gamma + 1)[None, :, None])  # [B, G+1, T]
  return a, z, jnp.argmax(at_depth, axis=-1)


def tree_round(model: Llama, adapter: Adapter, draft_head, draft_ids, st: RoundState, eta, *,
               gamma: int, topk: int, nodes: int, sizes: tuple[int, ...],
               params: SamplingParams):
  """One tree round: draft, verify, and write the accepted path into every cache.

  Returns (Verdict: the path's tokens (y0, then the accepted drafts) and layer-l states,
  accepted drafts, next token, nodes verified, draft steps; cache; adapter cache).
  `sizes`: the static verification block sizes.
  """
  l = adapter.acfg.exit_layer
  n, live = st.n, ~st.done
  tree, h0, steps, cache, acache = draft_tree(model, adapter, draft_head, draft_ids, st, eta,
                                              gamma=gamma, topk=topk, params=params)
  chosen = select_nodes(tree, nodes)  # [B, N] slots
  block = verification_block(tree, chosen, st.y0, h0)
  target, deep_kv = verify_tree(model, block, n, cache, st.seen, live, l=l,
                                sizes=sizes, params=params)
  a, z, path = accept_path(block, target, gamma)
  rows = jnp.arange(path.shape[0])[:, None]  # [B, 1]
  positions = n[:, None] + jnp.arange(gamma + 1)[None]  # [B, G+1]
  cache = kv.write_layers(cache, jax.tree.map(lambda x: x[rows, path], deep_kv), l, positions)
  # The root's shallow and adapter entries are in their caches already; the path's nodes
  # go after it. A root entry (path index 0) past the path only fills slots that a later
  # round overwrites before anything reads them.
  slots = jnp.take_along_axis(chosen, jnp.maximum(path[:, 1:] - 1, 0), axis=1)  # [B, G]
  node_kv = lambda buffers: jax.tree.map(lambda x: x[rows, slots], buffers)
  cache = kv.write_layers(cache, node_kv(tree.shallow), 0, positions[:, 1:])
  acache = kv.write_layers(acache, node_kv(tree.adapter), 0, positions[:, 1:])
  Y = jnp.take_along_axis(block["tokens"], path, axis=1)
  H = block["hidden"][rows, path]
  verified = jnp.sum(block["valid"][:, 1:], axis=1)
  return Verdict(tokens=Y, hidden=H, accepted=a, next_token=z, verified=verified,
                 steps=steps, looked_up=jnp.zeros_like(steps, bool)), cache, acache
