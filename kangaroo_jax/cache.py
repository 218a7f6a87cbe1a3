"""The KV cache: a plain pytree of fixed-shape arrays.

Slot `s` of sequence `b` holds the key/value of the token at absolute position `s`, so
a query at position `p` may attend exactly the slots `<= p`. Nothing else marks which
slots are valid: rejected draft tokens are "rolled back" by the caller moving its
per-sequence length back, and the stale slots are overwritten before anything attends
to them. No step ever copies the cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kangaroo_jax.config import ModelConfig

# A cache is {"k": [L x [B, S, K, H]], "v": [L x [B, S, K, H]]}: one entry per layer, so
# a forward pass over layers [a, b) touches only entries a..b-1.
KVCache = dict


def init_cache(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
  """Zero cache for `num_layers` attention layers and `max_len` slots per sequence.

  Under a mesh (`jax.set_mesh`, as the decode loops do when given one) each entry is
  pinned to its shard: the batch over 'data', the KV heads over 'model'.
  """
  shape = (batch, max_len, num_kv_heads, head_dim)  # [B, S, K, H]
  zeros = lambda: _sharded_over_mesh(jnp.zeros(shape, dtype))
  return {"k": [zeros() for _ in range(num_layers)], "v": [zeros() for _ in range(num_layers)]}


def cache_spec(batch: int, num_kv_heads: int, axis_sizes) -> P:
  """PartitionSpec of a [B, S, K, H] cache entry: each axis that divides its dimension."""
  return P("data" if batch % axis_sizes["data"] == 0 else None, None,
           "model" if num_kv_heads % axis_sizes["model"] == 0 else None, None)


def _sharded_over_mesh(x: jax.Array) -> jax.Array:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, cache_spec(x.shape[0], x.shape[2], mesh.shape))


def init_model_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """Cache for every decoder layer of `cfg`."""
  return init_cache(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)


def write(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array,
          positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes new keys/values [B, T, K, H] at slots `positions` [B, T] (in place under jit)."""
  batch_idx = jnp.arange(k.shape[0])[:, None]  # [B, 1]
  # mode="drop": positions past the cache end (only ever padding) are ignored.
  return (cache_k.at[batch_idx, positions].set(k.astype(cache_k.dtype), mode="drop"),
          cache_v.at[batch_idx, positions].set(v.astype(cache_v.dtype), mode="drop"))


def write_layers(cache: KVCache, block: KVCache, start: int, positions: jax.Array) -> KVCache:
  """Writes a block's keys/values ({"k", "v": [n x [B, T, K, H]]}, layers start..start+n-1)
  at slots `positions` [B, T]; the other layers' entries are passed through."""
  ks, vs = list(cache["k"]), list(cache["v"])
  for i, (k, v) in enumerate(zip(block["k"], block["v"])):
    ks[start + i], vs[start + i] = write(ks[start + i], vs[start + i], k, v, positions)
  return {"k": ks, "v": vs}


def cache_len(cache: KVCache) -> int:
  """Number of slots per sequence."""
  return cache["k"][0].shape[1]
