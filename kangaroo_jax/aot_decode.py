"""The decode loops compiled for a TPU slice on this CPU: what a chip holds and reads.

Builds the loop calls decoding runs, plain (`decoding._plain_stream_run`) and Kangaroo
(`kangaroo._kangaroo_stream_rounds`), from shapes alone, for a model shape on a ('data',
'model') mesh of a TPU topology's devices (`aot.topology_mesh` or any Mesh), bfloat16
weights and activations, fixed-width steps of 8, as a TPU runs them; each is compiled
for the state its prompt pass hands it (that pass is compiled too, for its outputs'
shardings). `compile_report` compiles one and reads per-device memory, collectives and
copies inside the loops from the executable. `bytes_per_token` is the analytic roofline: the bytes a chip must stream
from HBM for one plain step and one Kangaroo verification (the weights it holds and the
KV cache slots it attends), next to the weights' bytes a chip, and the tokens/s its HBM
bandwidth allows at most.

Programs are traced for the target (`traced_for`): the step width, the KV cache's dtype
and the weights' casts are the TPU's, not this CPU's. Nothing runs; see
../shared/docs/TPU_AOT.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kangaroo_jax import cache as kv
from kangaroo_jax import hlo, memory, precision, sharding
from kangaroo_jax.adapter import Adapter, AdapterConfig
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.decoding import _plain_stream_run, _plain_stream_start, cache_size
from kangaroo_jax.kangaroo import _kangaroo_stream_rounds, _kangaroo_stream_start
from kangaroo_jax.model import Llama
from kangaroo_jax.sampling import SamplingParams

STEP_WIDTH = precision.STEP_WIDTH


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  """What one compiled decode loop serves: batch, prompt bucket, new tokens, drafting."""
  batch: int = 1
  prompt: int = 128
  max_len: int = 2048  # prompt + new tokens
  gamma: int = 6
  exit_layer: int = 2

  @property
  def new_tokens(self) -> int:
    return self.max_len - self.prompt

  @property
  def slots(self) -> int:
    """Cache slots the loops allocate (`kangaroo._kangaroo_start`): a round's block + 2."""
    return cache_size(self.prompt, self.new_tokens, max(self.gamma + 2, STEP_WIDTH))


@contextlib.contextmanager
def traced_for(platform: str):
  """Traces programs for `platform` ("tpu", "gpu", "cpu") on this host.

  precision's backend-dependent choices (step width, the KV cache's dtype, the weights'
  casts, the products' rows) default to `jax.default_backend()`, which is "cpu" here; a
  TPU program traced so would get the CPU's. `precision.target` makes `platform` the
  default while tracing (a `Llama` records it as `Llama.platform`).
  """
  jax.clear_caches()  # jit's trace cache does not know the default changed: trace afresh
  try:
    with precision.target(platform):
      yield
  finally:
    jax.clear_caches()


def _abstract(module: nnx.Module, mesh) -> tuple:
  """(graphdef, state of ShapeDtypeStructs with the project's shardings on `mesh`)."""
  graphdef, state = nnx.split(module)
  shardings = sharding.param_shardings(state, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       state, shardings)
  return graphdef, state


def decode_programs(cfg: ModelConfig, mesh, shape: DecodeShape, platform: str = "tpu") -> dict:
  """{"plain", "kangaroo": (lowered loop call)} for `cfg` on `mesh`, traced for `platform`."""
  dtype = jnp.bfloat16
  acfg = AdapterConfig.for_model(cfg, shape.exit_layer)
  with traced_for(platform):
    model = nnx.eval_shape(lambda: Llama(cfg, dtype, activations=dtype, step_width=STEP_WIDTH))
    adapter = nnx.eval_shape(lambda: Adapter(acfg, cfg, dtype))
    graphdef, state = _abstract(model, mesh)
    agraphdef, astate = _abstract(adapter, mesh)
    batch = NamedSharding(mesh, P("data") if shape.batch % mesh.shape["data"] == 0 else P())
    rep = NamedSharding(mesh, P())
    tokens = jax.ShapeDtypeStruct((shape.batch, shape.prompt), jnp.int32, sharding=batch)
    lens = jax.ShapeDtypeStruct((shape.batch,), jnp.int32, sharding=batch)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    eos = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep)
    limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    eta = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    until = limit  # a loop call's last step (or round): a replicated int32 too
    # Capacities that size both loops' caches to exactly `shape.slots` (a plain step
    # reaches STEP_WIDTH - 1 slots past its token, a round max(gamma + 2, STEP_WIDTH)).
    static = dict(params=SamplingParams(), capacity=shape.slots - shape.prompt - STEP_WIDTH + 1)
    kstatic = dict(static, capacity=shape.slots - shape.prompt - max(shape.gamma + 2, STEP_WIDTH),
                   gamma=shape.gamma, send_unconfident=True)
    with jax.set_mesh(mesh):  # as decoding runs them (`decoding.on_mesh`)
      st = _start_state(_plain_stream_start.lower(graphdef, state, tokens, lens, key, eos,
                                                  limit, **static))
      plain = _plain_stream_run.lower(graphdef, state, st, eos, until, params=static["params"])
      st = _start_state(_kangaroo_stream_start.lower(graphdef, state, agraphdef, astate, tokens,
                                                     lens, key, eos, limit, **kstatic))
      kangaroo = _kangaroo_stream_rounds.lower(graphdef, state, agraphdef, astate, None, st, eos,
                                               eta, until, **kstatic)
  return {"plain": plain, "kangaroo": kangaroo}


def _start_state(start) -> object:
  """The loop state a lowered prompt pass hands the loop calls: its shapes, with the
  shardings the compiled pass gives them (the loop call is compiled for those)."""
  shardings = start.compile().output_shardings
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      start.out_info, shardings)


def bytes_per_token(cfg: ModelConfig, axis_sizes: dict, shape: DecodeShape) -> dict:
  """The bytes one device streams from HBM per plain step and per Kangaroo verification
  (analytic: every weight it holds but the embedding, which a step only gathers rows
  of, plus the KV cache slots it attends), and the weights' bytes a device."""
  dtype = jnp.bfloat16
  weights = memory.model_bytes(cfg, dtype, axis_sizes)
  embedding = cfg.vocab_size * cfg.hidden_size * 2 // axis_sizes["model"]
  if cfg.tie_embeddings:
    embedding = 0  # the head is the embedding: read whole every step
  per_layer = (weights - embedding - _head_bytes(cfg, axis_sizes)) // cfg.num_layers
  cache = memory.kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype,
                                shape.batch, shape.slots, axis_sizes)
  plain = weights - embedding + cache
  deep = cfg.num_layers - shape.exit_layer
  verify = deep * per_layer + _head_bytes(cfg, axis_sizes) + cache * deep // cfg.num_layers
  acfg = AdapterConfig.for_model(cfg, shape.exit_layer)
  adapter_cache = memory.kv_cache_bytes(1, acfg.num_heads, acfg.head_dim, dtype, shape.batch,
                                        shape.slots, axis_sizes)
  draft = (shape.exit_layer * per_layer + memory.adapter_bytes(acfg, cfg, dtype, axis_sizes)
           + _head_bytes(cfg, axis_sizes) + cache * shape.exit_layer // cfg.num_layers
           + adapter_cache)
  return {"weights": weights, "plain_step": plain, "verification": verify, "draft_step": draft,
          "kv_cache": cache}


def _head_bytes(cfg: ModelConfig, axis_sizes: dict) -> int:
  return cfg.vocab_size * cfg.hidden_size * 2 // axis_sizes["model"]


_COLLECTIVE = re.compile(r"\s(all-reduce|all-gather|collective-permute|all-to-all|"
                         r"reduce-scatter)(-start)?\(")


def loop_collectives(text: str) -> dict[str, int]:
  """Collectives inside the loops' computations of optimized HLO, by kind (static counts)."""
  comps = hlo.computations_of(text)
  out = {k: 0 for k in ("all-reduce", "all-gather", "collective-permute", "all-to-all",
                        "reduce-scatter")}
  for name in hlo.loop_computations(comps):
    for line in comps.get(name, ()):
      m = _COLLECTIVE.search(line)
      if m:
        out[m.group(1)] += 1
  return out


def _cache_dims(cfg: ModelConfig, shape: DecodeShape, axis_sizes: dict) -> str:
  """"B,S,K,H" of a device's part of a model cache entry (`kv.cache_spec`)."""
  spec = kv.cache_spec(shape.batch, cfg.num_kv_heads, axis_sizes)
  split = {a: axis_sizes[a] for a in spec if a is not None}
  b = shape.batch // split.get("data", 1) if spec and spec[0] == "data" else shape.batch
  heads = cfg.num_kv_heads // axis_sizes["model"] if "model" in spec else cfg.num_kv_heads
  return f"{b},{shape.slots},{heads},{cfg.head_dim}"


def cache_copies(text: str, cfg: ModelConfig, shape: DecodeShape, axis_sizes: dict) -> int:
  """Copies of a KV-cache-shaped array (per device) inside the loops."""
  return len(hlo.copies_in_loops(text, _cache_dims(cfg, shape, axis_sizes)))


def caches_aliased(text: str, cfg: ModelConfig, shape: DecodeShape,
                   axis_sizes: dict) -> tuple[int, int]:
  """(aliased, all) of the loop call's model cache parameters: those its output reuses,
  updated in place across calls (the state is donated), of all it takes."""
  params = hlo.entry_parameters(text, _cache_dims(cfg, shape, axis_sizes))
  return len(set(params) & hlo.aliased_parameters(text)), len(params)


def compile_report(lowered, cfg: ModelConfig, shape: DecodeShape, axis_sizes: dict,
                   hbm_bytes: float, hbm_bytes_per_s: float) -> dict:
  """Compiles one lowered loop call; per-device memory, collectives and cache copies in
  loops, and the model cache parameters it updates in place (`caches_aliased`)."""
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  text = compiled.as_text()
  roof = bytes_per_token(cfg, axis_sizes, shape)
  return {"peak_bytes": peak, "hbm_bytes": hbm_bytes, "fits": peak <= 0.9 * hbm_bytes,
          "collectives_in_loops": loop_collectives(text),
          "cache_copies_in_loops": cache_copies(text, cfg, shape, axis_sizes),
          "caches_aliased": caches_aliased(text, cfg, shape, axis_sizes),
          "bytes_per_token": roof,
          "plain_tokens_per_s_max": hbm_bytes_per_s / roof["plain_step"]}


class Lowered:
  """A lowered loop with the mesh it was built for, as `scripts/tpu_aot.py` takes a
  program: `.lower()` (already traced, for the target) and `.mesh`."""

  def __init__(self, lowered, mesh):
    self.lowered, self.mesh = lowered, mesh

  def lower(self):
    return self.lowered


def decode_mesh(mesh, cfg: ModelConfig, batch: int, device_bytes: float):
  """The automatic decode mesh over `mesh`'s devices (`memory.pick_mesh_shape` for
  `batch`: batch 1 puts every device on 'model')."""
  from jax.sharding import Mesh
  devices = np.asarray(mesh.devices).reshape(-1)
  data, model = memory.pick_mesh_shape(cfg, jnp.bfloat16, devices.size, int(device_bytes), batch)
  auto = jax.sharding.AxisType.Auto
  return Mesh(devices.reshape(data, model), ("data", "model"), axis_types=(auto, auto))


def roofline_line(cfg: ModelConfig, axis_sizes: dict, shape: DecodeShape,
                  hbm_bytes_per_s: float) -> str:
  """One line: bytes a device streams per plain step, verification and draft step."""
  r = bytes_per_token(cfg, axis_sizes, shape)
  gb = lambda b: f"{b / 1e9:.2f} GB"
  return (f"  bytes a token per device: plain step {gb(r['plain_step'])} "
          f"({r['plain_step'] / r['weights']:.2f}x the weights' {gb(r['weights'])}), Kangaroo "
          f"verification {gb(r['verification'])} ({r['verification'] / r['plain_step']:.2f}x a "
          f"plain step), draft step {gb(r['draft_step'])} "
          f"({r['draft_step'] / r['plain_step']:.2f}x); plain decoding at most "
          f"{hbm_bytes_per_s / r['plain_step']:.0f} tokens/s a sequence at HBM bandwidth")
