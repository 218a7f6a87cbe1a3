"""Peak host memory of streamed loading, measured on a 7B-wide checkpoint with few layers.

  python scripts/memory_bench.py --dir /tmp/llama7b_wide --layers 2

Writes a Llama-2-7B-shaped checkpoint (hidden 4096, FFN 11008, vocabulary 32000, untied
head) with only `--layers` decoder layers as one bfloat16 model.safetensors, then loads it
in fresh processes and prints, per way of loading, the peak resident set size (VmHWM)
against the largest tensor, the largest layer and the file size. The checkpoint is
deleted afterwards unless --keep.

On CPU the "devices" are host memory, so the loaded weights themselves sit in the RSS:
the number that matters is the transient, peak - baseline - weights placed, which is
what loading needs on top of the runtime and the model it produces (target: <= 1.5x the
largest layer). Loading modes:
  streamed        kangaroo_jax.loading.load_params onto one device (what load_model does)
  streamed_1x8    the same onto a 1x8 mesh of fake CPU devices
  whole_float32   weights.load_checkpoint (every tensor as float32) then from_hf_state_dict:
                  the old path, for comparison
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("streamed", "streamed_1x8", "whole_float32")
LLAMA_7B_WIDE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                     hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     tie_word_embeddings=False)
MIB = 1 << 20


def layer_shapes(c: dict) -> dict[str, tuple[int, int]]:
  """Checkpoint name suffix -> shape of one decoder layer's tensors."""
  d, f = c["hidden_size"], c["intermediate_size"]
  return {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d, d),
          "self_attn.v_proj.weight": (d, d), "self_attn.o_proj.weight": (d, d),
          "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
          "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
          "post_attention_layernorm.weight": (d,)}


def write_checkpoint(folder: str, layers: int) -> dict:
  """Writes the bfloat16 checkpoint; returns its sizes (file, largest tensor, largest layer)."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file
  c = dict(LLAMA_7B_WIDE, num_hidden_layers=layers)
  d, v = c["hidden_size"], c["vocab_size"]
  rng = np.random.default_rng(0)
  tensor = lambda shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  sd = {"model.embed_tokens.weight": tensor((v, d)), "model.norm.weight": tensor((d,)),
        "lm_head.weight": tensor((v, d))}
  for i in range(layers):
    sd |= {f"model.layers.{i}.{k}": tensor(s) for k, s in layer_shapes(c).items()}
  os.makedirs(folder, exist_ok=True)
  save_file(sd, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(c, f)
  layer = sum(2 * int(np.prod(s)) for s in layer_shapes(c).values())
  return dict(file_bytes=os.path.getsize(os.path.join(folder, "model.safetensors")),
              largest_tensor_bytes=max(x.nbytes for x in sd.values()), largest_layer_bytes=layer)


def _status_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def measure(folder: str, mode: str) -> dict:
  """Loads `folder` one way (in this process) and returns RSS numbers in bytes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from kangaroo_jax import loading, sharding, weights
  from kangaroo_jax.model import from_hf_state_dict
  jax.block_until_ready(jax.device_put(jnp.ones(4)))  # the CPU client and its threads
  mesh = sharding.make_mesh(1, 8) if mode == "streamed_1x8" else None
  baseline = _status_bytes("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS: the peak below is the load's own
  if mode == "whole_float32":
    cfg, sd = weights.load_checkpoint(folder)
    model = from_hf_state_dict(cfg, sd, jnp.bfloat16)
    del sd
  else:
    cfg, tensors = weights.open_checkpoint(folder)
    model = loading.load_params(cfg, tensors, jnp.bfloat16, mesh)
  placed = sum(s.data.nbytes for leaf in jax.tree.leaves(nnx.state(model))
               for s in leaf.addressable_shards)
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  peak = _status_bytes("VmHWM")
  return dict(mode=mode, baseline_rss=baseline, peak_rss=peak, weights_placed=placed,
              transient=peak - baseline - placed)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dir", default="/tmp/llama7b_wide", help="where to write the checkpoint")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
  p.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # the child process
  args = p.parse_args()
  if args.measure:
    print(json.dumps(measure(args.dir, args.measure)))
    return
  sizes = write_checkpoint(args.dir, args.layers)
  try:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    print(f"checkpoint: {args.layers} layers, file {sizes['file_bytes'] / MIB:.0f} MiB, largest "
          f"tensor {sizes['largest_tensor_bytes'] / MIB:.0f} MiB, largest layer "
          f"{sizes['largest_layer_bytes'] / MIB:.0f} MiB (bfloat16)")
    for mode in MODES:
      out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--measure", mode],
                           capture_output=True, text=True, env=env, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{mode:>14}: peak RSS {r['peak_rss'] / MIB:6.0f} MiB = baseline "
            f"{r['baseline_rss'] / MIB:.0f} + weights placed {r['weights_placed'] / MIB:.0f} + "
            f"transient {r['transient'] / MIB:.0f} MiB; transient / largest layer "
            f"{r['transient'] / sizes['largest_layer_bytes']:.2f}, / largest tensor "
            f"{r['transient'] / sizes['largest_tensor_bytes']:.2f}, / file "
            f"{r['transient'] / sizes['file_bytes']:.2f}")
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
