"""Per-device memory from shapes alone: weights, KV cache and adapter on a ('data', 'model') mesh.

The numbers come from the same sharding rules that place the parameters
(`sharding.spec_for`), so what this module predicts is what loading puts on each device.
`pick_mesh_shape` uses them to size the 'model' axis: the fewest devices per model copy
that leave room for the KV cache and activations.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax import cache as kv
from kangaroo_jax import sharding
from kangaroo_jax.adapter import Adapter, AdapterConfig
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.model import Llama

# Weights may fill at most this share of a device; the rest holds the KV cache, the
# adapter and XLA's temporaries (a decode step's activations are small next to them).
WEIGHT_SHARE = 0.75
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes per device of each part, on a mesh of `data` x `model` devices."""
  data: int
  model: int
  weights: int
  kv_cache: int
  adapter: int
  batch: int
  slots: int

  @property
  def total(self) -> int:
    return self.weights + self.kv_cache + self.adapter

  def summary(self) -> str:
    """One line: 'per device (mesh 1x8): weights 1.57 GiB, KV cache ..., adapter ...; total ...'."""
    return (f"per device (mesh {self.data}x{self.model}): weights {_readable(self.weights)}, "
            f"KV cache {_readable(self.kv_cache)} (batch {self.batch} x {self.slots} slots), "
            f"adapter {_readable(self.adapter)}; total {_readable(self.total)}")


def _readable(n: int) -> str:
  """Bytes as GiB from 1 GiB up, else MiB (a small model's adapter is a few MiB)."""
  return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def state_bytes_per_device(state, axis_sizes) -> int:
  """Bytes one device holds of a parameter pytree (arrays or shape structs) on a mesh shape."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    shape = tuple(leaf.shape)
    spec, _ = sharding.spec_for(sharding.leaf_name(path), shape, axis_sizes)
    split = math.prod(axis_sizes[a] for a in spec if a is not None)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize // split
  return total


def model_bytes(cfg: ModelConfig, dtype, axis_sizes) -> int:
  """Weight bytes per device of a Llama `cfg` in `dtype` (computed from shapes, no arrays)."""
  return state_bytes_per_device(nnx.state(nnx.eval_shape(lambda: Llama(cfg, dtype))), axis_sizes)


def adapter_bytes(acfg: AdapterConfig, cfg: ModelConfig, dtype, axis_sizes) -> int:
  """Weight bytes per device of an adapter `acfg` for model `cfg`."""
  abstract = nnx.eval_shape(lambda: Adapter(acfg, cfg, dtype))
  return state_bytes_per_device(nnx.state(abstract), axis_sizes)


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype, batch: int,
                   slots: int, axis_sizes) -> int:
  """KV cache bytes per device: the batch over 'data', the KV heads over 'model' where they
  divide (`cache.cache_spec`, the sharding the decode loops pin the cache to)."""
  spec = kv.cache_spec(batch, num_kv_heads, axis_sizes)
  split = math.prod(axis_sizes[a] for a in spec if a is not None)
  per_layer = 2 * batch * slots * num_kv_heads * head_dim * np.dtype(dtype).itemsize  # k and v
  return num_layers * per_layer // split


def report(cfg: ModelConfig, dtype, axis_sizes, batch: int = 1, slots: int = 2048,
           acfg: Optional[AdapterConfig] = None, cache_dtype=None) -> MemoryReport:
  """Per-device bytes of weights, the KV caches (model and adapter) and the adapter.

  `dtype` is the weights'; `cache_dtype` the KV caches' (None: the same). They differ
  whenever the activations do from the weights: the caches hold activations
  (`precision.cache_dtype`), so bfloat16 weights with float32 activations cache float32.
  """
  cache_dtype = dtype if cache_dtype is None else cache_dtype
  kv = kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cache_dtype, batch, slots,
                      axis_sizes)
  adapter = 0
  if acfg is not None:
    adapter = adapter_bytes(acfg, cfg, dtype, axis_sizes)
    kv += kv_cache_bytes(1, acfg.num_heads, acfg.head_dim, cache_dtype, batch, slots, axis_sizes)
  return MemoryReport(axis_sizes["data"], axis_sizes["model"], model_bytes(cfg, dtype, axis_sizes),
                      kv, adapter, batch, slots)


def device_memory_bytes(device: Optional[jax.Device] = None) -> int:
  """Memory of one device: its allocator limit, or for CPU devices a share of host memory.

  Fake CPU devices (--xla_force_host_platform_device_count) all live in host memory.
  """
  device = device or jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host // len(jax.devices(device.platform))


class DoesNotFit(MemoryError, ValueError):
  """A model that does not fit the devices; a ValueError too, so the command lines
  report it as one `error:` line."""


def pick_mesh_shape(cfg: ModelConfig, dtype, n_devices: int, device_bytes: int,
                    batch: int = 1) -> tuple[int, int]:
  """(data, model): the largest 'data' axis dividing both `n_devices` and `batch` whose
  weights (split over the rest, 'model') fit a device.

  A 'data' axis that does not divide the batch would replicate it: every device of a
  copy then reads the same weights for the same rows (batch 1 on 4x2 reads 4x the bytes
  a token of 1x8 does), so batch 1 puts every device on 'model'.

  Raises:
    DoesNotFit: the weights exceed WEIGHT_SHARE of a device even split over all devices.
  """
  splits = [d for d in range(n_devices, 0, -1) if n_devices % d == 0 and batch % d == 0]
  for data in splits:
    sizes = {"data": data, "model": n_devices // data}
    if model_bytes(cfg, dtype, sizes) <= WEIGHT_SHARE * device_bytes:
      return data, n_devices // data
  need = model_bytes(cfg, dtype, {"data": 1, "model": n_devices})
  raise DoesNotFit(f"the model needs {need / GIB:.2f} GiB of weights per device even split over "
                   f"all {n_devices} devices; each has {device_bytes / GIB:.2f} GiB "
                   f"({WEIGHT_SHARE:.0%} usable for weights): use more devices or bfloat16")


def check_fits(cfg: ModelConfig, dtype, mesh: Optional[jax.sharding.Mesh]) -> None:
  """Raises DoesNotFit (one line, the numbers) unless the weights of `cfg` in `dtype` fit
  WEIGHT_SHARE of each device of `mesh` (None: the default device), before loading."""
  if mesh is None:
    axis_sizes, n = {"data": 1, "model": 1}, 1
    device = jax.devices()[0]
    # One CPU device may use the whole host, however many fake devices share it.
    room = device_memory_bytes(device) * (len(jax.devices()) if device.platform == "cpu" else 1)
  else:
    axis_sizes, n = dict(mesh.shape), mesh.devices.size
    room = device_memory_bytes(mesh.devices.flat[0])
  need = model_bytes(cfg, dtype, axis_sizes)
  if need > WEIGHT_SHARE * room:
    where = "one device" if mesh is None else f"a {axis_sizes['data']}x{axis_sizes['model']} mesh"
    raise DoesNotFit(f"the weights need {need / GIB:.2f} GiB per device on {where}; each device "
                     f"has {room / GIB:.2f} GiB ({WEIGHT_SHARE:.0%} usable for weights): use "
                     f"--dtype bfloat16 or split them over more devices (--mesh 1x{2 * n})")


def auto_mesh(cfg: ModelConfig, dtype=jnp.float32, batch: int = 1) -> Optional[jax.sharding.Mesh]:
  """A ('data', 'model') mesh over all devices sized by `pick_mesh_shape` for `batch`.

  None for one device, and for CPU devices: fake CPU devices share one host's memory and
  cores, so splitting a model over them saves nothing (pass a mesh to test sharding).
  """
  devices = jax.devices()
  if len(devices) == 1 or devices[0].platform == "cpu":
    return None
  n = len(devices)
  data, model = pick_mesh_shape(cfg, dtype, n, device_memory_bytes(), batch)
  return sharding.make_mesh(data, model)


# Llama-2 shapes (Vicuna v1.3 shares them): the README's table.
REFERENCE_MODELS = {
    "7B": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128),
    "13B": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_heads=40, num_kv_heads=40, head_dim=128),
}


def markdown_table(devices=(1, 4, 8), batch: int = 1, slots: int = 2048, exit_layer: int = 2) -> str:
  """Per-device GiB of the reference models in bfloat16, weights split over all devices (1xN).

  `python -m kangaroo_jax.memory` prints it; README.md shows it.
  """
  rows = ["| model | mesh | weights | KV cache | adapter | total |", "| --- | --- | --- | --- | --- | --- |"]
  for name, cfg in REFERENCE_MODELS.items():
    acfg = AdapterConfig.for_model(cfg, exit_layer)
    for n in devices:
      r = report(cfg, jnp.bfloat16, {"data": 1, "model": n}, batch, slots, acfg)
      rows.append(f"| {name} | 1x{n} | {r.weights / GIB:.2f} | {r.kv_cache / GIB:.2f} | "
                  f"{r.adapter / GIB:.2f} | {r.total / GIB:.2f} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(markdown_table())
