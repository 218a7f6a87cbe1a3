"""Adapter training, the run: config checks, data, mesh, the train loop with resumable
checkpoints, evaluation, export and the learning curve.

The loss, the jitted train and eval steps and the acceptance simulation live in
`kangaroo_jax/distill.py`.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
import optax
from flax import nnx

from kangaroo_jax.adapter import Adapter
from kangaroo_jax.data import epath
from kangaroo_jax.distill import (add_hidden, average, copy_adapter_weights, draft_index,
                                  make_eval_step, make_optimizer, make_train_step,
                                  pick_draft_vocab, simulate_acceptance, warm_start)


HIDDEN_CACHE_BYTES = 3 << 30
# The adapter's parameters and optimizer state, whatever the model's dtype: an AdamW step
# at a 7B learning rate (5e-5) is below half a bfloat16 unit of most weights (and of
# every norm weight, 1.0), so bfloat16 master weights would barely move.
MASTER_DTYPE = np.float32
SOURCES = ("magpie", "sharegpt", "tfds", "teacher")


class ConfigError(ValueError):
  """A config, or a workdir, that this run cannot use; train.py reports it in one line."""


def check_config(c) -> None:
  """Raises ConfigError naming the first config value that cannot work."""
  positive = ("steps", "batch_size", "lr")
  for name in positive:
    if not c[name] > 0:
      raise ConfigError(f"config.{name} must be > 0, got {c[name]}")
  if c.seq_len < 2:
    raise ConfigError(f"config.seq_len must be >= 2, got {c.seq_len}")
  if any(not isinstance(w, int) or w < 2 for w in c.get("length_buckets", ())):
    raise ConfigError(f"config.length_buckets must be widths >= 2, got {c.length_buckets}")
  if c.data.source not in SOURCES:
    raise ConfigError(f"config.data.source must be one of {', '.join(SOURCES)}, got {c.data.source!r}")
  if c.data.source in ("sharegpt", "tfds", "teacher") and not c.data.path:
    raise ConfigError(f"config.data.path is required for data.source={c.data.source!r}")
  for name in ("warmup_steps", "log_every", "eval_every", "checkpoint_every", "draft_vocab",
               "data.eval_examples"):
    value = c.data[name[5:]] if name.startswith("data.") else c[name]
    if value < 0:
      raise ConfigError(f"config.{name} must be >= 0, got {value}")


def check_shared_workdir(workdir: str, processes: int) -> None:
  """Refuses a relative local workdir for several processes: each host would write its
  own folder, and orbax's multi-host save needs one that all of them share."""
  if processes > 1 and "://" not in workdir and not os.path.isabs(workdir):
    raise ConfigError(f"config.workdir {workdir!r} is a relative local folder, but the "
                      f"{processes} processes must share one: give gs://bucket/... or an "
                      "absolute path on a shared disk")


def latest_checkpoint_step(workdir: str):
  """The step of the last complete checkpoint in workdir/checkpoints, None without one.

  Read from the folder names (orbax names a complete checkpoint by its step and a
  half-written one otherwise), so it needs no checkpoint manager and no jax.
  """
  folder = epath(workdir) / "checkpoints"
  steps = [int(d.name) for d in folder.iterdir() if d.name.isdigit()] if folder.is_dir() else []
  return max(steps, default=None)


def _append(path: str, line: str) -> None:
  """Appends `line` to a small text file, local or remote (object stores cannot append:
  the file is rewritten)."""
  p = epath(path)
  p.write_text((p.read_text() if p.exists() else "") + line)


def _write_through_local(path: str, write) -> None:
  """Calls write(local path) and puts the file at `path` (local or gs://)."""
  if "://" not in path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write(path)
    return
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    write(local)
    epath(local).copy(epath(path), overwrite=True)


def _host(tree):
  """Host (numpy) copies of global arrays. With several processes every process must call
  it: arrays sharded across hosts are gathered (`jax.device_get` cannot read them)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def check_resumable(c) -> None:
  """Refuses a workdir whose last checkpoint is past config.steps, before the model loads.

  Resuming it would train nothing and export an adapter trained longer than this config
  asks for; a checkpoint cannot be rewound.
  """
  step = latest_checkpoint_step(c.workdir)
  if step is not None and step > c.steps:
    raise ConfigError(f"{os.path.join(c.workdir, 'checkpoints')} holds a checkpoint at step "
                      f"{step}, past config.steps={c.steps}: set --config.steps to at least "
                      f"{step} or use a new --config.workdir")


def load_dataset(c, model, tokenizer, eos_ids, progress=None):
  """The configured data source -> `data.Dataset` (generating self-distilled data if needed)."""
  from kangaroo_jax import chat_templates, data
  template = chat_templates.resolve(c.data.chat_template)  # a name, a file or the text
  # Several processes: each tokenises its share of the records and they exchange the
  # results, so every process holds the whole set, in the order one process would make.
  part = (jax.process_index(), jax.process_count())
  common = dict(max_len=c.seq_len, eos_ids=eos_ids, chat_template=template, part=part)
  if c.data.source in ("sharegpt", "tfds"):
    ds = (data.sharegpt(c.data.path, tokenizer, **common) if c.data.source == "sharegpt" else
          data.tfds_source(c.data.path, tokenizer, c.data.split, c.data.tfds_data_dir or None,
                           **common))
    if part[1] == 1:
      return ds
    from kangaroo_jax import multihost
    return data.merge_parts([data.unpack(b) for b in multihost.all_gather_bytes(data.pack(ds))],
                            c.data.path)
  if c.data.source == "teacher":
    raise ValueError("teacher caches are read by split_teacher_caches")
  folder = c.data.path or os.path.join(c.workdir, "magpie")
  settings = data.MagpieSettings(
      num=c.data.magpie_num, batch=c.data.magpie_batch, user_max=c.data.magpie_user_max,
      answer_max=c.data.magpie_answer_max, user_temperature=c.data.magpie_user_temperature,
      answer_temperature=c.data.magpie_answer_temperature, top_p=c.data.magpie_top_p,
      teacher_top_k=c.data.teacher_top_k, seed=c.seed,
      user_starts=tuple(c.data.get("magpie_user_starts", ())))
  if not os.path.isdir(folder) or data.count_magpie(folder) < settings.num:
    if jax.process_count() > 1:
      raise ValueError(f"generate the self-distilled data on one host first ({folder})")
    data.magpie_generate(model, tokenizer, folder, settings, eos_ids, template, progress)
  return data.load_magpie(folder, c.seq_len)


def split_teacher_caches(c, log=print):
  """(train conversations, {eval name: held-out conversations}) from teacher caches.

  `data.path` is a comma list of cache folders (`python -m kangaroo_jax.teacher`); the
  first `data.eval_shards` shards of each are held out and evaluated as their own set,
  named after the folder, so a cache that grows keeps the same held-out text.
  """
  from kangaroo_jax import teacher
  from kangaroo_jax.data import DataError
  train, evals = [], {}
  held = c.data.get("eval_shards", 1)
  for folder in [p.strip() for p in c.data.path.split(",") if p.strip()]:
    name = os.path.basename(os.path.normpath(folder))
    evals[name] = teacher.load_cache(folder, c.seq_len, slice(0, held)).examples
    # A cache of held-out shards only is evaluated, not trained on (e.g. own text beside
    # a run on teacher-forced text).
    part = teacher.load_cache(folder, c.seq_len, slice(held, None)).examples \
        if len(teacher.shard_dirs(folder)) > held else []
    log(f"{folder}: {len(part)} training / {len(evals[name])} held-out conversations")
    train += part
  if not train:
    raise DataError(f"{c.data.path}: every cache has at most {held} complete shards, all held "
                    "out for evaluation, so it needs more")
  return train, evals


def _global(tree, shardings):
  """Host arrays -> global jax.Arrays (each process supplies the shards it holds)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def training_mesh(c):
  """The ('data', 'model') mesh of config `c`: batch over 'data', parameters over 'model'."""
  from kangaroo_jax import sharding
  n_dev = len(jax.devices())
  if c.mesh_model < 1 or n_dev % c.mesh_model:
    raise ConfigError(f"config.mesh_model {c.mesh_model} does not divide the {n_dev} devices")
  data = n_dev // c.mesh_model if c.mesh_data == -1 else c.mesh_data
  if data * c.mesh_model > n_dev:
    raise ConfigError(f"config.mesh_data x mesh_model = {data} x {c.mesh_model} needs "
                      f"{data * c.mesh_model} devices, {n_dev} present")
  mesh = sharding.make_mesh(data, c.mesh_model)
  check_mesh(c, mesh)
  return mesh


def check_mesh(c, mesh) -> None:
  """Raises ConfigError unless config.batch_size divides over the mesh's 'data' axis."""
  if c.batch_size % mesh.shape["data"]:
    raise ConfigError(f"config.batch_size {c.batch_size} is not a multiple of the 'data' axis "
                      f"({mesh.shape['data']} devices)")


def split_onto_mesh(module: nnx.Module, mesh, fsdp: bool = False):
  """(graphdef, state) of `module`, its parameters placed on `mesh` by their partition specs."""
  from kangaroo_jax import sharding
  graphdef, state = nnx.split(module)
  return graphdef, _global(state, sharding.param_shardings(state, mesh, fsdp))


def optimizer(c) -> optax.GradientTransformation:
  """The config's AdamW schedule (`distill.make_optimizer`)."""
  return make_optimizer(c.lr, c.warmup_steps, c.steps, c.weight_decay, c.b1, c.b2, c.grad_clip,
                        c.end_lr_fraction)


def state_shardings(tx: optax.GradientTransformation, params, mesh, fsdp: bool):
  """(params, optimizer state) shardings: the moments follow their parameters (over
  'model', and 'data' too with fsdp), scalars such as the step count are replicated."""
  from jax.sharding import NamedSharding, PartitionSpec
  from kangaroo_jax import sharding
  p = sharding.param_shardings(params, mesh, fsdp)
  o = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), p,
                            transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
                            is_leaf=lambda x: isinstance(x, NamedSharding))
  return p, o


def abstract_train_step(c, cfg, mesh, teacher_top_k: int = 0):
  """(jitted train step, abstract arguments): the step `train` runs for config `c`, for a
  model of shape `cfg` on `mesh`, with `jax.ShapeDtypeStruct` arguments carrying the
  shardings `train` gives them; `step.lower(*args).compile()` compiles it without weights
  or data (`kangaroo_jax.aot`). teacher_top_k > 0: batches from a top-k teacher cache.
  """
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from kangaroo_jax import sharding
  from kangaroo_jax.adapter import init_adapter
  from kangaroo_jax.model import Llama
  check_mesh(c, mesh)
  model = nnx.eval_shape(lambda: Llama(cfg, jnp.dtype(c.dtype), nnx.Rngs(0), step_width=1))
  model_graphdef, model_state = nnx.split(model)
  adapter = nnx.eval_shape(lambda: init_adapter(cfg, c.exit_layer, c.adapter_heads or None, 0,
                                                MASTER_DTYPE, c.get("adapter_ffn", 0)))
  adapter_graphdef, params = nnx.split(adapter)
  tx = optimizer(c)
  p_sh, o_sh = state_shardings(tx, params, mesh, c.fsdp)
  shaped = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params_in = jax.tree.map(shaped, params, p_sh)
  opt_in = jax.tree.map(shaped, jax.eval_shape(tx.init, params), o_sh)
  model_in = jax.tree.map(shaped, model_state, sharding.param_shardings(model_state, mesh, c.fsdp))
  rows = sharding.data_sharding(mesh)
  b, t = c.batch_size, c.seq_len
  batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows),
           "assistant": jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=rows)}
  if teacher_top_k:
    batch["teacher_ids"] = jax.ShapeDtypeStruct((b, t, teacher_top_k), jnp.int32, sharding=rows)
    batch["teacher_probs"] = jax.ShapeDtypeStruct((b, t, teacher_top_k), jnp.float32, sharding=rows)
  replicated = NamedSharding(mesh, PartitionSpec())
  inv = jax.ShapeDtypeStruct((cfg.vocab_size,), jnp.int32, sharding=replicated)
  dids = (jax.ShapeDtypeStruct((c.draft_vocab,), jnp.int32, sharding=replicated)
          if c.draft_vocab and c.draft_vocab < cfg.vocab_size else None)
  step = make_train_step(model_graphdef, adapter_graphdef, tx, (p_sh, o_sh), mesh)
  return step, (params_in, opt_in, model_in, batch, inv, dids)


def initial_adapter(model, c, start_from: Optional[Adapter] = None) -> Adapter:
  """The adapter training starts from, in float32 (`MASTER_DTYPE`) whatever `model.dtype`:
  the target's logit lens at the exit layer (`warm_start`), or `start_from`'s weights."""
  from kangaroo_jax.adapter import init_adapter
  adapter = warm_start(init_adapter(model.cfg, c.exit_layer, c.adapter_heads or None, c.seed,
                                    MASTER_DTYPE, c.get("adapter_ffn", 0)), model)
  if start_from is not None:
    copy_adapter_weights(start_from, adapter)
  return adapter


def _fingerprint(examples) -> int:
  """A cheap identity of the training data, so a resume on different data is caught."""
  h = len(examples)
  for ex in examples[:64]:
    h = (h * 1000003 + int(np.asarray(ex.ids, np.int64).sum()) + len(ex.ids)) % (1 << 31)
  return h


def train(c, log=print, on_eval=None, stop_at=None) -> dict:
  """Trains an adapter as configured by `c` (see configs/); resumes from `c.workdir`.

  Returns the final metrics (train and held-out). Writes checkpoints under
  workdir/checkpoints, metrics to workdir/metrics.jsonl, and the standalone adapter to
  `c.export_path` (default workdir/adapter.safetensors).

  on_eval(step, metrics, write_adapter): called after every held-out evaluation (the
  starting adapter's, the periodic ones and the final one); `write_adapter(path, extra)`
  writes the adapter at that step. stop_at: a `time.time()` past which the run saves a
  checkpoint and ends early (exported at that step; rerunning resumes to `c.steps`); for
  one process only (hosts' clocks could stop them at different steps).
  """
  import json
  import time

  from tqdm import tqdm

  from kangaroo_jax import api, checkpoint, data, sharding

  t_start = time.time()
  # Stage 1, mesh and model: the checkpoint streams straight onto the mesh, each process
  # reading only the shards its devices hold.
  mesh = start_run(c)
  main = jax.process_index() == 0
  # float32 activations where the model runs outside the step (cached states, generated
  # data) on every backend; the step computes as `distill.step_numerics` says.
  model, tokenizer = api.load_model(c.model_path or None, c.dtype, mesh=mesh,
                                    activations="float32", fsdp=c.fsdp)
  eos = api.eos_ids(model, tokenizer)

  # Stage 2, data: training and held-out conversations, the draft vocabulary.
  train_set, eval_sets, batches, skipped = load_data(c, model, tokenizer, eos, main, log)
  start_from = None
  if c.get("init_from", ""):
    from kangaroo_jax.adapter import load_adapter
    start_from = load_adapter(c.init_from, model.cfg, MASTER_DTYPE)
  draft_ids = choose_draft_vocab(c, model.cfg.vocab_size, train_set, eos, start_from)

  # Stage 3, state and resume.
  model_graphdef, model_state = nnx.split(model)
  adapter = initial_adapter(model, c, start_from[0] if start_from is not None else None)
  adapter_graphdef, params = split_onto_mesh(adapter, mesh, c.fsdp)
  tx = optimizer(c)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = state_shardings(tx, params, mesh, c.fsdp)
  opt_state = jax.jit(tx.init, out_shardings=shardings[1])(params)
  # [-1] stands for "the full vocabulary" (orbax cannot store an empty array).
  vocab_ids = draft_ids if draft_ids is not None else np.full((1,), -1, np.int32)

  mgr = checkpoint.manager(os.path.join(c.workdir, "checkpoints"), c.keep_checkpoints)
  start, params, opt_state, vocab_ids = resume(c, mgr, params, opt_state, vocab_ids, train_set,
                                               batches, log if main else (lambda *_: None))
  draft_ids = None if vocab_ids[0] < 0 else vocab_ids
  inv = _global(draft_index(draft_ids, model.cfg.vocab_size), replicated)
  dids = None if draft_ids is None else _global(np.asarray(draft_ids, np.int32), replicated)

  # Stage 4, the loop: steps, held-out evaluations, checkpoints, export.
  step_fn = make_train_step(model_graphdef, adapter_graphdef, tx, shardings, mesh)
  eval_fn = make_eval_step(model_graphdef, adapter_graphdef, mesh)
  batch_sharding = sharding.data_sharding(mesh)
  to_device = lambda b: _global(b, {k: batch_sharding for k in b})

  def evaluate_set(params, eval_set, prefix) -> dict:
    out = []
    for i in range(0, len(eval_set), c.batch_size):
      chunk = eval_set[i:i + c.batch_size]
      batch = to_device(data.make_batch(chunk, c.seq_len, rows=c.batch_size))
      # Per-token outputs are sharded over every process's devices: gather them whole.
      out.append(multihost_utils.process_allgather(
          eval_fn(params, model_state, batch, inv, dids), tiled=True))
    accepted, rounds = map(sum, zip(*(simulate_acceptance(m["_correct"], m["_confidence"], m["_mask"])
                                      for m in out)))
    return {f"{prefix}{k}": v for k, v in average(out).items()} | {
        f"{prefix}simulated_accepted_tokens": accepted / max(rounds, 1)}

  def evaluate(params) -> dict:
    out = {}
    for name, eval_set in eval_sets.items():
      if eval_set:
        out |= evaluate_set(params, eval_set, f"eval_{name}_" if name else "eval_")
    return out

  def save(step):
    checkpoint.save(mgr, step, train_state(params, opt_state, step, batches.position(step),
                                           vocab_ids, _fingerprint(train_set)))

  metrics_file = os.path.join(c.workdir, "metrics.jsonl")  # training metrics, per log step
  eval_file = os.path.join(c.workdir, "eval.jsonl")  # held-out metrics: the learning curve
  if main:
    epath(c.workdir).mkdir(parents=True, exist_ok=True)
    for path in (metrics_file, eval_file):
      if epath(path).is_file():  # drop lines logged after the checkpoint we resume from
        kept = [l + "\n" for l in epath(path).read_text().splitlines()
                if l.strip() and json.loads(l)["step"] <= start]
        epath(path).write_text("".join(kept))
  bar = tqdm(total=c.steps, initial=start, desc="training", unit="step", disable=not main,
             dynamic_ncols=True)
  # Loss positions per step, averaged over the data (for the learning curve's x axis).
  tokens_per_step = c.batch_size * sum(int(ex.assistant[1:].sum()) for ex in train_set) / len(train_set)
  window: list = []
  last: dict = {}
  def write_adapter(path, extra=None):
    from kangaroo_jax.adapter import save_adapter
    nnx.update(adapter, jax.device_get(params))  # on_eval: one process only
    _write_through_local(path, lambda local: save_adapter(
        local, adapter, draft_ids, extra={k: v for k, v in (extra or {}).items()
                                          if isinstance(v, (int, float))}))

  if c.eval_every and start == 0:  # the learning curve's first point: the starting adapter
    ev = evaluate(params)
    if main:
      bar.write("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
      _append(eval_file, json.dumps(ev | {"step": 0, "tokens_seen": 0}) + "\n")
      if on_eval:
        on_eval(0, ev | {"tokens_seen": 0}, write_adapter)
  t_train = time.time()
  for step in range(start, c.steps):
    params, opt_state, m = step_fn(params, opt_state, model_state, to_device(batches(step)), inv, dids)
    window.append(m)
    done = step + 1
    if done % max(c.log_every, 1) == 0 or done == c.steps:
      last = average(jax.device_get(window)) | {"step": done, "epoch": batches.position(step)[0],
                                                 "lr": float(tx_lr(c, done))}
      window = []
      bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last['top1_agreement']:.3f}",
                      accept=f"{last['expected_acceptance']:.3f}")
      if main:
        _append(metrics_file, json.dumps(last) + "\n")
    if c.eval_every and done % c.eval_every == 0 and done != c.steps:
      ev = evaluate(params)
      if main:
        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        _append(eval_file,  # the learning curve's points
                json.dumps(ev | {"step": done, "tokens_seen": done * tokens_per_step}) + "\n")
        if on_eval:
          on_eval(done, ev | {"tokens_seen": done * tokens_per_step}, write_adapter)
    stopping = stop_at is not None and done < c.steps and time.time() > stop_at
    if c.checkpoint_every and (done % c.checkpoint_every == 0 or done == c.steps or stopping):
      save(done)
    bar.update(1)
    if stopping:
      break
  bar.close()
  steps_done = done if c.steps > start else start
  train_seconds = time.time() - t_train
  final = dict(last) | evaluate(params) | {
      "steps": steps_done, "resumed_from": start, "train_seconds_this_run": round(train_seconds, 1),
      "wall_seconds_this_run": round(time.time() - t_start, 1), "exit_layer": c.exit_layer,
      "draft_vocab": 0 if draft_ids is None else len(draft_ids),
      "train_conversations": len(train_set),
      "eval_conversations": sum(map(len, eval_sets.values())),
      "tokens_seen": steps_done * tokens_per_step, "adapter_ffn": c.get("adapter_ffn", 0),
      "data_skipped": skipped}
  if steps_done < c.steps:
    final["stopped_early"] = True
  trained = _host(params)  # every process: a collective with several
  if main:
    export(c, adapter, trained, draft_ids, final, eval_file, log)
    if on_eval:
      on_eval(steps_done, {k: v for k, v in final.items() if k.startswith("eval_")}
              | {"tokens_seen": final["tokens_seen"]}, write_adapter)
  return final


def start_run(c):
  """Checks the config and workdir, joins the other processes, returns the training mesh."""
  check_config(c)
  check_resumable(c)
  if c.distributed or c.num_processes > 1:
    from kangaroo_jax import multihost
    multihost.initialize(c.coordinator_address, c.num_processes, c.process_id)
  check_shared_workdir(c.workdir, jax.process_count())
  return training_mesh(c)


def load_data(c, model, tokenizer, eos_ids, main: bool, log):
  """(training conversations, {eval name: held-out conversations}, `data.Batches`, the
  skipped counts).

  With a cached teacher and little data, each token's layer-l states are kept in host
  memory (`add_hidden`): the step then skips the shallow layers; past a few GB it
  recomputes them (two of thirty layers: cheap).
  """
  from kangaroo_jax import data
  train_set, eval_sets, skipped = prepare_data(c, model, tokenizer, eos_ids, main, log)
  everything = train_set + [ex for s in eval_sets.values() for ex in s]
  if main:
    log(f"data: {len(train_set)} training / {sum(map(len, eval_sets.values()))} held-out "
        f"conversations; {skipped}")
  hidden_bytes = sum(len(ex.ids) for ex in everything) * model.cfg.hidden_size * 4
  # Not with several processes: their model spans hosts, and a multi-host data set is far
  # past the byte limit anyway.
  if (all(ex.teacher_ids is not None for ex in everything) and hidden_bytes < HIDDEN_CACHE_BYTES
      and jax.process_count() == 1):
    add_hidden(model, everything, c.exit_layer, c.seq_len, c.batch_size)
  buckets = tuple(c.get("length_buckets", ()))
  batches = data.Batches(train_set, c.batch_size, c.seq_len, c.seed, buckets)
  if main and len(batches.widths) > 1:
    shares = data.bucket_shares(train_set, c.batch_size, c.seq_len, buckets)
    log("batches by padded width: " + ", ".join(f"{w}: {100 * f:.0f}%" for w, f in shares.items())
        + " (the train step compiles once per width)")
  return train_set, eval_sets, batches, skipped


def choose_draft_vocab(c, vocab_size: int, train_set, eos_ids, start_from) -> Optional[np.ndarray]:
  """The reduced draft vocabulary (config.draft_vocab most frequent answer tokens), or None.

  A starting adapter (`init_from`) with a vocabulary of that size keeps it (chosen on its
  own, larger data), ordered by this data's counts so its first n ids stay the n most useful.
  """
  from kangaroo_jax import data
  if not c.draft_vocab or c.draft_vocab >= vocab_size:
    return None
  counts = data.token_frequencies(train_set, vocab_size)
  if start_from is not None and start_from[1] is not None and len(start_from[1]) == c.draft_vocab:
    old = np.asarray(start_from[1])
    counts = np.where(np.isin(np.arange(len(counts)), old), counts + 1, 0)
  return pick_draft_vocab(counts, c.draft_vocab, tuple(eos_ids))


def resume(c, mgr, params, opt_state, vocab_ids, train_set, batches, log):
  """(start step, params, optimizer state, draft vocabulary ids) from the last checkpoint
  in `mgr`, or the ones given at step 0; refuses a checkpoint of other data or batch size."""
  from kangaroo_jax import checkpoint
  restored = checkpoint.restore_latest(mgr, train_state(params, opt_state, 0, (0, 0), vocab_ids, 0))
  if restored is None:
    return 0, params, opt_state, vocab_ids
  start = int(restored["step"])
  if int(restored["data_fingerprint"]) != _fingerprint(train_set):
    raise ConfigError(f"{c.workdir} holds a run on different data; use a new workdir")
  if (int(restored["epoch"]), int(restored["index"])) != batches.position(start):
    raise ConfigError(f"{c.workdir}: the checkpoint's data position does not match this "
                      "config's batch size; use the original config or a new workdir")
  log(f"resumed from step {start} (epoch {batches.position(start)[0]})")
  return start, restored["params"], restored["opt_state"], np.asarray(restored["draft_ids"])


def prepare_data(c, model, tokenizer, eos_ids, main: bool, log) -> tuple[list, dict, dict]:
  """(training conversations, {eval name: held-out conversations}, skipped counts).

  A fixed slice is held out for evaluation (for teacher caches, whole shards of each);
  self-distilled data is generated first if the folder lacks it, with a progress bar.
  """
  from tqdm import tqdm

  from kangaroo_jax import data
  if c.data.source == "teacher":
    train_set, eval_sets = split_teacher_caches(c, log if main else (lambda *_: None))
    return train_set, eval_sets, {}
  gen_bar = None
  if c.data.source == "magpie" and main:
    folder = c.data.path or os.path.join(c.workdir, "magpie")
    have = data.count_magpie(folder) if os.path.isdir(folder) else 0
    gen_bar = tqdm(total=c.data.magpie_num, initial=min(have, c.data.magpie_num),
                   desc="self-distilling", unit="conv", disable=have >= c.data.magpie_num)
  ds = load_dataset(c, model, tokenizer, eos_ids, gen_bar.update if gen_bar else None)
  if gen_bar:
    gen_bar.close()
  order = np.random.default_rng([c.seed, 1]).permutation(len(ds.examples))
  n_eval = min(c.data.eval_examples, max(0, len(ds.examples) - c.batch_size))
  eval_sets = {"": [ds.examples[i] for i in order[:n_eval]]}
  return [ds.examples[i] for i in order[n_eval:]], eval_sets, ds.skipped


def train_state(params, opt_state, step: int, position: tuple[int, int], vocab_ids: np.ndarray,
                fingerprint: int) -> dict:
  """What a checkpoint holds; the same keys serve as the template a restore fills.

  position: the data position (epoch, index) after `step`; vocab_ids: the draft
  vocabulary, [-1] for the full one; fingerprint: `_fingerprint` of the training data,
  so that a resume on other data is refused.
  """
  epoch, index = position
  return {"params": params, "opt_state": opt_state, "step": np.int64(step),
          "epoch": np.int64(epoch), "index": np.int64(index), "draft_ids": vocab_ids,
          "data_fingerprint": np.int64(fingerprint)}


def export(c, adapter: Adapter, params, draft_ids, final: dict, eval_file: str, log) -> None:
  """Writes the trained adapter file, final_metrics.json and the learning curve (local
  paths or gs://); `params` are host arrays (`_host`)."""
  import json

  from kangaroo_jax.adapter import save_adapter
  path = c.export_path or os.path.join(c.workdir, "adapter.safetensors")
  nnx.update(adapter, params)
  _write_through_local(path, lambda local: save_adapter(
      local, adapter, draft_ids, extra={k: v for k, v in final.items() if isinstance(v, (int, float))}))
  epath(os.path.join(c.workdir, "final_metrics.json")).write_text(json.dumps(final, indent=1))
  _append(eval_file, json.dumps({k: v for k, v in final.items() if k.startswith("eval_")}
                                | {"step": final["steps"], "tokens_seen": final["tokens_seen"]}) + "\n")
  _write_through_local(os.path.join(c.workdir, "learning_curve.png"),
                       lambda local: plot_learning_curve(eval_file, local))
  log(f"adapter written to {path}")
  log(json.dumps(final))


def tx_lr(c, step: int) -> float:
  """The learning rate of `make_optimizer`'s schedule at `step` (for logging)."""
  warmup = min(c.warmup_steps, max(c.steps - 1, 0))
  return float(optax.warmup_cosine_decay_schedule(
      0.0, c.lr, warmup, max(c.steps, warmup + 1), c.lr * c.end_lr_fraction)(step))


def plot_learning_curve(metrics_file: str, png: str) -> None:
  """Held-out top-1 agreement and expected acceptance against tokens seen, one line per set."""
  import json

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(l) for l in epath(metrics_file).read_text().splitlines() if l.strip()]
  rows = [r for r in rows if "tokens_seen" in r]
  if not rows:
    return
  names = sorted({k[:-len("top1_agreement")] for r in rows for k in r if k.endswith("top1_agreement")})
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, metric, title in ((axes[0], "top1_agreement", "held-out top-1 agreement"),
                            (axes[1], "expected_acceptance", "held-out expected acceptance")):
    for prefix in names:
      pts = sorted((r["tokens_seen"], r[prefix + metric]) for r in rows if prefix + metric in r)
      label = prefix[len("eval_"):].rstrip("_") or "held-out"
      ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("training tokens seen (millions, loss positions)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)
