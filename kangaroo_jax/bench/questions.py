"""Spec-Bench questions: the JSON-lines file, and which questions a run takes."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

from kangaroo_jax.bench.errors import BenchError

# The shipped question set lives in kangaroo_jax/questions, beside this package.
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_QUESTIONS = os.path.join(HERE, "questions", "spec_bench_small.jsonl")


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
