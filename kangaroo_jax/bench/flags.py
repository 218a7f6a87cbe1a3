"""The bench command's flags, and the checks on them that need no model."""
from __future__ import annotations

import argparse
import os

from kangaroo_jax.bench.errors import BenchError
from kangaroo_jax.bench.methods import METHODS
from kangaroo_jax.bench.questions import DEFAULT_QUESTIONS
from kangaroo_jax.cli import OneLineParser, tree_flag_checks

DESCRIPTION = "Spec-Bench harness: Kangaroo against plain decoding and transformers' peers, same run."


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags (errors raise BenchError instead of printing usage)."""
  p = OneLineParser(prog="python -m kangaroo_jax.bench", description=DESCRIPTION,
                     error_type=BenchError)
  add = p.add_argument
  add("--questions", default=DEFAULT_QUESTIONS, metavar="PATH",
      help="Spec-Bench question file (default: the shipped 2-per-category subset)")
  add("--per-category", type=int, metavar="N", help="first N questions of each category")
  add("--offset", type=int, default=0, metavar="K",
      help="skip the first K questions of each category (e.g. to sweep on held-out ones)")
  add("--categories", metavar="A,B", help="only these categories (comma-separated)")
  add("--max-new-tokens", type=int, default=128, metavar="N")
  add("--methods", default=",".join(METHODS), metavar="A,B",
      help=f"comma-separated, from {', '.join(METHODS)} (plain is always run)")
  add("--skip", default="", metavar="A,B", help="methods to leave out")
  add("--chat-template", metavar="vicuna|chatml|FILE", help="the prompt format when the "
      "tokenizer has none (decode.py's flag; vicuna for Vicuna)")
  add("--model", metavar="PATH", help="HF folder or .gguf (default: embedded SmolLM2-135M)")
  add("--dtype", choices=("float32", "bfloat16"), default="float32",
      help="this project's weights dtype (default float32)")
  add("--activations", choices=("float32", "bfloat16"), default="float32",
      help="this project's hidden-state and KV cache dtype (default float32: lossless)")
  add("--hf-model", metavar="PATH", help="what the transformers peers load (default: --model)")
  add("--adapter", metavar="PATH", help="adapter file or the authors' folder (default: the "
      "shipped one if it fits the model)")
  add("--untrained-adapter", action="store_true", help="a fresh random adapter for a model "
      "that has none (lossless, slower than plain: exercises the code, measures no speedup)")
  add("--adapters", metavar="A,B", help="compare these adapter files at the same setting in one "
      "run: one Kangaroo method each, named kangaroo[adapter=NAME] (NAME=PATH names one; "
      "default: the file's folder when it is called adapter.safetensors, else its stem); "
      "with --sweep, the grid for each file, the best setting per adapter")
  add("--eta", type=float, metavar="ETA", help="default: the tuned setting, else 0.6")
  add("--gamma", type=int, metavar="G", help="default: the tuned setting, else 6")
  add("--draft-vocab", type=int, metavar="N",
      help="0 = full vocabulary, N = first N stored ids (default: tuned, else all stored)")
  add("--send-unconfident", choices=("yes", "no"),
      help="verify the draft that fell below eta too (default: tuned, else yes)")
  add("--tree-nodes", type=int, metavar="N",
      help="tree drafting (greedy): verify the N best nodes; 0 = chain (default: tuned, else 0)")
  add("--tree-topk", type=int, metavar="K", help="tree drafting: children per node "
      "(default: tuned, else 4)")
  add("--lookup", type=int, metavar="N", help="prompt-lookup rounds verify up to N copied "
      "tokens; 0 = off (default: tuned, else 0)")
  add("--hf-threads", type=int, default=os.cpu_count() or 1, metavar="N",
      help="torch threads for the transformers peers (default: all CPUs)")
  add("--out", metavar="DIR", help="results.json, results.md, speedup.png (default: a new "
      "folder runs/bench/<date-time>)")
  add("--write-markdown", metavar="FILE",
      help="also put the results between the bench markers of FILE (e.g. BENCHMARKS.md)")
  add("--from-json", metavar="PATH", help="no run: rebuild markdown/chart from a results.json")
  add("--costs", action="store_true", help="also measure draft/verify costs vs a plain step")
  add("--max-seconds", type=float, metavar="S", help="start no new question after S seconds")
  add("--sweep", action="store_true", help="grid over eta/gamma/draft vocab; the best lossless "
      "setting goes to <out>/tuned.json (and, with --write-tuned, to the tuned file)")
  add("--sweep-eta", default="0.4,0.6,0.8", metavar="A,B")
  add("--sweep-gamma", default="2,4,6", metavar="A,B")
  add("--sweep-draft-vocab", default="stored,0", metavar="A,B",
      help="'stored' = the adapter's own, 0 = full, N = first N stored ids")
  add("--sweep-send-unconfident", default="yes,no", metavar="A,B", help="yes, no or both")
  add("--sweep-tree-nodes", default="0", metavar="A,B",
      help="0 = chain, N = a tree verifying N nodes (e.g. 0,4,8,16,32: chain against trees)")
  add("--sweep-tree-topk", default="4", metavar="A,B", help="children per node of the trees")
  add("--sweep-lookup", default="0", metavar="A,B",
      help="prompt lookup tokens for chain settings: 0 = off (e.g. 0,8)")
  add("--write-tuned", action="store_true",
      help="with --sweep: also update kangaroo_jax/tuned/<backend>.json, which decoding reads")
  add("--tuned-file", metavar="PATH",
      help="with --sweep: also write the best setting to PATH (instead of --write-tuned's file)")
  add("--quiet", action="store_true", help="no per-prompt progress on stderr")
  return p


def csv_items(text: str) -> list[str]:
  """The non-empty items of a comma-separated flag value."""
  return [t.strip() for t in text.split(",") if t.strip()]


def numbers(text: str, kind, flag: str) -> list:
  """A comma-separated flag value as numbers of type `kind`; BenchError naming `flag` if not."""
  try:
    return [kind(t) for t in csv_items(text)]
  except ValueError:
    raise BenchError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def parse_methods(methods: str, skip: str) -> list[str]:
  """The methods to run, plain first; raises BenchError on an unknown name."""
  names, skipped = csv_items(methods), csv_items(skip)
  for n in names + skipped:
    if n not in METHODS:
      raise BenchError(f"unknown method {n!r}; choose from {', '.join(METHODS)}")
  if "plain" in skipped:
    raise BenchError("plain decoding is the baseline and cannot be skipped")
  return ["plain"] + [m for m in METHODS if m in names and m not in skipped and m != "plain"]


def adapter_list(text: str) -> list[tuple[str, str]]:
  """`--adapters` as (name, path) pairs: NAME=PATH, or a name taken from the path."""
  pairs = []
  for item in csv_items(text):
    name, sep, path = item.partition("=")
    if not sep:
      path = item
      stem = os.path.splitext(os.path.basename(path))[0]
      name = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "adapter" else stem
    pairs.append((name, path))
  return pairs


def adapter_list_checks(args) -> list[tuple[bool, str]]:
  """(ok, message) checks of `--adapters` that need no model."""
  if not args.adapters:
    return []
  pairs = adapter_list(args.adapters)
  names = [n for n, _ in pairs]
  return ([(os.path.isfile(p), f"--adapters: no such adapter file: {p}") for _, p in pairs]
          + [(len(set(names)) == len(names), f"--adapters: two adapters share a name in {names}; "
              "name them NAME=PATH"),
             (not (args.sweep and (args.write_tuned or args.tuned_file)),
              "--write-tuned/--tuned-file keep one adapter's best setting: sweep it with "
              "--adapter, not --adapters"),
             (args.adapter is None, "give either --adapter or --adapters, not both")])


def validate(args) -> None:
  """Checks what needs no model, so that mistakes fail before the slow load."""
  checks = [(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
            (args.eta is None or 0 < args.eta <= 1, f"--eta must be in (0, 1], got {args.eta}"),
            (args.gamma is None or args.gamma >= 1, f"--gamma must be >= 1, got {args.gamma}"),
            (args.draft_vocab is None or args.draft_vocab >= 0,
             f"--draft-vocab must be >= 0, got {args.draft_vocab}"),
            (args.hf_threads >= 1, f"--hf-threads must be >= 1, got {args.hf_threads}"),
            (args.adapter is None or os.path.isfile(args.adapter),
             f"no such adapter file: {args.adapter}"),
            *adapter_list_checks(args),
            (args.from_json is None or os.path.isfile(args.from_json),
             f"no such results file: {args.from_json}")] + tree_flag_checks(args)
  for ok, message in checks:
    if not ok:
      raise BenchError(message)


