"""Spec-Bench harness: Kangaroo against plain decoding and transformers' peers, same run.

  python -m kangaroo_jax.bench                                  # the shipped small question set
  python -m kangaroo_jax.bench --questions ../shared/data/spec_bench_question.jsonl --per-category 5
  python -m kangaroo_jax.bench --methods plain,hf               # JAX plain vs transformers greedy
  python -m kangaroo_jax.bench --sweep --per-category 1         # tune eta/gamma/draft vocab
  python -m kangaroo_jax.bench --sweep --write-tuned            # ... and update tuned/<backend>.json
  python -m kangaroo_jax.bench --from-json runs/bench/<run>/results.json --write-markdown BENCHMARKS.md

Protocol (Spec-Bench): greedy, batch 1, a fixed `--max-new-tokens`, every turn of a
question timed whole (MT-bench second turns see the first answer of plain decoding, the
same text for every method). Each method is warmed up before its first timed prompt of
each compiled shape, so compilation is never timed. Two speeds per category and overall:
the decoding (the tokens after each answer's first, over the wall time less the prompt
pass that gave the first: it grows with the prompt and is the same work in every
method) and the whole request (all new tokens over the wall time, Spec-Bench's own);
speedup = speed / plain decoding's speed in the same run, for each. Methods
run prompt by prompt, interleaved, so a change in machine load hits all of them alike.

Methods:
  plain          this project's plain greedy decoding (always run: it is the baseline)
  kangaroo       this project's Kangaroo decoding
  hf             transformers PyTorch greedy `generate` on the same weights
  hf_early_exit  transformers assisted generation, `assistant_early_exit` = the adapter's
                 exit layer (LayerSkip-style self-speculation)
  hf_pld         transformers prompt-lookup decoding (`prompt_lookup_num_tokens=10`)

Lossless check: Kangaroo's and `hf`'s texts against plain's; the two assisted peers
against `hf`'s (same numerics), prompt by prompt. Outputs: results.json, results.md and
speedup.png under `--out` (default: a new run folder runs/bench/<date-time>); files the
repository ships change only when asked: BENCHMARKS.md with `--write-markdown`, the tuned
settings with `--write-tuned` or `--tuned-file` (a sweep always writes its best setting to
<out>/tuned.json). Bad input ends with one `error: <message>` line, status 2; a
peer that fails to load or run is reported as skipped and the run goes on.

Modules, one job each: `questions` (the question file), `methods` (what is compared),
`harness` (the timed run and its summary), `report` (markdown, chart, run folder),
`sweep` (the tuning grid), `flags` (the command-line flags), `command` (the command
itself); piece costs and their report live in `kangaroo_jax.costs`. The names below are
the package's interface.
"""
from kangaroo_jax.bench.command import bench, main, run
from kangaroo_jax.bench.errors import BenchError
from kangaroo_jax.bench.flags import build_parser, parse_methods, validate
from kangaroo_jax.bench.harness import (TARGETS, Record, aggregate, check_targets, machine_info,
                                        run_questions)
from kangaroo_jax.bench.methods import (DESCRIPTIONS, METHODS, REFERENCE, Method, Output,
                                        PeerUnavailable, hf_method, jax_kangaroo, jax_plain,
                                        kangaroo_label, load_hf_model)
from kangaroo_jax.bench.questions import DEFAULT_QUESTIONS, Question, load_questions, select_questions
from kangaroo_jax.bench.report import (MARK_BEGIN, MARK_END, chart, default_out_dir, markdown,
                                       write_markdown_file, write_outputs)
from kangaroo_jax.bench.sweep import best_setting, sweep_grid, sweep_report
from kangaroo_jax.cli import EXIT_ERROR

__all__ = [
    "BenchError", "EXIT_ERROR", "bench", "main", "run", "build_parser", "parse_methods",
    "validate", "TARGETS", "Record", "aggregate", "check_targets", "machine_info",
    "run_questions", "DESCRIPTIONS", "METHODS", "REFERENCE", "Method", "Output",
    "PeerUnavailable", "hf_method", "jax_kangaroo", "jax_plain", "kangaroo_label",
    "load_hf_model", "DEFAULT_QUESTIONS", "Question", "load_questions", "select_questions",
    "MARK_BEGIN", "MARK_END", "chart", "default_out_dir", "markdown", "write_markdown_file",
    "write_outputs", "best_setting", "sweep_grid", "sweep_report"]
