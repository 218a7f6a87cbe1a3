"""The Llama-family decoder as Flax NNX modules.

The forward pass is split so that Kangaroo can run it in pieces: `embed` tokens, run
decoder layers [start, end) with `run_layers` (any hidden state is available between
pieces), then `logits` = final norm + LM head. Weights use the layout `x @ W`
([in, out]); q/k/v and gate/up projections are fused into one matrix each because on a
CPU a batch-1 step is bound by the number and size of matrix-vector products.

The fused columns are ordered so that tensor parallelism needs no reshuffle: q/k/v
grouped per KV head (`qkv_order`: each group's q heads, then its key and value head),
gate/up interleaved column by column (`gate_up_order`). A 'model' axis that divides the
KV heads then gives each device whole groups and the gate and up columns of the same
FFN units, the ones its slice of `o` / `down` multiplies: the layer's only collective is
the all-reduce after `o` and after `down` (Megatron). Split in checkpoint order
([q | k | v], [gate | up]) the contiguous shards would cross those boundaries, and XLA
moved columns between devices with collective-permutes, hundreds per step at 7B.
Loaders and adapter files convert from and to the checkpoint order with these orders.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax import cache as kv
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.precision import Products, default_step_width, platform_of, products_for
from kangaroo_jax.sharding import batch_rows, gathered


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [H/2], with Llama-3 scaling when configured."""
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq.astype(np.float32)
  # Llama-3: keep high frequencies, divide low ones by `factor`, blend in between.
  low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
            / (rs.high_freq_factor - rs.low_freq_factor))
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, H] by absolute positions [B, T] (Hugging Face half-split layout)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def qkv_order(num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
  """The fused q/k/v weight's column order: column i of the model's [D, (N + 2K) * H]
  is column order[i] of the checkpoint order [q | k | v].

  Grouped per KV head: [q heads 0..G-1, k 0, v 0, q heads G..2G-1, k 1, v 1, ...] with
  G = N / K, the q heads that share a KV head (Hugging Face's `repeat_kv` convention).
  """
  n, k, h = num_heads, num_kv_heads, head_dim
  q = np.arange(n * h).reshape(k, n // k * h)  # [K, G * H]
  key = n * h + np.arange(k * h).reshape(k, h)  # [K, H]
  val = (n + k) * h + np.arange(k * h).reshape(k, h)  # [K, H]
  return np.concatenate([q, key, val], axis=1).reshape(-1)  # [K * (G + 2) * H]


def gate_up_order(ffn_size: int) -> np.ndarray:
  """The fused gate/up weight's column order: [gate 0, up 0, gate 1, up 1, ...] of the
  checkpoint order [gate | up] (F columns each)."""
  f = np.arange(ffn_size)
  return np.stack([f, ffn_size + f], axis=1).reshape(-1)  # [2F]


def split_qkv(qkv: jax.Array, n: int, k: int, h: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The grouped q/k/v product [B, T, K * (G + 2) * H] (`qkv_order`) -> q [B, T, N, H],
  keys and values [B, T, K, H]."""
  b, t, _ = qkv.shape
  g = n // k
  qkv = qkv.reshape(b, t, k, g + 2, h)  # [B, T, K, G + 2, H]: per KV head, its group
  return qkv[:, :, :, :g].reshape(b, t, n, h), qkv[:, :, :, g], qkv[:, :, :, g + 1]


def split_gate_up(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The interleaved gate/up product [..., 2F] (`gate_up_order`) -> gate, up [..., F]."""
  pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)  # [..., F, 2]
  return pairs[..., 0], pairs[..., 1]


def weight_product(spec: str, x: jax.Array, w: jax.Array,
                   products: Optional[Products] = None) -> jax.Array:
  """einsum(spec, x, w) accumulated and returned in float32, as `products` computes it
  (default: the mode of x's dtype, the activation dtype).

  The inputs meet in the wider of their dtypes: float32 activations multiply bfloat16
  weights exactly (the weights widen; nothing is rounded), bfloat16 ones multiply them
  as bfloat16. See `kangaroo_jax.precision`.
  """
  return (products or products_for(x.dtype)).einsum(spec, x, w)


def dense(x: jax.Array, w: jax.Array, products: Optional[Products] = None) -> jax.Array:
  """x [B, T, D_in] @ w [D_in, D_out] -> [B, T, D_out] in x's (the activation) dtype."""
  return weight_product("btd,df->btf", x, w, products).astype(x.dtype)  # [B, T, D_out]


def _param(rngs: nnx.Rngs, shape, dtype, scale: float = 0.02) -> nnx.Param:
  return nnx.Param((scale * jax.random.normal(rngs.params(), shape)).astype(dtype))


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads (MHA/GQA/MQA) over a KV cache."""

  def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
               bias: bool, dtype, rngs: nnx.Rngs, o_bias: bool = False,
               products: Optional[Products] = None):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.products = products  # None: the mode of the activations' dtype
    qkv_out = (num_heads + 2 * num_kv_heads) * head_dim
    self.qkv = _param(rngs, (hidden, qkv_out), dtype)  # [D, K * (G + 2) * H]: `qkv_order`
    self.qkv_bias = nnx.Param(jnp.zeros((qkv_out,), dtype)) if bias else None
    self.o = _param(rngs, (num_heads * head_dim, hidden), dtype)  # [N * H, D]
    self.o_bias = nnx.Param(jnp.zeros((hidden,), dtype)) if o_bias else None

  def __call__(self, x: jax.Array, positions: jax.Array, cache_k: jax.Array,
               cache_v: jax.Array, inv_freq: jax.Array, write: bool = True,
               view: Optional["BlockView"] = None, one_sum: bool = False):
    """x [B, T, D] at positions [B, T] -> (out [B, T, D], cache_k, cache_v).

    write=False leaves the cache alone (read only): the block attends the slots before
    its first position plus its own keys, and (out, block keys, block values [B, T, K, H])
    come back for the caller to write (see `Llama.run_layers_block`). A `view` (tree
    drafting) instead puts x's keys/values into the view's block buffer [B, T', K, H] at
    its slots and attends the cache below its limit plus the buffer entries its mask
    allows; the updated buffer comes back in place of the cache.
    """
    b, t, _ = x.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = dense(x, self.qkv[...], self.products)  # [B, T, K * (G + 2) * H]
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(qkv.dtype)
    q, key, val = split_qkv(qkv, n, k, h)
    q = apply_rope(q, positions, inv_freq)  # [B, T, N, H]
    key = apply_rope(key, positions, inv_freq)  # [B, T, K, H]
    if write:
      cache_k, cache_v = kv.write(cache_k, cache_v, key, val, positions)
      out = attend(q, cache_k, cache_v, positions, self.products)  # [B, T, N * H]
    elif view is None and one_sum:
      # Consecutive positions (a single-row verification block), the cache only read:
      # the block's keys and values go into a copy of this layer's cache, attended as
      # plain decoding attends its written cache, in one sum over the same slots. Two
      # sums (cache, then block: `attend_block`) round differently from plain decoding's
      # one and can flip a near tie. The copy reads and writes this layer's cache once; a
      # conditional that wrote the cache itself would copy it all the same.
      full_k, full_v = kv.write(cache_k, cache_v, key, val, positions)  # [B, S, K, H] each
      out = attend(q, full_k, full_v, positions, self.products)  # [B, T, N * H]
      cache_k, cache_v = key.astype(cache_k.dtype), val.astype(cache_v.dtype)  # the block's
    else:
      # The block's keys as the cache would hold them (its dtype), so the result is what
      # attending the written cache gives.
      key, val = key.astype(cache_k.dtype), val.astype(cache_v.dtype)
      if view is None:  # consecutive positions: causal over the block, the cache before it
        view = BlockView(key, val, None, positions[:, None, :] <= positions[:, :, None],
                         positions[:, 0])
      else:
        rows = jnp.arange(b)[:, None]  # [B, 1]
        view = view._replace(keys=view.keys.at[rows, view.slots].set(key),
                             values=view.values.at[rows, view.slots].set(val))
      out = attend_block(q, cache_k, cache_v, view, self.products)  # [B, T, N * H]
      cache_k, cache_v = view.keys, view.values
    out = dense(out, self.o[...], self.products)
    if self.o_bias is not None:
      out = out + self.o_bias[...].astype(out.dtype)
    return out, cache_k, cache_v


  def sequence(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               products: Products) -> jax.Array:
    """Whole sequences x [B, T, D] at positions 0..T-1 -> out [B, T, D], no cache
    (training: `attend_causal`; each weight gathered as `sharding.gathered` says)."""
    b, t, _ = x.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    # Rounded before the gather: float32 master weights (the adapter's) travel as bfloat16.
    weight = lambda w, name: gathered(w if products.inputs is None else w.astype(products.inputs),
                                      name)
    qkv = dense(x, weight(self.qkv[...], "qkv"), products)  # [B, T, K * (G + 2) * H]
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(qkv.dtype)
    q, key, val = split_qkv(qkv, n, k, h)
    q = apply_rope(q, positions, inv_freq)  # [B, T, N, H]
    key = apply_rope(key, positions, inv_freq)  # [B, T, K, H]
    out = attend_causal(q, key, val, products)  # [B, T, N * H]
    out = dense(out, weight(self.o[...], "o"), products)
    if self.o_bias is not None:
      out = out + self.o_bias[...].astype(out.dtype)
    return out


def attend(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, positions: jax.Array,
           products: Optional[Products] = None) -> jax.Array:
  """Causal attention of q [B, T, N, H] over cache slots [B, S, K, H]: slot s <= position.

  Probabilities and the output are in q's (the activation) dtype; sums accumulate in
  float32 (`products`, default: the mode of q's dtype).
  """
  b, t, n, h = q.shape
  products = products or products_for(q.dtype)
  einsum = products.einsum
  k = cache_k.shape[2]
  q = q.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]
  scores = einsum("btkgh,bskh->bkgts", q, cache_k) / math.sqrt(h)  # [B, K, G, T, S]
  slots = jnp.arange(cache_k.shape[1])
  mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
  scores = jnp.where(mask[:, None, None], scores, -1e30)
  softmax = lambda s: jax.nn.softmax(s, axis=-1)
  probs = products.rowwise(softmax, scores, 3).astype(q.dtype)  # [B, K, G, T, S]
  out = einsum("bkgts,bskh->btkgh", probs, cache_v)  # [B, T, K, G, H]
  return out.reshape(b, t, n * h).astype(q.dtype)  # [B, T, N * H]


# Queries per block of `attend_causal`: its scores are [B, N, 256, T] float32 a block
# instead of [B, N, T, T] (7B, 4 sequences a chip, T = 2048: 256 MiB instead of 2 GiB).
ATTENTION_CHUNK = 256


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, products: Optional[Products] = None,
                  chunk: int = ATTENTION_CHUNK) -> jax.Array:
  """Causal self-attention of whole sequences at positions 0..T-1, with no cache (training).

  q [B, T, N, H] attends its own keys/values [B, T, K, H], `chunk` queries at a time and
  each block only the keys up to its last position, so the float32 scores never exist
  for all T x T pairs and the masked upper half is mostly not computed (8 blocks: 9/16
  of the square). Each block is recomputed in the backward pass (`jax.checkpoint`)
  instead of saved. Returns [B, T, N * H] in q's dtype: the numbers `attend` gives over
  a cache holding these keys.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  c = min(chunk, t)
  einsum = (products or products_for(q.dtype)).einsum
  q = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]

  @jax.checkpoint
  def block(start, qc, kc, vc):
    scores = einsum("btkgh,bskh->bkgts", qc, kc) / math.sqrt(h)  # [B, K, G, Tc, S]
    mask = jnp.arange(kc.shape[1])[None, :] <= start + jnp.arange(qc.shape[1])[:, None]  # [Tc, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1).astype(q.dtype)
    return einsum("bkgts,bskh->btkgh", probs, vc).astype(q.dtype)  # [B, Tc, K, G, H]

  # A Python loop (straight-line code): each block's keys have their own length, and a
  # compiled program's cost analysis counts every block (it counts a loop body once).
  out = [block(s, q[:, s:s + c], k[:, :s + c], v[:, :s + c]) for s in range(0, t, c)]
  return jnp.concatenate(out, axis=1).reshape(b, t, n * h)  # [B, T, N * H]


class BlockView(NamedTuple):
  """What a block of queries sees besides the committed cache (read only).

  keys, values [B, T', K, H]: the block buffer (a verification block's own keys, or a
    draft tree's nodes so far); slots [B, T] where the queries' own keys go in it (None:
    the buffer is the queries' own keys); mask [B, T, T']: buffer entries each query may
    attend; limit [B]: committed cache slots < limit are attended by every query.
  """
  keys: jax.Array
  values: jax.Array
  slots: Optional[jax.Array]
  mask: jax.Array
  limit: jax.Array


def attend_block(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, view: BlockView,
                 products: Optional[Products] = None) -> jax.Array:
  """Attention of a block of queries without writing its keys to the cache.

  q [B, T, N, H] attends cache slots [B, S, K, H] below `view.limit` (read only) and the
  block buffer entries `view.mask` allows. With the block's own keys and a causal mask
  this equals writing the block into the cache and calling `attend`, but the cache stays
  an input: a verification branch that only reads it makes XLA copy nothing. With a
  tree's ancestor mask it is tree attention.
  """
  b, t, n, h = q.shape
  einsum = (products or products_for(q.dtype)).einsum
  k = cache_k.shape[2]
  q = q.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]
  scale = 1.0 / math.sqrt(h)
  old = einsum("btkgh,bskh->bkgts", q, cache_k) * scale  # [B, K, G, T, S]
  new = einsum("btkgh,bjkh->bkgtj", q, view.keys) * scale  # [B, K, G, T, T']
  slots = jnp.arange(cache_k.shape[1])
  old_mask = slots[None, None, :] < view.limit[:, None, None]  # [B, 1, S]
  scores = jnp.concatenate([jnp.where(old_mask[:, None, None], old, -1e30),
                            jnp.where(view.mask[:, None, None], new, -1e30)], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, S + T']
  s = cache_k.shape[1]
  out = (einsum("bkgts,bskh->btkgh", probs[..., :s], cache_v)
         + einsum("bkgtj,bjkh->btkgh", probs[..., s:], view.values))  # [B, T, K, G, H]
  return out.reshape(b, t, n * h).astype(q.dtype)  # [B, T, N * H]


class DecoderLayer(nnx.Module):
  """Pre-norm attention block then pre-norm SwiGLU MLP, both residual."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, products: Optional[Products] = None):
    self.products = products
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.qkv_bias, dtype, rngs, o_bias=cfg.o_bias, products=products)
    self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    # [D, 2F], gate and up interleaved (`gate_up_order`)
    self.gate_up = _param(rngs, (cfg.hidden_size, 2 * cfg.intermediate_size), dtype)
    self.down = _param(rngs, (cfg.intermediate_size, cfg.hidden_size), dtype)  # [F, D]

  def __call__(self, x, positions, cache_k, cache_v, inv_freq, write: bool = True,
               view: Optional[BlockView] = None, one_sum: bool = False):
    rowwise = (self.products or products_for(x.dtype)).rowwise
    attn_out, cache_k, cache_v = self.attn(rowwise(self.input_norm, x, 1), positions, cache_k,
                                           cache_v, inv_freq, write, view, one_sum)
    return self.mlp(x + attn_out, self.products, rowwise=rowwise), cache_k, cache_v

  def mlp(self, x: jax.Array, products: Optional[Products],
          gather=lambda w, name: w, rowwise=None) -> jax.Array:
    """x + the SwiGLU MLP of post_norm(x); `gather(w, name)` sees each weight first, and
    `rowwise` (decoding: `Products.rowwise`) runs the norm over fixed row blocks."""
    normed = self.post_norm(x) if rowwise is None else rowwise(self.post_norm, x, 1)
    gate, up = split_gate_up(dense(normed, gather(self.gate_up[...], "gate_up"),
                                   products))  # [B, T, F] each
    return x + dense(jax.nn.silu(gate) * up, gather(self.down[...], "down"), products)

  def sequence(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               products: Products) -> jax.Array:
    """The layer over whole sequences at positions 0..T-1, with no cache (training)."""
    x = x + self.attn.sequence(self.input_norm(x), positions, inv_freq, products)
    return self.mlp(x, products, gathered)


class Llama(nnx.Module):
  """A Llama-family causal LM whose forward pass can run over any range of layers.

  `dtype` stores the weights; `activations` is the dtype of the hidden states and of the
  KV cache; `products` how every matrix product computes (default: the activations'
  mode on `platform`, `precision.products_for`); `step_width` the rows per sequence of
  every decoding step (default: the platform's, `precision.default_step_width`);
  `platform` the backend the programs are built for (default: this one; a TPU or GPU
  when compiling ahead of time on a CPU host). See `kangaroo_jax.precision`.
  """

  def __init__(self, cfg: ModelConfig, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None,
               activations=jnp.float32, products: Optional[Products] = None,
               step_width: Optional[int] = None, platform: Optional[str] = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.dtype = dtype
    self.activations = activations
    self.platform = platform_of(platform)
    self.products = products or products_for(activations, self.platform)
    self.step_width = step_width or default_step_width(self.platform)
    if self.step_width < 1:
      raise ValueError(f"step width must be >= 1, got {self.step_width}")
    self.embedding = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)  # [V, D]
    self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs, self.products)
                          for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    # Untied models keep their own head [D, V]; tied ones reuse the embedding.
    self.lm_head = None if cfg.tie_embeddings else _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> hidden [B, T, D] in the activation dtype."""
    return jnp.take(gathered(self.embedding[...], "embedding"), tokens,
                    axis=0).astype(self.activations)

  def run_layers(self, x: jax.Array, positions: jax.Array, cache: kv.KVCache,
                 start: int = 0, end: Optional[int] = None):
    """Runs decoder layers [start, end) on x [B, T, D]; writes their cache entries.

    Returns (hidden after layer end-1 [B, T, D], cache with entries start..end-1 updated).
    """
    end = self.cfg.num_layers if end is None else end
    inv_freq = jnp.asarray(rope_inv_freq(self.cfg))
    ks, vs = list(cache["k"]), list(cache["v"])
    for i in range(start, end):
      x, ks[i], vs[i] = self.layers[i](x, positions, ks[i], vs[i], inv_freq)
    return x, {"k": ks, "v": vs}

  def run_fresh(self, tokens: jax.Array, end: Optional[int] = None) -> jax.Array:
    """Hidden states [B, T, D] after layers [0, end) of tokens [B, T] at positions 0..T-1,
    with a fresh cache (whole sequences at once: teacher passes, cached training states)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))  # [B, T]
    fresh = kv.init_model_cache(self.cfg, b, t, self.activations)
    return self.run_layers(self.embed(tokens), positions, fresh, 0, end)[0]

  def run_sequence(self, x: jax.Array, start: int = 0, end: Optional[int] = None,
                   products: Optional[Products] = None) -> jax.Array:
    """Layers [start, end) over whole sequences x [B, T, D] at positions 0..T-1, with no
    KV cache and attention a block of queries at a time (`attend_causal`): the training
    step's forward pass, in x's dtype with `products` (default: the model's)."""
    end = self.cfg.num_layers if end is None else end
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))  # [B, T]
    inv_freq = jnp.asarray(rope_inv_freq(self.cfg))
    for i in range(start, end):
      x = self.layers[i].sequence(batch_rows(x), positions, inv_freq, products or self.products)
    return batch_rows(x)

  def run_layers_block(self, x: jax.Array, positions: jax.Array, cache: kv.KVCache,
                       start: int = 0, end: Optional[int] = None, *,
                       tree: Optional[dict] = None):
    """Like `run_layers` over a block of consecutive positions, but the cache is only read.

    Returns (hidden [B, T, D], {"k": [...], "v": [...]}: the block's keys/values
    [B, T, K, H] for layers start..end-1), for the caller to write with `cache.write`.

    `tree` (tree drafting and verification) makes the block a set of tree nodes:
    {"k", "v": [end - start x [B, T', K, H]] node buffers, "slots" [B, T], "mask"
    [B, T, T'], "limit" [B]} (see `BlockView`); the updated node buffers come back.

    With single-row steps (`step_width` 1) a chain block attends the cache as plain
    decoding does, in one sum (`Attention`, `kangaroo_jax.precision`): its states feed a
    verification. With fixed-width steps the verification recomputes every layer, so a
    block here (a lookup proposal's shallow states, for the adapter) takes two sums and
    copies nothing.
    """
    end = self.cfg.num_layers if end is None else end
    inv_freq = jnp.asarray(rope_inv_freq(self.cfg))
    ks, vs = [], []
    for j, i in enumerate(range(start, end)):
      view = None if tree is None else BlockView(tree["k"][j], tree["v"][j], tree["slots"],
                                                 tree["mask"], tree["limit"])
      x, k, v = self.layers[i](x, positions, cache["k"][i], cache["v"][i], inv_freq,
                               write=False, view=view, one_sum=self.step_width == 1)
      ks.append(k)
      vs.append(v)
    return x, {"k": ks, "v": vs}

  def head_weight(self) -> jax.Array:
    """The LM head as [V, D] (the embedding itself when tied)."""
    return self.embedding[...] if self.lm_head is None else self.lm_head[...].T

  def logits(self, x: jax.Array, products: Optional[Products] = None) -> jax.Array:
    """Final norm + LM head: hidden [B, T, D] -> float32 logits [B, T, V]."""
    return self.project(self.norm(x), products=products)

  def project(self, x: jax.Array, head: Optional[jax.Array] = None,
              products: Optional[Products] = None) -> jax.Array:
    """LM head only: normed hidden [B, T, D] -> float32 logits [B, T, V].

    `head` [V', D] replaces the full head (a reduced draft vocabulary); `products`
    replaces the model's (the training step's). The head is never padded to more rows
    (`Products.one_row`): one row streams it at the matrix-vector kernel's cost, and a
    greedy verification computes it position by position as plain decoding does
    (`kangaroo_jax.precision`).
    """
    products = (products or self.products).one_row()
    if head is not None:
      return weight_product("btd,vd->btv", x, head, products)  # [B, T, V']
    if self.lm_head is None:
      return weight_product("btd,vd->btv", x, gathered(self.embedding[...], "embedding"),
                            products)  # [B, T, V]
    return weight_product("btd,dv->btv", x, gathered(self.lm_head[...], "lm_head"),
                          products)  # [B, T, V]

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: kv.KVCache):
    """Full forward: tokens [B, T] at positions [B, T] -> (logits [B, T, V], cache)."""
    x, cache = self.run_layers(self.embed(tokens), positions, cache)
    return self.logits(x), cache


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, np.ndarray], dtype=jnp.float32,
                       activations=jnp.float32) -> Llama:
  """Builds a Llama from in-memory Hugging Face-named weights ([out, in] linear layout),
  stored in `dtype`, computing with `activations` (see `kangaroo_jax.precision`).

  The same construction as streamed checkpoint loading (`kangaroo_jax.loading`), from a
  dict: for tests and models already in host memory.
  """
  from kangaroo_jax.loading import load_params  # loading builds on this module
  from kangaroo_jax.weights import StoredTensor
  tensors = {name: StoredTensor(np.shape(w), lambda dtype, index=None, w=w:
                                np.asarray(w)[index or ()].astype(dtype))
             for name, w in sd.items()}
  return load_params(cfg, tensors, dtype, activations=activations)
