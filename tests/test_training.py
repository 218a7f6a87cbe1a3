"""Tests for kangaroo_jax.training / checkpoint and train.py, on a tiny random model."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax import api, checkpoint, data, distill, sharding, training
from kangaroo_jax.adapter import init_adapter, load_adapter

from fixtures import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny as tiny_config  # noqa: E402

WORDS = "the cat sat on a mat and dog ran far away up down it is good bad yes no".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model folder, model, tokenizer, sharegpt file) shared by the tests."""
  folder = tiny_model.write(str(tmp_path_factory.mktemp("tiny_model")))
  rng = np.random.default_rng(0)
  lines = []
  for _ in range(40):
    q = " ".join(rng.choice(WORDS, 3))
    a = " ".join(rng.choice(WORDS, int(rng.integers(3, 6)))) + "."
    lines.append(json.dumps({"conversations": [{"from": "human", "value": q},
                                               {"from": "gpt", "value": a}]}))
  path = str(tmp_path_factory.mktemp("data") / "chats.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  model, tok = api.load_model(folder)
  return folder, model, tok, path


def _config(tiny, workdir, **overrides):
  c = tiny_config.get_config()
  c.model_path, c.data.path, c.workdir = tiny[0], tiny[3], str(workdir)
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


# ---- the loss and its alignment ----
def test_prediction_mask_shifts_assistant_flags_left():
  assistant = jnp.asarray([[0, 0, 1, 1, 0], [1, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(distill.prediction_mask(assistant),
                                [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]])


def test_distill_loss_metrics():
  logits = jnp.log(jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
  p = jnp.asarray([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]])
  top1 = jnp.asarray([[0, 0]])
  loss, m = distill.distill_loss(logits, p, top1, jnp.asarray([[1, 0]]))
  entropy = -np.sum(np.array([0.7, 0.2, 0.1]) * np.log([0.7, 0.2, 0.1]))
  np.testing.assert_allclose(loss, entropy, rtol=1e-6)
  assert float(m["top1_agreement"]) == 1.0
  np.testing.assert_allclose(m["expected_acceptance"], 1.0, rtol=1e-6)
  _, m = distill.distill_loss(logits, p, top1, jnp.asarray([[0, 1]]))
  assert float(m["top1_agreement"]) == 0.0  # draft says 2, target 0
  np.testing.assert_allclose(m["expected_acceptance"], 0.1 + 0.1 + 0.1, rtol=1e-6)


def _one_hot_batch(tiny, j):
  """A batch whose only assistant token is token j of row 0."""
  _, _, tok, _ = tiny
  ids = np.asarray([tok.convert_tokens_to_ids(list("the cat sat on the mat"))], np.int32)
  assistant = np.zeros_like(ids, bool)
  assistant[0, j] = True
  return {"tokens": jnp.asarray(ids), "assistant": jnp.asarray(assistant)}


def test_loss_reads_the_position_that_predicts_the_assistant_token(tiny):
  """The off-by-one test: token j is assistant -> only the prediction at j-1 counts."""
  _, model, _, _ = tiny
  adapter = init_adapter(model.cfg, 1, seed=3)
  j = 7
  batch = _one_hot_batch(tiny, j)
  inv = jnp.asarray(distill.draft_index(None, model.cfg.vocab_size))
  loss, m = distill.forward(model, adapter, batch, inv, None)
  assert float(m["tokens"]) == 1.0
  # Independent reference: full target forward and draft forward over the sequence.
  tokens = batch["tokens"]
  t = tokens.shape[1]
  pos = jnp.arange(t)[None]
  from kangaroo_jax import cache as kv
  h1, _ = model.run_layers(model.embed(tokens), pos, kv.init_model_cache(model.cfg, 1, t), 0, 1)
  logits_t, _ = model(tokens, pos, kv.init_model_cache(model.cfg, 1, t))
  out, _ = adapter(h1, pos, adapter.init_cache(1, t))
  logq = jax.nn.log_softmax(model.project(out), -1)[0]  # [T, V]
  p = jax.nn.softmax(logits_t, -1)[0]  # [T, V]
  ce = -jnp.sum(p * logq, -1)  # [T]
  np.testing.assert_allclose(loss, ce[j - 1], rtol=1e-5)
  assert abs(float(loss) - float(ce[j])) > 1e-3  # the reference code's misalignment differs


def test_cached_teacher_rows_are_shifted_like_the_mask(tiny):
  """Row j of the teacher cache describes token j, so it is used at position j - 1."""
  _, model, _, _ = tiny
  adapter = init_adapter(model.cfg, 1, seed=3)
  j = 5
  batch = _one_hot_batch(tiny, j)
  t = batch["tokens"].shape[1]
  tid = np.zeros((1, t, 2), np.int32)
  tp = np.zeros((1, t, 2), np.float32)
  tid[0, j] = [9, 11]
  tp[0, j] = [0.75, 0.25]
  tid[0, j - 1] = [30, 31]  # decoys at the neighbouring rows
  tid[0, j + 1] = [40, 41]
  tp[0, j - 1] = tp[0, j + 1] = [1.0, 0.0]
  batch |= {"teacher_ids": jnp.asarray(tid), "teacher_probs": jnp.asarray(tp)}
  inv = jnp.asarray(distill.draft_index(None, model.cfg.vocab_size))
  loss, m = distill.forward(model, adapter, batch, inv, None)
  from kangaroo_jax import cache as kv
  pos = jnp.arange(t)[None]
  h1, _ = model.run_layers(model.embed(batch["tokens"]), pos, kv.init_model_cache(model.cfg, 1, t), 0, 1)
  logq = jax.nn.log_softmax(model.project(adapter(h1, pos, adapter.init_cache(1, t))[0]), -1)[0]
  np.testing.assert_allclose(loss, -(0.75 * logq[j - 1, 9] + 0.25 * logq[j - 1, 11]), rtol=1e-5)
  assert float(m["top1_agreement"]) == float(jnp.argmax(logq[j - 1]) == 9)


def test_reduced_draft_vocabulary(tiny):
  _, model, _, _ = tiny
  counts = np.zeros(64, np.int64)
  counts[[40, 3, 17, 9, 22, 5, 30, 11, 50]] = [90, 80, 70, 60, 50, 40, 30, 20, 10]
  ids = distill.pick_draft_vocab(counts, 8, always=(60,))
  # EOS-like ids first, then by falling frequency: the first n are the n most useful.
  assert ids.tolist() == [60, 40, 3, 17, 9, 22, 5, 30]
  from kangaroo_jax import tuning
  assert tuning.select_draft_ids(ids, 3).tolist() == [60, 40, 3]
  inv = distill.draft_index(ids, 64)
  assert inv[60] == 0 and inv[30] == 7 and inv[11] == 8  # 8 = "not in the draft vocabulary"
  adapter = init_adapter(model.cfg, 1, seed=3)
  batch = _one_hot_batch(tiny, 7)
  loss, m = distill.forward(model, adapter, batch, jnp.asarray(inv), jnp.asarray(ids))
  assert np.isfinite(float(loss)) and 0 <= float(m["expected_acceptance"]) <= 1


def test_loss_in_blocks_of_positions_equals_the_whole(tiny):
  """The loss formed a block of positions at a time (blocks that do not divide T), with a
  cached and an on-the-fly teacher, equals one block of all T; so do its gradients."""
  _, model, _, _ = tiny
  adapter = init_adapter(model.cfg, 1, seed=3)
  batch = _one_hot_batch(tiny, 7)
  batch["assistant"] = jnp.ones_like(batch["assistant"])
  t = batch["tokens"].shape[1]
  rng = np.random.default_rng(0)
  cached = batch | {"teacher_ids": jnp.asarray(rng.integers(0, 64, (1, t, 3)), jnp.int32),
                    "teacher_probs": jnp.full((1, t, 3), 1 / 3, jnp.float32)}
  inv = jnp.asarray(distill.draft_index(None, model.cfg.vocab_size))
  ag, params = nnx.split(adapter)
  for b in (batch, cached):
    loss = lambda p, chunk: distill.forward(model, nnx.merge(ag, p), b, inv, None, chunk)[0]
    (whole, g1), (blocks, g2) = (jax.value_and_grad(loss)(params, c) for c in (t, 4))
    np.testing.assert_allclose(blocks, whole, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


# ---- optimisation ----
def _step_setup(tiny, batch_size=4, mesh=None):
  folder, model, tok, path = tiny
  ds = data.sharegpt(path, tok, max_len=64, eos_ids=[2])
  batch = data.make_batch(ds.examples[:batch_size], 64)
  adapter = init_adapter(model.cfg, 1, seed=0)
  mg, ms = nnx.split(model)
  ag, params = nnx.split(adapter)
  tx = distill.make_optimizer(3e-2, 2, 40)
  inv = jnp.asarray(distill.draft_index(None, model.cfg.vocab_size))
  return mg, ms, ag, params, tx, batch, inv


def test_loss_falls_on_a_fixed_batch(tiny):
  mg, ms, ag, params, tx, batch, inv = _step_setup(tiny)
  step = distill.make_train_step(mg, ag, tx)
  opt = tx.init(params)
  losses = []
  for _ in range(40):
    params, opt, m = step(params, opt, ms, batch, inv, None)
    losses.append(float(m["loss"]))
  # Soft targets: the loss cannot fall below the teacher's entropy; the gap (the KL) must shrink.
  from kangaroo_jax import cache as kv
  model = nnx.merge(mg, ms)
  tokens = jnp.asarray(batch["tokens"])
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, _ = model(tokens, pos, kv.init_model_cache(model.cfg, *tokens.shape))
  p = jax.nn.softmax(logits, -1)
  entropy, _ = distill.distill_loss(jnp.log(p), p, jnp.argmax(p, -1),
                                     distill.prediction_mask(jnp.asarray(batch["assistant"])))
  gaps = np.asarray(losses) - float(entropy)
  assert gaps[-1] < 0.3 * gaps[0], (float(entropy), losses)
  assert float(m["expected_acceptance"]) > 0.5


def test_only_the_adapter_trains(tiny):
  mg, ms, ag, params, tx, batch, inv = _step_setup(tiny)
  before = jax.tree.map(np.asarray, ms)
  step = distill.make_train_step(mg, ag, tx)
  p0 = jax.tree.map(np.array, params)
  opt = tx.init(params)
  for _ in range(2):  # the warm-up's first learning rate is 0
    params, opt, _ = step(params, opt, ms, batch, inv, None)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, ms))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(params)))


def test_bfloat16_model_one_step_at_7b_lr_moves_every_adapter_leaf(tiny):
  """Float32 master weights: at lr 5e-5 a bfloat16 adapter would keep most weights (and the
  norms, 1.0, whose bfloat16 unit is 2^-7) unchanged; the float32 one moves every leaf.

  Two steps: the warm start zeroes the attention's output projection, so q/k/v get no
  gradient until it has moved once."""
  model, tok = api.load_model(tiny[0], "bfloat16")
  c = _config(tiny, "unused", lr=5e-5)
  adapter = training.initial_adapter(model, c)
  ds = data.sharegpt(tiny[3], tok, max_len=64, eos_ids=[2])
  batch = data.make_batch(ds.examples[:4], 64)
  mg, ms = nnx.split(model)
  ag, params = nnx.split(adapter)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  tx = distill.make_optimizer(5e-5, 0, 100)
  opt = tx.init(params)
  assert {x.dtype for x in jax.tree.leaves(opt) if x.ndim} == {jnp.dtype(jnp.float32)}
  before = jax.tree.map(np.array, params)
  inv = jnp.asarray(distill.draft_index(None, model.cfg.vocab_size))
  step = distill.make_train_step(mg, ag, tx)
  after, opt, _ = step(params, opt, ms, batch, inv, None)
  after, _, _ = step(after, opt, ms, batch, inv, None)
  names = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
  assert any("norm" in n for n in names)
  for name, a, b in zip(names, jax.tree.leaves(before), jax.tree.leaves(after)):
    changed = np.mean(np.asarray(a) != np.asarray(b))
    assert changed > 0.99, (name, changed)


def test_sharded_step_on_8_devices_matches_one_device(tiny):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  mg, ms, ag, params, tx, batch, inv = _step_setup(tiny, batch_size=8)
  host = jax.tree.map(np.array, params)  # the steps below donate their parameters
  step = distill.make_train_step(mg, ag, tx)
  _, _, m1 = step(jax.tree.map(jnp.copy, params), tx.init(params), ms, batch, inv, None)
  mesh = sharding.make_mesh(4, 2)
  ms_s = jax.device_put(ms, sharding.param_shardings(ms, mesh))
  params_s = jax.device_put(params, sharding.param_shardings(params, mesh))
  batch_s = jax.device_put(batch, sharding.data_sharding(mesh))
  new, _, m8 = step(params_s, tx.init(params_s), ms_s, batch_s, inv, None)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  assert jax.tree.leaves(new["attn"]["qkv"])[0].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  # Fully sharded (config.fsdp): every weight split over 'data' too, gathered where used.
  P = jax.sharding.PartitionSpec
  ms_f = jax.device_put(ms, sharding.param_shardings(ms, mesh, fsdp=True))
  params_f = jax.device_put(host, sharding.param_shardings(host, mesh, fsdp=True))
  assert jax.tree.leaves(ms_f["layers"][0]["gate_up"])[0].sharding.spec == P("data", "model")
  fsdp_step = distill.make_train_step(mg, ag, tx, mesh=mesh)
  new, _, mf = fsdp_step(params_f, tx.init(params_f), ms_f, batch_s, inv, None)
  np.testing.assert_allclose(mf["loss"], m1["loss"], rtol=1e-5)
  assert jax.tree.leaves(new["attn"]["qkv"])[0].sharding.spec == P("data", "model")


# ---- checkpoints ----
def test_checkpoint_save_restore_is_bit_exact(tiny, tmp_path):
  mg, ms, ag, params, tx, batch, inv = _step_setup(tiny)
  step = distill.make_train_step(mg, ag, tx)
  params, opt, _ = step(params, tx.init(params), ms, batch, inv, None)
  state = {"params": params, "opt_state": opt, "step": np.int64(1), "epoch": np.int64(0),
           "index": np.int64(4), "draft_ids": np.arange(5, dtype=np.int32),
           "data_fingerprint": np.int64(7)}
  mgr = checkpoint.manager(str(tmp_path), keep=2)
  for s in (1, 2, 3):
    checkpoint.save(mgr, s, state)
  assert mgr.all_steps() == [2, 3]  # keeps the last 2
  zeros = jax.tree.map(jnp.zeros_like, state)
  restored = checkpoint.restore_latest(mgr, zeros)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(restored) == jax.tree.structure(state)


# ---- the training run: in-process resume, CLI, kill -9, errors ----
@pytest.mark.parametrize("buckets", [(), (46,)])
def test_train_resumes_step_count_and_data_position(tiny, tmp_path, buckets):
  """Also with length buckets: the tiny conversations are 39-54 tokens, so (46,) pads
  about half the batches to 46 and the rest to seq_len 64 (two compiled steps)."""
  quiet = lambda s: None
  lines = []
  full = training.train(_config(tiny, tmp_path / "full", steps=12, checkpoint_every=4,
                                length_buckets=buckets), log=lines.append)
  if buckets:
    assert any(l.startswith("batches by padded width: 46: ") for l in lines), lines
  # Interrupted after step 8: drop the last checkpoint, rerun the same config.
  split = _config(tiny, tmp_path / "split", steps=12, checkpoint_every=4, length_buckets=buckets)
  training.train(split, log=quiet)
  import shutil
  shutil.rmtree(tmp_path / "split" / "checkpoints" / "12")
  rest = training.train(split, log=quiet)
  assert rest["resumed_from"] == 8
  assert rest["loss"] == full["loss"] and rest["eval_loss"] == full["eval_loss"]
  a, _ = load_adapter(str(tmp_path / "full" / "adapter.safetensors"), tiny[1].cfg)
  b, _ = load_adapter(str(tmp_path / "split" / "adapter.safetensors"), tiny[1].cfg)
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(x, y)
  # The metrics log continues: no step twice, none missing.
  logged = [json.loads(l)["step"] for l in open(tmp_path / "split" / "metrics.jsonl")]
  assert logged == list(range(1, 13))
  # The checkpoint records where the data stands: 38 training conversations, 8 a batch
  # -> 4 batches an epoch, so after 8 steps: epoch 2, index 0 (with buckets, the two
  # widths' remainders leave 3).
  mgr = checkpoint.manager(str(tmp_path / "split" / "checkpoints"), 2)
  import orbax.checkpoint as ocp
  got = mgr.restore(8, args=ocp.args.StandardRestore())
  want = (8, 2, 0) if not buckets else (8, 2, 16)  # buckets: 3 full batches an epoch
  assert (int(got["step"]), int(got["epoch"]), int(got["index"])) == want


def _cli(tiny, workdir, *extra, env=None):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
          os.path.join(ROOT, "configs", "tiny.py"), f"--config.model_path={tiny[0]}",
          f"--config.data.path={tiny[3]}", f"--config.workdir={workdir}", *extra]


def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


@pytest.mark.slow  # subprocesses: about a minute
def test_kill_9_mid_run_then_rerun_loses_nothing(tiny, tmp_path):
  args = ("--config.steps=400", "--config.checkpoint_every=20", "--config.log_every=10")
  ref = subprocess.run(_cli(tiny, tmp_path / "ref", *args), env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-2000:]
  cmd = _cli(tiny, tmp_path / "run", *args)
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "run" / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(int(p.name) >= 60 for p in ckpts.iterdir() if p.name.isdigit()):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed; raise steps"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resumed from step" in again.stdout + again.stderr
  final_ref = json.load(open(tmp_path / "ref" / "final_metrics.json"))
  final = json.load(open(tmp_path / "run" / "final_metrics.json"))
  assert final["resumed_from"] >= 60 and final["loss"] == final_ref["loss"]
  a, _ = load_adapter(str(tmp_path / "ref" / "adapter.safetensors"), tiny[1].cfg)
  b, _ = load_adapter(str(tmp_path / "run" / "adapter.safetensors"), tiny[1].cfg)
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(x, y)


def test_checkpoint_past_the_configured_steps_is_refused(tiny, tmp_path):
  """A workdir trained to step 4 and a config of 2 steps: no silent resume (which would
  export the 4-step adapter), one error line naming the folder, before the model loads."""
  training.train(_config(tiny, tmp_path / "w", steps=4, checkpoint_every=2), log=lambda s: None)
  os.remove(tmp_path / "w" / "adapter.safetensors")
  folder = str(tmp_path / "w" / "checkpoints")
  with pytest.raises(ValueError, match=re.escape(f"{folder} holds a checkpoint at step 4, "
                                                 "past config.steps=2")):
    training.train(_config(tiny, tmp_path / "w", steps=2, checkpoint_every=2), log=lambda s: None)
  r = subprocess.run(_cli(tiny, tmp_path / "w", "--config.steps=2"), env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"error: {folder} holds a checkpoint at step 4, past config.steps=2: set --config.steps "
      "to at least 4 or use a new --config.workdir"], r.stderr
  assert not (tmp_path / "w" / "adapter.safetensors").exists()  # nothing exported


def test_several_processes_need_a_shared_workdir():
  training.check_shared_workdir("runs/x", 1)
  training.check_shared_workdir("/shared/runs/x", 2)
  training.check_shared_workdir("gs://bucket/runs/x", 4)
  with pytest.raises(training.ConfigError, match="relative local folder"):
    training.check_shared_workdir("runs/x", 2)


def test_cli_rejects_an_unknown_config_field(tiny, tmp_path):
  r = subprocess.run(_cli(tiny, tmp_path, "--config.no_such_field=1"), env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "no_such_field" in r.stderr


def test_empty_or_unusable_data_is_a_clear_error(tiny, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"conversations": [{"from": "human", "value": "q"}]}\nnot json\n')
  with pytest.raises(data.DataError, match="no usable conversation"):
    training.train(_config(tiny, tmp_path / "w", **{"data.path": str(bad)}), log=lambda s: None)
  with pytest.raises(ValueError, match="data.source"):
    training.train(_config(tiny, tmp_path / "w", **{"data.source": "csv"}), log=lambda s: None)
  with pytest.raises(data.DataError, match="fewer than one batch"):
    training.train(_config(tiny, tmp_path / "w", batch_size=64, **{"data.eval_examples": 0}),
                   log=lambda s: None)


def test_bad_input_to_train_py_is_one_line_and_exit_2(tiny, tmp_path):
  """A batch the mesh cannot split, a model folder missing a shard: one line, status 2."""
  import shutil
  broken = tmp_path / "broken"
  shutil.copytree(tiny[0], broken)
  for f in broken.glob("*.safetensors"):
    f.unlink()
  (broken / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
  for extra, env, words in (
      ((f"--config.model_path={broken}",), _env(1), "missing shard"),
      (("--config.batch_size=6",), _env(4), "not a multiple of the 'data' axis")):
    r = subprocess.run(_cli(tiny, tmp_path / "w", *extra), env=env, capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr[-2000:]
    assert lines[0].startswith("error: ")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(tiny, workdir, *args):
  """Popen of train.py as a run of two processes with 4 CPU devices each, the tiny model
  split over all 8 ('model' = 8 spans both processes)."""
  port = _free_port()
  return [subprocess.Popen(
      _cli(tiny, workdir, *args, "--config.mesh_model=8",
           f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2",
           f"--config.process_id={i}"),
      env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _wait(procs, timeout=300):
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
  return outs


@pytest.mark.slow  # four runs of subprocesses: about two minutes
def test_two_processes_killed_and_resumed_end_where_an_uninterrupted_run_ends(tiny, tmp_path):
  """Multi-host on one machine: two processes joined by jax.distributed on 127.0.0.1, the
  weights sharded over both. Each loads only its devices' shards and tokenises half the
  data; killed with SIGKILL after a checkpoint and rerun, the run ends with the adapter
  of an uninterrupted two-process run, and with one process's loss."""
  args = ("--config.steps=30", "--config.checkpoint_every=10", "--config.log_every=1")
  one = subprocess.run(_cli(tiny, tmp_path / "one", *args, "--config.mesh_model=8"), env=_env(8),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-2000:]
  _wait(_two_processes(tiny, tmp_path / "ref", *args))

  procs = _two_processes(tiny, tmp_path / "run", *args)
  ckpts = tmp_path / "run" / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.02)
  assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
  killed_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert killed_at < 30
  outs = _wait(_two_processes(tiny, tmp_path / "run", *args))
  assert f"resumed from step {killed_at}" in outs[0]

  final = json.load(open(tmp_path / "run" / "final_metrics.json"))
  ref = json.load(open(tmp_path / "ref" / "final_metrics.json"))
  single = json.load(open(tmp_path / "one" / "final_metrics.json"))
  assert final["resumed_from"] == killed_at and final["steps"] == 30
  assert final["loss"] == ref["loss"]
  np.testing.assert_allclose(final["loss"], single["loss"], rtol=1e-5)
  assert final["train_conversations"] == single["train_conversations"]
  a, _ = load_adapter(str(tmp_path / "ref" / "adapter.safetensors"), tiny[1].cfg)
  b, _ = load_adapter(str(tmp_path / "run" / "adapter.safetensors"), tiny[1].cfg)
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(x, y)


def test_self_distilled_run_end_to_end(tiny, tmp_path):
  """data.source=magpie: the target writes the data, then the adapter trains on its cache."""
  # seq_len 128: the tiny template's prefix plus a 12-token user turn and the answer can
  # pass 64 tokens, and a conversation cut before its answer is dropped.
  c = _config(tiny, tmp_path / "w", steps=4, batch_size=8, checkpoint_every=2, seq_len=128,
              **{"data.source": "magpie", "data.path": "", "data.magpie_num": 12,
                 "data.magpie_user_max": 12, "data.eval_examples": 2})
  # The random tiny model seldom ends a user turn with <|im_end|>: let '.' end it too.
  import unittest.mock
  with unittest.mock.patch.object(api, "eos_ids", lambda m, t: [2, t.convert_tokens_to_ids(".")]):
    final = training.train(c, log=lambda s: None)
  assert data.count_magpie(str(tmp_path / "w" / "magpie")) >= 12
  assert np.isfinite(final["loss"]) and final["eval_tokens"] > 0
  adapter, ids = load_adapter(str(tmp_path / "w" / "adapter.safetensors"), tiny[1].cfg)
  assert ids is None and adapter.acfg.exit_layer == 1


def test_precomputed_hidden_states_give_the_same_loss(tiny):
  _, model, tok, path = tiny
  ds = data.sharegpt(path, tok, max_len=64, eos_ids=[2])
  examples = ds.examples[:4]
  batch = {k: jnp.asarray(v) for k, v in data.make_batch(examples, 64).items()}
  distill.add_hidden(model, examples, 1, 64, 3)  # a batch size that splits the examples
  with_hidden = {k: jnp.asarray(v) for k, v in data.make_batch(examples, 64).items()}
  assert "hidden" in with_hidden
  inv = jnp.asarray(distill.draft_index(None, model.cfg.vocab_size))
  adapter = init_adapter(model.cfg, 1, seed=2)
  a, _ = distill.forward(model, adapter, batch, inv, None)
  b, _ = distill.forward(model, adapter, with_hidden, inv, None)
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_configs():
  from configs import llama7b, llama13b, smollm2_135m
  for mod, exit_layer in ((llama7b, 2), (llama13b, 3), (smollm2_135m, 2), (tiny_config, 1)):
    c = mod.get_config()
    assert c.exit_layer == exit_layer
    for field in ("model_path", "workdir", "steps", "batch_size", "lr", "seq_len"):
      assert field in c
    assert "source" in c.data and "path" in c.data
  assert "USER:" in llama7b.get_config().data.chat_template


def test_training_md_names_the_model_each_config_trains():
  """A config whose model_path is empty trains the embedded 135M model: TRAINING.md's
  table must say so (it called configs/tiny.py "a tiny random model")."""
  from configs import smollm2_135m
  with open(os.path.join(ROOT, "TRAINING.md")) as f:
    rows = {cells[1].strip(" `"): cells[2] for cells in
            (line.split("|") for line in f if line.startswith("| `configs/"))}
  for name, mod in (("configs/tiny.py", tiny_config), ("configs/smollm2_135m.py", smollm2_135m)):
    assert mod.get_config().model_path == ""  # the embedded model
    assert "SmolLM2-135M" in rows[name] and not rows[name].strip().startswith("a tiny"), name


def test_simulate_acceptance_replays_kangaroo_rounds():
  ok = np.array([[1, 1, 0, 1, 1, 1, 1, 1]], bool)
  sure = np.ones((1, 8))
  m = np.ones((1, 8), bool)
  # Round 1 accepts 2 drafts + the target's token at 2; round 2 accepts 4 drafts + 1 token.
  assert distill.simulate_acceptance(ok, sure, m) == (8, 2)
  # Unsure at 0: round 1 stops after that (accepted) draft; round 2 fails at 2 at once.
  unsure = sure.copy()
  unsure[0, 0] = 0.5
  assert distill.simulate_acceptance(ok, unsure, m) == (8, 3)
  assert distill.simulate_acceptance(ok, sure, m, gamma=2) == (8, 3)  # 3 + 3 + 2
  m[0, :3] = False  # only the answer counts
  assert distill.simulate_acceptance(ok, sure, m) == (5, 1)
