"""Streamed, sharded model loading: checkpoint tensors go one at a time to their devices.

Each parameter of the model is built on the host from its checkpoint tensors (q/k/v and
gate/up fused in the model's column orders, `model.qkv_order`; [out, in] transposed to
the model's [in, out]), cast straight from the stored type to the model's dtype, placed
with its final sharding (`sharding.place`) and dropped from host memory before the next
one is read. Each device's block is read on its own (`_block`), from only the rows and
columns it holds, so peak host memory is about one device's block of the largest weight
(an FFN gate/up or the embedding; the whole weight without a mesh), and each process of
a multi-host run reads only its own devices' shards.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kangaroo_jax import sharding
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.model import Llama, gate_up_order, qkv_order
from kangaroo_jax.weights import StoredTensor


def _block(tensors: dict[str, StoredTensor], names: list[str], dtype, transpose: bool,
           order: Optional[np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
  """Block `index` of a model parameter fused from the checkpoint tensors `names`.

  The parameter is the tensors concatenated along their first (output) axis, in the
  model's column order `order` (`model.qkv_order`: model position i holds output
  order[i] of the concatenation), transposed to the model's [in, out] when `transpose`.
  `index` holds a slice per axis of the model's layout. From each tensor only the span of
  rows the block uses is read (with the block's slice of its other axis), so a device's
  shard costs the host its own bytes, not the whole weight's.
  """
  shapes = [tensors[n].shape for n in names]
  out_axis = 1 if transpose else 0  # the model axis that runs over checkpoint rows
  rows = np.arange(sum(s[0] for s in shapes))[index[out_axis]]  # model positions wanted
  rows = rows if order is None else order[rows]  # -> rows of the concatenation
  in_axis = 0 if transpose else 1
  other = (index[in_axis],) if len(shapes[0]) == 2 else ()  # the checkpoint's in-axis slice
  block = np.empty(tuple(len(range(*i.indices(n))) for i, n in
                         zip(index, _model_shape(shapes, transpose))), dtype)
  start = 0
  for name, shape in zip(names, shapes):
    mine = (rows >= start) & (rows < start + shape[0])
    if mine.any():
      local = rows[mine] - start
      lo, hi = int(local.min()), int(local.max()) + 1
      w = tensors[name].read(dtype, (slice(lo, hi),) + other)  # [hi - lo, in...]
      if hi - lo != len(local) or np.any(np.diff(local) != 1):
        w = w[local - lo]  # interleaved orders (gate/up) pick rows from the span
      if transpose:
        block[:, mine] = w.T  # [rows, in] -> columns of [in, out]
      else:
        block[mine] = w
      del w
    start += shape[0]
  return block


def _model_shape(shapes: list[tuple[int, ...]], transpose: bool) -> tuple[int, ...]:
  """The fused parameter's shape in the model's layout."""
  fused = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
  return fused[::-1] if transpose else fused


def _recipes(model: Llama) -> list[tuple[nnx.Variable, str, list[str], bool, Optional[np.ndarray]]]:
  """(variable, sharding rule name, checkpoint tensor names, transpose, column order) per
  model parameter."""
  c = model.cfg
  qkv = qkv_order(c.num_heads, c.num_kv_heads, c.head_dim)
  gate_up = gate_up_order(c.intermediate_size)
  out = [(model.embedding, "embedding", ["model.embed_tokens.weight"], False, None)]
  for i, layer in enumerate(model.layers):
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    out += [(layer.input_norm.weight, "weight", [p + "input_layernorm.weight"], False, None),
            (layer.post_norm.weight, "weight", [p + "post_attention_layernorm.weight"], False,
             None),
            (layer.attn.qkv, "qkv", [a + n + "_proj.weight" for n in "qkv"], True, qkv),
            (layer.attn.o, "o", [a + "o_proj.weight"], True, None),
            (layer.gate_up, "gate_up", [m + "gate_proj.weight", m + "up_proj.weight"], True,
             gate_up),
            (layer.down, "down", [m + "down_proj.weight"], True, None)]
    if layer.attn.qkv_bias is not None:
      out.append((layer.attn.qkv_bias, "qkv_bias", [a + n + "_proj.bias" for n in "qkv"], False,
                  qkv))
    if layer.attn.o_bias is not None:
      out.append((layer.attn.o_bias, "o_bias", [a + "o_proj.bias"], False, None))
  out.append((model.norm.weight, "weight", ["model.norm.weight"], False, None))
  if model.lm_head is not None:
    out.append((model.lm_head, "lm_head", ["lm_head.weight"], True, None))
  return out


PROGRESS_AFTER = 1.5  # seconds of loading before the progress bar shows (tqdm's delay)


def load_params(cfg: ModelConfig, tensors: dict[str, StoredTensor], dtype=jnp.float32,
                mesh: Optional[Mesh] = None, activations=jnp.float32, fsdp: bool = False,
                progress: bool = False) -> Llama:
  """Builds a Llama from checkpoint tensors (`weights.open_checkpoint`), streamed to `mesh`.

  Args:
    cfg: the model config.
    tensors: Hugging Face-named tensors ([out, in] linear layout), read one at a time.
    dtype: the parameters' dtype; each tensor is cast to it on the host as it is read.
    mesh: a ('data', 'model') mesh to shard the parameters over; None = the default device.
    activations: the hidden states' and KV caches' dtype (`kangaroo_jax.precision`).
    fsdp: also split each weight over the mesh's 'data' axis (`sharding.spec_for`).
    progress: a progress bar in bytes on stderr once loading takes over PROGRESS_AFTER
      seconds (a 7B folder takes a minute or more; a small model shows nothing).
  Parameters the mesh does not divide are replicated and reported with a warning.
  """
  import sys

  from tqdm import tqdm
  model = nnx.eval_shape(lambda: Llama(cfg, dtype, nnx.Rngs(0), activations))
  undivided = []
  recipes = _recipes(model)
  total = sum(int(np.prod(tensors[n].shape)) for _, _, names, _, _ in recipes for n in names)
  bar = tqdm(total=total * np.dtype(dtype).itemsize, unit="B", unit_scale=True,
             desc="loading weights", file=sys.stderr, delay=PROGRESS_AFTER, leave=False,
             disable=not progress)
  for var, rule, names, transpose, order in recipes:
    shape = _model_shape([tensors[n].shape for n in names], transpose)
    read = lambda index, names=names, transpose=transpose, order=order: _block(
        tensors, names, np.dtype(dtype), transpose, order, index)
    array, divides = sharding.place(shape, read, rule, mesh, fsdp)
    var.set_value(array)
    bar.update(sum(int(np.prod(tensors[n].shape)) for n in names) * np.dtype(dtype).itemsize)
    if not divides:
      undivided.append(f"{'+'.join(names)} {list(array.shape)}")
  bar.close()
  if mesh is not None:
    sharding.report_undivided(undivided, mesh)
  return model
