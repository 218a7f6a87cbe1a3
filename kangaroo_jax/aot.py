"""Compiling a program for a TPU topology on this CPU (ahead of time) and reading what the
executable needs a chip: memory against HBM, FLOPs and bytes, collectives.

With jax[tpu] installed (`make tpu-venv`), `jax.experimental.topologies` describes a TPU
slice without one, and `jax.jit(f).lower(*abstract args).compile()` returns the real
TPU executable (see ../shared/docs/TPU_AOT.md). Nothing runs: numerics and measured speed
still need a device. `scripts/tpu_aot.py` is the command; the programs it builds are in
`PROGRAMS` there. `topology_mesh("cpu", ...)` stands the host's (fake) CPU devices in for
a slice, so the tests exercise everything here without libtpu.

Import this module before jax when compiling for a TPU: `tpu_environment` must set
libtpu's variables first (the module itself imports jax only inside functions).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional

GIB = 1 << 30
# The fraction of a chip's bfloat16 peak a well-fed training step reaches (MaxText's
# Llama-2-7B runs on v4/v5e report 40-60% MFU): the implied step time is FLOPs over this.
EFFICIENCY = 0.4
# A program fits when its peak bytes a device are at most this share of the device's HBM.
FIT_SHARE = 0.9


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public figures of one TPU chip (bfloat16 peak, HBM size and bandwidth)."""
  name: str
  hbm_gib: float
  hbm_bytes_per_s: float
  bf16_flops: float
  accelerator_type: str  # TPU_ACCELERATOR_TYPE's prefix ("v5litepod" -> v5litepod-8)


CHIPS = {
    "v4": Chip("TPU v4", 32, 1.2e12, 275e12, "v4"),
    "v5e": Chip("TPU v5e", 16, 0.82e12, 197e12, "v5litepod"),
    "v6e": Chip("TPU v6e", 32, 1.6e12, 918e12, "v6e"),
    # The tests' stand-in: the host's CPU devices, with nominal figures.
    "cpu": Chip("CPU (nominal figures)", 16, 0.1e12, 1e12, ""),
}


class TopologyError(ValueError):
  """A topology name this module cannot compile for; the message names the known ones."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A named slice: its chip, chip count and the devices jax shows for it."""
  name: str
  chip: Chip
  chips: int

  @property
  def generation(self) -> str:
    return self.name.split(":")[0]


def parse_topology(name: str) -> Topology:
  """"v5e:2x4" -> Topology (8 TPU v5e chips); "cpu" or "cpu:N" -> the host's devices."""
  generation, _, dims = name.partition(":")
  if generation not in CHIPS:
    raise TopologyError(f"unknown topology {name!r}: use <generation>:<AxB[xC]> with generation "
                        f"one of {', '.join(g for g in CHIPS if g != 'cpu')} (e.g. v5e:2x4, "
                        "v4:2x2x1), or cpu")
  if generation == "cpu":
    return Topology(name, CHIPS["cpu"], int(dims) if dims.isdigit() else 0)
  if not re.fullmatch(r"\d+(x\d+){1,2}", dims):
    raise TopologyError(f"unknown topology {name!r}: the chip grid must be like 2x4 or 2x2x1")
  return Topology(name, CHIPS[generation], math.prod(int(d) for d in dims.split("x")))


def tpu_environment(topology: Topology) -> None:
  """Sets libtpu's start-up variables for `topology` (quiets its warnings); call before
  jax is imported. A v4 chip counts as two cores in its accelerator type (v4-8: 4 chips)."""
  if topology.generation == "cpu":
    return
  cores = topology.chips * (2 if topology.generation == "v4" else 1)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topology.chip.accelerator_type}-{cores}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles at once


def devices(topology: Topology) -> list:
  """The devices jax shows for `topology` (TPU: from libtpu's topology description)."""
  import jax
  if topology.generation == "cpu":
    found = jax.devices("cpu")
    n = topology.chips or len(found)
    if n > len(found):
      raise TopologyError(f"{topology.name} needs {n} CPU devices, only {len(found)} present "
                          "(XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return found[:n]
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology_name=topology.name, platform="tpu").devices)
  except Exception as e:  # libtpu raises RuntimeError/XlaRuntimeError for names it lacks
    raise TopologyError(f"libtpu cannot describe topology {topology.name!r}: "
                        f"{str(e).splitlines()[0]}") from None


def topology_mesh(topology: Topology, data: int, model: int):
  """A ('data', 'model') Mesh over the topology's devices, in their order.

  A plain `Mesh`: `jax.make_mesh` refuses the 8 devices this libtpu shows for v4:2x2x1
  (two TensorCores a chip). data = -1: every device not on 'model'.
  """
  import jax
  import numpy as np
  from jax.sharding import Mesh
  found = devices(topology)
  data = len(found) // model if data == -1 else data
  if data * model != len(found):
    raise TopologyError(f"a {data}x{model} mesh does not cover the {len(found)} devices of "
                        f"{topology.name}")
  auto = jax.sharding.AxisType.Auto
  return Mesh(np.array(found).reshape(data, model), ("data", "model"), axis_types=(auto, auto))


def platform(topology: Topology) -> str:
  """The backend name a program for `topology` is traced for ("tpu" or "cpu")."""
  return "cpu" if topology.generation == "cpu" else "tpu"


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_OP = re.compile(r"= \S+ (" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_COPY = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* copy(-start)?\(")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "s8": 1, "u8": 1, "pred": 1}


def collectives(hlo: str) -> dict:
  """Collective instructions of optimized HLO by kind (an async -start counted once), in
  all computations and inside loop bodies; plus copies of 1 MiB or more (`hlo.py`).

  Static counts: an instruction inside a while body is counted once, not per trip.
  """
  from kangaroo_jax.hlo import computations_of, loop_computations
  comps = computations_of(hlo)
  looped = loop_computations(comps)
  out = {k: 0 for k in _COLLECTIVES} | {"in_loops": 0, "copies_1mib": 0}
  for name, lines in comps.items():
    for line in lines:
      m = _OP.search(line)
      if m:
        out[m.group(1)] += 1
        out["in_loops"] += name in looped
      c = _COPY.search(line)
      if c and c.group(1) in _BYTES:
        size = math.prod(int(d) for d in c.group(2).split(",") if d) * _BYTES[c.group(1)]
        out["copies_1mib"] += size >= 1 << 20
  return out


def report(compiled, topology: Topology, n_devices: int) -> dict:
  """What a compiled executable needs a device, against the device's share of its chip.

  Memory from `memory_analysis()` (peak = arguments + outputs - donated aliases +
  temporaries + code), FLOPs and bytes from `cost_analysis()`, collectives from the
  optimized HLO; `step_s` = FLOPs / (EFFICIENCY x the device's bfloat16 peak) and
  `hbm_s` = bytes / HBM bandwidth (cost analysis counts on-chip traffic too: an upper
  bound). `fits`: peak <= FIT_SHARE of the device's HBM.
  """
  per_chip = max(1, n_devices // topology.chips) if topology.chips else 1
  chip = topology.chip
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  code = mem.generated_code_size_in_bytes
  peak = args + out - alias + temp + code
  hbm = chip.hbm_gib * GIB / per_chip
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  peak_flops = chip.bf16_flops / per_chip
  return {"topology": topology.name, "chip": chip.name, "devices": n_devices,
          "devices_per_chip": per_chip, "hbm_bytes": hbm, "argument_bytes": args,
          "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp, "code_bytes": code,
          "peak_bytes": peak, "headroom": 1 - peak / hbm, "fits": peak <= FIT_SHARE * hbm,
          "flops": flops, "bytes_accessed": nbytes,
          "step_s": flops / (EFFICIENCY * peak_flops),
          "hbm_s": nbytes / (chip.hbm_bytes_per_s / per_chip),
          "collectives": collectives(compiled.as_text())}


def table(r: dict, title: Optional[str] = None) -> str:
  """A report (`report`) as a few readable lines: memory, compute, collectives, the verdict."""
  g = lambda b: f"{b / GIB:.2f} GiB"
  unit = "core" if r["devices_per_chip"] > 1 else "chip"
  coll = r["collectives"]
  lines = [title or f"{r['topology']}: {r['devices']} devices ({r['chip']})",
           f"  per {unit}: arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])} "
           f"(donated {g(r['alias_bytes'])}), temporaries {g(r['temp_bytes'])}, code "
           f"{g(r['code_bytes'])}",
           f"  peak {g(r['peak_bytes'])} of {g(r['hbm_bytes'])} HBM a {unit}: headroom "
           f"{100 * r['headroom']:.1f}% (needs {100 * (1 - FIT_SHARE):.0f}%)",
           f"  per {unit} a step: {r['flops']:.3e} FLOP, {r['bytes_accessed']:.3e} bytes accessed; "
           f"{r['step_s']:.3f} s at {100 * EFFICIENCY:.0f}% of peak ({r['hbm_s']:.3f} s to stream "
           "the bytes)",
           "  collectives: " + ", ".join(f"{k} {coll[k]}" for k in _COLLECTIVES)
           + f" ({coll['in_loops']} inside loops); copies >= 1 MiB: {coll['copies_1mib']}",
           f"  {'fits' if r['fits'] else 'DOES NOT FIT'}"]
  return "\n".join(lines)
