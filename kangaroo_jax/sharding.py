"""A two-axis device mesh: batch over 'data', attention heads / FFN / vocabulary over 'model'.

Parameters get a `PartitionSpec` from their name (the last path element) and rank; jit
then propagates shardings through the decode loops and the train step. On a CPU, test
with fake devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# name -> spec. Kernels are [in, out]: shard the head/FFN/vocab dimension over 'model'.
_RULES = {
    "qkv": P(None, "model"),        # [D, (N + 2K) * H]
    "qkv_bias": P("model"),
    "o": P("model", None),          # [N * H, D]
    "gate_up": P(None, "model"),    # [D, 2F]
    "down": P("model", None),       # [F, D]
    "ffn_gate_up": P(None, "model"),  # adapter FFN [D, 2F]
    "ffn_down": P("model", None),     # adapter FFN [F, D]
    "embedding": P("model", None),  # [V, D]
    "lm_head": P(None, "model"),    # [D, V]
}


def make_mesh(data: int = 1, model: Optional[int] = None) -> Mesh:
  """A ('data', 'model') mesh; `model` defaults to all devices not used by `data`."""
  n = len(jax.devices())
  model = model or n // data
  if data * model > n:
    raise ValueError(f"a {data}x{model} mesh needs {data * model} devices, only {n} present")
  # Auto axes: XLA's sharding propagation places every intermediate; the only
  # annotations we need are on parameters and batch inputs.
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(auto, auto))


def _spec(path, value, mesh: Mesh) -> P:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  names = [n for n in names if n != "value"]  # nnx Variables end in `.value`
  spec = _RULES.get(names[-1] if names else "", P())
  ndim = getattr(value, "ndim", 0)
  if len(spec) != ndim:
    return P()
  # Replicate a dimension the 'model' axis does not divide (e.g. a tiny test vocabulary).
  for dim, axis in zip(value.shape, spec):
    if axis is not None and dim % mesh.shape[axis]:
      return P()
  return spec


def param_shardings(state, mesh: Mesh):
  """NamedShardings for an nnx State (or any pytree of parameters) on `mesh`."""
  return jax.tree_util.tree_map_with_path(lambda p, v: NamedSharding(mesh, _spec(p, v, mesh)), state)


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places a module's parameters on `mesh` (in place) and returns it."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, param_shardings(state, mesh)))
  return module


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for [B, ...] arrays: batch over 'data', replicated over 'model'."""
  return NamedSharding(mesh, P("data"))
