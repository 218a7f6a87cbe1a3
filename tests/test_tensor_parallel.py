"""Tensor parallelism without reshuffles: the compiled plain and Kangaroo loops on 1x4 and
1x8 fake CPU meshes run only the all-reduces a Megatron layout needs.

The fused q/k/v and gate/up weights are laid out so that the 'model' axis splits whole
KV-head groups and matching gate/up columns (`model.qkv_order`, `model.gate_up_order`).
In checkpoint order ([q | k | v], [gate | up]) this config (float32) compiled to 36-42
collective-permutes a plain step and 67-121 a Kangaroo round (the layout before).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax import hlo, sharding
from kangaroo_jax import model as M
from kangaroo_jax.adapter import init_adapter
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.decoding import _plain_loop
from kangaroo_jax.kangaroo import _kangaroo_loop
from kangaroo_jax.sampling import SamplingParams

# GQA (16 query heads over 8 KV heads): groups of 2 q heads, 8 KV heads split by 4 and 8.
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=16, num_kv_heads=8, head_dim=8, max_position_embeddings=256)


def collectives_in_loops(text: str) -> dict[str, list[str]]:
  """Collective instructions inside the loops' computations, by kind: their lines."""
  comps = hlo.computations_of(text)
  loops = hlo.loop_computations(comps)
  out = {}
  for op in ("collective-permute", "all-gather", "all-reduce", "all-to-all"):
    pattern = re.compile(r"\s" + re.escape(op) + r"(-start)?\(")
    out[op] = [line.strip() for name in loops for line in comps.get(name, ())
               if pattern.search(line)]
  return out


def result_dims(line: str) -> tuple[int, ...]:
  """The result shape of one HLO instruction line ('%x = f32[1,7,8]{...} op(...)')."""
  dims = re.search(r"=\s*\(?\w+\[([\d,]*)\]", line).group(1)
  return tuple(int(d) for d in dims.split(",") if d)


def compiled_loops(model_axis: int):
  mesh = sharding.make_mesh(1, model_axis)
  model = M.Llama(CFG, jnp.bfloat16, activations=jnp.bfloat16, step_width=8)
  adapter = init_adapter(CFG, 1, dtype=jnp.bfloat16)
  sharding.shard_module(model, mesh)
  sharding.shard_module(adapter, mesh)
  graphdef, state = nnx.split(model)
  agraphdef, astate = nnx.split(adapter)
  tokens = jax.device_put(jnp.zeros((1, 32), jnp.int32), sharding.data_sharding(mesh))
  lens = jax.device_put(jnp.full((1,), 5, jnp.int32), sharding.data_sharding(mesh))
  common = (tokens, lens, jax.random.key(0), jnp.asarray([1]))
  plain = _plain_loop.lower(graphdef, state, *common, jnp.int32(16), params=SamplingParams(),
                            capacity=16)
  kangaroo = _kangaroo_loop.lower(graphdef, state, agraphdef, astate, None, *common,
                                  jnp.float32(0.6), jnp.int32(16), params=SamplingParams(),
                                  capacity=16, gamma=6, send_unconfident=True)
  weights = {tuple(x.shape) for x in jax.tree.leaves(state) + jax.tree.leaves(astate)
             if np.ndim(x) == 2}
  return {"plain": plain.compile().as_text(), "kangaroo": kangaroo.compile().as_text()}, weights


@pytest.mark.parametrize("model_axis", [4, 8])
def test_loops_run_only_megatron_all_reduces(model_axis):
  loops, weight_shapes = compiled_loops(model_axis)
  for name, text in loops.items():
    found = collectives_in_loops(text)
    assert found["collective-permute"] == [], f"{name}: {found['collective-permute'][:3]}"
    assert found["all-to-all"] == []
    # All-gathers only of a step's small results (top-k over the vocabulary shards), never
    # of a weight, whole or in part.
    for line in found["all-gather"]:
      dims = result_dims(line)
      assert dims not in weight_shapes and np.prod(dims) < CFG.hidden_size * CFG.vocab_size // 8, line
    # Two all-reduces a layer (after o and after down) and one for the embedding lookup;
    # Kangaroo's loop holds the plain step's pieces several times (draft, verification).
    assert len(found["all-reduce"]) >= 2 * CFG.num_layers, name
  plain = collectives_in_loops(loops["plain"])
  assert len(plain["all-reduce"]) == 2 * CFG.num_layers + 1


def test_layout_orders_are_permutations_that_group_heads():
  order = M.qkv_order(num_heads=4, num_kv_heads=2, head_dim=1)
  # [q | k | v] = [q0 q1 q2 q3 | k0 k1 | v0 v1] -> [q0 q1 k0 v0 | q2 q3 k1 v1]
  assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
  assert M.gate_up_order(3).tolist() == [0, 3, 1, 4, 2, 5]
  assert sorted(M.qkv_order(32, 8, 128)) == list(range((32 + 16) * 128))
