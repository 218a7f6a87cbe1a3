"""Learning curves of several training runs on one chart: held-out top-1 agreement and
expected acceptance against tokens seen, read from each run's `eval.jsonl`.

  python scripts/plot_study.py --out bench/training/study_capacity.png \
      paper=runs/study/e2_paper ffn768=runs/study/e2_ffn768 ...

`--metric-set sharegpt_self` picks which held-out set to plot (the `eval_<set>_...` keys
that `train.py` writes); the default is the target's own answers, the text a drafter
sees when decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_curve(run_dir: str, metric_set: str) -> list[dict]:
  """The run's evaluations in step order; a one-line ValueError when there are none."""
  path = os.path.join(run_dir, "eval.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"{run_dir}: no eval.jsonl (not a training run folder?)")
  rows = []
  with open(path) as f:
    for line in f:
      if line.strip():
        rows.append(json.loads(line))
  key = f"eval_{metric_set}_top1_agreement"
  rows = sorted((r for r in rows if key in r), key=lambda r: r["step"])
  if not rows:
    raise ValueError(f"{path}: no {key} entries")
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
  p.add_argument("--out", required=True, metavar="PNG")
  p.add_argument("--metric-set", default="sharegpt_self")
  p.add_argument("--title", default="Drafter capacity and depth: same data, same steps")
  args = p.parse_args(argv)
  try:
    curves = []
    for item in args.runs:
      label, sep, run_dir = item.partition("=")
      if not sep:
        label, run_dir = os.path.basename(os.path.normpath(item)), item
      curves.append((label, read_curve(run_dir, args.metric_set)))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, rows in curves:
    x = [r["tokens_seen"] / 1e3 for r in rows]
    for ax, name in zip(axes, ("top1_agreement", "expected_acceptance")):
      ax.plot(x, [r[f"eval_{args.metric_set}_{name}"] for r in rows], marker="o", label=label)
  for ax, name in zip(axes, ("held-out top-1 agreement", "held-out expected acceptance")):
    ax.set_xlabel("training tokens seen (thousands)")
    ax.set_ylabel(f"{name} ({args.metric_set})")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(args.title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
