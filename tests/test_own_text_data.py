"""The committed own-text data (`data/own_text/`): what its card says, and held out from
the benchmark: no prompt in it opens like a Spec-Bench question."""
import os
import re

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
IDS = os.path.join(ROOT, "data", "own_text", "sharegpt_self_ids.npz")
CARD = os.path.join(ROOT, "data", "own_text", "README.md")
SPEC_BENCH = os.path.join(ROOT, "..", "shared", "data", "spec_bench_question.jsonl")


def _card_rows() -> dict:
  """{shard or "all": (conversations, tokens, answer tokens)} from the card's Counts table."""
  rows = {}
  for line in open(CARD, encoding="utf-8").read().split("## Counts", 1)[1].splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    m = re.match(r"(\*\*in all\*\*|\d+)", cells[0]) if len(cells) > 3 else None
    if m:
      key = "all" if m.group(1).startswith("*") else int(m.group(1))
      nums = [int(re.sub(r"[^\d]", "", c.split("(")[0])) for c in cells[1:4]]
      rows[key] = tuple(nums)
  return rows


def test_the_ids_file_is_what_its_card_counts():
  z = np.load(IDS)
  ids, offsets, answer, shard = z["ids"], z["offsets"], z["assistant"], z["shard"]
  assert ids.dtype == np.uint16 and answer.dtype == bool and len(answer) == len(ids)
  assert offsets[0] == 0 and offsets[-1] == len(ids) and np.all(np.diff(offsets) > 0)
  assert len(shard) == len(offsets) - 1
  rows = _card_rows()
  assert rows.pop("all") == (len(shard), len(ids), int(answer.sum()))
  assert sorted(rows) == sorted(set(shard.tolist())), "a shard in the file without a card row"
  for s, (convs, tokens, answers) in rows.items():
    at = np.flatnonzero(shard == s)
    lo, hi = offsets[at[0]], offsets[at[-1] + 1]
    assert np.all(np.diff(at) == 1), f"shard {s} is not contiguous"
    assert (len(at), hi - lo, int(answer[lo:hi].sum())) == (convs, tokens, answers), s
  # Every conversation has an answer, after its prompt.
  firsts = [np.argmax(answer[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
  assert all(f > 0 for f in firsts) and all(answer[a:b].any() for a, b in zip(offsets[:-1], offsets[1:]))


@pytest.mark.skipif(not os.path.isfile(SPEC_BENCH), reason="no ../shared/data/spec_bench_question.jsonl")
def test_no_own_text_prompt_is_a_spec_bench_question():
  from kangaroo_jax import sharegpt
  from kangaroo_jax.weights import load_tokenizer
  tok = load_tokenizer()
  z = np.load(IDS)
  offsets, answer = z["offsets"], z["assistant"]
  records = []
  for a, b in zip(offsets[:-1], offsets[1:]):
    prompt = tok.decode(z["ids"][a:a + int(np.argmax(answer[a:b]))].tolist())
    user = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    records.append({"messages": [{"role": "user", "content": user}]})
  openings = sharegpt.spec_bench_openings([SPEC_BENCH])
  assert len(openings) > 400
  kept, dropped = sharegpt.drop_overlap(records, openings)
  assert dropped == 0 and len(kept) == len(records) > 2000
  # The check does find a question when one is there.
  question = next(iter(openings))
  assert sharegpt.drop_overlap([{"messages": [{"role": "user", "content": question}]}], openings)[1] == 1
