"""Which dtype each part of a decoding step computes in.

The weights are stored in the model's dtype (`Llama.dtype`): they are most of the bytes
a decoding step reads. The hidden states, the KV cache and every product's output use
the activation dtype (`Llama.activations`); products accumulate in float32 and their
inputs meet in the wider dtype (`model.weight_product`).

float32 activations (the default) round nothing but the weights: a bfloat16 weight times
a float32 activation is exact in float32. Kangaroo's verification, which runs the deep
layers over a block of T positions where plain decoding runs one, then differs from
plain decoding only in the float32 order of its sums, as with float32 weights.
bfloat16 activations round every layer's output and every cached key and value: cheaper,
but a sum reduced in another order can round to a neighbouring bfloat16 value and flip a
near-tie argmax, so greedy Kangaroo may then differ from plain decoding.

Every matrix product names its precision (`Products`, one per activation dtype in
`PRODUCTS`): no backend default decides. A backend's default would: on NVIDIA GPUs JAX
multiplies float32 operands in TF32 (10-bit mantissas), on TPUs in one bfloat16 pass, so
"float32 activations" would not mean float32 products there.

Fixed-width steps (`Llama.step_width` W > 1, the default off a CPU) make greedy Kangaroo
identical to plain decoding by construction: every plain step and every verification
runs the whole model over exactly W rows per sequence (plain decoding pads its one token),
writing the cache in place and attending it the same way. A kernel then computes each
row the same whatever the other rows hold, so the rows a verification accepts are the
rows plain decoding computes. A backend picks its kernels by shape (an NVIDIA GPU runs
one row and a block of rows through different kernels, with other sums), and on an
accelerator a block of 8 rows costs about what 1 row costs, so one fixed shape is free
there. A CPU computes each row the same at any row count (the oracle test checks it) and
pays for every row, so W = 1 there: plain steps of one row, verification of the
smallest block that holds the drafts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

ACTIVATIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def activation_dtype(name: str):
  """The activation dtype named `name` ('float32' or 'bfloat16')."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
  return ACTIVATIONS[name]


def default_dtypes(platform: Optional[str] = None) -> tuple[str, str]:
  """(weights, activations) dtype names when the user names none, for `platform`
  (default: this backend): float32 and float32 on a CPU (XLA's CPU multiplies bfloat16 in
  float32 anyway; float32 keeps single-row Kangaroo equal to plain decoding), bfloat16
  and bfloat16 on accelerators (half the bytes a step reads; fixed-width steps keep
  greedy Kangaroo identical; float32 products at HIGHEST cost 30% of plain speed on an
  H200: the README's precision table).
  """
  platform = platform or jax.default_backend()
  return ("float32", "float32") if platform == "cpu" else ("bfloat16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Products:
  """How a mode's matrix products compute: accumulated and returned in float32.

  precision: the product's precision, named (`jax.lax.Precision`): HIGHEST computes
    float32 operands in float32 on every backend (no TF32 on a GPU, six bfloat16 passes
    on a TPU); DEFAULT multiplies bfloat16 operands natively.
  inputs: None: the operands meet in the wider of their dtypes (a bfloat16 weight widens
    to a float32 activation exactly). A dtype rounds both operands to it first: bfloat16
    here is what a TPU's default precision does to float32 operands; float16 keeps
    TF32's 10-bit mantissa (tests use it as the control that a product algorithm other
    than plain decoding's is detected).
  block_inputs: a dtype: like `inputs`, but only for products over more than one row
    per sequence (the `t` axis of the first operand). It emulates on a CPU a backend
    that computes a block of rows with other kernels than one row (an NVIDIA GPU's TF32
    blocks): tests show fixed-width steps are immune to it and single-row steps are not.
  """
  precision: jax.lax.Precision
  inputs: Optional[Any] = None
  block_inputs: Optional[Any] = None

  def einsum(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(spec, a, b) in this mode, float32 out."""
    inputs = self.inputs
    if self.block_inputs is not None and a.shape[spec.split(",")[0].index("t")] > 1:
      inputs = self.block_inputs
    if inputs is not None:
      a, b = a.astype(inputs), b.astype(inputs)
    return jnp.einsum(spec, a, b, precision=self.precision, preferred_element_type=jnp.float32)


# The one place each mode's products are chosen, by activation dtype.
PRODUCTS = {"float32": Products(jax.lax.Precision.HIGHEST),
            "bfloat16": Products(jax.lax.Precision.DEFAULT)}


# The training step's products with a bfloat16 model (`distill.step_numerics`): the frozen
# teacher only supplies top-k targets, and the adapter's float32 master weights only need
# float32 updates, so every product multiplies bfloat16 operands (one MXU pass on a TPU,
# not HIGHEST's six) and sums in float32; hidden states are bfloat16 between layers.
TRAINING = Products(jax.lax.Precision.DEFAULT, inputs=jnp.bfloat16)


def products_for(activations) -> Products:
  """The products of the mode whose activations are `activations` (a dtype)."""
  return PRODUCTS[jnp.dtype(activations).name]


# Rows per sequence of every decoding step off a CPU (module docstring): a round verifies
# at most STEP_WIDTH - 1 drafts.
STEP_WIDTH = 8


def default_step_width() -> int:
  """Rows per sequence each decoding step runs on this backend: 1 on a CPU, else STEP_WIDTH."""
  return 1 if _cpu() else STEP_WIDTH


def _cpu() -> bool:
  return jax.default_backend() == "cpu"


def as_computed(state):
  """Model or adapter state (`nnx.split`) as this backend's matrix products consume it.

  XLA's CPU backend has no bfloat16 matrix product: it converts both operands to float32
  at every product. Out of a loop it hoists a weight's conversion (once per call), but not
  out of a conditional's branches, so Kangaroo's verification (a `lax.switch`) converted
  every deep-layer weight again each round. Converting once, before the call, is exact
  (every bfloat16 is a float32) and is what plain decoding already paid inside XLA; it
  changes no result (see `model.weight_product`). Other backends multiply bfloat16
  natively and get the state unchanged.
  """
  if not _cpu():
    return state
  return jax.tree.map(lambda w: w.astype(jnp.float32) if w.dtype == jnp.bfloat16 else w, state)


def cache_dtype(activations):
  """The KV cache's dtype for `activations`: the same, but float32 for bfloat16 on a CPU.

  XLA's CPU backend widens a bfloat16 cache write to float32 and back over the whole
  cache, which it cannot do in place: every write then copies the cache. A float32 cache
  holding the bfloat16 keys and values (exactly) is written in place and attends to the
  same numbers.
  """
  return jnp.float32 if _cpu() and activations == jnp.bfloat16 else activations
