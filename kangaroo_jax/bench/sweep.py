"""The tuning sweep: a grid of Kangaroo settings, the best lossless one, its tuned file."""
from __future__ import annotations

import os
from typing import Optional

from kangaroo_jax.bench.errors import BenchError
from kangaroo_jax.bench.flags import csv_items, numbers


def sweep_grid(args, stored) -> list[tuple[float, int, Optional[int], bool, int, int, int]]:
  """(eta, gamma, draft_vocab, send_unconfident, tree_nodes, tree_topk, lookup) settings;
  vocab sizes the adapter cannot give and trees larger than top-k x gamma nodes are dropped.
  A tree verifies every node it drafts, so it is swept with send_unconfident yes only;
  prompt lookup goes with the chain only."""
  sends = []
  for v in csv_items(args.sweep_send_unconfident):
    if v not in ("yes", "no"):
      raise BenchError(f"--sweep-send-unconfident: expected yes/no values, got {v!r}")
    sends.append(v == "yes")
  etas = numbers(args.sweep_eta, float, "--sweep-eta")
  gammas = numbers(args.sweep_gamma, int, "--sweep-gamma")
  trees = numbers(args.sweep_tree_nodes, int, "--sweep-tree-nodes")
  topks = numbers(args.sweep_tree_topk, int, "--sweep-tree-topk")
  lookups = list(dict.fromkeys(numbers(args.sweep_lookup, int, "--sweep-lookup")))
  vocabs = []
  for v in csv_items(args.sweep_draft_vocab):
    if v == "stored":
      vocabs.append(None)
    else:
      vocabs += numbers(v, int, "--sweep-draft-vocab")
  if any(not 0 < e <= 1 for e in etas) or any(g < 1 for g in gammas) or any(
      v is not None and v < 0 for v in vocabs) or any(t < 0 for t in trees) or any(
      k < 1 for k in topks) or any(lk < 0 for lk in lookups):
    raise BenchError("sweep values: eta in (0, 1], gamma >= 1, draft vocab >= 0 or 'stored', "
                     "tree nodes >= 0, tree top-k >= 1, lookup >= 0")
  n = 0 if stored is None else len(stored)
  # Without stored ids, 'stored' is the full vocabulary: keep one of the two.
  vocabs = list(dict.fromkeys(0 if v is None and stored is None else v for v in vocabs
                              if v is None or v == 0 or v <= n))
  shapes = [(0, 0)] if 0 in trees else []
  shapes += [(t, k) for t in dict.fromkeys(trees) if t for k in dict.fromkeys(topks)]
  grid = [(e, g, v, s, t, k, lk) for t, k in shapes for lk in (lookups if not t else [0])
          for s in dict.fromkeys(sends) for v in vocabs for g in gammas for e in etas
          if not t or (s and t <= k * g)]
  if not (etas and gammas and vocabs and sends and lookups) or not grid:
    raise BenchError("the sweep grid is empty")
  return grid


def best_setting(results: dict, labels: dict) -> Optional[tuple[str, dict]]:
  """The fastest lossless setting (overall speedup); None if none is lossless."""
  ok = [(results["overall"][name]["speedup"], name) for name in labels
        if name in results["overall"] and results["overall"][name]["lossless"] == 1.0]
  if not ok:
    return None
  _, name = max(ok)
  return name, labels[name]


def best_per_adapter(results: dict, labels: dict) -> dict:
  """{adapter name (None for a one-adapter sweep): (method name, setting) or None}."""
  groups: dict = {}
  for name, setting in labels.items():
    groups.setdefault(setting.get("adapter"), {})[name] = setting
  return {a: best_setting(results, group) for a, group in groups.items()}


def sweep_report(results: dict, labels: dict, args, log) -> dict:
  """Prints the sweep table and writes the best lossless setting to the tuned file."""
  from kangaroo_jax import tuning
  rows = []
  for name, s in labels.items():
    o = results["overall"].get(name)
    if o:
      rows.append(dict(s, speedup=o["speedup"], tokens_per_second=o["tokens_per_second"],
                       mean_accepted_tokens=o["mean_accepted_tokens"],
                       drafts_per_round=o["drafts_per_round"], lossless=o["lossless"]))
  width = max([len(r.get("adapter") or "") for r in rows] + [0])
  adapter_column = (lambda a: f"{a or '':<{width}} ") if width else (lambda a: "")
  log(f"{adapter_column('adapter')}{'eta':>5} {'gamma':>5} {'vocab':>7} {'send':>5} {'tree':>6} "
      f"{'speedup':>8} {'accepted':>9} {'drafts':>7} {'lossless':>9}")
  for r in rows:
    v = "stored" if r["draft_vocab"] is None else r["draft_vocab"]
    tree = (f"{r['tree_nodes']}/{r['tree_topk']}" if r["tree_nodes"]
            else f"look{r['lookup']}" if r.get("lookup") else "chain")
    log(f"{adapter_column(r.get('adapter'))}{r['eta']:>5g} {r['gamma']:>5} {v!s:>7} "
        f"{'yes' if r['send_unconfident'] else 'no':>5} {tree:>6} {r['speedup']:>7.2f}x "
        f"{r['mean_accepted_tokens']:>9.2f} {r['drafts_per_round']:>7.2f} {r['lossless']:>9.0%}")
  bests = best_per_adapter(results, labels)
  out = dict(rows=rows, best=None, tuned_file=None)
  if None not in bests:  # several adapters: each one's best, no tuned file (flags refuse it)
    out["best_per_adapter"] = {a: b and b[1] for a, b in bests.items()}
    for a, b in bests.items():
      log(f"best for {a}: " + (f"{b[0]}, {results['overall'][b[0]]['speedup']:.2f}x" if b
                               else "no setting was lossless on every prompt"))
    return out
  best = bests[None]
  if best is None:
    log("no setting was lossless on every prompt: nothing written")
    return out
  name, setting = best
  o = results["overall"][name]
  measured = dict(
      speedup=o["speedup"], mean_accepted_tokens=o["mean_accepted_tokens"],
      drafts_per_round=o["drafts_per_round"], prompts=o["prompts"],
      max_new_tokens=args.max_new_tokens, adapter=results["config"]["adapter"],
      device=results["config"]["machine"]["device"], date=results["config"]["date"],
      command=results["config"]["command"])
  # The run folder always gets the result; the shipped tuned file only when asked.
  paths = [tuning.write_tuned(setting, os.path.join(args.out, "tuned.json"), measured)]
  path = args.tuned_file or (tuning.tuned_path() if args.write_tuned else None)
  if path:
    paths.append(tuning.write_tuned(setting, path, measured=measured))
  log(f"best: {name}, {o['speedup']:.2f}x; written to {', '.join(paths)}"
      + ("" if path else " (--write-tuned would update " + tuning.tuned_path() + ")"))
  out.update(best=setting, tuned_file=path)
  return out


