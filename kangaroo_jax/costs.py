"""What Kangaroo's pieces cost, in units of one plain decoding step, and the speedup they imply.

Each piece runs `n` times inside one jitted `lax.fori_loop`, each iteration feeding its
argmax back as the next input so that nothing can be hoisted out of the loop. A piece's
cost is the slope (t(n0 + iters) - t(n0)) / iters: dispatch, the copy of the cache
argument and other per-call constants cancel out. Pieces, matching `kangaroo.py`:

  plain      one full decoding step: all layers on 1 token, final norm, full LM head
  shallow    layers [0, l) on 1 token (the pending token y0, once per round)
  draft      one draft step: the adapter on 2 positions, the LM head over the draft
             vocabulary, softmax + argmax, then layers [0, l) on the drafted token
  verify[T]  layers [l, L) over T positions, final norm, full LM head, argmax
  tree_draft one depth of tree drafting (`--tree-topk K`): layers [0, l), the adapter and
             the draft head over K frontier nodes at once, top-K (a tree round runs the
             root's shallow + draft step, then one of these per further depth, and
             verifies N + 1 positions: verify[N + 1], whatever the tree mask)

Per round, with k draft steps (mean `drafts_per_round`) and a verify block of T:

  cost   = shallow + k * draft + verify[T]        (plain steps)
  tokens = mean accepted tokens per round (the target's own token included)
  speedup = tokens / cost

`kangaroo.py` verifies the smallest of a few static block sizes (powers of two and
gamma + 1) that holds every sequence's drafts, so T lies between k + 1 and gamma + 1;
at batch 1 it is close to k + 1. Costs do not depend on the weights, so a
randomly initialised model of the target's shape (`SEVEN_B`) gives the costs at scale.

`cost_markdown` puts the measured pieces beside a benchmark's measured speedup (the
report of `python -m kangaroo_jax.bench --costs`).

  python -m kangaroo_jax.costs --preset 7b --dtype bfloat16 --max-block 8
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax import cache as kv
from kangaroo_jax.adapter import Adapter, init_adapter
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.decoding import cache_size
from kangaroo_jax.model import BlockView, Llama
from kangaroo_jax.precision import ACTIVATIONS, as_computed, cache_dtype

# Vicuna/Llama-2-7B shapes (the paper's main target).
SEVEN_B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                      max_position_embeddings=4096)
# SmolLM2-135M shapes (the embedded default model), for CPU checks without the weights.
SMOLLM2_135M = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           rope_theta=100000.0, tie_embeddings=True)
TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
PRESETS = {"7b": SEVEN_B, "135m": SMOLLM2_135M, "tiny": TINY}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0,
                 activations=jnp.float32) -> Llama:
  """A randomly initialised model of `cfg`'s shape (costs do not depend on the weights)."""
  return Llama(cfg, dtype, nnx.Rngs(seed), activations)


# ---- one iteration of each piece: carry -> carry ----

def _plain_step(model, adapter, head, ids, pos, carry):
  tok, cache = carry
  logits, cache = model(tok[:, None], pos[:, None], cache)  # [1, 1, V]
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


def _shallow_step(model, adapter, head, ids, pos, carry):
  tok, cache = carry
  h, cache = model.run_layers(model.embed(tok[:, None]), pos[:, None], cache, 0,
                              adapter.acfg.exit_layer)  # [1, 1, D]
  # Any cheap token that depends on h keeps iterations in sequence.
  return (jnp.argmax(h[:, 0], axis=-1) % model.cfg.vocab_size).astype(jnp.int32), cache


def _draft_step(model, adapter, head, ids, pos, carry):
  tok, h_prev, cache, acache = carry
  h, cache = model.run_layers(model.embed(tok[:, None]), pos[:, None], cache, 0,
                              adapter.acfg.exit_layer)  # [1, 1, D]
  pair = jnp.concatenate([h_prev, h], axis=1)  # [1, 2, D]
  a_out, acache = adapter(pair, pos[:, None] + jnp.arange(-1, 1)[None], acache)
  q = jax.nn.softmax(model.project(a_out[:, 1:], head)[:, 0], axis=-1)  # [1, V']
  # The confidence feeds the carry too, as it feeds the early-exit test in the real loop.
  choice = jnp.argmax(q, axis=-1) + (jnp.max(q, axis=-1) < 0).astype(jnp.int32)
  nxt = choice if ids is None else ids[choice]
  return nxt.astype(jnp.int32), h, cache, acache


def _tree_draft_step(model, adapter, head, ids, pos, carry):
  """One depth of tree drafting: K frontier nodes through the shallow layers, the adapter
  and the draft head in one call, reading the caches (as `tree._node_pass`), then top-K."""
  tok, cache, acache = carry  # tok [1, K]
  k = tok.shape[1]
  positions = jnp.broadcast_to(pos[:, None], tok.shape)  # [1, K]
  l = adapter.acfg.exit_layer
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((k, k), bool))[None], (1, k, k))  # [1, K, K]
  view = dict(slots=jnp.arange(k)[None], mask=mask, limit=pos + 1)
  empty = lambda c: jnp.zeros((1, k) + c.shape[2:], c.dtype)  # [1, K, Kv, Hd]
  h, _ = model.run_layers_block(model.embed(tok), positions, cache, 0, l,
                                tree=view | jax.tree.map(empty, {"k": cache["k"][:l],
                                                                  "v": cache["v"][:l]}))
  abuf = jax.tree.map(empty, acache)
  a_out, _ = adapter(h, positions, acache, view=BlockView(abuf["k"][0], abuf["v"][0],
                                                          view["slots"], mask, pos + 1))
  logq = jax.nn.log_softmax(model.project(a_out, head), axis=-1)  # [1, K, V']
  choice = jax.lax.top_k(logq[:, -1], k)[1]  # [1, K]
  nxt = choice if ids is None else ids[choice]
  return nxt.astype(jnp.int32), cache, acache


def _verify_step(model, adapter, head, ids, pos, carry):
  x, cache = carry  # x [1, T, D]
  t = x.shape[1]
  positions = pos[:, None] + jnp.arange(t)[None]  # [1, T]
  # As `kangaroo._verify_switch`: the deep layers read the cache, then the block is written.
  l = adapter.acfg.exit_layer
  h, block = model.run_layers_block(x, positions, cache, l, None)
  target = jnp.argmax(model.logits(h), axis=-1)  # [1, T]
  return model.embed(target).astype(x.dtype), kv.write_layers(cache, block, l, positions)


def _build(step: Callable, model: Llama, adapter: Adapter) -> Callable:
  """A jitted fn(state, astate, head, ids, pos, carry, n) running `step` n times."""
  graphdef, _ = nnx.split(model)
  agraphdef, _ = nnx.split(adapter)

  def run(state, astate, head, ids, pos, carry, n):
    m, a = nnx.merge(graphdef, state), nnx.merge(agraphdef, astate)
    return jax.lax.fori_loop(0, n, lambda _, c: step(m, a, head, ids, pos, c), carry)

  return jax.jit(run)


def _slope(fn: Callable, args: tuple, iters: int, reps: int) -> float:
  """Seconds per iteration: (t(n0 + iters) - t(n0)) / iters, best of `reps` each."""
  n0 = max(1, iters // 4)

  def best(n):
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args, jnp.int32(n)))
      times.append(time.perf_counter() - start)
    return min(times)

  jax.block_until_ready(fn(*args, jnp.int32(n0)))  # warm-up
  return max(1e-9, (best(n0 + iters) - best(n0)) / iters)


def measure_costs(model: Llama, adapter: Optional[Adapter] = None,
                  draft_ids: Optional[np.ndarray] = None, *, max_block: int = 8,
                  context: int = 256, iters: int = 20, reps: int = 3,
                  exit_layer: int = 2, tree_topk: int = 0,
                  blocks: Optional[Sequence[int]] = None) -> dict:
  """Times one plain step, a draft step and verification of 1..max_block positions.

  Args:
    model: the target (its weights do not matter; see `random_model`).
    adapter: the draft adapter; None = a fresh one exiting after `exit_layer` layers.
    draft_ids: the reduced draft vocabulary, or None for the full LM head. The draft
      step is timed with the full head as well when a reduced one is given.
    max_block: largest verification block (gamma + 1).
    context: tokens already in the cache; its slots are sized as decoding sizes them.
    iters: iterations per timing (the slope over this many); reps: timings per length.
    exit_layer: for a fresh adapter only.
    tree_topk: also time one depth of tree drafting over this many frontier nodes
      (`tree_draft`; 0 = not).
    blocks: the verification block sizes to time (default 1..max_block); costs between
      them are interpolated (`verify_cost`), which keeps a large model's run short.
  Returns:
    {"seconds": {...}, "relative": {...}} where each has plain, shallow, draft,
    draft_full_vocab and verify {T: ...}; relative = seconds / plain seconds. Also the
    shapes measured (layers, exit_layer, hidden, vocab, draft_vocab, dtype, device).
  """
  adapter = adapter or init_adapter(model.cfg, exit_layer, dtype=model.dtype)
  cfg, dtype = model.cfg, model.dtype
  slots = cache_size(context, 0, max(max_block, *(blocks or [1])) + 2)
  # The weights as the decoding loops pass them (see `precision.as_computed`).
  state = as_computed(nnx.split(model)[1], model.platform)
  astate = as_computed(nnx.split(adapter)[1], model.platform)
  full_head = model.head_weight()  # [V, D]
  head = None if draft_ids is None else full_head[jnp.asarray(draft_ids)]  # [V', D]
  ids = None if draft_ids is None else jnp.asarray(draft_ids, jnp.int32)
  pos = jnp.full((1,), context, jnp.int32)
  tok = jnp.ones((1,), jnp.int32)
  cache = kv.init_model_cache(cfg, 1, slots, cache_dtype(model.activations, model.platform))
  acache = adapter.init_cache(1, slots, cache_dtype(model.activations, model.platform))
  h0 = jnp.zeros((1, 1, cfg.hidden_size), model.activations)

  jobs = {"plain": (_plain_step, (None, None, (tok, cache))),
          "shallow": (_shallow_step, (None, None, (tok, cache))),
          "draft": (_draft_step, (head, ids, (tok, h0, cache, acache)))}
  if draft_ids is not None:
    jobs["draft_full_vocab"] = (_draft_step, (None, None, (tok, h0, cache, acache)))
  if tree_topk:
    jobs["tree_draft"] = (_tree_draft_step, (head, ids, (jnp.ones((1, tree_topk), jnp.int32),
                                                         cache, acache)))
  blocks = sorted(set(blocks)) if blocks else list(range(1, max_block + 1))
  for t in blocks:
    x = jnp.zeros((1, t, cfg.hidden_size), model.activations)
    jobs[f"verify{t}"] = (_verify_step, (None, None, (x, cache)))

  # Trace one at a time (nnx graph handling is not meant for threads), then compile
  # side by side: XLA compiles outside the GIL, which saves minutes on a many-core host.
  lowered = []
  for name, (step, (hd, ids_, carry)) in jobs.items():
    args = (state, astate, hd, ids_, pos, carry)
    lowered.append((name, _build(step, model, adapter).lower(*args, jnp.int32(1)), args))
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    executables = list(pool.map(lambda item: item[1].compile(), lowered))
  compiled = [(name, fn, args) for (name, _, args), fn in zip(lowered, executables)]
  seconds = {name: _slope(fn, args, iters, reps) for name, fn, args in compiled}
  if draft_ids is None:
    seconds["draft_full_vocab"] = seconds["draft"]
  verify = {t: seconds.pop(f"verify{t}") for t in blocks}
  seconds["verify"] = verify
  plain = seconds["plain"]
  relative = {k: (v / plain if not isinstance(v, dict) else {t: s / plain for t, s in v.items()})
              for k, v in seconds.items()}
  return {"seconds": seconds, "relative": relative, "shapes": dict(
      layers=cfg.num_layers, exit_layer=adapter.acfg.exit_layer, adapter_ffn=adapter.acfg.ffn_size,
      hidden=cfg.hidden_size,
      ffn=cfg.intermediate_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
      vocab=cfg.vocab_size, draft_vocab=cfg.vocab_size if draft_ids is None else len(draft_ids),
      dtype=jnp.dtype(dtype).name, activations=jnp.dtype(model.activations).name, context=context, cache_slots=slots, iters=iters,
      device=str(jax.devices()[0].device_kind))}


# Piece costs measured before (plain steps), to explain a run without measuring anew: this
# 2-core CPU with the embedded 135M model (BENCHMARKS.md, "Where the time goes") and a 7B
# model on an NVIDIA H200, float32 activations, 128-token context (ACCELERATOR.md).
MEASURED = {
    "cpu": dict(shallow=0.049, draft=0.101,
                verify={1: 0.839, 2: 1.359, 3: 1.768, 4: 1.711, 5: 1.853}),
    "h200": dict(shallow=0.078, draft=0.091,
                 verify={1: 1.11, 2: 0.94, 3: 0.96, 5: 0.97, 8: 0.98}),
}


def explain_ratio(stats: dict, speedup: float, backend: str) -> str:
  """One line: why Kangaroo ran at `speedup` x plain here (tokens per verification step
  against what drafting and verifying that many positions cost on this backend) and a
  labelled projection of the same acceptance from the H200's measured costs.

  `stats`: a Kangaroo decode's (mean_accepted_tokens, drafts_per_round,
  verified_drafts_per_round). The round model is `project_speedup`'s.
  """
  tau, k = stats["mean_accepted_tokens"], stats["drafts_per_round"]
  block = stats["verified_drafts_per_round"] + 1  # the drafts sent plus the pending token
  line = f"why {speedup:.2f}x: {tau:.2f} tokens per verification step"
  if backend == "cpu":
    rel = MEASURED["cpu"]
    line += (f", but on this CPU verifying {block:.1f} positions costs "
             f"{verify_cost(rel, block):.2f} plain steps and {k:.2f} draft steps "
             f"{k * rel['draft']:.2f}: a round {round_cost(rel, k, block):.2f} plain steps "
             f"(costs measured for the embedded 135M model, BENCHMARKS.md), "
             f"{project_speedup(rel, tau, k, block):.2f}x "
             "predicted")
  return (line + "; projection, same acceptance on an H200 (its measured costs for a 7B "
          f"model, ACCELERATOR.md): {project_speedup(MEASURED['h200'], tau, k, block):.2f}x")


def verify_cost(relative: dict, block: float) -> float:
  """verify[T] at any block size: linear between the nearest measured sizes, clamped to
  the smallest and largest measured."""
  sizes = sorted(int(t) for t in relative["verify"])
  v = {int(t): c for t, c in relative["verify"].items()}
  block = min(max(block, sizes[0]), sizes[-1])
  hi = next(t for t in sizes if t >= block)
  lo = max(t for t in sizes if t <= block)
  frac = (block - lo) / (hi - lo) if hi > lo else 0.0
  return v[lo] * (1 - frac) + v[hi] * frac


def round_cost(relative: dict, drafts_per_round: float, block: float, tree: bool = False) -> float:
  """Plain steps one round costs: shallow + k * draft + verify[block].

  With `tree`, k counts the tree's depths: the root's draft step, then one `tree_draft`
  (all frontier nodes at once) per further depth.
  """
  if tree:
    drafting = relative["draft"] + max(drafts_per_round - 1, 0.0) * relative["tree_draft"]
  else:
    drafting = drafts_per_round * relative["draft"]
  return relative["shallow"] + drafting + verify_cost(relative, block)


def project_speedup(relative: dict, tokens_per_round: float, drafts_per_round: float,
                    block: float, tree: bool = False) -> float:
  """Speedup over plain decoding = tokens per round / plain steps per round.

  Args:
    relative: `measure_costs(...)["relative"]`.
    tokens_per_round: mean accepted tokens per verification (bonus token included).
    drafts_per_round: mean draft steps per round.
    block: verified positions per round: gamma + 1 for a fixed block,
      drafts_per_round + 1 for an exactly sized one (`kangaroo.py` is in between).
    tree: a tree round (drafts_per_round = depths; see `round_cost`).
  """
  return tokens_per_round / round_cost(relative, drafts_per_round, block, tree)


def projection_table(relative: dict, gamma: int, acceptance: Sequence[tuple[str, float, float]]
                     ) -> list[dict]:
  """Projected speedups for (label, tokens_per_round, drafts_per_round) rows."""
  rows = []
  for label, tau, k in acceptance:
    rows.append(dict(label=label, tokens_per_round=tau, drafts_per_round=k,
                     fixed_block=project_speedup(relative, tau, k, gamma + 1),
                     variable_block=project_speedup(relative, tau, k, k + 1)))
  return rows


def bench_acceptance(results: dict) -> list[dict]:
  """Each Kangaroo method's measured acceptance in a bench results.json (`kangaroo_jax.bench`):
  dict(method, tokens_per_round, drafts_per_round, verified_per_round, tree, speedup)."""
  rows = []
  for name, o in results["overall"].items():
    if not name.startswith("kangaroo") or not o.get("mean_accepted_tokens"):
      continue
    tree = ",tree=" in name or (name == "kangaroo"
                                and bool(results["config"]["kangaroo"].get("tree_nodes")))
    rows.append(dict(method=name, tokens_per_round=o["mean_accepted_tokens"],
                     drafts_per_round=o["drafts_per_round"], verified_per_round=_sent(o),
                     tree=tree, speedup=o["speedup"]))
  return rows


def measured_projection(relative: dict, rows: list[dict]) -> list[dict]:
  """`bench_acceptance` rows with the speedup these costs give them (T = verified + 1)."""
  return [dict(r, projected=project_speedup(relative, r["tokens_per_round"], r["drafts_per_round"],
                                            r["verified_per_round"] + 1, r["tree"]))
          for r in rows]


def format_measured_projection(rows: list[dict], source: str) -> str:
  """A small text table of `measured_projection` rows."""
  lines = [f"  acceptance measured in {source}; projected with the costs above (T = verified + 1):",
           f"  {'method':<52}{'tokens':>7}{'drafts':>7}{'verified':>9}{'measured':>9}{'projected':>10}"]
  for r in rows:
    measured = "–" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    lines.append(f"  {r['method']:<52}{r['tokens_per_round']:>7.2f}{r['drafts_per_round']:>7.2f}"
                 f"{r['verified_per_round']:>9.2f}{measured:>9}{r['projected']:>9.2f}x")
  return "\n".join(lines)


def format_costs(result: dict) -> str:
  """A small text table of the relative costs."""
  r, s, sh = result["relative"], result["seconds"], result["shapes"]
  ffn = f", adapter FFN {sh['adapter_ffn']}" if sh.get("adapter_ffn") else ""
  lines = [f"costs on {sh['device']} ({sh['dtype']}, {sh['activations']} activations, {sh['layers']} layers, hidden {sh['hidden']}, "
           f"exit layer {sh['exit_layer']}{ffn}, draft vocab {sh['draft_vocab']}/{sh['vocab']}, "
           f"{sh['cache_slots']} cache slots)",
           f"  {'piece':<22}{'ms':>9}{'x plain':>9}"]
  for name in ("plain", "shallow", "draft", "draft_full_vocab", "tree_draft"):
    if name not in s:
      continue
    lines.append(f"  {name:<22}{1e3 * s[name]:>9.3f}{r[name]:>9.3f}")
  for t, rel in r["verify"].items():
    lines.append(f"  {'verify T=' + str(t):<22}{1e3 * s['verify'][t]:>9.3f}{rel:>9.3f}")
  return "\n".join(lines)


def format_projection(rows: list[dict], gamma: int) -> str:
  """A small text table of `projection_table` rows."""
  lines = [f"  {'acceptance':<28}{'tokens/round':>13}{'drafts/round':>13}"
           f"{'fixed T=' + str(gamma + 1):>12}{'T=k+1':>8}"]
  for row in rows:
    lines.append(f"  {row['label']:<28}{row['tokens_per_round']:>13.2f}"
                 f"{row['drafts_per_round']:>13.2f}{row['fixed_block']:>11.2f}x"
                 f"{row['variable_block']:>7.2f}x")
  return "\n".join(lines)


def default_acceptance(gamma: int) -> list[tuple[str, float, float]]:
  """Illustrative acceptance rows when none was measured: k drafts, a fraction accepted."""
  return [(f"{k} drafts, {tau - 1:.1f} accepted", tau, float(k))
          for k, tau in ((2, 2.0), (3, 2.5), (gamma, 3.0), (gamma, 4.0)) if k <= gamma]


# ---- markdown for the benchmark report: the measured pieces beside the measured speedup ----

def cost_markdown(costs: dict, kangaroo_rows: dict[str, dict], gamma: int,
                  target_speedup: float, tree: bool = False) -> str:
  """Where Kangaroo's time goes, as markdown: piece costs and the speedup they predict.

  Args:
    costs: what `measure_costs` returned.
    kangaroo_rows: per row label (the benchmark's categories, then "overall") Kangaroo's
      summary there: mean_accepted_tokens, drafts_per_round, verified_drafts_per_round
      (optional) and the measured speedup (None when unknown).
    gamma: the most drafts per round.
    target_speedup: the speedup the levers line says what it would take to reach.
    tree: the rows come from tree drafting (drafts_per_round counts depths; see
      `round_cost`); predicted with the measured `tree_draft` piece.
  """
  rel, sh = costs["relative"], costs["shapes"]
  lines = [f"Where the time goes (`kangaroo_jax.costs`, {sh['device']}, {sh['cache_slots']} cache "
           "slots; one plain step = 1):", "",
           "| piece | x plain step |", "| --- | --- |",
           f"| draft step: layers 0..{sh['exit_layer'] - 1} + adapter + head over "
           f"{sh['draft_vocab']} tokens | {rel['draft']:.3f} |",
           f"| same with the full {sh['vocab']}-token head | {rel['draft_full_vocab']:.3f} |",
           f"| shallow layers alone (pending token, once a round) | {rel['shallow']:.3f} |"]
  if "tree_draft" in rel:
    lines.append(f"| one tree depth: layers 0..{sh['exit_layer'] - 1} + adapter + draft head over "
                 f"the frontier nodes at once | {rel['tree_draft']:.3f} |")
  for t, v in rel["verify"].items():
    lines.append(f"| verify T={t} (layers {sh['exit_layer']}..{sh['layers'] - 1} + head) "
                 f"| {v:.3f} |")
  lines += ["", "Per round: shallow + k x draft + verify[T]; speedup = tokens per round / that "
            "cost. `kangaroo.py` verifies the smallest static block (powers of two, or "
            f"gamma + 1 = {gamma + 1}) that holds the drafts plus the pending token, so T = k + 1 "
            "(k = drafts verified per round, which is fewer than the draft steps when "
            "unconfident drafts are dropped) is the model; T = gamma + 1 shows a fixed-size "
            "block.", "",
            "| category | tokens/round | drafts/round | predicted (T = k+1) | "
            "predicted (T = gamma+1) | measured | gap vs T = k+1 |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  for cat, k in kangaroo_rows.items():
    if not k or not k["mean_accepted_tokens"]:
      continue
    tau, d, v = k["mean_accepted_tokens"], k["drafts_per_round"], _sent(k)
    predicted = project_speedup(rel, tau, d, v + 1, tree)
    # The gap is what the loop costs beyond its pieces (negative: slower than predicted).
    gap = "–" if k["speedup"] is None else f"{100 * (k['speedup'] / predicted - 1):+.0f}%"
    lines.append(f"| {cat} | {tau:.2f} | {d:.2f} | {predicted:.2f}x | "
                 f"{project_speedup(rel, tau, d, gamma + 1, tree):.2f}x | {_speedup(k)}x | {gap} |")
  k = kangaroo_rows.get("overall")
  if k and k["mean_accepted_tokens"] and not tree:
    lines += ["", _levers(rel, k, target_speedup)]
  return "\n".join(lines)


def _levers(rel: dict, k: dict, target: float) -> str:
  """The overall round broken into its pieces, and what would move the speedup."""
  tau, d, v = k["mean_accepted_tokens"], k["drafts_per_round"], _sent(k)
  draft, verify = d * rel["draft"], verify_cost(rel, v + 1)
  total = rel["shallow"] + draft + verify
  full = dict(rel, draft=rel["draft_full_vocab"])
  one = verify_cost(rel, 1)
  flat = dict(rel, verify={t: one for t in rel["verify"]})
  lines = [f"Overall, a round costs {total:.2f} plain steps: {rel['shallow']:.2f} shallow + "
           f"{d:.2f} drafts x {rel['draft']:.3f} = {draft:.2f} drafting + {verify:.2f} verifying "
           f"~{v + 1:.1f} positions ({100 * verify / total:.0f}% of the round), and yields "
           f"{tau:.2f} tokens: {tau / total:.2f}x predicted, {_speedup(k)}x measured "
           "(the gap is per-round work outside the pieces: bookkeeping, block padding). Levers:",
           f"- with these costs, {target:.1f}x needs {target * total:.2f} tokens per round "
           f"(now {tau:.2f})" + (": a better-trained adapter;" if tau < target * total else ";"),
           "- if verifying a block cost no more than one position (as on an accelerator): "
           f"{project_speedup(flat, tau, d, v + 1):.2f}x predicted;",
           "- drafting over the full vocabulary instead: "
           f"{project_speedup(full, tau, d, v + 1):.2f}x predicted."]
  return "\n".join(lines)


def _sent(k: dict) -> float:
  """Drafts verified per round; results without the count (older runs) fall back to the
  draft steps, which overstates the block when unconfident drafts are dropped."""
  v = k.get("verified_drafts_per_round")
  return k["drafts_per_round"] if v is None else v


def _speedup(k: dict) -> str:
  """The measured speedup for a table cell ("–" when unknown)."""
  return "–" if k["speedup"] is None else f"{k['speedup']:.2f}"


def main(argv=None) -> int:
  """The command line; returns the exit status (2 with one `error:` line on bad flags)."""
  from kangaroo_jax import cli
  return cli.exit_status(lambda: _measure_command(argv))


def _measure_command(argv) -> None:
  """Measures a randomly initialised preset and prints costs and projected speedups."""
  from kangaroo_jax.cli import OneLineParser
  p = OneLineParser(description="Kangaroo piece costs relative to one plain step",
                    prog="python -m kangaroo_jax.costs")
  p.add_argument("--preset", choices=sorted(PRESETS), default="7b",
                 help="model shape, randomly initialised (default 7b)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
  p.add_argument("--activations", choices=sorted(ACTIVATIONS), default="float32",
                 help="hidden-state dtype (default float32: lossless; see precision.py)")
  p.add_argument("--exit-layer", type=int, default=2)
  p.add_argument("--adapter-ffn", type=int, default=0, metavar="N",
                 help="time a drafter whose adapter has a SwiGLU FFN of width N (0 = the paper's)")
  p.add_argument("--max-block", type=int, default=8, help="verify T = 1..this (gamma + 1)")
  p.add_argument("--draft-vocab", type=int, default=0,
                 help="reduced draft vocabulary size (0 = full head only)")
  p.add_argument("--context", type=int, default=256)
  p.add_argument("--tree-topk", type=int, default=0,
                 help="also time one depth of tree drafting over this many nodes")
  p.add_argument("--blocks", metavar="A,B",
                 help="verify block sizes to time, e.g. 1,2,5,9,17,33 (default 1..--max-block)")
  p.add_argument("--layers", type=int, metavar="N",
                 help="the preset's width with N layers (a 7B-wide model that fits a small host)")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--accepted", type=float, action="append", default=[],
                 help="tokens per round to project (repeatable; with --drafts)")
  p.add_argument("--drafts", type=float, action="append", default=[],
                 help="draft steps per round, one per --accepted")
  p.add_argument("--project-from", metavar="RESULTS_JSON",
                 help="also project every Kangaroo method of a bench results.json (its measured "
                 "tokens, drafts and verified drafts per round, chain or tree) with these costs")
  p.add_argument("--json", metavar="PATH", help="also write the results here")
  args = p.parse_args(argv)
  measured = None
  if args.project_from:
    with open(args.project_from) as f:  # read first: a bad file fails before the slow part
      try:
        measured = bench_acceptance(json.load(f))
      except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{args.project_from} is not a bench results.json (no {e})") from None
  if len(args.accepted) != len(args.drafts):
    p.error("give one --drafts per --accepted")
  cfg = PRESETS[args.preset]
  if args.layers is not None:
    if not args.exit_layer < args.layers <= cfg.num_layers:
      p.error(f"--layers must be in ({args.exit_layer}, {cfg.num_layers}], got {args.layers}")
    cfg = dataclasses.replace(cfg, num_layers=args.layers)
  try:
    blocks = [int(t) for t in args.blocks.split(",")] if args.blocks else None
  except ValueError:
    p.error(f"--blocks: expected comma-separated block sizes, got {args.blocks!r}")
  if blocks and min(blocks) < 1:
    p.error(f"--blocks: sizes must be >= 1, got {args.blocks}")
  model = random_model(cfg, DTYPES[args.dtype], activations=ACTIVATIONS[args.activations])
  ids = np.arange(args.draft_vocab) if 0 < args.draft_vocab < cfg.vocab_size else None
  if args.adapter_ffn < 0:
    p.error(f"--adapter-ffn must be >= 0, got {args.adapter_ffn}")
  adapter = init_adapter(cfg, args.exit_layer, dtype=model.dtype, ffn_size=args.adapter_ffn)
  result = measure_costs(model, adapter, ids, max_block=args.max_block, context=args.context,
                         iters=args.iters, exit_layer=args.exit_layer,
                         tree_topk=args.tree_topk, blocks=blocks)
  gamma = args.max_block - 1
  acceptance = ([(f"given {a:.2f}/{k:.2f}", a, k) for a, k in zip(args.accepted, args.drafts)]
                or default_acceptance(gamma))
  result["projection"] = projection_table(result["relative"], gamma, acceptance)
  print(format_costs(result))
  print(format_projection(result["projection"], gamma))
  if measured is not None:
    result["measured_projection"] = measured_projection(result["relative"], measured)
    print(format_measured_projection(result["measured_projection"], args.project_from))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  sys.exit(main())
