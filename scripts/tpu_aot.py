"""Compiles a program of this project for a TPU topology on this CPU and prints what it
needs a chip: memory against HBM, FLOPs and bytes a step, the step time at 40% of peak,
collectives. Exits 1 when the program does not fit with 10% headroom, 2 on bad input.

  make tpu-venv    # once: .venv-tpu with jax[tpu] (libtpu compiles for TPUs on a CPU)
  .venv-tpu/bin/python scripts/tpu_aot.py --program train --config configs/llama7b.py \
      --topology v5e:2x4 [--json FILE] [--layers N] [--teacher cache] [--seq-len 512]

  .venv-tpu/bin/python scripts/tpu_aot.py --program decode --config configs/llama7b.py \
      --topology v5e:2x4 [--loop plain|kangaroo] [--batch 1]

--layers N compiles an N-layer model of the same shape (quicker; the report says so).
--topology cpu[:N] compiles for this host's (fake) CPU devices instead (tests, no libtpu).
See kangaroo_jax/aot.py and ../shared/docs/TPU_AOT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ and kangaroo_jax from this checkout

from kangaroo_jax import aot  # noqa: E402  (no jax yet: tpu_environment comes first)


def model_shape(c, name: str):
  """The ModelConfig to compile: --model's reference shape (7B, 13B), else the config's
  model_path config.json, else the embedded SmolLM2-135M's shape."""
  from kangaroo_jax import costs, memory
  from kangaroo_jax.config import ModelConfig
  if name:
    return memory.REFERENCE_MODELS[name]
  path = os.path.join(c.model_path, "config.json") if c.model_path else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      return ModelConfig.from_hf_dict(json.load(f))
  if c.model_path:
    raise ValueError(f"{c.model_path} has no config.json: pass --model 7B or 13B")
  return costs.SMOLLM2_135M


def build_train(c, cfg, mesh, args):
  """The train step `train.py --config` runs (`training.abstract_train_step`)."""
  from kangaroo_jax import training
  return training.abstract_train_step(c, cfg, mesh, c.data.teacher_top_k if args.teacher == "cache" else 0)


def build_decode(c, cfg, mesh, args):
  """A decode loop (`--loop plain|kangaroo`) as decode.py runs it on the topology:
  bfloat16, fixed-width steps of 8, gamma 6, 2048 positions, batch `--batch`, on the
  automatic mesh for that batch (`kangaroo_jax.aot_decode`)."""
  from kangaroo_jax import aot_decode
  topology = aot.parse_topology(args.topology)
  per_chip = max(1, mesh.devices.size // topology.chips) if topology.chips else 1
  dmesh = aot_decode.decode_mesh(mesh, cfg, args.batch, topology.chip.hbm_gib * aot.GIB / per_chip)
  shape = aot_decode.DecodeShape(batch=args.batch, exit_layer=c.exit_layer)
  lowered = aot_decode.decode_programs(cfg, dmesh, shape, aot.platform(topology))[args.loop]
  c.batch_size, c.seq_len = shape.batch, shape.max_len  # what the report's title names
  print(aot_decode.roofline_line(cfg, dict(dmesh.shape), shape,
                                 topology.chip.hbm_bytes_per_s / per_chip))
  program = aot_decode.Lowered(lowered, dmesh)
  program.caches = lambda text: {  # the KV cache checks, read from the compiled HLO
      "cache_copies_in_loops": aot_decode.cache_copies(text, cfg, shape, dict(dmesh.shape)),
      "caches_aliased": aot_decode.caches_aliased(text, cfg, shape, dict(dmesh.shape))}
  return program, ()


# The programs --program compiles: name -> builder(config, model shape, mesh, args) that
# returns (jitted function, abstract arguments).
PROGRAMS = {"train": build_train, "decode": build_decode}
# The config's model on the Hugging Face hub is not here: the reference shapes stand in.
CONFIG_MODELS = {"llama7b": "7B", "llama13b": "13B"}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--program", choices=sorted(PROGRAMS), default="train")
  p.add_argument("--config", required=True, help="a configs/*.py file")
  p.add_argument("--topology", required=True, help="e.g. v4:2x2x1, v5e:2x4, v5e:4x4; cpu[:N]")
  p.add_argument("--layers", type=int, default=0, help="compile N layers (0: the model's)")
  p.add_argument("--model", default="", choices=["", "7B", "13B"],
                 help="the model's shape (default: the config's)")
  p.add_argument("--teacher", default="fly", choices=["fly", "cache"],
                 help="train: the teacher inside the step, or top-k targets from a cache")
  p.add_argument("--mesh-model", type=int, default=0, help="override config.mesh_model")
  p.add_argument("--seq-len", type=int, default=0,
                 help="train: compile batches of this width (one of config.length_buckets; "
                      "0: config.seq_len)")
  p.add_argument("--json", default="", help="also write the report here")
  p.add_argument("--loop", default="kangaroo", choices=["kangaroo", "plain"],
                 help="decode: which loop to compile")
  p.add_argument("--batch", type=int, default=1, help="decode: sequences at once")
  args = p.parse_args(argv)
  try:
    topology = aot.parse_topology(args.topology)
  except aot.TopologyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  aot.tpu_environment(topology)

  import importlib.util
  if not os.path.isfile(args.config):
    print(f"error: no such config file: {args.config}", file=sys.stderr)
    return 2
  spec = importlib.util.spec_from_file_location("aot_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  if args.mesh_model:
    c.mesh_model = args.mesh_model
  if args.seq_len:
    c.seq_len = args.seq_len  # the step of one length bucket (`data.Batches`)
  from kangaroo_jax.training import ConfigError
  name = args.model or CONFIG_MODELS.get(os.path.splitext(os.path.basename(args.config))[0], "")
  try:
    cfg = model_shape(c, name)
    if args.layers:
      if not 0 < args.layers <= cfg.num_layers or args.layers <= c.exit_layer:
        raise ValueError(f"--layers must be in ({c.exit_layer}, {cfg.num_layers}], got {args.layers}")
      cfg = dataclasses.replace(cfg, num_layers=args.layers)
    mesh = aot.topology_mesh(topology, c.mesh_data, c.mesh_model)
    fn, fn_args = PROGRAMS[args.program](c, cfg, mesh, args)
    mesh = getattr(fn, "mesh", mesh)  # a decode loop picks its own (the automatic one)
  except (aot.TopologyError, ConfigError, ValueError, NotImplementedError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  t0 = time.time()
  try:
    compiled = fn.lower(*fn_args).compile()
  except Exception as e:  # the compiler refuses a program that cannot fit the chip
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    why = str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
    print(f"error: {args.program} does not fit {topology.name} (batch {c.batch_size} x "
          f"{c.seq_len}, {cfg.num_layers} layers): {why}", file=sys.stderr)
    return 1
  seconds = time.time() - t0
  r = aot.report(compiled, topology, mesh.devices.size)
  r |= {"program": args.program, "config": args.config, "teacher": args.teacher,
        "layers": cfg.num_layers, "model_layers": model_shape(c, name).num_layers,
        "mesh": dict(mesh.shape), "batch_size": c.batch_size, "seq_len": c.seq_len,
        "dtype": c.dtype, "fsdp": bool(c.get("fsdp", False)), "compile_s": round(seconds, 1)}
  layers = (f", {cfg.num_layers} of {r['model_layers']} layers (not the whole model)"
            if cfg.num_layers != r["model_layers"] else f", {cfg.num_layers} layers")
  title = (f"{args.program} {args.config} on {topology.name}: {r['devices']} devices "
           f"({r['chip']}), mesh {r['mesh']}, batch {c.batch_size} x {c.seq_len}{layers}, "
           f"teacher {args.teacher}; compiled in {seconds:.0f} s")
  print(aot.table(r, title))
  if hasattr(fn, "caches"):
    r |= fn.caches(compiled.as_text())
    aliased, caches = r["caches_aliased"]
    print(f"  KV caches: {r['cache_copies_in_loops']} copies inside the loops; {aliased} of "
          f"{caches} updated in place across calls (the state is donated)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=1)
  if not r["fits"]:
    print(f"error: {args.program} needs {r['peak_bytes'] / aot.GIB:.2f} GiB a device of "
          f"{r['hbm_bytes'] / aot.GIB:.2f}: more than {100 * aot.FIT_SHARE:.0f}%",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
