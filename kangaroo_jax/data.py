"""Training conversations: ShareGPT files, TFDS data sets and self-distilled (Magpie) text.

Every source yields `Conversation`s: token ids plus a per-token flag "this token belongs
to an assistant turn". Self-distilled conversations also carry the frozen target's top-k
distribution for every assistant token, recorded while the target wrote them, so training
on them never runs the deep layers again (see TRAINING.md for why).

Bad records (malformed JSON lines, no assistant turn, unknown roles, too long) are
skipped and counted in `Dataset.skipped` with one warning per kind; a source that yields
no usable conversation raises `DataError`.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
         "system": "system"}
_SENTINEL = "\u2063KANGAROO\u2063"  # a string no template contains


class DataError(ValueError):
  """A data source that cannot be used at all (missing, unreadable, or empty)."""


@dataclasses.dataclass
class Conversation:
  """One rendered conversation.

  ids: token ids [T]. assistant: [T] bool, token t is part of an assistant turn.
  teacher_ids / teacher_probs: optional [T, K] top-k of the target's distribution over
  token t given tokens < t (rows of non-assistant tokens are unused).
  hidden: optional [T, D] layer-l states of the frozen target (see `training.add_hidden`).
  """
  ids: np.ndarray
  assistant: np.ndarray
  teacher_ids: Optional[np.ndarray] = None
  teacher_probs: Optional[np.ndarray] = None
  hidden: Optional[np.ndarray] = None


@dataclasses.dataclass
class Dataset:
  """Conversations and the counts of skipped records by reason. `records`: each example's
  record number in its source, where the set is one process's part (`merge_parts`)."""
  examples: list[Conversation]
  skipped: dict[str, int]
  records: list[int] = dataclasses.field(default_factory=list)


def pack(ds: Dataset) -> bytes:
  """A tokenised data set (ids, assistant masks, record numbers, counts) as bytes, to send
  to the other processes of a multi-host run (`multihost.all_gather_bytes`)."""
  import io
  lengths = np.array([len(ex.ids) for ex in ds.examples], np.int64)
  join = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)
  buf = io.BytesIO()
  np.savez(buf, ids=join([ex.ids for ex in ds.examples], np.int32),
           assistant=join([ex.assistant for ex in ds.examples], np.bool_), lengths=lengths,
           records=np.asarray(ds.records, np.int64),
           skipped=np.frombuffer(json.dumps(ds.skipped).encode(), np.uint8))
  return buf.getvalue()


def unpack(blob: bytes) -> Dataset:
  """The data set `pack` wrote."""
  import io
  z = np.load(io.BytesIO(blob))
  cuts = np.cumsum(z["lengths"])[:-1]
  examples = [Conversation(ids, mask) for ids, mask in
              zip(np.split(z["ids"], cuts), np.split(z["assistant"], cuts))] if len(z["lengths"]) else []
  return Dataset(examples, json.loads(z["skipped"].tobytes()), z["records"].tolist())


def merge_parts(parts: Sequence[Dataset], what: str = "data") -> Dataset:
  """One data set from the parts several processes rendered (`conversations_from_records`'
  `part`): the examples in record order and the counts summed, as one process would
  have rendered the whole source."""
  pairs = sorted((r, ex) for ds in parts for r, ex in zip(ds.records, ds.examples))
  counts = collections.Counter()
  for ds in parts:
    counts.update({k: v for k, v in ds.skipped.items() if k != "kept"})
  if not pairs:
    raise DataError(f"{what}: no usable conversation (skipped: {dict(counts) or 'none'})")
  return Dataset([ex for _, ex in pairs], {**counts, "kept": len(pairs)}, [r for r, _ in pairs])


class _Skips:
  """Counts skipped records by reason; warns once per reason."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()

  def __call__(self, reason: str, detail: str = "") -> None:
    if not self.counts[reason]:
      log.warning("skipping a record (%s)%s; further ones are only counted", reason,
                  f": {detail}" if detail else "")
    self.counts[reason] += 1


# ---- chat template rendering ----
def _template(tokenizer, messages, add_generation_prompt: bool, chat_template=None) -> str:
  return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                       add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
  # Templates write their own BOS/special tokens into the text.
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer, messages: Sequence[dict], eos_ids: Sequence[int] = (),
           chat_template: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
  """Renders chat messages with the tokenizer's template.

  Returns (ids [T] int32, assistant [T] bool). An assistant span runs from the end of the
  generation prompt to its end-of-turn token (kept: the draft must predict it); template
  text after that token (e.g. a newline) is not marked.

  Raises:
    ValueError: the template does not render prefixes as prefixes of the whole.
  """
  full = _encode(tokenizer, _template(tokenizer, messages, False, chat_template))
  mask = np.zeros(len(full), bool)
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = _encode(tokenizer, _template(tokenizer, messages[:i], True, chat_template))
    upto = _encode(tokenizer, _template(tokenizer, messages[:i + 1], False, chat_template))
    start, end = len(before), len(upto)
    if full[:start] != before or full[:end] != upto or start >= end:
      raise ValueError("the chat template does not render conversation prefixes as prefixes")
    span = full[start:end]
    stop = next((j for j, t in enumerate(span) if t in eos_ids), len(span) - 1)
    mask[start:start + stop + 1] = True
  return np.asarray(full, np.int32), mask


def to_messages(record: Any) -> list[dict]:
  """A ShareGPT (`conversations` of from/value) or `messages` (role/content) record -> messages.

  Raises:
    ValueError: the record has no recognisable conversation or an unknown role.
  """
  if isinstance(record, dict):
    turns = record.get("conversations", record.get("messages"))
    if turns is None:
      raise ValueError("no 'conversations' or 'messages' field")
  else:
    turns = record
  if isinstance(turns, (bytes, str)):
    turns = json.loads(turns)
  if not isinstance(turns, list):
    raise ValueError("the conversation is not a list of turns")
  out = []
  for t in turns:
    if not isinstance(t, dict):
      raise ValueError("a turn is not an object")
    role = t.get("from", t.get("role"))
    text = t.get("value", t.get("content"))
    role = role.decode() if isinstance(role, bytes) else role
    text = text.decode() if isinstance(text, bytes) else text
    if role not in ROLES or not isinstance(text, str):
      raise ValueError(f"unknown role {role!r} or non-text content")
    out.append({"role": ROLES[role], "content": text})
  return out


def drop_leading_answers(messages: list[dict]) -> list[dict]:
  """`messages` without the assistant turns that open it: they answer nothing the data
  holds (ShareGPT has many conversations that open mid-exchange), and a template cannot
  render the empty prefix before them. FastChat's Vicuna training drops them too."""
  first = next((i for i, m in enumerate(messages) if m["role"] != "assistant"), len(messages))
  return messages[first:]


def conversations_from_records(records: Iterable[Any], tokenizer, *, max_len: int,
                               eos_ids: Sequence[int] = (), chat_template: Optional[str] = None,
                               what: str = "data", part: tuple[int, int] = (0, 1)) -> Dataset:
  """Renders records into conversations; counts and skips the bad ones.

  A conversation longer than `max_len` tokens is cut to `max_len` (counted as
  'truncated'); one left without any assistant token is skipped. part=(i, n): render
  only records number k with k % n == i, process i's share of a multi-host run (the
  parts are joined by `merge_parts`; a part may be empty).
  """
  skip = _Skips()
  out, numbers = [], []
  for number, rec in enumerate(records):
    if number % part[1] != part[0]:
      continue
    if isinstance(rec, Exception):  # a malformed line, passed on by the reader
      skip("malformed", str(rec))
      continue
    try:
      messages = drop_leading_answers(to_messages(rec))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
      skip("bad record", str(e))
      continue
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
      skip("no assistant turn")
      continue
    try:
      ids, mask = render(tokenizer, messages, eos_ids, chat_template)
    except Exception as e:  # templates raise on e.g. two user turns in a row
      skip("template error", str(e).splitlines()[0] if str(e) else type(e).__name__)
      continue
    if len(ids) > max_len:
      skip("truncated", f"{len(ids)} > {max_len} tokens")
      ids, mask = ids[:max_len], mask[:max_len]
      if not mask[1:].any():
        skip("no assistant token within max_len")
        continue
    out.append(Conversation(ids, mask))
    numbers.append(number)
  if skip.counts:
    log.warning("%s: %d conversations kept; %s", what, len(out), dict(skip.counts))
  if not out and part[1] == 1:
    raise DataError(f"{what}: no usable conversation (skipped: {dict(skip.counts) or 'none'})")
  return Dataset(out, {**skip.counts, "kept": len(out)}, numbers)


# ---- (a) ShareGPT JSON / JSONL ----
def epath(path: str):
  """`path` as an etils `epath.Path`: local, or gs://... (multi-host data, workdirs)."""
  from etils import epath as etils_epath  # imported here: only remote paths need it
  return etils_epath.Path(path)


def matching_files(pattern: str) -> list[str]:
  """The files a path or glob names, local (~ expanded) or in a bucket (gs://bucket/x*.json)."""
  if "://" not in pattern:
    return glob.glob(os.path.expanduser(pattern))
  folder, name = pattern.rsplit("/", 1)
  return [str(p) for p in epath(folder).glob(name)] if epath(folder).is_dir() else []


def read_json_records(pattern: str) -> Iterable[Any]:
  """Records from JSON (a list) or JSONL files; `pattern` is a path, glob or comma list
  (local, or gs://... as a multi-host run's hosts share it).

  Malformed JSONL lines come out as exceptions (counted by the caller), not raised.
  """
  files = sorted(f for p in pattern.split(",") for f in matching_files(p.strip()))
  if not files:
    raise DataError(f"no data file matches {pattern!r}")
  for f in files:
    with epath(f).open("r", encoding="utf-8") as fh:
      head = fh.read(4096).lstrip()
      fh.seek(0)
      if head.startswith("["):
        try:
          records = json.load(fh)
        except json.JSONDecodeError as e:
          raise DataError(f"{f} is not valid JSON: {e}") from None
        yield from records
        continue
      for n, line in enumerate(fh, 1):
        if not line.strip():
          continue
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          yield ValueError(f"{f}:{n}: {e}")


def sharegpt(pattern: str, tokenizer, **kw) -> Dataset:
  """Conversations from ShareGPT-format JSON or JSONL files (see `conversations_from_records`)."""
  return conversations_from_records(read_json_records(pattern), tokenizer, what=pattern, **kw)


# ---- (b) TensorFlow Datasets, read without TensorFlow ----
_PROMPT_KEYS = ("prompt", "question", "instruction", "input", "user")
_ANSWER_KEYS = ("response", "answer", "output", "completion", "assistant")


def _tfds_record(rec: dict) -> Any:
  """A TFDS example -> a conversation record (a JSON conversation field or prompt/answer)."""
  if "conversations" in rec or "messages" in rec:
    return rec
  p = next((k for k in _PROMPT_KEYS if k in rec), None)
  a = next((k for k in _ANSWER_KEYS if k in rec), None)
  if p is None or a is None:
    raise ValueError(f"a TFDS example needs a conversation or prompt/answer fields, has {sorted(rec)}")
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  return {"messages": [{"role": "user", "content": text(rec[p])},
                       {"role": "assistant", "content": text(rec[a])}]}


def tfds_records(name: str, split: str = "train", data_dir: Optional[str] = None) -> Iterable[Any]:
  """Records of a TFDS data set by name (+ data_dir) or prepared directory; no TensorFlow.

  Uses `tfds.data_source` / `tfds.builder_from_directory(...).as_data_source` (random
  access over array_record files).
  """
  import tensorflow_datasets as tfds
  try:
    if os.path.isdir(name):
      source = tfds.builder_from_directory(name).as_data_source(split=split)
    else:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    raise DataError(f"cannot open TFDS data set {name!r} split {split!r}: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  for i in range(len(source)):
    try:
      yield _tfds_record(source[i])
    except ValueError as e:
      yield e


def tfds_source(name: str, tokenizer, split: str = "train", data_dir: Optional[str] = None,
                **kw) -> Dataset:
  """Conversations from a TFDS data set (see `tfds_records`)."""
  return conversations_from_records(tfds_records(name, split, data_dir), tokenizer,
                                    what=f"tfds:{name}/{split}", **kw)


# ---- (c) self-distillation: the target writes user turns and answers (Magpie) ----
def user_prefix(tokenizer, chat_template: Optional[str] = None) -> tuple[list[int], list[int]]:
  """(bare user prefix ids, ids between the user text and the answer) of the chat template.

  The prefix is the template up to where a user message's text starts: sampled from
  there, an instruction model writes a plausible user request (Magpie; Xu et al., 2024).
  """
  text = _template(tokenizer, [{"role": "user", "content": _SENTINEL}], True, chat_template)
  before, after = text.split(_SENTINEL)
  return _encode(tokenizer, before), _encode(tokenizer, after)


@dataclasses.dataclass(frozen=True)
class MagpieSettings:
  num: int = 1000            # conversations to write
  batch: int = 32            # sequences decoded together
  user_max: int = 96         # tokens; user turns that do not end by then are dropped
  answer_max: int = 256      # tokens; longer answers are cut (their teacher rows stay valid)
  user_temperature: float = 1.0
  answer_temperature: float = 0.7
  top_p: float = 0.95
  teacher_top_k: int = 32    # teacher probabilities kept per token
  seed: int = 0
  # Optional openings of the user turn, cycled over the rows ("" = pure Magpie): they steer
  # the model to write task kinds it rarely writes unprompted (translation, summaries...).
  user_starts: tuple[str, ...] = ()


def generate_answers(model, prompts: Sequence[Sequence[int]], *, max_new: int, temperature: float,
                     top_p: float, k: int, seed: int, eos_ids: Sequence[int]):
  """Samples answers and records the target's top-k distribution for each answer token.

  Returns a list of (answer ids [n], teacher ids [n, k], teacher probs [n, k]) per prompt;
  row j is the distribution token j was drawn from (before temperature / top-p).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from kangaroo_jax.decoding import pad_prompts, plain_capacity, plain_loop_with_top_k
  from kangaroo_jax.sampling import SamplingParams
  tokens, lens = pad_prompts(prompts, model.cfg.max_position_embeddings, max_new)
  graphdef, state = nnx.split(model)
  out, ti, tp, counts = map(np.asarray, plain_loop_with_top_k(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(lens), jax.random.key(seed),
      jnp.asarray(list(eos_ids) or [-1], jnp.int32), jnp.int32(max_new),
      params=SamplingParams(temperature, 0, top_p),
      capacity=plain_capacity(model, tokens.shape[1], max_new), top_k=k))
  return [(out[i, :counts[i]], ti[i, :counts[i]], tp[i, :counts[i]]) for i in range(len(prompts))]


def magpie_generate(model, tokenizer, out_dir: str, s: MagpieSettings, eos_ids: Sequence[int],
                    chat_template: Optional[str] = None,
                    progress: Optional[Callable[[int], None]] = None) -> int:
  """Writes self-distilled conversations to `out_dir` in shards; resumes where it stopped.

  Each round samples `s.batch` user turns from the bare user prefix, keeps those that
  end with an end-of-turn token within `s.user_max` tokens (and are new), then samples
  the answers with the teacher's top-k recorded. A shard (npz + readable jsonl) is
  written atomically per round, so a killed run loses at most one round.

  Returns the number of conversations in `out_dir`.
  """
  from kangaroo_jax.decoding import plain_decode
  from kangaroo_jax.sampling import SamplingParams
  os.makedirs(out_dir, exist_ok=True)
  prefix, header = user_prefix(tokenizer, chat_template)
  have = count_magpie(out_dir)
  seen: set = set()
  rnd = len(glob.glob(os.path.join(out_dir, "shard_*.npz")))
  starts = [_encode(tokenizer, t) if t else [] for t in (s.user_starts or ("",))]
  while have < s.num:
    seed = s.seed * 100003 + rnd
    # Row i of round r opens with start (r * batch + i) mod len(starts).
    opens = [starts[(rnd * s.batch + i) % len(starts)] for i in range(s.batch)]
    users = plain_decode(model, [prefix + o for o in opens], max_new_tokens=s.user_max,
                         params=SamplingParams(s.user_temperature, 0, s.top_p), seed=seed,
                         eos_ids=eos_ids).tokens
    users = [o + u for o, u in zip(opens, users)]
    keep = []
    for u in users:
      text = tokenizer.decode(u, skip_special_tokens=True).strip()
      if u and u[-1] in eos_ids and len(text) >= 8 and text not in seen:
        seen.add(text)
        keep.append(u[:-1])
    answers = []
    if keep:
      # Pad the batch with repeats so one compiled loop serves every round.
      prompts = [prefix + u + header for u in keep]
      prompts += [prompts[0]] * (s.batch - len(prompts))
      answers = generate_answers(model, prompts, max_new=s.answer_max,
                                 temperature=s.answer_temperature, top_p=s.top_p,
                                 k=s.teacher_top_k, seed=seed + 7, eos_ids=eos_ids)[:len(keep)]
    # Every round writes a shard, even an empty one: the round number (and seed) of a
    # resumed run is the number of shards.
    _write_shard(out_dir, rnd, tokenizer, [prefix + u + header for u in keep], answers,
                 s.teacher_top_k)
    have += len(keep)
    if progress and keep:
      progress(len(keep))
    rnd += 1
  return have


def _write_shard(out_dir, rnd, tokenizer, prompts, answers, k) -> None:
  ids = [np.concatenate([np.asarray(p, np.int32), a]) for p, (a, _, _) in zip(prompts, answers)]
  cat = lambda xs, shape, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(shape, dtype)
  arrays = dict(
      ids=cat(ids, (0,), np.int32),
      offsets=np.cumsum([0] + [len(x) for x in ids]).astype(np.int64),
      prompt_lens=np.asarray([len(p) for p in prompts], np.int64),
      teacher_ids=cat([t for _, t, _ in answers], (0, k), np.int32),
      teacher_probs=cat([p for _, _, p in answers], (0, k), np.float16))
  base = os.path.join(out_dir, f"shard_{rnd:05d}")
  with open(base + ".jsonl.tmp", "w", encoding="utf-8") as f:
    for p, (a, _, _) in zip(prompts, answers):
      f.write(json.dumps({"prompt": tokenizer.decode(p), "answer": tokenizer.decode(a)}) + "\n")
  os.replace(base + ".jsonl.tmp", base + ".jsonl")
  np.savez(base + ".tmp.npz", **arrays)
  os.replace(base + ".tmp.npz", base + ".npz")  # the npz marks the shard complete


def count_magpie(out_dir: str) -> int:
  """Number of self-distilled conversations already written to `out_dir`."""
  return sum(len(np.load(f)["prompt_lens"]) for f in sorted(glob.glob(os.path.join(out_dir, "shard_*.npz"))))


def load_magpie(out_dir: str, max_len: int) -> Dataset:
  """Self-distilled conversations with their teacher top-k, from `magpie_generate`'s shards."""
  files = sorted(glob.glob(os.path.join(out_dir, "shard_*.npz")))
  if not files:
    raise DataError(f"no self-distilled shards in {out_dir}")
  skip = _Skips()
  out = []
  for f in files:
    z = np.load(f)
    t0 = 0
    for i, p in enumerate(z["prompt_lens"]):
      ids = z["ids"][z["offsets"][i]:z["offsets"][i + 1]]
      n = len(ids) - int(p)
      k = z["teacher_ids"].shape[1]
      tids = np.zeros((len(ids), k), np.int32)
      tprobs = np.zeros((len(ids), k), np.float16)
      tids[p:], tprobs[p:] = z["teacher_ids"][t0:t0 + n], z["teacher_probs"][t0:t0 + n]
      t0 += n
      mask = np.zeros(len(ids), bool)
      mask[p:] = True
      if len(ids) > max_len:
        skip("truncated", f"{len(ids)} > {max_len} tokens")
        if max_len <= p:
          skip("no assistant token within max_len")
          continue
        ids, mask, tids, tprobs = ids[:max_len], mask[:max_len], tids[:max_len], tprobs[:max_len]
      out.append(Conversation(ids, mask, tids, tprobs))
  if not out:
    raise DataError(f"{out_dir}: no usable conversation ({dict(skip.counts)})")
  return Dataset(out, {**skip.counts, "kept": len(out)})


# ---- batching ----
def token_frequencies(examples: Sequence[Conversation], vocab_size: int) -> np.ndarray:
  """Counts [V] of assistant tokens: what the draft will be asked to propose."""
  counts = np.zeros(vocab_size, np.int64)
  for ex in examples:
    np.add.at(counts, ex.ids[ex.assistant], 1)
  return counts


def make_batch(examples: Sequence[Conversation], seq_len: int, pad_id: int = 0,
               rows: Optional[int] = None) -> dict[str, np.ndarray]:
  """Right-pads conversations into arrays (`rows` >= len(examples) adds empty rows).

  Returns tokens [B, T] int32, assistant [B, T] bool, and when every example has a
  teacher cache, teacher_ids [B, T, K] int32 / teacher_probs [B, T, K] float32 (row t:
  the target's distribution of token t), when every one has them, hidden [B, T, D].
  Alignment to predictions happens in training.
  """
  b = rows or len(examples)
  out = {"tokens": np.full((b, seq_len), pad_id, np.int32), "assistant": np.zeros((b, seq_len), bool)}
  cached = all(ex.teacher_ids is not None for ex in examples)
  if cached:
    k = examples[0].teacher_ids.shape[1]
    out["teacher_ids"] = np.zeros((b, seq_len, k), np.int32)
    out["teacher_probs"] = np.zeros((b, seq_len, k), np.float32)
  if examples and all(ex.hidden is not None for ex in examples):
    out["hidden"] = np.zeros((b, seq_len, examples[0].hidden.shape[-1]), np.float32)
    for i, ex in enumerate(examples):
      out["hidden"][i, :min(len(ex.ids), seq_len)] = ex.hidden[:seq_len]
  for i, ex in enumerate(examples):
    n = min(len(ex.ids), seq_len)
    out["tokens"][i, :n] = ex.ids[:n]
    out["assistant"][i, :n] = ex.assistant[:n]
    if cached:
      out["teacher_ids"][i, :n] = ex.teacher_ids[:n]
      out["teacher_probs"][i, :n] = ex.teacher_probs[:n]
  return out


class Batches:
  """Deterministic epochs over a data set: batch `step` is a pure function of (seed, step).

  Epoch e visits the examples in the order of a permutation seeded by (seed, e); the
  remainder that does not fill a batch is dropped for that epoch. So the data position
  is just the step number, and a resumed run sees exactly the batches it would have seen.

  buckets: padded widths below `seq_len` (e.g. (512, 1024)). Each conversation then
  goes in the narrowest width that holds it, every batch is drawn from one width and
  padded to it, and an epoch's batches of all widths come in a seeded order. A step of
  width 512 costs about a quarter of one at 2048 (ShareGPT: `bucket_shares`); the train
  step compiles once per width. Without buckets every batch is `seq_len` wide.
  """

  def __init__(self, examples: Sequence[Conversation], batch_size: int, seq_len: int, seed: int = 0,
               buckets: Sequence[int] = ()):
    if len(examples) < batch_size:
      raise DataError(f"the data set has {len(examples)} conversations, fewer than one batch "
                      f"of {batch_size}")
    self.examples, self.batch_size, self.seq_len, self.seed = examples, batch_size, seq_len, seed
    self.widths = sorted({w for w in buckets if 0 < w < seq_len}) + [seq_len]
    width_of = np.searchsorted(self.widths, [min(len(ex.ids), seq_len) for ex in examples])
    self.members = [np.flatnonzero(width_of == i) for i in range(len(self.widths))]
    self.steps_per_epoch = sum(len(m) // batch_size for m in self.members)
    if not self.steps_per_epoch:
      raise DataError(f"no padded width {self.widths} holds {batch_size} conversations: "
                      "use fewer config.length_buckets or a smaller batch")

  def position(self, step: int) -> tuple[int, int]:
    """(epoch, index of the batch's first example in that epoch's order) of batch `step`."""
    return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.batch_size

  def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """Epoch `epoch`'s batches as (width, example indices [batch_size])."""
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for width, members in zip(self.widths, self.members):
      perm = rng.permutation(members)
      batches += [(width, perm[i:i + self.batch_size])
                  for i in range(0, len(perm) - self.batch_size + 1, self.batch_size)]
    if len(self.widths) > 1:  # one width keeps the order runs without buckets had
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def batch(self, step: int) -> tuple[int, np.ndarray]:
    """(padded width, example indices) of batch `step`."""
    epoch, start = self.position(step)
    return self._epoch(epoch)[start // self.batch_size]

  def indices(self, step: int) -> np.ndarray:
    return self.batch(step)[1]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    width, indices = self.batch(step)
    return make_batch([self.examples[i] for i in indices], width)


def bucket_shares(examples: Sequence[Conversation], batch_size: int, seq_len: int,
                  buckets: Sequence[int] = ()) -> dict[int, float]:
  """{padded width: share of an epoch's batches} of `Batches` over `examples` (what a
  schedule's time is the mix of: a step's cost grows about linearly with its width)."""
  b = Batches(examples, batch_size, seq_len, buckets=buckets)
  return {w: (len(m) // batch_size) / b.steps_per_epoch for w, m in zip(b.widths, b.members)}
