"""A two-axis device mesh: batch over 'data', attention heads / FFN / vocabulary over 'model'.

Parameters get a `PartitionSpec` from their name (the last path element) and rank; jit
then propagates shardings through the decode loops and the train step. On a CPU, test
with fake devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""
from __future__ import annotations

import warnings
from typing import Optional

import jax
import numpy as np
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


def _path_names(path) -> list[str]:
  """A pytree path as names: ['layers', '0', 'attn', 'qkv'] (nnx's trailing `.value` dropped)."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return [n for n in names if n != "value"]


def leaf_name(path) -> str:
  """The last name of a pytree path: the key of the sharding rules (`qkv`, `embedding`)."""
  names = _path_names(path)
  return names[-1] if names else ""


def spec_for(name: str, shape: tuple[int, ...], axis_sizes, fsdp: bool = False) -> tuple[P, bool]:
  """(PartitionSpec, divides) of a parameter named `name` (the last path element).

  `axis_sizes` maps axis name -> size (a Mesh's `.shape`). `divides` is False when the
  rule names an axis that does not divide its dimension (e.g. a tiny test vocabulary):
  the parameter is then replicated, and the caller reports it (`report_undivided`).
  fsdp=True also splits the largest other dimension that 'data' divides over 'data'
  (fully sharded data parallel: each product gathers its weight, `gathered`); vectors
  (norms, biases) stay as the rules say.
  """
  spec = _RULES.get(name, P())
  if len(spec) != len(shape):
    spec, divides = (P(*([None] * len(shape))) if fsdp and len(shape) > 1 else P()), True
  else:
    divides = all(axis is None or dim % axis_sizes[axis] == 0 for dim, axis in zip(shape, spec))
    if not divides:
      return P(), False
  if fsdp and len(shape) > 1 and axis_sizes.get("data", 1) > 1:
    free = [i for i, axis in enumerate(spec) if axis is None and shape[i] % axis_sizes["data"] == 0]
    if free:
      i = max(free, key=lambda i: shape[i])
      spec = P(*[("data" if j == i else axis) for j, axis in enumerate(spec)])
  return spec, divides


def batch_rows(x: jax.Array) -> jax.Array:
  """x [B, ...] split over 'data' by its batch under the current mesh (`jax.set_mesh`).

  Pins the training step's hidden states to data parallelism: with fully sharded weights
  (split over 'data' as well) XLA could otherwise keep every sequence on every device
  and split the hidden dimension instead, as the weights are.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.shape[0] % mesh.shape["data"]:
    return x
  return jax.lax.with_sharding_constraint(x, P("data"))


def gathered(w: jax.Array, name: str) -> jax.Array:
  """Weight `w` (parameter `name`) as a product consumes it under the current mesh
  (`jax.set_mesh`): with its tensor-parallel spec only. A weight stored fully sharded
  (`fsdp`) is then all-gathered over 'data' where it is used, a layer at a time, rather
  than XLA resharding the activations to match it; otherwise this changes nothing."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return w
  return jax.lax.with_sharding_constraint(w, spec_for(name, w.shape, mesh.shape)[0])


def _spec(path, value, mesh: Mesh, fsdp: bool = False) -> P:
  return spec_for(leaf_name(path), tuple(getattr(value, "shape", ())), mesh.shape, fsdp)[0]


def param_shardings(state, mesh: Mesh, fsdp: bool = False):
  """NamedShardings for an nnx State (or any pytree of parameters) on `mesh` (`spec_for`)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, v: NamedSharding(mesh, _spec(p, v, mesh, fsdp)), state)


def undivided_params(state, mesh: Mesh) -> list[str]:
  """'path [shape]' of each parameter that `mesh` replicates because an axis does not divide it."""
  out = []
  for path, value in jax.tree_util.tree_flatten_with_path(state)[0]:
    shape = tuple(getattr(value, "shape", ()))
    if not spec_for(leaf_name(path), shape, mesh.shape)[1]:
      out.append(f"{'/'.join(_path_names(path))} {list(shape)}")
  return out


def report_undivided(names: list[str], mesh: Mesh) -> None:
  """Warns (one line) about parameters replicated on every device of `mesh`."""
  if names:
    warnings.warn(f"{len(names)} parameter(s) replicated on all {mesh.devices.size} devices: the "
                  f"mesh {dict(mesh.shape)} does not divide them: " + ", ".join(names),
                  stacklevel=3)


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places a module's parameters on `mesh` (in place) and returns it.

  Parameters the mesh does not divide are replicated and reported with a warning.
  """
  state = nnx.state(module)
  report_undivided(undivided_params(state, mesh), mesh)
  nnx.update(module, jax.device_put(state, param_shardings(state, mesh)))
  return module


def mesh_of(module: nnx.Module) -> Optional[Mesh]:
  """The mesh a module's parameters live on, or None when they sit on one device."""
  for leaf in jax.tree.leaves(nnx.state(module)):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.devices.size > 1:
      return sharding.mesh
  return None


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for [B, ...] arrays: batch over 'data', replicated over 'model'."""
  return NamedSharding(mesh, P("data"))


def place(shape: tuple[int, ...], read, name: str, mesh: Optional[Mesh],
          fsdp: bool = False) -> tuple[jax.Array, bool]:
  """Puts a parameter `name` of `shape` on `mesh` with the sharding its rule gives; (array,
  divides).

  read(index) returns the host block at `index` (a tuple of slices). It is called once
  per distinct block this process's devices hold (replicas share one read), so no device,
  and no host, ever reads a whole sharded weight. mesh=None: the whole parameter on the
  default device, uncommitted (as `jnp.asarray` leaves it), so jit may still move it.
  `fsdp` and `divides` as for `spec_for`.
  """
  if mesh is None:
    return jax.device_put(read(tuple(slice(0, n) for n in shape))), True
  spec, divides = spec_for(name, shape, mesh.shape, fsdp)
  blocks = {}

  def block(index):
    key = tuple(i.indices(n) for i, n in zip(index, shape))
    if key not in blocks:
      blocks[key] = read(tuple(slice(*k) for k in key))
    return blocks[key]
  return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), block), divides
