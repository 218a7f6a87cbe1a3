"""The Kangaroo adapter: the tiny network that turns layer-`l` states into draft logits.

  h_l -> RMSNorm -> self-attention (own q/k/v/o, RoPE at the same absolute positions,
  own KV cache) -> + h_l [-> RMSNorm -> SwiGLU FFN -> +] -> RMSNorm -> the target's LM head

The paper's adapter is one transformer block without the FFN (Liu et al., 2024);
`ffn_size > 0` adds a SwiGLU FFN after the attention, the capacity at the drafted
position that a small target's shallow layers lack (TRAINING.md measures it). Only this
module trains.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax import cache as kv
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.model import (Attention, BlockView, RMSNorm, dense, gate_up_order, qkv_order,
                                rope_inv_freq, split_gate_up)
from kangaroo_jax.sharding import batch_rows, gathered


class AdapterError(ValueError):
  """An adapter that does not fit the model, or a missing/corrupt adapter file."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Where the draft exits (`exit_layer` = number of shallow layers) and the block's shape."""
  exit_layer: int
  hidden_size: int
  num_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  ffn_size: int = 0  # 0 = the paper's adapter (no FFN); files without it load as 0
  # None: RoPE as the target's (theta, scaling); a number: plain RoPE at that base, as
  # the authors' adapters rotate (10000 whatever the target's; `authors_adapter`).
  rope_theta: Optional[float] = None

  @classmethod
  def for_model(cls, cfg: ModelConfig, exit_layer: int, num_heads: Optional[int] = None,
                ffn_size: int = 0):
    """An adapter config matching `cfg`, with the model's head count unless given."""
    heads = num_heads or cfg.num_heads
    if cfg.hidden_size % heads:
      raise AdapterError(f"adapter head count {heads} does not divide hidden size {cfg.hidden_size}")
    if ffn_size < 0:
      raise AdapterError(f"adapter FFN size must be >= 0, got {ffn_size}")
    return cls(exit_layer, cfg.hidden_size, heads, cfg.hidden_size // heads, cfg.rms_norm_eps,
               ffn_size)

  def check(self, cfg: ModelConfig) -> None:
    """Raises AdapterError unless this adapter fits the model `cfg`."""
    if self.hidden_size != cfg.hidden_size:
      raise AdapterError(f"adapter hidden size {self.hidden_size} != model hidden size {cfg.hidden_size}")
    if not 1 <= self.exit_layer < cfg.num_layers:
      raise AdapterError(f"exit layer {self.exit_layer} is out of range [1, {cfg.num_layers - 1}]"
                         f" for a {cfg.num_layers}-layer model")
    if self.head_dim % 2 or self.num_heads * self.head_dim <= 0:
      raise AdapterError(f"adapter head count {self.num_heads} / head dim {self.head_dim} is invalid")


class Adapter(nnx.Module):
  """RMSNorm -> attention -> residual -> RMSNorm; the caller applies the target's head."""

  def __init__(self, acfg: AdapterConfig, rope_cfg: ModelConfig, dtype=jnp.float32,
               rngs: Optional[nnx.Rngs] = None):
    rngs = rngs or nnx.Rngs(0)
    self.acfg = acfg
    # RoPE frequencies follow the target's theta/scaling at the adapter's own head dim.
    rope = dict(head_dim=acfg.head_dim, num_heads=acfg.num_heads, num_kv_heads=acfg.num_heads)
    if acfg.rope_theta is not None:
      rope |= dict(rope_theta=acfg.rope_theta, rope_scaling=None)
    self.rope_cfg = dataclasses.replace(rope_cfg, **rope)
    self.dtype = dtype
    self.input_norm = RMSNorm(acfg.hidden_size, acfg.rms_norm_eps, dtype)
    self.attn = Attention(acfg.hidden_size, acfg.num_heads, acfg.num_heads, acfg.head_dim,
                          False, dtype, rngs)
    d, f = acfg.hidden_size, acfg.ffn_size
    self.ffn_norm = RMSNorm(d, acfg.rms_norm_eps, dtype) if f else None
    self.ffn_gate_up = nnx.Param(  # [D, 2F]
        (0.02 * jax.random.normal(rngs.params(), (d, 2 * f))).astype(dtype)) if f else None
    # Zero: a new FFN leaves the block as it was; training grows the correction.
    self.ffn_down = nnx.Param(jnp.zeros((f, d), dtype)) if f else None  # [F, D]
    self.out_norm = RMSNorm(acfg.hidden_size, acfg.rms_norm_eps, dtype)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> kv.KVCache:
    """Zero cache of `max_len` slots, in `dtype` (default: the adapter's weights' dtype)."""
    return kv.init_cache(1, batch, max_len, self.acfg.num_heads, self.acfg.head_dim,
                         dtype or self.dtype)

  def __call__(self, h: jax.Array, positions: jax.Array, cache: kv.KVCache,
               view: Optional[BlockView] = None, write: bool = True):
    """Layer-l states h [B, T, D] at positions [B, T] -> (normed states [B, T, D], cache).

    With a `view` (tree drafting) the cache is only read and the view's node buffer,
    updated with these positions' keys/values, comes back in place of the cache.
    write=False (consecutive positions, no view) only reads the cache too and returns
    the positions' own keys/values {"k", "v": [[B, T, K, H]]} for the caller to write.
    """
    inv_freq = jnp.asarray(rope_inv_freq(self.rope_cfg))
    out, k, v = self.attn(self.input_norm(h), positions, cache["k"][0], cache["v"][0], inv_freq,
                          write=write and view is None, view=view)
    x = h + out
    if self.ffn_down is not None:
      gate, up = split_gate_up(dense(self.ffn_norm(x), self.ffn_gate_up[...]))  # [B, T, F] each
      x = x + dense(jax.nn.silu(gate) * up, self.ffn_down[...])
    return self.out_norm(x), {"k": [k], "v": [v]}

  def sequence(self, h: jax.Array, positions: jax.Array, products) -> jax.Array:
    """Layer-l states h [B, T, D] of whole sequences at positions 0..T-1 -> normed states
    [B, T, D] in h's dtype, with no cache (training; `model.attend_causal`). The weights
    meet the states in `products`' dtype: float32 master weights compute in bfloat16."""
    inv_freq = jnp.asarray(rope_inv_freq(self.rope_cfg))
    h = batch_rows(h)
    x = h + self.attn.sequence(self.input_norm(h), positions, inv_freq, products)
    if self.ffn_down is not None:
      gate, up = split_gate_up(dense(self.ffn_norm(x), gathered(self.ffn_gate_up[...],
                                                                "ffn_gate_up"),
                                     products))  # [B, T, F] each
      x = x + dense(jax.nn.silu(gate) * up, gathered(self.ffn_down[...], "ffn_down"), products)
    return batch_rows(self.out_norm(x))


def init_adapter(cfg: ModelConfig, exit_layer: int, num_heads: Optional[int] = None,
                 seed: int = 0, dtype=jnp.float32, ffn_size: int = 0) -> Adapter:
  """A freshly initialised adapter for model `cfg` exiting after `exit_layer` layers."""
  acfg = AdapterConfig.for_model(cfg, exit_layer, num_heads, ffn_size)
  acfg.check(cfg)
  return Adapter(acfg, cfg, dtype, nnx.Rngs(seed))


def check_draft_ids(ids, vocab_size: int, source: str = "draft_ids") -> np.ndarray:
  """The draft vocabulary `ids` as int32 [N], or AdapterError naming what is wrong.

  Lossless sampling needs each id once and inside [0, vocab_size): a repeated id loses
  probability mass in the scatter back to the full vocabulary, and an out-of-range id
  would be silently clamped by the gather from the LM head.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or not 0 < len(ids) <= vocab_size or not np.issubdtype(ids.dtype, np.integer):
    raise AdapterError(f"{source}: draft vocabulary must be 1..{vocab_size} integer ids, got "
                       f"{ids.dtype} of shape {ids.shape}")
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if len(bad):
    raise AdapterError(f"{source}: draft vocabulary id {bad[0]} is outside the model's "
                       f"{vocab_size} tokens")
  values, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise AdapterError(f"{source}: draft vocabulary repeats token id {values[counts > 1][0]}")
  return ids.astype(np.int32)


# ---- the standalone adapter file: one safetensors file, config in its metadata ----
_FORMAT = "kangaroo-jax-adapter/1"


def tensors(adapter: Adapter) -> dict[str, nnx.Param]:
  """The adapter's parameters by their file names."""
  out = {"input_norm.weight": adapter.input_norm.weight, "attn.qkv": adapter.attn.qkv,
         "attn.o": adapter.attn.o, "out_norm.weight": adapter.out_norm.weight}
  if adapter.ffn_down is not None:
    out |= {"ffn_norm.weight": adapter.ffn_norm.weight, "ffn.gate_up": adapter.ffn_gate_up,
            "ffn.down": adapter.ffn_down}
  return out


def _column_orders(acfg: AdapterConfig) -> dict[str, np.ndarray]:
  """The fused tensors' column orders (`model.qkv_order`): the module keeps them grouped
  for tensor parallelism, the file in checkpoint order ([q | k | v], [gate | up])."""
  return {"attn.qkv": qkv_order(acfg.num_heads, acfg.num_heads, acfg.head_dim),
          "ffn.gate_up": gate_up_order(acfg.ffn_size)}


def to_module_layout(acfg: AdapterConfig, name: str, array: np.ndarray) -> np.ndarray:
  """A tensor as the file stores it -> as the module holds it."""
  order = _column_orders(acfg).get(name)
  return array if order is None else array[:, order]


def save_adapter(path: str, adapter: Adapter, draft_ids: Optional[np.ndarray] = None,
                 extra: Optional[dict] = None) -> None:
  """Writes the adapter (and an optional reduced draft vocabulary) to one small file."""
  orders = _column_orders(adapter.acfg)
  arrays = {}
  for k, v in tensors(adapter).items():
    arrays[k] = np.asarray(v[...], np.float32)
    if k in orders:  # back to checkpoint order: column order[i] <- module column i
      arrays[k] = arrays[k][:, np.argsort(orders[k])]
  save_arrays(path, adapter.acfg, arrays, draft_ids, extra)


def save_arrays(path: str, acfg: AdapterConfig, arrays: dict[str, np.ndarray],
                draft_ids: Optional[np.ndarray] = None, extra: Optional[dict] = None) -> None:
  """Writes an adapter file from its config and tensors by file name (`tensors`)."""
  from safetensors.numpy import save_file
  arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
  if draft_ids is not None:
    arrays["draft_ids"] = np.asarray(draft_ids, np.int32)
  # Unset optional fields stay out, so files that need none of them load in older versions.
  config = {k: v for k, v in dataclasses.asdict(acfg).items() if v is not None}
  meta = {"format": _FORMAT, "config": json.dumps(config), "extra": json.dumps(extra or {})}
  save_file(arrays, path, metadata=meta)


def load_adapter(path: str, cfg: ModelConfig, dtype=jnp.float32,
                 mesh=None, exit_layer: Optional[int] = None) -> tuple[Adapter, Optional[np.ndarray]]:
  """Reads an adapter file written by `save_adapter`, or the authors' adapter folder
  (`kangaroo_jax.authors_adapter`, exiting after `exit_layer` layers, default 2); checks
  it fits model `cfg`.

  Tensors are read one at a time, cast to `dtype` on the host and placed with their
  final sharding on `mesh` (a ('data', 'model') mesh; None = the default device).
  Returns (adapter, draft_ids or None). Raises AdapterError on a missing, corrupt or
  mismatched file.
  """
  from safetensors import safe_open
  import os

  from kangaroo_jax import adapter_file, authors_adapter, sharding
  if authors_adapter.is_folder(path):
    return _load_folder(path, cfg, dtype, mesh, exit_layer), None
  if not os.path.isfile(path):
    raise AdapterError(f"no such adapter file: {path}")
  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      if meta.get("format") != _FORMAT:
        raise AdapterError(adapter_file.not_an_adapter(path, "another safetensors file"))
      fields = json.loads(meta["config"])
      unknown = set(fields) - {f.name for f in dataclasses.fields(AdapterConfig)}
      if unknown:
        raise AdapterError(f"{path} needs a newer kangaroo-jax (unknown adapter fields: "
                           f"{', '.join(sorted(unknown))})")
      acfg = AdapterConfig(**fields)
      acfg.check(cfg)
      adapter = nnx.eval_shape(lambda: Adapter(acfg, cfg, dtype, nnx.Rngs(0)))
      undivided = []
      for name, var in tensors(adapter).items():
        if name not in f.keys():
          raise AdapterError(f"{path} lacks the tensor {name!r}")
        shape = tuple(f.get_slice(name).get_shape())
        if shape != tuple(var.shape):
          raise AdapterError(f"{path}: {name} has shape {shape}, the model needs "
                             f"{tuple(var.shape)}")
        # Sharding rules are keyed by attribute name: "attn.qkv" -> "qkv", "ffn.down" -> "ffn_down".
        rule = name.replace("ffn.", "ffn_").split(".")[-1]
        host = to_module_layout(acfg, name, f.get_tensor(name).astype(np.dtype(dtype)))
        array, divides = sharding.place(host.shape, lambda index: host[index], rule, mesh)
        var.set_value(array)
        if not divides:
          undivided.append(f"{name} {list(shape)}")
      draft_ids = f.get_tensor("draft_ids") if "draft_ids" in f.keys() else None
  except AdapterError:
    raise
  except Exception as e:  # safetensors raises several types for damaged files
    raise AdapterError(adapter_file.unreadable(path, e)) from None
  if mesh is not None:
    sharding.report_undivided(undivided, mesh)
  if draft_ids is not None:
    draft_ids = check_draft_ids(draft_ids, cfg.vocab_size, path)
  return adapter, draft_ids


def _load_folder(folder: str, cfg: ModelConfig, dtype, mesh, exit_layer: Optional[int]) -> Adapter:
  """The authors' adapter folder as an Adapter for model `cfg` on `mesh`."""
  from kangaroo_jax import authors_adapter, sharding
  try:
    acfg, arrays = authors_adapter.read_folder(folder, exit_layer)
  except authors_adapter.FolderError as e:
    raise AdapterError(str(e)) from None
  acfg.check(cfg)
  adapter = nnx.eval_shape(lambda: Adapter(acfg, cfg, dtype, nnx.Rngs(0)))
  undivided = []
  for name, var in tensors(adapter).items():
    rule = name.split(".")[-1]  # the sharding rule's key: "attn.qkv" -> "qkv"
    host = to_module_layout(acfg, name, arrays[name].astype(np.dtype(dtype)))
    array, divides = sharding.place(host.shape, lambda index: host[index], rule, mesh)
    var.set_value(array)
    if not divides:
      undivided.append(f"{name} {list(arrays[name].shape)}")
  if mesh is not None:
    sharding.report_undivided(undivided, mesh)
  return adapter
