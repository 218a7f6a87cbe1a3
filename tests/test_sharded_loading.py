"""Streamed, sharded loading on 8 fake CPU devices: decoding equals one device, each device
holds only its shard, memory predicted from shapes equals what loading placed."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fixtures import tiny_model
from hf_tiny import VARIANTS
from kangaroo_jax import api, cli, loading, memory, sharding, weights
from kangaroo_jax import cache as kv
from kangaroo_jax.adapter import init_adapter, save_adapter
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.model import gate_up_order, qkv_order

PROMPTS = ["Hello there", "Why is the sky blue? Tell me."]  # batch 2: split over 'data' on 2x4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_model.write(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("adapter") / "adapter.safetensors")
  save_adapter(path, init_adapter(ModelConfig.from_hf_dict(tiny_model.CONFIG), exit_layer=1, seed=3))
  return path


@pytest.fixture(scope="module")
def unsharded(folder, adapter_path):
  model, tok = api.load_model(folder, mesh=None)
  drafter = api.load_adapter_for(model, adapter_path)
  return model, tok, drafter


def _decode(model, tok, drafter, mode):
  # eta near 0: drafts run to gamma every round, so the adapter path is exercised.
  return api.generate(model, tok, PROMPTS, mode=mode, adapter=drafter, max_new_tokens=12,
                      eta=1e-3, gamma=3).token_ids


def _assert_each_device_holds_its_shard(module, mesh):
  """Every parameter is on `mesh`; a parameter with a 'model' rule is split 1/model per device."""
  split = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]:
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh, path
    spec, divides = sharding.spec_for(sharding.leaf_name(path), leaf.shape, mesh.shape)
    assert divides, path  # the tiny model's dimensions all divide 8
    shards = leaf.addressable_shards
    assert len(shards) == mesh.devices.size
    for shard in shards:
      assert shard.data.size * (mesh.shape["model"] if "model" in spec else 1) == leaf.size, path
    split += "model" in spec
  assert split > 0


@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
def test_sharded_load_decodes_like_one_device(folder, adapter_path, unsharded, shape):
  ref_model, tok, ref_drafter = unsharded
  mesh = sharding.make_mesh(*shape)
  model, _ = api.load_model(folder, mesh=mesh)
  drafter = api.load_adapter_for(model, adapter_path)
  assert sharding.mesh_of(model) is mesh and sharding.mesh_of(drafter.adapter) is mesh
  _assert_each_device_holds_its_shard(model, mesh)
  _assert_each_device_holds_its_shard(drafter.adapter, mesh)
  for mode in ("plain", "kangaroo"):
    want = _decode(ref_model, tok, ref_drafter, mode)
    assert _decode(model, tok, drafter, mode) == want, mode


def test_memory_report_equals_the_placed_bytes(folder, adapter_path):
  mesh = sharding.make_mesh(2, 4)
  model, _ = api.load_model(folder, "bfloat16", mesh=mesh)
  drafter = api.load_adapter_for(model, adapter_path)
  device = jax.devices()[0]

  def on_device(module):
    return sum(s.data.nbytes for leaf in jax.tree.leaves(nnx.state(module))
               for s in leaf.addressable_shards if s.device == device)

  got = api.memory_report(model, drafter, batch=2, slots=256)
  assert (got.data, got.model) == (2, 4)
  assert got.weights == on_device(model)
  assert got.adapter == on_device(drafter.adapter)
  cfg, acfg = model.cfg, drafter.adapter.acfg
  # k+v, B, S, float32: the caches hold the (default float32) activations, not the weights' bf16.
  per_layer = lambda heads, head_dim: 2 * 2 * 256 * heads * head_dim * 4
  # The model's 2 KV heads do not divide 'model' (4): only the batch splits (over 2);
  # the adapter's 4 heads split over 'model' too.
  want_kv = (cfg.num_layers * per_layer(cfg.num_kv_heads, cfg.head_dim) // 2
             + per_layer(acfg.num_heads, acfg.head_dim) // 8)
  assert got.kv_cache == want_kv
  assert "per device (mesh 2x4)" in got.summary()


@pytest.mark.parametrize("activations", ["float32", "bfloat16"])
def test_memory_report_sizes_the_kv_cache_kangaroo_allocates(folder, activations):
  """bfloat16 weights: the caches hold float32 activations (also for bfloat16 activations on
  a CPU, `precision.cache_dtype`), so the report must count 4 bytes a value, not 2."""
  from kangaroo_jax import kangaroo
  from kangaroo_jax.sampling import SamplingParams
  model, _ = api.load_model(folder, "bfloat16", mesh=None, activations=activations)
  drafter = api.load_adapter_for(model, exit_layer=1, untrained=True)
  tokens, lens = jnp.zeros((1, 16), jnp.int32), jnp.array([5], jnp.int32)
  state = nnx.eval_shape(lambda m, a: kangaroo._kangaroo_start(
      m, a, tokens, lens, jax.random.key(0), jnp.array([1]), 8, params=SamplingParams(),
      capacity=100, gamma=2), model, drafter.adapter)
  caches = jax.tree.leaves((state.cache, state.acache))
  slots = {c.shape[1] for c in caches}.pop()
  allocated = sum(c.size * c.dtype.itemsize for c in caches)
  assert api.memory_report(model, drafter, slots=slots).kv_cache == allocated


def test_bf16_checkpoint_streams_without_a_float32_copy(tmp_path):
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      max_position_embeddings=64, **VARIANTS["gqa_untied"])).to(torch.bfloat16)
  hf.save_pretrained(tmp_path)
  cfg, tensors = weights.open_checkpoint(str(tmp_path))
  assert tensors["model.layers.0.mlp.up_proj.weight"].read(jnp.bfloat16).dtype == jnp.bfloat16
  mesh = sharding.make_mesh(1, 8)
  # The vocabulary (97) does not divide 8: embedding and head are replicated, and said so.
  with pytest.warns(UserWarning, match=r"2 parameter\(s\) replicated.*embed_tokens.*lm_head"):
    model = loading.load_params(cfg, tensors, jnp.bfloat16, mesh)
  sd = {k: v.view(torch.int16).numpy().view(jnp.bfloat16) for k, v in hf.state_dict().items()}
  p = "model.layers.1."
  # The model's column orders: q/k/v grouped per KV head, gate/up interleaved.
  qkv = np.concatenate([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).T[
      :, qkv_order(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)]  # [D, K * (G + 2) * H]
  gate_up = np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]).T[
      :, gate_up_order(cfg.intermediate_size)]  # [D, 2F]
  layer = model.layers[1]
  for got, want in ((layer.attn.qkv, qkv), (layer.gate_up, gate_up),
                    (model.lm_head, sd["lm_head.weight"].T)):
    assert got[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got[...]), want)


LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32, head_dim=128)


def test_pick_mesh_shape_sizes_the_model_axis_by_the_weights():
  gib = memory.GIB
  one = memory.model_bytes(LLAMA_7B, jnp.bfloat16, {"data": 1, "model": 1})
  assert 12.5 * gib < one < 12.6 * gib  # 6.74e9 parameters in bf16
  # Everything but the 65 norms [D] splits: 8 devices hold 1/8 each of the rest.
  norms = (2 * LLAMA_7B.num_layers + 1) * LLAMA_7B.hidden_size * 2
  assert memory.model_bytes(LLAMA_7B, jnp.bfloat16, {"data": 1, "model": 8}) == (
      (one - norms) // 8 + norms)
  # A batch of 8: the most data parallelism whose weights fit.
  assert memory.pick_mesh_shape(LLAMA_7B, jnp.bfloat16, 8, 80 * gib, batch=8) == (8, 1)
  assert memory.pick_mesh_shape(LLAMA_7B, jnp.bfloat16, 8, 16 * gib, batch=8) == (4, 2)
  assert memory.pick_mesh_shape(LLAMA_7B, jnp.bfloat16, 8, 8 * gib, batch=8) == (2, 4)
  # The 'data' axis never replicates a batch it cannot split: batch 1 (the default) puts
  # every device on 'model', batch 2 at most 2 on 'data'.
  for gib_each in (80, 16, 8):
    assert memory.pick_mesh_shape(LLAMA_7B, jnp.bfloat16, 8, gib_each * gib) == (1, 8)
  assert memory.pick_mesh_shape(LLAMA_7B, jnp.bfloat16, 8, 80 * gib, batch=2) == (2, 4)
  assert memory.pick_mesh_shape(LLAMA_7B, jnp.bfloat16, 8, 80 * gib, batch=6) == (2, 4)
  with pytest.raises(memory.DoesNotFit, match="even split over all 8 devices"):
    memory.pick_mesh_shape(LLAMA_7B, jnp.bfloat16, 8, 1 * gib)


def test_a_model_that_does_not_fit_is_refused_before_loading(folder, monkeypatch, capsys):
  """One line with the numbers, before a weight is read (the reader would fail loudly)."""
  monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 1 << 10)
  monkeypatch.setattr(loading, "load_params", lambda *a, **k: pytest.fail("weights were read"))
  with pytest.raises(memory.DoesNotFit, match=r"the weights need .* GiB per device on one "
                     r"device; each device has 0.00 GiB \(75% usable"):
    api.load_model(folder, mesh=None)
  mesh = sharding.make_mesh(1, 8)
  with pytest.raises(memory.DoesNotFit, match="on a 1x8 mesh.*--mesh 1x16"):
    api.load_model(folder, mesh=mesh)
  assert isinstance(memory.DoesNotFit("x"), ValueError)  # the command lines' one error line


def test_dtype_defaults_follow_the_backend():
  from kangaroo_jax import precision
  assert precision.default_dtypes("cpu") == ("float32", "float32")
  for platform in ("gpu", "tpu", "cuda"):
    assert precision.default_dtypes(platform) == ("bfloat16", "bfloat16")
  assert precision.default_dtypes() == ("float32", "float32")  # these tests run on a CPU


def test_decode_cli_on_a_1x8_mesh(folder, capsys):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("decode_cli", os.path.join(root, "decode.py"))
  decode = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(decode)
  assert decode.main(["--model", folder, "--prompt", "Hi", "--dtype", "bfloat16",
                      "--mesh", "1x8", "--mode", "plain", "--max-new-tokens", "4"]) == 0
  assert "per device (mesh 1x8): weights" in capsys.readouterr().err
  assert decode.main(["--model", folder, "--prompt", "Hi", "--mesh", "2by4"]) == cli.EXIT_ERROR
  assert "--mesh must be DATAxMODEL" in capsys.readouterr().err


def test_caches_are_pinned_to_the_mesh():
  mesh = sharding.make_mesh(2, 4)
  cfg = ModelConfig.from_hf_dict(tiny_model.CONFIG)  # 2 KV heads: 'model' (4) does not divide
  with jax.set_mesh(mesh):
    cache = jax.jit(lambda: kv.init_cache(2, 4, 128, 4, 8))()
    odd = jax.jit(lambda: kv.init_model_cache(cfg, 3, 128))()
  assert cache["k"][1].sharding.spec == P("data", None, "model")  # trailing None dropped
  assert odd["v"][0].sharding.is_fully_replicated
  # Outside a mesh the cache is an ordinary single-device array.
  assert not isinstance(jax.jit(lambda: kv.init_cache(1, 1, 8, 2, 4))()["k"][0].sharding,
                        NamedSharding)


def test_readme_shows_the_computed_memory_table():
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "README.md")) as f:
    assert memory.markdown_table() in f.read()


def test_each_device_block_reads_only_its_rows(folder):
  """On a 1x8 mesh every weight split over 'model' is read in eighths, each row once: the
  reads a multi-host run makes on each host are those of its own devices' shards."""
  cfg, tensors = weights.open_checkpoint(folder)
  reads = []

  def recorded(name, t):
    def read(dtype, index=None):
      w = t.read(dtype, index)
      reads.append((name, w.shape))
      return w
    return weights.StoredTensor(t.shape, read)
  mesh = sharding.make_mesh(1, 8)
  loading.load_params(cfg, {n: recorded(n, t) for n, t in tensors.items()}, mesh=mesh)
  for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
               "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
    rows = tensors[name].shape[0]
    shapes = [shape for n, shape in reads if n == name]
    if name.endswith("down_proj.weight"):  # [D, F] split over F, its in-axis: columns
      assert shapes == [(rows, tensors[name].shape[1] // 8)] * 8, name
    else:
      assert sum(s[0] for s in shapes) == rows and max(s[0] for s in shapes) <= rows // 4, name
  norm = [shape for n, shape in reads if n == "model.norm.weight"]
  assert norm == [(cfg.hidden_size,)]  # replicated: one read for all eight devices
