"""The adapter folder as the paper's authors publish it, read and converted to ours.

Their Vicuna adapters (GitHub Equationliu/Kangaroo) are a folder: a LlamaConfig
`config.json` (num_hidden_layers 1) and a `pytorch_model.bin` holding

  layers.0.input_layernorm.weight                      [D]
  layers.0.self_attn.{q,k,v,o}_proj.weight             [out, in] (torch's layout)
  norm.weight                                          [D]

It is our adapter without its FFN: RMSNorm -> attention with rotate-half RoPE at
absolute positions -> residual -> RMSNorm, then the target's LM head, on the states
after `exit_layer` layers. Two things are not in the folder: the exit layer (their code
takes it as an argument, default 2: `exit_layer` here, `--exit-layer` on the command
lines) and the RoPE base: their attention builds its rotary embedding without one, so
it rotates at 10000 whatever config.json says (`AUTHORS_ROPE_THETA`, stored in the
converted file). eps is config.json's `rms_norm_eps` (LlamaConfig's default 1e-6).

  python -m kangaroo_jax.authors_adapter FOLDER OUT.safetensors [--exit-layer 2]

writes the folder as our adapter file (`adapter.save_adapter`'s format). Reading a
`.bin` needs torch (a `model.safetensors` in the folder is read without it). This
module imports jax only where it builds an adapter, so decode.py can check a folder
before its slow imports (`check_folder`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np

AUTHORS_ROPE_THETA = 10000.0
DEFAULT_EXIT_LAYER = 2
LLAMA_EPS = 1e-6  # LlamaConfig's default rms_norm_eps
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ATTN = "layers.0.self_attn."
# Their norm keys -> our file's names; the projections are fused and transposed.
_KEYS = {"layers.0.input_layernorm.weight": "input_norm.weight", "norm.weight": "out_norm.weight"}
_PROJ = [_ATTN + f"{n}_proj.weight" for n in "qkvo"]
# What Kangaroo without an adapter says (`api.load_adapter_for`, decode.py, the bench):
# a random adapter is lossless but slower than plain decoding, so it is never silent.
NO_ADAPTER = ("this model has no adapter: train one (train.py, see TRAINING.md) or use the "
              "paper's authors' adapter folder (--adapter FOLDER; load_adapter_for(model, "
              "FOLDER)); --untrained-adapter (untrained=True) runs Kangaroo with a random one, "
              "lossless but slower than --mode plain")


class FolderError(ValueError):
  """An authors' adapter folder that is incomplete or does not hold an adapter."""


def is_folder(path: str) -> bool:
  """True when `path` is a folder (the authors' format) rather than our adapter file."""
  return os.path.isdir(path)


def folder_config(folder: str) -> dict:
  """config.json of an authors' adapter folder as a dict, checked to describe one layer."""
  file = os.path.join(folder, "config.json")
  if not os.path.isfile(file):
    raise FolderError(f"{folder} is not an adapter folder: it has no config.json (the authors' "
                      "adapter is a folder with config.json and pytorch_model.bin)")
  try:
    with open(file) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise FolderError(f"{file} is not readable JSON: {' '.join(str(e).split())}") from None
  for key in ("hidden_size", "num_attention_heads"):
    if not isinstance(config.get(key), int):
      raise FolderError(f"{file} lacks {key}: not a Llama adapter config")
  if config.get("num_hidden_layers", 1) != 1:
    raise FolderError(f"{file} describes {config['num_hidden_layers']} layers; the Kangaroo "
                      "adapter has 1 (is this a model folder? pass it as --model)")
  kv = config.get("num_key_value_heads") or config["num_attention_heads"]
  if kv != config["num_attention_heads"]:
    raise FolderError(f"{file}: {kv} key/value heads for {config['num_attention_heads']} query "
                      "heads; the adapter supports multi-head attention only")
  return config


def weight_file(folder: str) -> str:
  """The folder's weight file (model.safetensors, else pytorch_model.bin)."""
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise FolderError(f"{folder} has no {' or '.join(WEIGHT_FILES)}")


def check_folder(folder: str) -> None:
  """The cheap checks (config, a weight file, torch for a .bin), before a model loads."""
  folder_config(folder)
  if weight_file(folder).endswith(".bin"):
    _torch()


def _torch():
  try:
    import torch
  except ImportError:
    raise FolderError("reading the authors' pytorch_model.bin needs torch: `pip install torch` "
                      "(or convert it once where torch is installed: python -m "
                      "kangaroo_jax.authors_adapter FOLDER OUT.safetensors)") from None
  return torch


def _read_tensors(file: str) -> dict[str, np.ndarray]:
  """All tensors of a .bin or .safetensors file as float32 numpy arrays."""
  if file.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return {k: v.astype(np.float32) for k, v in load_file(file).items()}
    except Exception as e:  # safetensors raises several types for damaged files
      raise FolderError(f"{file} is corrupt or truncated: {str(e).splitlines()[0]}") from None
  torch = _torch()
  try:
    # weights_only: a pickle from elsewhere must not run code.
    state = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError...
    raise FolderError(f"{file} is corrupt or truncated: {str(e).splitlines()[0]}") from None
  if not isinstance(state, dict):
    raise FolderError(f"{file} holds no state dict")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def read_folder(folder: str, exit_layer: Optional[int] = None):
  """(AdapterConfig, {our tensor name: float32 array}) of an authors' adapter folder.

  The arrays are in our file's canonical layout (`adapter.save_adapter`): q/k/v fused
  as [D, 3 * N * H] in that order, o as [N * H, D]. Raises FolderError naming a missing
  tensor or one of the wrong shape.
  """
  from kangaroo_jax.adapter import AdapterConfig
  config = folder_config(folder)
  file = weight_file(folder)
  d, n = config["hidden_size"], config["num_attention_heads"]
  if d % n or (d // n) % 2:
    raise FolderError(f"{folder}: hidden size {d} does not split into {n} heads of even size")
  state = _read_tensors(file)
  unknown = sorted(k for k in state if k.startswith("layers.") and k not in _KEYS
                   and k not in _PROJ and not k.endswith("rotary_emb.inv_freq"))
  if unknown:
    raise FolderError(f"{file} has layer tensors the adapter does not use: {', '.join(unknown)}")
  want = {k: (d,) for k in _KEYS} | {k: (d, d) for k in _PROJ}
  for key, shape in want.items():
    if key not in state:
      raise FolderError(f"{file} lacks the tensor {key!r}")
    if state[key].shape != shape:
      raise FolderError(f"{file}: {key} has shape {tuple(state[key].shape)}, an adapter of "
                        f"hidden size {d} needs {shape}")
  arrays = {ours: state[key] for key, ours in _KEYS.items()}
  q, k, v, o = (state[key] for key in _PROJ)
  arrays["attn.qkv"] = np.concatenate([q, k, v]).T  # [out, in] x 3 -> [D, 3 * N * H]
  arrays["attn.o"] = o.T  # [D, N * H] -> [N * H, D]
  acfg = AdapterConfig(exit_layer=DEFAULT_EXIT_LAYER if exit_layer is None else exit_layer,
                       hidden_size=d, num_heads=n, head_dim=d // n,
                       rms_norm_eps=float(config.get("rms_norm_eps") or LLAMA_EPS),
                       rope_theta=AUTHORS_ROPE_THETA)
  return acfg, arrays


def convert(folder: str, out: str, exit_layer: int = DEFAULT_EXIT_LAYER) -> None:
  """Writes the authors' adapter folder as our adapter file `out` (exit layer stored)."""
  from kangaroo_jax.adapter import save_arrays
  acfg, arrays = read_folder(folder, exit_layer)
  save_arrays(out, acfg, arrays, extra={"converted_from": os.path.abspath(folder)})


def main(argv=None) -> int:
  """`python -m kangaroo_jax.authors_adapter FOLDER OUT [--exit-layer L]`; errors exit 2."""
  from kangaroo_jax import cli
  p = cli.OneLineParser(description="Convert the Kangaroo authors' adapter folder "
                        "(config.json + pytorch_model.bin) to a kangaroo-jax adapter file.")
  p.add_argument("folder", help="the authors' adapter folder")
  p.add_argument("out", help="the adapter file to write (.safetensors)")
  p.add_argument("--exit-layer", type=int, default=DEFAULT_EXIT_LAYER, metavar="L",
                 help="layers before the adapter: not stored in the folder; the authors use "
                 "2 for Vicuna-7B, 3 for 13B (default 2)")

  def command():
    args = p.parse_args(argv)
    if args.exit_layer < 1:
      raise FolderError(f"--exit-layer must be >= 1, got {args.exit_layer}")
    if not is_folder(args.folder):
      raise FolderError(f"{args.folder} is not a folder (the authors' adapter is a folder "
                        "with config.json and pytorch_model.bin)")
    convert(args.folder, args.out, args.exit_layer)
    print(f"wrote {args.out} (exit layer {args.exit_layer})", file=sys.stderr)

  return cli.exit_status(command)


if __name__ == "__main__":
  sys.exit(main())
