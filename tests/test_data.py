"""Tests for kangaroo_jax.data: every source on a tiny fixture, bad input, batching."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kangaroo_jax import api, data
from kangaroo_jax.data import DataError

from fixtures import tiny_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EOS = [2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tiny_model.write(str(tmp_path_factory.mktemp("tiny_model")))
  model, tok = api.load_model(folder)
  return folder, model, tok


def _decode_masked(tok, ids, mask):
  return tok.decode(ids[mask])


def test_render_marks_exactly_the_assistant_turns(tiny):
  _, _, tok = tiny
  messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "Yo."}, {"role": "user", "content": "ok"},
              {"role": "assistant", "content": "Bye!"}]
  ids, mask = data.render(tok, messages, EOS)
  assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
  # Each span is the answer text plus its end-of-turn token; the template's newline is not.
  spans = np.split(np.arange(len(ids))[mask], np.where(np.diff(np.arange(len(ids))[mask]) > 1)[0] + 1)
  assert [tok.decode(ids[s]) for s in spans] == ["Yo.<|im_end|>", "Bye!<|im_end|>"]


def test_sharegpt_jsonl_skips_and_counts_bad_records(tiny, caplog):
  _, _, tok = tiny
  ds = data.sharegpt(os.path.join(FIXTURES, "sharegpt_bad.jsonl"), tok, max_len=64, eos_ids=EOS)
  assert len(ds.examples) == 2
  assert ds.skipped["malformed"] == 1          # the broken JSON line
  assert ds.skipped["no assistant turn"] == 2  # no answer / a blank answer
  assert ds.skipped["bad record"] == 2         # an unknown role / not a list of turns
  assert ds.skipped["truncated"] == 1          # the long two-round conversation, cut to 64
  assert all(len(ex.ids) <= 64 and ex.assistant[1:].any() for ex in ds.examples)
  assert "skipping a record (malformed)" in caplog.text


@pytest.mark.parametrize("processes", [2, 3])
def test_parts_tokenised_by_several_processes_merge_into_the_whole(tiny, processes):
  """Each process of a multi-host run renders every n-th record; the parts, sent as bytes,
  merge into what one process renders: the same conversations in the same order, the
  same counts (a part may hold none of a reason, or no conversation at all)."""
  _, _, tok = tiny
  path = ",".join(os.path.join(FIXTURES, f) for f in ("sharegpt_bad.jsonl", "sharegpt_tiny.jsonl"))
  whole = data.sharegpt(path, tok, max_len=64, eos_ids=EOS)
  parts = [data.sharegpt(path, tok, max_len=64, eos_ids=EOS, part=(i, processes))
           for i in range(processes)]
  assert sum(len(p.examples) for p in parts) == len(whole.examples)
  assert all(0 < len(p.examples) < len(whole.examples) for p in parts)  # each did a share
  merged = data.merge_parts([data.unpack(data.pack(p)) for p in parts])
  assert merged.skipped == whole.skipped and merged.records == whole.records
  for a, b in zip(merged.examples, whole.examples, strict=True):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.assistant, b.assistant)
  empty = data.unpack(data.pack(data.Dataset([], {}, [])))
  assert data.merge_parts([empty, merged]).records == whole.records
  with pytest.raises(DataError, match="no usable conversation"):
    data.merge_parts([empty, empty])


def test_a_conversation_opening_with_an_answer_keeps_the_rest(tiny):
  """ShareGPT has many conversations that open with a 'gpt' turn (38% of a 1,500-record
  sample): the answer to nothing is dropped, the user/assistant turns after it are kept
  (before, the template had no prefix to render and the whole record was skipped)."""
  _, _, tok = tiny
  rec = {"conversations": [{"from": "gpt", "value": "orphan."}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "Yo."}]}
  assert [m["role"] for m in data.drop_leading_answers(data.to_messages(rec))] == ["user", "assistant"]
  ds = data.conversations_from_records([rec], tok, max_len=64, eos_ids=EOS)
  assert ds.skipped == {"kept": 1}
  assert tok.decode(ds.examples[0].ids[ds.examples[0].assistant]) == "Yo.<|im_end|>"


def test_sharegpt_json_list_and_errors(tiny, tmp_path):
  _, _, tok = tiny
  good = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a."}]}]
  (tmp_path / "list.json").write_text(json.dumps(good * 3))
  assert len(data.sharegpt(str(tmp_path / "list.json"), tok, max_len=64).examples) == 3
  (tmp_path / "broken.json").write_text("[{\"conversations\": ")
  with pytest.raises(DataError, match="not valid JSON"):
    data.sharegpt(str(tmp_path / "broken.json"), tok, max_len=64)
  with pytest.raises(DataError, match="no data file"):
    data.sharegpt(str(tmp_path / "missing*.jsonl"), tok, max_len=64)
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(DataError, match="no usable conversation"):
    data.sharegpt(str(tmp_path / "empty.jsonl"), tok, max_len=64)
  (tmp_path / "bad.jsonl").write_text('{"conversations": [{"from": "human", "value": "q"}]}\n{oops\n')
  with pytest.raises(DataError, match="no usable conversation"):
    data.sharegpt(str(tmp_path / "bad.jsonl"), tok, max_len=64)


def _tiny_tfds(data_dir: str) -> str:
  import tensorflow_datasets as tfds

  class TinyChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"prompt": tfds.features.Text(), "response": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, {"prompt": f"question {'abcdef'[i]}", "response": f"Answer {'abcdef'[i]}." if i != 3 else ""}

  builder = TinyChat(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


def test_tfds_source_without_tensorflow(tiny, tmp_path):
  _, _, tok = tiny
  import importlib.util
  assert importlib.util.find_spec("tensorflow") is None  # the point: no TensorFlow
  prepared = _tiny_tfds(str(tmp_path))
  by_name = data.tfds_source("tiny_chat", tok, "train", str(tmp_path), max_len=64, eos_ids=EOS)
  by_dir = data.tfds_source(prepared, tok, "train", max_len=64, eos_ids=EOS)
  assert len(by_name.examples) == len(by_dir.examples) == 5  # the empty answer is skipped
  assert by_name.skipped["no assistant turn"] == 1
  texts = sorted(_decode_masked(tok, ex.ids, ex.assistant) for ex in by_dir.examples)
  assert texts[0] == "Answer a.<|im_end|>"
  with pytest.raises(DataError, match="cannot open TFDS"):
    data.tfds_source("no_such_dataset_xyz", tok, "train", str(tmp_path), max_len=64)


def test_magpie_writes_conversations_with_aligned_teacher(tiny, tmp_path):
  _, model, tok = tiny
  s = data.MagpieSettings(num=6, batch=4, user_max=12, answer_max=10, answer_temperature=0.0,
                          teacher_top_k=4, seed=1)
  prefix, header = data.user_prefix(tok)
  assert tok.decode(prefix) == "<|im_start|>user\n"
  assert tok.decode(header) == "<|im_end|>\n<|im_start|>assistant\n"
  # A random tiny model rarely ends a user turn: accept any text for the test.
  n = data.magpie_generate(model, tok, str(tmp_path), s, EOS + [tok.convert_tokens_to_ids(".")])
  assert n >= 6
  ds = data.load_magpie(str(tmp_path), max_len=64)
  assert len(ds.examples) == n
  for ex in ds.examples:
    p = int(np.argmax(ex.assistant))
    assert tok.decode(ex.ids[:p]).startswith("<|im_start|>user\n")
    assert tok.decode(ex.ids[:p]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # Greedy answers: row t of the teacher cache is the distribution token t came from,
    # so its top-1 is token t itself.
    np.testing.assert_array_equal(ex.teacher_ids[p:, 0], ex.ids[p:])
    probs = ex.teacher_probs[p:].astype(np.float32)
    assert np.all(np.diff(probs, axis=1) <= 1e-3) and np.all(probs.sum(1) <= 1.01)
  # Rerunning with a larger target resumes: old shards stay, new ones are added.
  before = sorted(os.listdir(tmp_path))
  s2 = data.MagpieSettings(**{**s.__dict__, "num": n + 1})
  assert data.magpie_generate(model, tok, str(tmp_path), s2, EOS + [tok.convert_tokens_to_ids(".")]) > n
  assert set(before) < set(os.listdir(tmp_path))


def test_load_magpie_errors(tmp_path):
  with pytest.raises(DataError, match="no self-distilled shards"):
    data.load_magpie(str(tmp_path), max_len=64)


def _conv(n, start):
  ids = np.arange(start, start + n, dtype=np.int32)
  mask = np.zeros(n, bool)
  mask[n // 2:] = True
  return data.Conversation(ids, mask)


def test_batches_are_a_pure_function_of_the_step():
  examples = [_conv(5 + i % 3, 10 * i) for i in range(10)]
  b = data.Batches(examples, batch_size=3, seq_len=8, seed=4)
  assert b.steps_per_epoch == 3
  assert b.position(0) == (0, 0) and b.position(4) == (1, 3)
  # One epoch visits distinct examples; the next epoch is another order.
  seen = np.concatenate([b.indices(s) for s in range(3)])
  assert len(set(seen.tolist())) == 9
  assert not np.array_equal(b.indices(0), b.indices(3))
  again = data.Batches(examples, batch_size=3, seq_len=8, seed=4)
  for s in (0, 5, 11):
    for k, v in b(s).items():
      np.testing.assert_array_equal(v, again(s)[k])
  batch = b(0)
  assert batch["tokens"].shape == (3, 8) and batch["assistant"].dtype == bool
  with pytest.raises(DataError, match="fewer than one batch"):
    data.Batches(examples[:2], batch_size=3, seq_len=8)


def test_batches_without_buckets_keep_the_order_runs_had():
  """A run started before length buckets existed resumes onto the same batches."""
  examples = [_conv(5 + i % 3, 10 * i) for i in range(10)]
  b = data.Batches(examples, batch_size=3, seq_len=8, seed=4)
  for step in range(7):
    epoch, start = b.position(step)
    old = np.random.default_rng([4, epoch]).permutation(10)[start:start + 3]
    np.testing.assert_array_equal(b.indices(step), old)


def test_length_buckets_pad_each_batch_to_the_narrowest_width_that_holds_it():
  # 8 short (5-7 tokens), 7 medium (9-15), 6 long (17-40): widths 8, 16 and seq_len 32.
  lengths = [5, 6, 7, 5, 6, 7, 5, 6] + [9, 12, 15, 10, 11, 13, 14] + [17, 20, 25, 30, 35, 40]
  examples = [_conv(n, i) for i, n in enumerate(lengths)]
  b = data.Batches(examples, batch_size=3, seq_len=32, seed=1, buckets=(16, 8, 64))
  assert b.widths == [8, 16, 32] and b.steps_per_epoch == 2 + 2 + 2
  for epoch in range(2):
    steps = range(epoch * 6, epoch * 6 + 6)
    widths = [b.batch(s)[0] for s in steps]
    assert sorted(widths) == [8, 8, 16, 16, 32, 32]
    for s in steps:
      width, idx = b.batch(s)
      batch = b(s)
      assert batch["tokens"].shape == (3, width)
      assert all(min(lengths[i], 32) <= width for i in idx)
      assert all(lengths[i] > {8: 0, 16: 8, 32: 16}[width] for i in idx)  # the narrowest
    seen = np.concatenate([b.indices(s) for s in steps])
    assert len(set(seen.tolist())) == 18  # 2 + 1 + 0 left over of 8, 7, 6
  assert [b.batch(s)[0] for s in range(6)] != [b.batch(s)[0] for s in range(6, 12)] or \
      not np.array_equal(b.indices(0), b.indices(6))  # epochs differ
  assert data.bucket_shares(examples, 3, 32, (8, 16)) == {8: 1 / 3, 16: 1 / 3, 32: 1 / 3}
  with pytest.raises(DataError, match="no padded width"):
    data.Batches(examples[:2] + examples[8:10] + examples[15:17], batch_size=3, seq_len=32,
                 buckets=(8, 16))


def test_make_batch_pads_rows_and_keeps_teacher_rows():
  ex = _conv(4, 1)
  ex.teacher_ids = np.arange(8, dtype=np.int32).reshape(4, 2)
  ex.teacher_probs = np.full((4, 2), 0.5, np.float16)
  b = data.make_batch([ex], seq_len=6, rows=2)
  assert b["tokens"].tolist() == [[1, 2, 3, 4, 0, 0], [0] * 6]
  assert b["teacher_ids"][0, 3].tolist() == [6, 7] and not b["assistant"][1].any()
  assert b["teacher_probs"].dtype == np.float32


def test_magpie_user_starts_open_the_user_turns(tiny, tmp_path):
  _, model, tok = tiny
  starts = ("Translate this:", "Summarize this:")
  s = data.MagpieSettings(num=6, batch=4, user_max=12, answer_max=4, answer_temperature=0.0,
                          teacher_top_k=4, seed=2, user_starts=starts)
  data.magpie_generate(model, tok, str(tmp_path), s, EOS + [tok.convert_tokens_to_ids(".")])
  users = [tok.decode(ex.ids[:int(np.argmax(ex.assistant))]) for ex in
           data.load_magpie(str(tmp_path), max_len=64).examples]
  opening = lambda u: next((t for t in starts if u.startswith("<|im_start|>user\n" + t)), None)
  # Every user turn opens with one of the starts, and the rows cycle through them.
  assert all(map(opening, users)) and {opening(u) for u in users} == set(starts)
