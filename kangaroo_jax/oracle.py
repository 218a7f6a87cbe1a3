"""The oracle model: a target whose every draft is accepted, at the real cost.

The output projections (attention `o` and MLP `down`, with their biases) of the deep
layers [l, L) and of the adapter's attention are set to zero, and the adapter's output
norm to the model's final norm. Those blocks then add exactly zero to the residual
stream, so the adapter's logits equal the target's: the draft is the target's own token
(up to rounding at near-ties) and each round commits about gamma + 1 tokens. The same
bytes move and the same products run as in a trained model, so its speed is the Kangaroo
loop's ceiling (`scripts/accelerator_check.py`).

`random_oracle` also gives every even token a twin: the next token's head row is its
row plus noise of 1e-5 of the weights' scale (a few units in the last place for
bfloat16 weights), so nearly every top token has a rival whose logit differs by about
one part in 10^5. Any product computed another way in verification than in plain
decoding then flips some argmax: the hardest test that Kangaroo's output equals plain
decoding's (`tests/test_numerics.py`), and every draft is verified.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kangaroo_jax.adapter import Adapter, init_adapter
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.model import Llama
from kangaroo_jax.precision import Products

# Drafting never stops early on the oracle: random logits are unsure of everything.
ORACLE_ETA = 1e-9


def _zero(param) -> None:
  if param is not None:
    param.set_value(jnp.zeros_like(param[...]))


def make_oracle(model: Llama, adapter: Adapter) -> tuple[Llama, Adapter]:
  """Turns `model` and `adapter` (in place) into the oracle pair; returns them."""
  for layer in model.layers[adapter.acfg.exit_layer:]:
    _zero(layer.attn.o)
    _zero(layer.attn.o_bias)
    _zero(layer.down)
  _zero(adapter.attn.o)
  _zero(adapter.attn.o_bias)
  if adapter.acfg.ffn_size:
    _zero(adapter.ffn_down)
  adapter.out_norm.weight.set_value(model.norm.weight[...].astype(adapter.out_norm.weight.dtype))
  return model, adapter


def random_oracle(cfg: ModelConfig, exit_layer: int = 2, *, dtype=jnp.float32,
                  activations=jnp.float32, products: Optional[Products] = None,
                  step_width: Optional[int] = None, seed: int = 0,
                  twins: bool = True) -> tuple[Llama, Adapter]:
  """A randomly initialised oracle pair for `cfg`: weights in `dtype`, computing in
  `activations` (with `products` and `step_width`: `model.Llama`); `twins` gives the
  head near-tied token pairs (module docstring)."""
  model = Llama(cfg, dtype, nnx.Rngs(seed), activations, products, step_width)
  if twins:
    twin_head(model, seed)
  return make_oracle(model, init_adapter(cfg, exit_layer, seed=seed, dtype=dtype))


def twin_head(model: Llama, seed: int) -> None:
  """Odd tokens' head rows := the even neighbour's + noise (near-ties for every token)."""
  tied = model.lm_head is None
  param = model.embedding if tied else model.lm_head
  w = param[...].astype(jnp.float32)
  w = w if tied else w.T  # [V, D]: one row per token
  even = w[0:w.shape[0] // 2 * 2:2]  # [V/2, D]
  # 1e-5 of the scale, but at least two units in the last place of the stored dtype.
  scale = max(1e-5, 2 * float(jnp.finfo(param[...].dtype).eps)) * float(jnp.std(w))
  noise = jax.random.normal(jax.random.key(seed + 1), even.shape) * scale  # [V/2, D]
  w = w.at[1:w.shape[0] // 2 * 2:2].set(even + noise)
  param.set_value((w if tied else w.T).astype(param[...].dtype))
