"""The timed run: every turn of every question through every method, then the summary.

Protocol (Spec-Bench): greedy, batch 1, every turn timed whole; each method is warmed up
before its first timed prompt of each compiled shape, and methods run prompt by prompt,
interleaved, so a change in machine load hits all of them alike.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any, Callable, Optional, Sequence

from kangaroo_jax.bench.errors import BenchError
from kangaroo_jax.bench.methods import Method
from kangaroo_jax.bench.questions import Question
from kangaroo_jax.cli import one_line

TARGETS = {"speedup_vs_plain": 1.5, "speed_vs_hf": 1.3, "lossless": 1.0}


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
  first_token_seconds: float = 0.0  # the prompt pass; `seconds` is the whole request


def map_count_warning(methods: int, path: str = "/proc/sys/vm/max_map_count",
                      per_method: int = 8000) -> Optional[str]:
  """A warning when this many compiled JAX methods may exhaust Linux's memory-map limit.

  XLA's CPU backend maps each compiled kernel's code separately: one Kangaroo loop takes
  about 10k mappings per prompt-length bucket, so a sweep of many settings over several
  buckets can pass the default limit of 65530, and the run then dies inside LLVM
  ("Cannot allocate memory") however much memory is free. None when the limit is fine
  or unknown (not Linux).
  """
  try:
    with open(path) as f:
      limit = int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None
  need = methods * per_method * 3  # about three prompt-length buckets in a Spec-Bench run
  if need <= limit:
    return None
  return (f"warning: vm.max_map_count is {limit}; {methods} compiled methods may need about "
          f"{need} memory maps and end the run with an LLVM 'Cannot allocate memory' error; "
          f"raise it first: sudo sysctl -w vm.max_map_count={max(262144, 2 * need)}")


def _mismatch(a: str, b: str) -> str:
  """Where two texts first differ, with a little context."""
  i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  return f"char {i}: {a[max(0, i - 20):i + 20]!r} vs reference {b[max(0, i - 20):i + 20]!r}"


def run_questions(questions: Sequence[Question], methods: Sequence[Method], tokenizer, *,
                  log: Callable[[str], None] = lambda s: None,
                  max_seconds: Optional[float] = None,
                  on_prompt: Optional[Callable[[list[Record]], None]] = None,
                  chat_template: Optional[str] = None) -> tuple[list[Record], dict]:
  """Runs every turn of every question through every method (plain first).

  Returns (records, skipped {method: reason}). A method that raises is dropped with its
  records and reported as skipped; the others go on. With `max_seconds`, no new
  question starts after that much time (the records say how far it got). `on_prompt`
  gets each prompt's records as soon as they exist (the command appends them to
  records.jsonl, so that a run killed midway keeps what it measured).
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
      ids = encode_prompt(tokenizer, messages, chat_template=chat_template)
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
            refused = one_line(e)  # e.g. too long for the model: no method gets this prompt
            break
          if m.name == "plain":
            raise
          skipped[m.name] = f"failed on question {q.question_id} turn {turn}: {one_line(e)}"
          log(f"{m.name}: skipped ({skipped[m.name]})")
          live.remove(m)
          records = [r for r in records if r.method != m.name]
          continue
        text = tokenizer.decode(out.tokens, skip_special_tokens=True)
        texts[m.name], token_lists[m.name] = text, out.tokens
        rec = Record(q.question_id, q.category, turn, m.name, len(ids), len(out.tokens), seconds,
                     out.verified, out.steps, out.draft_steps,
                     drafts_verified=out.drafts_verified,
                     first_token_seconds=out.first_token_seconds)
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
      if on_prompt is not None:
        on_prompt([r for r in records if r.question_id == q.question_id and r.turn == turn])
      # The next turn sees plain decoding's answer, the same for every method.
      history = messages + [{"role": "assistant", "content": texts["plain"]}]
  return records, skipped


def _summary(rs: Sequence[Record]) -> dict:
  """One method's totals over records `rs`.

  tokens_per_second is the decoding: the tokens after each answer's first over the
  request time less the prompt pass that gave it (which grows with the prompt and is the
  same work in every method); request_tokens_per_second times the whole request, all
  new tokens over it (Spec-Bench's convention).
  """
  tokens, seconds = sum(r.new_tokens for r in rs), sum(r.seconds for r in rs)
  first = sum(r.first_token_seconds for r in rs)
  decoded = tokens - sum(1 for r in rs if r.new_tokens)
  steps = sum(r.steps for r in rs)
  judged = [r for r in rs if r.identical is not None]
  return dict(prompts=len(rs), new_tokens=tokens, seconds=seconds,
              first_token_seconds=first, decoding_seconds=seconds - first,
              tokens_per_second=decoded / (seconds - first) if seconds > first else 0.0,
              request_tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
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
  each summary has prompts, new_tokens, seconds, tokens_per_second (the decoding after
  each first token), speedup, request_tokens_per_second and request_speedup (whole
  requests), mean_accepted_tokens, drafts_per_round, identical (count), lossless (fraction).
  """
  cats = list(dict.fromkeys(r.category for r in records))

  def block(rs):
    out = {m: _summary([r for r in rs if r.method == m]) for m in methods}
    out = {m: s for m, s in out.items() if s["prompts"]}
    base = out.get("plain", {}).get("tokens_per_second")
    request = out.get("plain", {}).get("request_tokens_per_second")
    for s in out.values():
      s["speedup"] = s["tokens_per_second"] / base if base else None
      s["request_speedup"] = s["request_tokens_per_second"] / request if request else None
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
