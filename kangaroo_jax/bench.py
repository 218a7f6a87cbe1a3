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
each compiled shape, so compilation is never timed. Speed = new tokens / wall time per
category and overall; speedup = speed / plain decoding's speed in the same run. Methods
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
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable, Hashable, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_QUESTIONS = os.path.join(HERE, "questions", "spec_bench_small.jsonl")
METHODS = ("plain", "kangaroo", "hf", "hf_early_exit", "hf_pld")
DESCRIPTIONS = {
    "plain": "kangaroo-jax plain greedy decoding (JAX)",
    "kangaroo": "kangaroo-jax Kangaroo self-speculative decoding (JAX)",
    "hf": "transformers greedy generate (PyTorch)",
    "hf_early_exit": "transformers assisted generation, assistant_early_exit (LayerSkip-style)",
    "hf_pld": "transformers prompt-lookup decoding (prompt_lookup_num_tokens=10)",
}
# Whose text each method must reproduce. The assisted peers are judged against
# transformers' own greedy output: PyTorch and XLA float32 can break near-ties differently.
REFERENCE = {"plain": "plain", "kangaroo": "plain", "hf": "plain", "hf_early_exit": "hf",
             "hf_pld": "hf"}
TARGETS = {"speedup_vs_plain": 1.5, "speed_vs_hf": 1.3, "lossless": 1.0}
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"
EXIT_ERROR = 2


class BenchError(ValueError):
  """Bad benchmark input (questions file, category, method, flag); the message says which."""


# ---- questions ----

@dataclasses.dataclass(frozen=True)
class Question:
  question_id: Any
  category: str
  turns: tuple[str, ...]


def load_questions(path: str) -> list[Question]:
  """Parses a Spec-Bench question file (JSON lines: question_id, category, turns).

  Raises:
    BenchError: the file is missing, unreadable, empty, or a line is malformed (the
      message names the line).
  """
  if not os.path.isfile(path):
    raise BenchError(f"no such questions file: {path}")
  questions, seen = [], set()
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise BenchError(f"cannot read questions file {path}: {e}") from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      raise BenchError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
      raise BenchError(f"{where}: expected a JSON object")
    for key in ("question_id", "category", "turns"):
      if key not in d:
        raise BenchError(f"{where}: lacks the field {key!r}")
    turns = d["turns"]
    if (not isinstance(turns, list) or not turns
        or not all(isinstance(t, str) and t.strip() for t in turns)):
      raise BenchError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    if not isinstance(d["category"], str) or not d["category"]:
      raise BenchError(f"{where}: 'category' must be a non-empty string")
    if d["question_id"] in seen:
      raise BenchError(f"{where}: duplicate question_id {d['question_id']!r}")
    seen.add(d["question_id"])
    questions.append(Question(d["question_id"], d["category"], tuple(turns)))
  if not questions:
    raise BenchError(f"{path} holds no questions")
  return questions


def select_questions(questions: Sequence[Question], categories: Optional[Sequence[str]] = None,
                     per_category: Optional[int] = None, offset: int = 0) -> list[Question]:
  """Questions `offset`..`offset + per_category - 1` of each wanted category, in file order.

  An offset keeps a tuning sweep off the questions the benchmark reports.
  """
  known = list(dict.fromkeys(q.category for q in questions))
  for c in categories or ():
    if c not in known:
      raise BenchError(f"unknown category {c!r}; the questions file has: {', '.join(known)}")
  if per_category is not None and per_category < 1:
    raise BenchError(f"--per-category must be >= 1, got {per_category}")
  if offset < 0:
    raise BenchError(f"--offset must be >= 0, got {offset}")
  wanted = set(categories or known)
  seen: dict[str, int] = {}
  out = []
  for q in questions:
    if q.category not in wanted:
      continue
    i = seen[q.category] = seen.get(q.category, 0) + 1
    if i > offset and (per_category is None or i <= offset + per_category):
      out.append(q)
  if not out:
    raise BenchError(f"no questions left after --offset {offset}")
  return out


# ---- methods: run(prompt ids) -> Output, plus the key under which one warm-up suffices ----

@dataclasses.dataclass
class Output:
  """One decoded turn: new tokens (EOS included when hit) and step counts.

  `verified` tokens came out of `steps` target forward passes (Spec-Bench's mean accepted
  tokens per step = verified / steps); `draft_steps` drafting passes were spent on them,
  and `drafts_verified` of their drafts were sent to verification (Kangaroo only).
  """
  tokens: list[int]
  verified: int
  steps: int
  draft_steps: int = 0
  drafts_verified: Optional[int] = None


@dataclasses.dataclass
class Method:
  name: str
  description: str
  reference: str
  run: Callable[[list[int]], Output]
  warm_key: Callable[[list[int]], Hashable]
  settings: dict = dataclasses.field(default_factory=dict)


class PeerUnavailable(Exception):
  """A peer that cannot load; the run reports it as skipped."""


def jax_plain(model, eos: Sequence[int], max_new_tokens: int) -> Method:
  """This project's plain greedy decoding."""
  from kangaroo_jax.decoding import bucket, plain_decode

  def run(ids):
    tokens = plain_decode(model, [ids], max_new_tokens=max_new_tokens, eos_ids=eos).tokens[0]
    # The first token comes from the prefill, as in Kangaroo's count.
    return Output(tokens, len(tokens) - 1, len(tokens) - 1)

  return Method("plain", DESCRIPTIONS["plain"], "plain", run,
                lambda ids: ("plain", bucket(len(ids))))


def kangaroo_label(eta: float, gamma: int, draft_vocab: Optional[int],
                   send_unconfident: bool = True) -> str:
  """The method name of one sweep setting, e.g. kangaroo[eta=0.6,gamma=4,vocab=stored,send=yes]."""
  vocab = "stored" if draft_vocab is None else ("full" if draft_vocab == 0 else draft_vocab)
  send = "yes" if send_unconfident else "no"
  return f"kangaroo[eta={eta:g},gamma={gamma},vocab={vocab},send={send}]"


def jax_kangaroo(model, adapter, draft_ids, eos: Sequence[int], max_new_tokens: int, eta: float,
                 gamma: int, name: str = "kangaroo", draft_vocab: Optional[int] = None,
                 send_unconfident: bool = True) -> Method:
  """Kangaroo decoding with one (eta, gamma, draft vocabulary, send_unconfident) setting."""
  from kangaroo_jax.decoding import bucket
  from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
  kparams = KangarooParams(eta, gamma, send_unconfident)
  vocab = None if draft_ids is None else len(draft_ids)

  def run(ids):
    r = kangaroo_decode(model, adapter, [ids], max_new_tokens=max_new_tokens, kparams=kparams,
                        eos_ids=eos, draft_ids=draft_ids)
    tokens = r.tokens[0]
    return Output(tokens, len(tokens) - 1, r.stats["rounds"], r.stats["draft_steps"],
                  r.stats["drafts_verified"])

  # eta is a traced argument: settings that differ only in eta share compiled code.
  return Method(name, DESCRIPTIONS["kangaroo"], "plain", run,
                lambda ids: ("kangaroo", gamma, send_unconfident, vocab, bucket(len(ids))),
                dict(eta=eta, gamma=gamma, draft_vocab=draft_vocab, draft_vocab_size=vocab,
                     send_unconfident=send_unconfident, exit_layer=adapter.acfg.exit_layer))


def load_hf_model(path: Optional[str], threads: int):
  """The same checkpoint as a transformers PyTorch float32 model (a .gguf or a folder)."""
  try:
    import torch
    import transformers
    from kangaroo_jax import weights
    torch.set_num_threads(threads)
    path = weights.default_model_path() if path is None else os.path.abspath(path)
    if path.endswith(".gguf"):
      model = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    else:
      model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
  except Exception as e:  # ImportError, OSError, ValueError... all mean "peer unavailable"
    raise PeerUnavailable(f"transformers cannot load {path}: {_one_line(e)}") from e


def hf_method(name: str, hf_model, eos: Sequence[int], pad_id: int, max_new_tokens: int,
              **generate_kwargs) -> Method:
  """A transformers `generate` peer; counts target and early-exit draft forward passes."""
  import torch
  base = getattr(hf_model, hf_model.base_model_prefix)
  layers = base.config.num_hidden_layers
  counts = {"target": 0, "draft": 0}

  def count(module, args, kwargs):
    # Early exit lowers num_hidden_layers while drafting (EarlyExitCandidateGenerator).
    counts["draft" if base.config.num_hidden_layers < layers else "target"] += 1

  hf_model.register_forward_pre_hook(count, with_kwargs=True)

  def run(ids):
    counts.update(target=0, draft=0)
    x = torch.tensor([ids])
    with torch.inference_mode():
      out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=list(eos), pad_token_id=pad_id,
                              **generate_kwargs)
    tokens = out[0, len(ids):].tolist()
    # Every target pass, the first included, yields its own token plus accepted drafts.
    return Output(tokens, len(tokens), max(1, counts["target"]), counts["draft"])

  return Method(name, DESCRIPTIONS[name], REFERENCE[name], run, lambda ids: name,
                dict(generate_kwargs))


# ---- the run ----

@dataclasses.dataclass
class Record:
  question_id: Any
  category: str
  turn: int
  method: str
  prompt_tokens: int
  new_tokens: int
  seconds: float
  verified: int
  steps: int
  draft_steps: int
  identical: Optional[bool] = None
  same_tokens: Optional[bool] = None
  mismatch: Optional[str] = None
  drafts_verified: Optional[int] = None


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _mismatch(a: str, b: str) -> str:
  """Where two texts first differ, with a little context."""
  i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  return f"char {i}: {a[max(0, i - 20):i + 20]!r} vs reference {b[max(0, i - 20):i + 20]!r}"


def run_questions(questions: Sequence[Question], methods: Sequence[Method], tokenizer, *,
                  log: Callable[[str], None] = lambda s: None,
                  max_seconds: Optional[float] = None) -> tuple[list[Record], dict]:
  """Runs every turn of every question through every method (plain first).

  Returns (records, skipped {method: reason}). A method that raises is dropped with its
  records and reported as skipped; the others go on. With `max_seconds`, no new
  question starts after that much time (the records say how far it got).
  """
  from kangaroo_jax.api import encode_prompt
  from kangaroo_jax.decoding import PromptError
  if not methods or methods[0].name != "plain":
    raise BenchError("the method list must start with plain decoding (the baseline)")
  live = list(methods)
  warmed: set = set()
  records: list[Record] = []
  skipped: dict[str, str] = {}
  start = time.perf_counter()
  total = sum(len(q.turns) for q in questions)
  done = 0
  for q in questions:
    if max_seconds is not None and time.perf_counter() - start > max_seconds:
      log(f"time budget of {max_seconds:.0f} s reached: stopping after {done}/{total} prompts")
      break
    history: list[dict] = []
    for turn, user in enumerate(q.turns, 1):
      messages = history + [{"role": "user", "content": user}]
      ids = encode_prompt(tokenizer, messages)
      texts, token_lists, line, refused = {}, {}, [], ""
      for m in list(live):
        try:
          # Methods sharing a key share compiled code (e.g. sweep settings differing in eta).
          if m.warm_key(ids) not in warmed:
            m.run(ids)  # compiles (JAX) or allocates (PyTorch) outside the timing
            warmed.add(m.warm_key(ids))
          t0 = time.perf_counter()
          out = m.run(ids)
          seconds = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  a failing method must not end the run
          if m.name == "plain" and isinstance(e, PromptError):
            refused = _one_line(e)  # e.g. too long for the model: no method gets this prompt
            break
          if m.name == "plain":
            raise
          skipped[m.name] = f"failed on question {q.question_id} turn {turn}: {_one_line(e)}"
          log(f"{m.name}: skipped ({skipped[m.name]})")
          live.remove(m)
          records = [r for r in records if r.method != m.name]
          continue
        text = tokenizer.decode(out.tokens, skip_special_tokens=True)
        texts[m.name], token_lists[m.name] = text, out.tokens
        rec = Record(q.question_id, q.category, turn, m.name, len(ids), len(out.tokens), seconds,
                     out.verified, out.steps, out.draft_steps,
                     drafts_verified=out.drafts_verified)
        ref = m.reference if m.reference in texts else "plain"
        if m.name != "plain":
          rec.identical = text == texts[ref]
          rec.same_tokens = out.tokens == token_lists[ref]
          if not rec.identical:
            rec.mismatch = f"vs {ref}: {_mismatch(text, texts[ref])}"
        records.append(rec)
        line.append(f"{m.name} {len(out.tokens) / seconds:.1f} tok/s"
                    + ("" if rec.identical in (None, True) else " DIFFERS"))
      done += 1
      if "plain" not in texts:
        log(f"[{done}/{total}] {q.category} q{q.question_id} turn {turn}: skipped ({refused})")
        break
      log(f"[{done}/{total}] {q.category} q{q.question_id} turn {turn} ({len(ids)} prompt "
          f"tokens): " + ", ".join(line))
      # The next turn sees plain decoding's answer, the same for every method.
      history = messages + [{"role": "assistant", "content": texts["plain"]}]
  return records, skipped


def _summary(rs: Sequence[Record]) -> dict:
  tokens, seconds = sum(r.new_tokens for r in rs), sum(r.seconds for r in rs)
  steps = sum(r.steps for r in rs)
  judged = [r for r in rs if r.identical is not None]
  return dict(prompts=len(rs), new_tokens=tokens, seconds=seconds,
              tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
              mean_accepted_tokens=sum(r.verified for r in rs) / steps if steps else None,
              drafts_per_round=sum(r.draft_steps for r in rs) / steps if steps else None,
              verified_drafts_per_round=(
                  sum(r.drafts_verified for r in rs) / steps
                  if steps and all(r.drafts_verified is not None for r in rs) else None),
              identical=sum(bool(r.identical) for r in judged) if judged else None,
              lossless=sum(bool(r.identical) for r in judged) / len(judged) if judged else None)


def aggregate(records: Sequence[Record], methods: Sequence[str]) -> dict:
  """Per category and overall: tokens/s, speedup vs plain, acceptance, lossless rate.

  Returns {"categories": {category: {method: summary}}, "overall": {method: summary}};
  each summary has prompts, new_tokens, seconds, tokens_per_second, speedup,
  mean_accepted_tokens, drafts_per_round, identical (count), lossless (fraction).
  """
  cats = list(dict.fromkeys(r.category for r in records))

  def block(rs):
    out = {m: _summary([r for r in rs if r.method == m]) for m in methods}
    out = {m: s for m, s in out.items() if s["prompts"]}
    base = out.get("plain", {}).get("tokens_per_second")
    for s in out.values():
      s["speedup"] = s["tokens_per_second"] / base if base else None
    return out

  return {"categories": {c: block([r for r in records if r.category == c]) for c in cats},
          "overall": block(records)}


def check_targets(overall: dict) -> dict:
  """Kangaroo against the issue's targets: >= 1.5x plain, >= 1.3x hf, 100% identical."""
  k = overall.get("kangaroo")
  if not k:
    return {}
  out = {"speedup_vs_plain": dict(value=k["speedup"], target=TARGETS["speedup_vs_plain"])}
  if "hf" in overall:
    out["speed_vs_hf"] = dict(value=k["tokens_per_second"] / overall["hf"]["tokens_per_second"],
                              target=TARGETS["speed_vs_hf"])
  out["lossless"] = dict(value=k["lossless"], target=TARGETS["lossless"])
  for t in out.values():
    t["met"] = t["value"] is not None and t["value"] >= t["target"] - 1e-12
    # How far off, as a fraction of the target (0 when met).
    t["short_by"] = 0.0 if t["met"] else 1 - (t["value"] or 0) / t["target"]
  return out


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict:
  """What the numbers were measured on: CPU, device, load, library versions."""
  import jax
  info = dict(platform=platform.platform(), processor=_cpu_model(),
              cpu_count=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
              jax_backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
  for mod in ("torch", "transformers", "flax"):
    try:
      info[mod] = __import__(mod).__version__
    except ImportError:
      pass
  return info


# ---- output: JSON, markdown, chart ----

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
  lines += ["Speedup over plain decoding (tokens/s in brackets):", "",
            "| category | " + " | ".join(methods) + " |",
            "| --- |" + " --- |" * len(methods)]
  for c in cats:
    row = table(c)
    cells = [f"{_fmt(row[m]['speedup'])}x ({_fmt(row[m]['tokens_per_second'], '.1f')})"
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
    lines += ["", cost_markdown(results)]
  if chart:
    lines += ["", f"![speedup per category]({chart})"]
  return "\n".join(lines) + "\n"


def _kangaroo_line(k: dict) -> str:
  vocab = ("the full vocabulary" if k["draft_vocab_size"] is None
           else f"a {k['draft_vocab_size']}-token draft vocabulary")
  send = ("the draft that fell below eta is verified too (the paper's rule)"
          if k.get("send_unconfident", True) else "the draft that fell below eta is dropped")
  return (f"Kangaroo settings: eta {k['eta']:g}, gamma {k['gamma']}, exit layer "
          f"{k['exit_layer']}, drafting over {vocab}; {send}.")


def cost_markdown(results: dict) -> str:
  """Where Kangaroo's time goes: piece costs and the speedup they predict."""
  from kangaroo_jax import costs as C
  c = results["costs"]
  rel, sh = c["relative"], c["shapes"]
  gamma = results["config"]["kangaroo"]["gamma"]
  lines = [f"Where the time goes (`kangaroo_jax.costs`, {sh['device']}, {sh['cache_slots']} cache "
           "slots; one plain step = 1):", "",
           "| piece | x plain step |", "| --- | --- |",
           f"| draft step: layers 0..{sh['exit_layer'] - 1} + adapter + head over "
           f"{sh['draft_vocab']} tokens | {rel['draft']:.3f} |",
           f"| same with the full {sh['vocab']}-token head | {rel['draft_full_vocab']:.3f} |",
           f"| shallow layers alone (pending token, once a round) | {rel['shallow']:.3f} |"]
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
  cats = list(results["categories"]) + ["overall"]
  for cat in cats:
    row = results["overall"] if cat == "overall" else results["categories"][cat]
    k = row.get("kangaroo")
    if not k or not k["mean_accepted_tokens"]:
      continue
    tau, d, v = k["mean_accepted_tokens"], k["drafts_per_round"], _sent(k)
    predicted = C.project_speedup(rel, tau, d, v + 1)
    # The gap is what the loop costs beyond its pieces (negative: slower than predicted).
    gap = "–" if k["speedup"] is None else f"{100 * (k['speedup'] / predicted - 1):+.0f}%"
    lines.append(f"| {cat} | {tau:.2f} | {d:.2f} | {predicted:.2f}x | "
                 f"{C.project_speedup(rel, tau, d, gamma + 1):.2f}x | {_fmt(k['speedup'])}x | {gap} |")
  k = results["overall"].get("kangaroo")
  if k and k["mean_accepted_tokens"]:
    lines += ["", _levers(rel, k, gamma)]
  return "\n".join(lines)


def _levers(rel: dict, k: dict, gamma: int) -> str:
  """The overall round broken into its pieces, and what would move the speedup."""
  from kangaroo_jax import costs as C
  tau, d, v = k["mean_accepted_tokens"], k["drafts_per_round"], _sent(k)
  draft, verify = d * rel["draft"], C.verify_cost(rel, v + 1)
  total = rel["shallow"] + draft + verify
  target = TARGETS["speedup_vs_plain"]
  full = dict(rel, draft=rel["draft_full_vocab"])
  one = C.verify_cost(rel, 1)
  flat = dict(rel, verify={t: one for t in rel["verify"]})
  lines = [f"Overall, a round costs {total:.2f} plain steps: {rel['shallow']:.2f} shallow + "
           f"{d:.2f} drafts x {rel['draft']:.3f} = {draft:.2f} drafting + {verify:.2f} verifying "
           f"~{v + 1:.1f} positions ({100 * verify / total:.0f}% of the round), and yields "
           f"{tau:.2f} tokens: {tau / total:.2f}x predicted, {_fmt(k['speedup'])}x measured "
           "(the gap is per-round work outside the pieces: bookkeeping, block padding). Levers:",
           f"- with these costs, {target:.1f}x needs {target * total:.2f} tokens per round "
           f"(now {tau:.2f})" + (": a better-trained adapter;" if tau < target * total else ";"),
           "- if verifying a block cost no more than one position (as on an accelerator): "
           f"{C.project_speedup(flat, tau, d, v + 1):.2f}x predicted;",
           "- drafting over the full vocabulary instead: "
           f"{C.project_speedup(full, tau, d, v + 1):.2f}x predicted."]
  return "\n".join(lines)


def _sent(k: dict) -> float:
  """Drafts verified per round; results without the count (older runs) fall back to the
  draft steps, which overstates the block when unconfident drafts are dropped."""
  v = k.get("verified_drafts_per_round")
  return k["drafts_per_round"] if v is None else v


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


# ---- the command line ----

class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, instead of argparse's usage block
    raise BenchError(message)


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags (errors raise BenchError instead of printing usage)."""
  p = _Parser(prog="python -m kangaroo_jax.bench", description=__doc__.split("\n")[0])
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
  add("--model", metavar="PATH", help="HF folder or .gguf (default: embedded SmolLM2-135M)")
  add("--dtype", choices=("float32", "bfloat16"), default="float32",
      help="this project's weights dtype (default float32)")
  add("--activations", choices=("float32", "bfloat16"), default="float32",
      help="this project's hidden-state and KV cache dtype (default float32: lossless)")
  add("--hf-model", metavar="PATH", help="what the transformers peers load (default: --model)")
  add("--adapter", metavar="PATH", help="adapter file (default: the shipped one, else a fresh one)")
  add("--eta", type=float, metavar="ETA", help="default: the tuned setting, else 0.6")
  add("--gamma", type=int, metavar="G", help="default: the tuned setting, else 6")
  add("--draft-vocab", type=int, metavar="N",
      help="0 = full vocabulary, N = first N stored ids (default: tuned, else all stored)")
  add("--send-unconfident", choices=("yes", "no"),
      help="verify the draft that fell below eta too (default: tuned, else yes)")
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
  add("--write-tuned", action="store_true",
      help="with --sweep: also update kangaroo_jax/tuned/<backend>.json, which decoding reads")
  add("--tuned-file", metavar="PATH",
      help="with --sweep: also write the best setting to PATH (instead of --write-tuned's file)")
  add("--quiet", action="store_true", help="no per-prompt progress on stderr")
  return p


def _csv(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _numbers(text: str, kind, flag: str) -> list:
  try:
    return [kind(t) for t in _csv(text)]
  except ValueError:
    raise BenchError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def parse_methods(methods: str, skip: str) -> list[str]:
  """The methods to run, plain first; raises BenchError on an unknown name."""
  names, skipped = _csv(methods), _csv(skip)
  for n in names + skipped:
    if n not in METHODS:
      raise BenchError(f"unknown method {n!r}; choose from {', '.join(METHODS)}")
  if "plain" in skipped:
    raise BenchError("plain decoding is the baseline and cannot be skipped")
  return ["plain"] + [m for m in METHODS if m in names and m not in skipped and m != "plain"]


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
            (args.from_json is None or os.path.isfile(args.from_json),
             f"no such results file: {args.from_json}")]
  for ok, message in checks:
    if not ok:
      raise BenchError(message)


def sweep_grid(args, stored) -> list[tuple[float, int, Optional[int], bool]]:
  """(eta, gamma, draft_vocab, send_unconfident) settings; vocab sizes the adapter cannot
  give are dropped."""
  sends = []
  for v in _csv(args.sweep_send_unconfident):
    if v not in ("yes", "no"):
      raise BenchError(f"--sweep-send-unconfident: expected yes/no values, got {v!r}")
    sends.append(v == "yes")
  etas = _numbers(args.sweep_eta, float, "--sweep-eta")
  gammas = _numbers(args.sweep_gamma, int, "--sweep-gamma")
  vocabs = []
  for v in _csv(args.sweep_draft_vocab):
    if v == "stored":
      vocabs.append(None)
    else:
      vocabs += _numbers(v, int, "--sweep-draft-vocab")
  if any(not 0 < e <= 1 for e in etas) or any(g < 1 for g in gammas) or any(
      v is not None and v < 0 for v in vocabs):
    raise BenchError("sweep values: eta in (0, 1], gamma >= 1, draft vocab >= 0 or 'stored'")
  n = 0 if stored is None else len(stored)
  # Without stored ids, 'stored' is the full vocabulary: keep one of the two.
  vocabs = list(dict.fromkeys(0 if v is None and stored is None else v for v in vocabs
                              if v is None or v == 0 or v <= n))
  if not (etas and gammas and vocabs and sends):
    raise BenchError("the sweep grid is empty")
  return [(e, g, v, s) for s in dict.fromkeys(sends) for v in vocabs for g in gammas
          for e in etas]


def best_setting(results: dict, labels: dict) -> Optional[tuple[str, dict]]:
  """The fastest lossless setting (overall speedup); None if none is lossless."""
  ok = [(results["overall"][name]["speedup"], name) for name in labels
        if name in results["overall"] and results["overall"][name]["lossless"] == 1.0]
  if not ok:
    return None
  _, name = max(ok)
  return name, labels[name]


def run(args) -> dict:
  """Loads the model(s), runs the questions, writes the outputs; returns the results."""
  log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
  methods = parse_methods(args.methods, args.skip)
  questions = select_questions(load_questions(args.questions),
                               _csv(args.categories) if args.categories else None,
                               args.per_category, args.offset)
  from kangaroo_jax import api, tuning  # slow (jax): after the cheap checks
  tuned = tuning.resolve(eta=args.eta, gamma=args.gamma, draft_vocab=args.draft_vocab,
                         send_unconfident=None if args.send_unconfident is None
                         else args.send_unconfident == "yes")
  eta, gamma, draft_vocab, send = (tuned[k] for k in ("eta", "gamma", "draft_vocab",
                                                      "send_unconfident"))
  start = time.perf_counter()
  model, tokenizer = api.load_model(args.model, args.dtype, args.activations)
  eos = api.eos_ids(model, tokenizer)
  need_adapter = args.sweep or "kangaroo" in methods or "hf_early_exit" in methods
  adapter, stored = api.load_adapter_for(model, args.adapter) if need_adapter else (None, None)
  # A tuned draft vocabulary may not fit this adapter; an explicit flag must.
  draft_ids = tuning.select_draft_ids(stored, draft_vocab, strict=args.draft_vocab is not None)
  log(f"loaded model and adapter in {time.perf_counter() - start:.1f} s")

  runners = [jax_plain(model, eos, args.max_new_tokens)]
  labels: dict[str, dict] = {}
  if args.sweep:
    for e, g, v, s in sweep_grid(args, stored):
      name = kangaroo_label(e, g, v, s)
      runners.append(jax_kangaroo(model, adapter, tuning.select_draft_ids(stored, v), eos,
                                  args.max_new_tokens, e, g, name=name, draft_vocab=v,
                                  send_unconfident=s))
      labels[name] = dict(eta=e, gamma=g, draft_vocab=v, send_unconfident=s)
    methods = ["plain"] + list(labels)
  elif "kangaroo" in methods:
    runners.append(jax_kangaroo(model, adapter, draft_ids, eos, args.max_new_tokens, eta, gamma,
                                draft_vocab=draft_vocab, send_unconfident=send))
  skipped = {}
  hf_names = [m for m in methods if m.startswith("hf")]
  if hf_names:
    try:
      hf_model = load_hf_model(args.hf_model or args.model, args.hf_threads)
    except PeerUnavailable as e:
      skipped = {m: str(e) for m in hf_names}
      log(f"transformers peers skipped: {e}")
    else:
      pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
      extra = {"hf": {}, "hf_pld": {"prompt_lookup_num_tokens": 10}}
      if adapter is not None:  # the LayerSkip-style peer exits where the adapter does
        extra["hf_early_exit"] = {"assistant_early_exit": adapter.acfg.exit_layer}
      runners += [hf_method(m, hf_model, eos, pad, args.max_new_tokens, **extra[m])
                  for m in hf_names]
  records, failed = run_questions(questions, runners, tokenizer, log=log,
                                  max_seconds=args.max_seconds)
  skipped.update(failed)
  ran = [m.name for m in runners if m.name not in skipped]
  results = dict(config=dict(
      command="python -m kangaroo_jax.bench " + " ".join(shlex.quote(a) for a in args.argv),
      date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine_info(),
      model=args.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
      adapter=_adapter_name(args.adapter, api, adapter), dtype=args.dtype,
      activations=args.activations, max_new_tokens=args.max_new_tokens, questions=_short(args.questions),
      questions_used=len({r.question_id for r in records}), prompts=sum(
          1 for r in records if r.method == "plain"),
      kangaroo=dict(eta=eta, gamma=gamma, draft_vocab=draft_vocab, send_unconfident=send,
                    draft_vocab_size=None if draft_ids is None else len(draft_ids),
                    exit_layer=adapter.acfg.exit_layer if adapter else None),
      sweep=args.sweep), methods_run=ran, descriptions={m: DESCRIPTIONS.get(m.split("[")[0], m)
                                                         for m in ran},
      skipped=skipped, **aggregate(records, ran))
  results["targets"] = {} if args.sweep else check_targets(results["overall"])
  results["records"] = [dataclasses.asdict(r) for r in records]
  if args.costs and adapter is not None:
    from kangaroo_jax import costs as C
    log("measuring piece costs...")
    context = int(sorted(r.prompt_tokens for r in records)[len(records) // 2]) if records else 256
    results["costs"] = C.measure_costs(model, adapter, draft_ids, max_block=gamma + 1,
                                       context=context + args.max_new_tokens // 2)
    log(C.format_costs(results["costs"]))
  if args.sweep:
    results["sweep"] = sweep_report(results, labels, args, log)
  return results


def _adapter_name(path, api, adapter) -> str:
  if adapter is None:
    return "none"
  if path:
    return _short(path)
  if os.path.isfile(api.DEFAULT_ADAPTER):
    return f"shipped ({_short(api.DEFAULT_ADAPTER)})"
  return f"fresh random (exit layer {adapter.acfg.exit_layer}; untrained)"


def _short(path: str) -> str:
  """A path relative to the working directory when inside it (for the tables)."""
  rel = os.path.relpath(os.path.abspath(path))
  return path if rel.startswith("..") else rel


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
  log(f"{'eta':>5} {'gamma':>5} {'vocab':>7} {'send':>5} {'speedup':>8} {'accepted':>9} "
      f"{'drafts':>7} {'lossless':>9}")
  for r in rows:
    v = "stored" if r["draft_vocab"] is None else r["draft_vocab"]
    log(f"{r['eta']:>5g} {r['gamma']:>5} {v!s:>7} {'yes' if r['send_unconfident'] else 'no':>5} "
        f"{r['speedup']:>7.2f}x {r['mean_accepted_tokens']:>9.2f} {r['drafts_per_round']:>7.2f} "
        f"{r['lossless']:>9.0%}")
  best = best_setting(results, labels)
  out = dict(rows=rows, best=None, tuned_file=None)
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


def _quiet_environment() -> None:
  # Before transformers is imported: no hub is reachable, and its logs would bury ours.
  for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     "TF_CPP_MIN_LOG_LEVEL": "2", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)


def bench(argv: Sequence[str]) -> dict:
  """Runs the benchmark for command-line arguments `argv`; returns the results dict.

  Writes results.json, results.md and speedup.png under --out (and --write-markdown).
  With --from-json, rebuilds the chart and markdown from a results file instead.

  Raises:
    BenchError (a ValueError) or the library's ValueErrors on bad input.
  """
  _quiet_environment()
  args = build_parser().parse_args(list(argv))
  args.argv = list(argv)
  validate(args)
  if args.out is None:  # a new folder per run: nothing the repository ships is overwritten
    args.out = default_out_dir()
  if args.from_json:
    with open(args.from_json) as f:
      results = json.load(f)
    chart_path = chart(results, os.path.join(os.path.dirname(os.path.abspath(args.from_json)),
                                             "speedup.png"))
  else:
    results = run(args)
    paths = write_outputs(results, args.out)
    chart_path = paths["chart"]
    print(markdown(results))
    print(f"wrote {', '.join(paths.values())}", file=sys.stderr)
  if args.write_markdown:
    write_markdown_file(results, args.write_markdown, chart_path)
    print(f"updated {args.write_markdown}", file=sys.stderr)
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (2 with one `error:` line on bad input)."""
  try:
    bench(sys.argv[1:] if argv is None else argv)
  except (ValueError, OSError) as e:  # the library's errors all subclass ValueError
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_ERROR
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
