"""The benchmark's outputs: markdown (settings, tables, targets, costs), chart, run folder."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from kangaroo_jax.bench.errors import BenchError
from kangaroo_jax.bench.harness import TARGETS
from kangaroo_jax.bench.methods import DESCRIPTIONS, REFERENCE

MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _fmt(x, spec=".2f", none="–"):
  return none if x is None else format(x, spec)


def markdown(results: dict, chart: Optional[str] = None) -> str:
  """The results as markdown: settings, speedup table, Kangaroo detail, targets, costs."""
  cfg, overall = results["config"], results["overall"]
  methods = [m for m in results["methods_run"] if m in overall]
  cats = list(results["categories"]) + ["overall"]
  table = lambda c: results["categories"].get(c) if c != "overall" else overall
  lines = [f"Command: `{cfg['command']}`", "",
           f"{cfg['date']}; {cfg['machine']['device']} ({cfg['machine'].get('processor', '?')}, "
           f"{cfg['machine']['cpu_count']} CPUs, "
           f"jax {cfg['machine']['jax']} on {cfg['machine']['jax_backend']}, load average at "
           f"start {_fmt((cfg['machine'].get('load_average') or [None])[0], '.1f')}); model "
           f"{cfg['model']}; adapter {cfg['adapter']}; greedy, batch 1, "
           f"{cfg['max_new_tokens']} new tokens; {cfg['questions_used']} question(s) "
           f"({cfg['prompts']} prompts) from `{cfg['questions']}`.", "",
           _kangaroo_line(cfg["kangaroo"]), ""]
  lines += [f"- `{m}`: {results.get('descriptions', {}).get(m, DESCRIPTIONS.get(m, m))}"
            for m in methods] + [""]
  for name, reason in results.get("skipped", {}).items():
    lines.append(f"- **{name} skipped**: {reason}")
  if results.get("skipped"):
    lines.append("")
  lines += ["Speedup over plain decoding (tokens/s in brackets) of the decoding after each "
            "answer's first token, the prompt pass apart; then of the whole request, prompt "
            "pass included (Spec-Bench's convention):", "",
            "| category | " + " | ".join(methods) + " | " + " | ".join(
                f"{m} (request)" for m in methods) + " |",
            "| --- |" + " --- |" * 2 * len(methods)]
  for c in cats:
    row = table(c)
    cells = [f"{_fmt(row[m]['speedup'])}x ({_fmt(row[m]['tokens_per_second'], '.1f')})"
             if m in row else "–" for m in methods]
    cells += [f"{_fmt(row[m].get('request_speedup'))}x "
              f"({_fmt(row[m].get('request_tokens_per_second'), '.1f')})"
              if m in row else "–" for m in methods]
    lines.append(f"| {'**overall**' if c == 'overall' else c} | " + " | ".join(cells) + " |")
  if "hf" in overall:  # issue 2: the two plain greedy decoders side by side
    p, h = overall["plain"]["tokens_per_second"], overall["hf"]["tokens_per_second"]
    lines += ["", f"Plain greedy decoding, this project (JAX) vs transformers `generate` "
              f"(PyTorch): {p:.1f} vs {h:.1f} tokens/s, ratio {p / h:.2f}."]
  others = [m for m in methods if m != "plain"]
  drafting = [m for m in others if overall[m].get("drafts_per_round")]
  columns = ([(f"{m} accepted/step", lambda row, m=m: _fmt(row.get(m, {}).get(
      "mean_accepted_tokens"))) for m in others]
             + [(f"{m} drafts/round", lambda row, m=m: _fmt(row.get(m, {}).get(
                 "drafts_per_round"))) for m in drafting]
             + [(f"{m} identical ({REFERENCE.get(m, 'plain')})",
                 lambda row, m=m: f"{row[m]['identical']}/{row[m]['prompts']}" if m in row else "–")
                for m in others])
  if columns:
    lines += ["", "Acceptance and lossless check (identical text, prompt by prompt, against "
              "the reference in brackets):", "",
              "| category | " + " | ".join(h for h, _ in columns) + " |",
              "| --- |" + " --- |" * len(columns)]
    for c in cats:
      lines.append(f"| {'**overall**' if c == 'overall' else c} | "
                   + " | ".join(f(table(c)) for _, f in columns) + " |")
  if results.get("targets"):
    lines += ["", "Targets (Kangaroo, overall):", ""]
    names = {"speedup_vs_plain": "speedup over plain JAX decoding",
             "speed_vs_hf": "tokens/s over transformers greedy generate",
             "lossless": "prompts with text identical to plain decoding"}
    for key, t in results["targets"].items():
      verdict = "met" if t["met"] else f"**missed by {100 * t['short_by']:.0f}%**"
      lines.append(f"- {names[key]}: {_fmt(t['value'])} (target {t['target']:.2f}): {verdict}")
  if results.get("costs"):
    from kangaroo_jax import costs  # jax: only when there are costs to report
    lines += ["", costs.cost_markdown(
        results["costs"], {c: (table(c) or {}).get("kangaroo") for c in cats},
        cfg["kangaroo"]["gamma"], TARGETS["speedup_vs_plain"],
        tree=bool(cfg["kangaroo"].get("tree_nodes")))]
  if chart:
    lines += ["", f"![speedup per category]({chart})"]
  return "\n".join(lines) + "\n"


def _kangaroo_line(k: dict) -> str:
  vocab = ("the full vocabulary" if k["draft_vocab_size"] is None
           else f"a {k['draft_vocab_size']}-token draft vocabulary")
  send = ("the draft that fell below eta is verified too (the paper's rule)"
          if k.get("send_unconfident", True) else "the draft that fell below eta is dropped")
  lookup = (f" Prompt-lookup rounds verify up to {k['lookup']} copied tokens when the last 3 "
            "tokens occurred earlier (the cost table prices every round as an adapter round)."
            if k.get("lookup") else "")
  return (f"Kangaroo settings: eta {k['eta']:g}, gamma {k['gamma']}, exit layer "
          f"{k['exit_layer']}, drafting over {vocab}; {send}.{lookup}")


def chart(results: dict, path: str) -> str:
  """A grouped bar chart of speedup over plain decoding per category and method."""
  import matplotlib
  matplotlib.use("Agg")  # no display on these machines
  import matplotlib.pyplot as plt
  import numpy as np
  methods = [m for m in results["methods_run"] if m != "plain" and m in results["overall"]]
  cats = list(results["categories"]) + ["overall"]
  rows = [results["overall"] if c == "overall" else results["categories"][c] for c in cats]
  x = np.arange(len(cats))
  width = 0.8 / max(1, len(methods))
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats) + 2), 4))
  for i, m in enumerate(methods):
    vals = [r.get(m, {}).get("speedup") or 0.0 for r in rows]
    ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
  ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
  ax.set_xticks(x, cats, rotation=35, ha="right")
  ax.set_ylabel("speedup over plain JAX decoding")
  cfg = results["config"]
  ax.set_title(f"{cfg['machine']['device']}, {cfg['max_new_tokens']} new tokens, greedy",
               fontsize=9)
  if methods:
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_markdown_file(results: dict, path: str, chart_path: Optional[str]) -> None:
  """Replaces the text between the bench markers in `path` (creates it if missing)."""
  rel = None if chart_path is None else os.path.relpath(
      os.path.abspath(chart_path), os.path.dirname(os.path.abspath(path)))
  body = markdown(results, rel)
  block = f"{MARK_BEGIN}\n{body}{MARK_END}"
  if os.path.isfile(path):
    with open(path) as f:
      text = f.read()
    if MARK_BEGIN not in text or MARK_END not in text:
      raise BenchError(f"{path} lacks the markers {MARK_BEGIN} and {MARK_END}")
    text = text[:text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END):]
  else:
    text = f"# Benchmarks\n\n{block}\n"
  with open(path, "w") as f:
    f.write(text)


def default_out_dir(root: str = os.path.join("runs", "bench")) -> str:
  """A new run folder, runs/bench/<date-time> (a suffix when two runs start together)."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  path, n = os.path.join(root, stamp), 1
  while os.path.exists(path):
    n += 1
    path = os.path.join(root, f"{stamp}-{n}")
  return path


def write_outputs(results: dict, out_dir: str) -> dict:
  """results.json, results.md and speedup.png under out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f) for k, f in
           (("json", "results.json"), ("markdown", "results.md"), ("chart", "speedup.png"))}
  with open(paths["json"], "w") as f:
    json.dump(results, f, indent=1, default=str)
  chart(results, paths["chart"])
  with open(paths["markdown"], "w") as f:
    f.write(markdown(results, "speedup.png"))
  return paths

