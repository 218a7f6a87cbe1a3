"""scripts/accelerator_train.py: the shipped ShareGPT prompt file, and the --tiny run on the
CPU (own answers -> teacher cache -> adapter, results as it goes, resumable)."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("accelerator_train",
                                              os.path.join(ROOT, "scripts", "accelerator_train.py"))
acc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(acc)


def test_prompt_file_is_small_first_turns_without_spec_bench():
  from kangaroo_jax import sharegpt
  assert os.path.getsize(acc.PROMPTS) < 4 << 20
  with gzip.open(acc.PROMPTS, "rt", encoding="utf-8") as f:
    records = [json.loads(l) for l in f]
  assert len(records) > 15000
  assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in records)
  assert len({r["id"] for r in records}) == len(records)
  openings = sharegpt.spec_bench_openings([p for p in acc.QUESTIONS if os.path.isfile(p)])
  assert openings
  assert sharegpt.drop_overlap(records, openings)[1] == 0


def test_bad_input_is_one_line(tmp_path, capsys):
  assert acc.main(["--out", str(tmp_path), "--steps", "0"]) == 2
  assert capsys.readouterr().err == "error: --steps must be > 0, got 0\n"
  assert acc.main(["--out", str(tmp_path), "--prompts", str(tmp_path / "none.gz")]) == 2
  assert "is missing; build it with --build-prompts" in capsys.readouterr().err
  assert acc.main(["--tiny"]) == 2
  assert capsys.readouterr().err.startswith("error: --out is required")


def _curve(results):
  with open(os.path.join(results, "learning_curve.csv")) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_run_writes_results_as_it_goes_and_resumes(tmp_path):
  out, results = str(tmp_path / "work"), str(tmp_path / "results")
  run = lambda *extra: acc.main(["--tiny", "--out", out, "--results", results, *extra])
  assert run("--shards", "3", "--steps", "8") == 0
  status = json.load(open(os.path.join(results, "run.json")))
  assert status["phase"] == "done" and status["data"]["shards"] == 3
  assert status["data"]["shards_returned"] == 3 and status["training"]["steps"] == 8
  names = sorted(os.listdir(results))
  assert names == ["adapter.metrics.json", "adapter.safetensors", "data_self.tar.gz.00",
                   "learning_curve.csv", "learning_curve.png", "own_text_ids.npz",
                   "run.json"]  # $OUT returns at most 8 flat files
  best = json.load(open(os.path.join(results, "adapter.metrics.json")))
  rows = _curve(results)
  assert [r["step"] for r in rows] == ["0", "4", "8"]
  assert best["eval_self_top1_agreement"] == max(float(r["eval_self_top1_agreement"]) for r in rows)
  shard0 = os.path.join(out, "data", "self", "shard_00000")
  mtime = os.path.getmtime(shard0)

  # More data: generation continues at shard 3; a new stage starts from the best adapter.
  assert run("--shards", "4", "--steps", "8") == 0
  assert os.path.getmtime(shard0) == mtime
  status = json.load(open(os.path.join(results, "run.json")))
  assert status["generation_this_call"]["shards"] == 1 and status["data"]["shards"] == 4
  assert [r["stage"] for r in _curve(results)][-1] == "shards_00004"

  # A budget already spent: no new data, one training step, a checkpoint, stopped early...
  assert run("--shards", "4", "--steps", "16", "--budget-seconds", "1") == 0
  status = json.load(open(os.path.join(results, "run.json")))
  assert status["training"]["steps"] == 9 and status["phase"].startswith("train (stopped")
  # ...and the next call resumes from that checkpoint.
  assert run("--shards", "4", "--steps", "16") == 0
  status = json.load(open(os.path.join(results, "run.json")))
  assert status["training"]["resumed_from"] == 9 and status["training"]["steps"] == 16

  # The returned data restores the teacher cache elsewhere (what a later session continues from).
  from kangaroo_jax import teacher
  other = str(tmp_path / "elsewhere")
  acc.unpack_data(results, other)
  got = teacher.load_cache(os.path.join(other, "data", "self")).examples
  want = teacher.load_cache(os.path.join(out, "data", "self")).examples
  assert len(got) == len(want) == 32
  assert all((g.ids == w.ids).all() and (g.teacher_probs == w.teacher_probs).all()
             for g, w in zip(got, want))
  z = np.load(os.path.join(results, "own_text_ids.npz"))
  assert z["ids"].dtype == np.uint16 and list(z["shard"]) == [j for j in range(4) for _ in range(8)]
  for i, w in enumerate(want):
    sl = slice(z["offsets"][i], z["offsets"][i + 1])
    assert (z["ids"][sl] == w.ids).all() and (z["assistant"][sl] == w.assistant).all()
