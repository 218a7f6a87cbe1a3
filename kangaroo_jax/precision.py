"""Which dtype each part of a decoding step computes in, and how its products run.

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

Row counts. Greedy Kangaroo equals plain decoding only if each row a verification
accepts is computed with the same sums as plain decoding computes that position. Kernels
are picked by shape, so the design keeps the shapes' relevant part equal:

- Fixed-width steps (`Llama.step_width` W > 1, the default off a CPU): every plain step
  and every verification runs the whole model over exactly W rows per sequence (plain
  decoding pads its one token), writing the cache in place and attending it the same
  way. On an accelerator a block of 8 rows costs about what 1 row costs, so one fixed
  shape is free there, and it holds whatever kernels the backend picks (an NVIDIA GPU
  runs one row and a block through different kernels, with other sums).
- On a CPU (W = 1) a step pays for every row, so verification runs the smallest block
  that holds the drafts, and the shapes are made to matter no more. Measured on this
  project's AMD EPYC hosts (AVX2 and AVX-512 alike, jax 0.10.2), XLA's CPU computes:
  a product of one row (a matrix-vector kernel) with other sums than the same row inside
  a product of two or more rows (max difference about 5e-5 at 576 x 1536), while
  products of 2 to 32 rows agree row for row (36 and more can differ); and a row
  reduction (RMSNorm's mean, the attention softmax's sum) with other sums depending on
  how many rows it reduces. So on a CPU:
  * every layer product has at least two rows (`Products.min_rows`: a one-row product is
    padded with a zero row, about free at these widths);
  * every row reduction in a layer runs over a block of 8 rows (`Products.rowwise`);
  * a verification block attends the cache with its own keys and values written into
    a copy of each layer's cache, in one sum over the same slots, as plain decoding
    attends its written cache (`model.Attention`; two sums, cache then block, round
    differently; the copy reads and writes each deep layer's cache once a round);
  * the LM head, the one product whose one-row kernel is much cheaper (it streams the
    49k-row embedding once; two rows cost 2-2.5x), stays one row in both: a greedy
    verification computes it position by position, as plain decoding's one-row head,
    and stops at the first rejected draft (`kangaroo._greedy_verdict`): one plain head
    per committed token.
  Then greedy Kangaroo equals plain decoding by construction in float32 activations
  (float32 or bfloat16 weights) for blocks of at most 8 rows and batch x block <= 32
  rows (`tests/test_numerics.py` checks the kernels this relies on, on the host it runs
  on). bfloat16 activations still may differ: XLA keeps float32 between fused
  operations where it can ("excess precision"), and where it can depends on the
  program; `XLA_FLAGS=--xla_allow_excess_precision=false` made them identical too
  (measured on random models, not the default), as do fixed-width steps.

The platform these choices follow is an argument (`platform`, default
`jax.default_backend()`), so a program traced on this CPU for a TPU or a GPU
(`scripts/tpu_aot.py`) gets the target's choices, not the host's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
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
  return ("float32", "float32") if _cpu(platform) else ("bfloat16", "bfloat16")


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
  block_inputs: a dtype: like `inputs`, but only for products of more than one row (the
    first operand's free dimensions, those not in the second, hold more than one
    element). It emulates on a CPU a backend whose one-row kernel and block kernel sum
    differently (a CPU's matrix-vector and matrix-matrix kernels; an NVIDIA GPU's TF32
    blocks, more strongly): tests show that the designs above are immune to it and that
    single-row steps with a block head are not.
  min_rows: a product of fewer rows runs padded to this many (zero rows, dropped
    after), so that it sums as the blocks of a verification do (module docstring).
  reduce_rows: the layers' row reductions (RMSNorm, the attention softmax) run over
    blocks padded to this many rows (`rowwise`): XLA's CPU reductions sum a row in
    another order depending on how many rows they reduce.
  """
  precision: jax.lax.Precision
  inputs: Optional[Any] = None
  block_inputs: Optional[Any] = None
  min_rows: int = 1
  reduce_rows: int = 1

  def einsum(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(spec, a, b) in this mode, float32 out. `spec` names the first operand's
    row axis `t` wherever `min_rows` may pad it."""
    lhs, rhs = spec.split("->")[0].split(",")
    rows = math.prod(n for d, n in zip(lhs, a.shape) if d not in rhs)
    if rows < self.min_rows:
      return self._padded(spec, a, b, lhs.index("t"), -(-self.min_rows // rows))
    inputs = self.inputs
    if self.block_inputs is not None and rows > 1:
      inputs = self.block_inputs
    if inputs is not None:
      a, b = a.astype(inputs), b.astype(inputs)
    return jnp.einsum(spec, a, b, precision=self.precision, preferred_element_type=jnp.float32)

  def _padded(self, spec: str, a: jax.Array, b: jax.Array, axis: int, rows: int) -> jax.Array:
    """The product with `a`'s axis `axis` (size 1) padded to `rows`, then cut back."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, rows - a.shape[axis])
    # The barriers keep XLA from slicing the product back down to one row (a slice of a
    # dot becomes a dot of the slice), which would bring back the one-row kernel.
    a = jax.lax.optimization_barrier(jnp.pad(a, pad))
    out = jax.lax.optimization_barrier(self.einsum(spec, a, b))
    out_axis = spec.split("->")[1].index("t")
    return jax.lax.slice_in_dim(out, 0, 1, axis=out_axis)

  def rowwise(self, f, x: jax.Array, axis: int) -> jax.Array:
    """f(x) for a function f acting on each row alone, x's `axis` padded (edge rows) to
    `reduce_rows` first, so every row is reduced in a block of the same shape."""
    t = x.shape[axis]
    if t >= self.reduce_rows:
      return f(x)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, self.reduce_rows - t)
    out = jax.lax.optimization_barrier(f(jax.lax.optimization_barrier(jnp.pad(x, pad, "edge"))))
    return jax.lax.slice_in_dim(out, 0, t, axis=axis)

  def one_row(self) -> "Products":
    """These products without padding: for the LM head, which stays one row per
    position (module docstring)."""
    return dataclasses.replace(self, min_rows=1)


# The one place each mode's products are chosen, by activation dtype.
PRODUCTS = {"float32": Products(jax.lax.Precision.HIGHEST),
            "bfloat16": Products(jax.lax.Precision.DEFAULT)}


# The training step's products with a bfloat16 model (`distill.step_numerics`): the frozen
# teacher only supplies top-k targets, and the adapter's float32 master weights only need
# float32 updates, so every product multiplies bfloat16 operands (one MXU pass on a TPU,
# not HIGHEST's six) and sums in float32; hidden states are bfloat16 between layers.
TRAINING = Products(jax.lax.Precision.DEFAULT, inputs=jnp.bfloat16)


def products_for(activations, platform: Optional[str] = None) -> Products:
  """The products of the mode whose activations are `activations` (a dtype) on
  `platform` (default: this backend): at least two rows each on a CPU."""
  products = PRODUCTS[jnp.dtype(activations).name]
  if not _cpu(platform):
    return products
  return dataclasses.replace(products, min_rows=2, reduce_rows=STEP_WIDTH)


# Rows per sequence of every decoding step off a CPU (module docstring): a round verifies
# at most STEP_WIDTH - 1 drafts.
STEP_WIDTH = 8


def default_step_width(platform: Optional[str] = None) -> int:
  """Rows per sequence each decoding step runs on `platform` (default: this backend):
  1 on a CPU, else STEP_WIDTH."""
  return 1 if _cpu(platform) else STEP_WIDTH


# The platform programs are built for when none is named: set by `target` while tracing
# ahead of time for another backend; None = this host's backend.
_target: Optional[str] = None


def platform_of(platform: Optional[str] = None) -> str:
  """`platform`, else the one `target` set, else this host's backend."""
  return platform or _target or jax.default_backend()


@contextlib.contextmanager
def target(platform: str):
  """Inside, every choice here that names no platform takes `platform` ("tpu", "gpu",
  "cpu"): for tracing a TPU program on this CPU (`aot_decode`). Clear jit's caches around
  it (`jax.clear_caches`): a trace cached for the host would keep the host's choices."""
  global _target
  saved, _target = _target, platform
  try:
    yield
  finally:
    _target = saved


def _cpu(platform: Optional[str] = None) -> bool:
  return platform_of(platform) == "cpu"


def as_computed(state, platform: Optional[str] = None):
  """Model or adapter state (`nnx.split`) as this backend's matrix products consume it.

  XLA's CPU backend has no bfloat16 matrix product: it converts both operands to float32
  at every product. Out of a loop it hoists a weight's conversion (once per call), but not
  out of a conditional's branches, so Kangaroo's verification (a `lax.switch`) converted
  every deep-layer weight again each round. Converting once, before the call, is exact
  (every bfloat16 is a float32) and is what plain decoding already paid inside XLA; it
  changes no result (see `model.weight_product`). Other backends multiply bfloat16
  natively and get the state unchanged. `platform`: the target (default: this backend).
  """
  if not _cpu(platform):
    return state
  return jax.tree.map(lambda w: w.astype(jnp.float32) if w.dtype == jnp.bfloat16 else w, state)


def cache_dtype(activations, platform: Optional[str] = None):
  """The KV cache's dtype for `activations`: the same, but float32 for bfloat16 on a CPU.

  XLA's CPU backend widens a bfloat16 cache write to float32 and back over the whole
  cache, which it cannot do in place: every write then copies the cache. A float32 cache
  holding the bfloat16 keys and values (exactly) is written in place and attends to the
  same numbers. `platform`: the target (default: this backend).
  """
  return jnp.float32 if _cpu(platform) and activations == jnp.bfloat16 else activations
