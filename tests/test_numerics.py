"""Kangaroo equals plain decoding on the oracle model in every precision mode, and the
test notices when the products differ (the control). Both row designs
(`kangaroo_jax.precision`) stay identical where a backend computes blocks of rows with
other kernels than single rows: fixed-width steps (the default off a CPU), and on a CPU
products of at least two rows with a one-row head; single-row steps with a block head
do not. The CPU design relies on products of 2 to 8 rows agreeing row for row, which
`test_cpu_products_agree_row_for_row_at_the_shapes_decoding_uses` checks on this host.

The oracle (`kangaroo_jax.oracle`) accepts nearly every draft, so every round verifies a
full block; its random weights put near-ties everywhere. On an NVIDIA GPU the default
float32 products (TF32) made exactly this comparison fail; `scripts/accelerator_check.py`
runs it there.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax.adapter import init_adapter
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
from kangaroo_jax.model import Llama
from kangaroo_jax.oracle import ORACLE_ETA, twin_head, random_oracle
from kangaroo_jax.precision import PRODUCTS, Products, products_for

CFG = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=6,
                  num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
# The embedded SmolLM2-135M's widths (attention 9 x 64, 3 KV heads; FFN 1536): on this
# project's AMD EPYC hosts (AVX2 and AVX-512 alike) XLA's one-row products at these widths
# sum differently from blocks, and before products of at least two rows, greedy Kangaroo
# at batch 1 left plain decoding here (float32, oracle seed 1: at token 7).
WIDE = ModelConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536, num_layers=4,
                   num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=1024)
# (weights, activations): the modes `decode.py --dtype/--activations` offer.
MODES = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]
NEW = 48


def _prompts():
  """Four prompts; the first repeats a segment, so prompt lookup finds n-grams."""
  rs = np.random.RandomState(0)
  seg = rs.randint(2, CFG.vocab_size, 6).tolist()
  return [seg * 3] + [rs.randint(2, CFG.vocab_size, n).tolist() for n in (5, 17, 9)]


def _oracle(weights, activations, products=None, step_width=1, cfg=CFG, seed=0):
  return random_oracle(cfg, 2, dtype=jnp.dtype(weights), activations=jnp.dtype(activations),
                       products=products, step_width=step_width, seed=seed)


def _kangaroo(model, adapter, prompts, **kw):
  return kangaroo_decode(model, adapter, prompts, max_new_tokens=NEW,
                         kparams=KangarooParams(ORACLE_ETA, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("weights, activations", MODES)
def test_oracle_kangaroo_identical_to_plain_in_every_mode(weights, activations):
  model, adapter = _oracle(weights, activations, cfg=WIDE, seed=1)
  assert model.products == products_for(jnp.dtype(activations))
  prompts = _prompts()
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  for gamma in (1, 4, 6):  # chain, batch 4
    out = _kangaroo(model, adapter, prompts, gamma=gamma)
    assert out.tokens == plain, f"chain gamma {gamma}"
    # The oracle: (nearly) every draft accepted, so every round verifies a full block.
    assert out.stats["mean_accepted_tokens"] > gamma + 0.25
  # Batch 1 (against plain at batch 1: each batch size is its own program), with prompt
  # lookup: the repeating prompt's n-grams give lookup rounds (every live sequence must
  # have one, so alone).
  one = plain_decode(model, prompts[:1], max_new_tokens=NEW).tokens
  assert _kangaroo(model, adapter, prompts[:1], gamma=4).tokens == one, "batch 1"
  out = _kangaroo(model, adapter, prompts[:1], gamma=2, lookup=4)
  assert out.tokens == one and out.stats["lookup_rounds"] > 0, "prompt lookup"
  # Fixed-width steps (the accelerators' default) in this mode too.
  model, adapter = _oracle(weights, activations, step_width=8)
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  assert _kangaroo(model, adapter, prompts, gamma=7).tokens == plain, "fixed width"


# A backend whose products over blocks of rows round their operands as TF32 does, while
# single rows stay float32: a CPU's matrix-vector against matrix-matrix kernels, or what
# the GPU run showed, made large enough to flip tokens, emulated on the CPU.
ROW_DEPENDENT = Products(PRODUCTS["float32"].precision, block_inputs=jnp.float16)


def _row_cases(cfg: ModelConfig):
  """(name, einsum spec, lhs feature shape, rhs shape) of every product a decoding step
  pads to two rows on a CPU (`precision.Products.min_rows`): the layers' weights and the
  attention over a 64-slot cache. The LM head is absent: it stays one row per position
  in plain decoding and verification alike, the same product by construction."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k = cfg.num_heads, cfg.num_kv_heads
  return [("qkv", "btd,df->btf", (d,), (d, (n + 2 * k) * h)),
          ("attention o", "btd,df->btf", (n * h,), (n * h, d)),
          ("gate_up", "btd,df->btf", (d,), (d, 2 * f)),
          ("down", "btd,df->btf", (f,), (f, d)),
          ("attention scores", "btkgh,bskh->bkgts", (k, n // k, h), (64, k, h)),
          ("attention values", "bkgts,bskh->btkgh", (k, n // k, 64), (64, k, h))]


@pytest.mark.parametrize("cfg", [CFG, WIDE], ids=["tiny", "135m-widths"])
def test_cpu_products_agree_row_for_row_at_the_shapes_decoding_uses(cfg):
  """What the CPU design relies on: each row of a product of T rows (a verification
  block) equals that row's product alone, as a plain step pads it to two rows. Float32
  products only: on a CPU bfloat16 activations meet the (float32, `as_computed`) weights
  in float32, the same kernels."""
  rs = np.random.RandomState(0)
  products = products_for(jnp.float32, "cpu")
  broken = []
  for name, spec, row_shape, w_shape in _row_cases(cfg):
    lhs, rhs = spec.split("->")[0].split(",")
    t_in, t_out = lhs.index("t"), spec.split("->")[1].index("t")
    run = jax.jit(lambda x, w, spec=spec: products.einsum(spec, x, w))
    for b in (1, 4):
      x = jnp.asarray(np.moveaxis(rs.randn(b, 8, *row_shape), 1, t_in), jnp.float32)  # T at t
      w = jnp.asarray(rs.randn(*((b,) if rhs[0] == "b" else ()), *w_shape) * 0.05, jnp.float32)
      alone = [run(jax.lax.slice_in_dim(x, j, j + 1, axis=t_in), w) for j in range(8)]
      for t in (2, 3, 4, 8):  # blocks of the verification sizes; 8 = the fixed width
        block = run(jax.lax.slice_in_dim(x, 0, t, axis=t_in), w)
        for j in range(t):
          row = jax.lax.slice_in_dim(block, j, j + 1, axis=t_out)
          if not bool(jnp.array_equal(row, alone[j])):
            diff = float(jnp.max(jnp.abs(row - alone[j])))
            broken.append(f"{name} ({spec}, batch {b}): row {j} of a {t}-row product differs "
                          f"from the row alone (padded to 2 rows) by {diff:.2g}")
  assert not broken, ("this host's kernels break the row invariance greedy Kangaroo needs "
                      "(kangaroo_jax.precision):\n" + "\n".join(broken[:10]))


@pytest.mark.slow
def test_fixed_width_steps_are_identical_where_kernels_depend_on_the_row_count():
  model, adapter = _oracle("float32", "float32", ROW_DEPENDENT, step_width=8)
  prompts = _prompts()
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  for gamma in (1, 4, 7):  # batch 4
    assert _kangaroo(model, adapter, prompts, gamma=gamma).tokens == plain, f"gamma {gamma}"
  one = plain_decode(model, prompts[:1], max_new_tokens=NEW).tokens
  assert _kangaroo(model, adapter, prompts[:1], gamma=3).tokens == one, "batch 1"
  out = _kangaroo(model, adapter, prompts[:1], gamma=2, lookup=4)
  assert out.tokens == one and out.stats["lookup_rounds"] > 0, "prompt lookup"


def _deep_model(cfg=CFG, weights="float32", activations="float32", products=None, seed=0):
  """A random model whose deep layers count (not the oracle: its deep layers add zero,
  so it cannot see how they compute), near-tied twins in the head, a random adapter
  (its drafts are rarely accepted: every round still verifies a block of gamma + 1)."""
  model = Llama(cfg, jnp.dtype(weights), nnx.Rngs(seed), jnp.dtype(activations), products, 1)
  twin_head(model, seed)
  return model, init_adapter(cfg, 2, seed=seed, dtype=jnp.dtype(weights))


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_cpu_design_identical_where_deep_layers_count(weights):
  """On this host's own kernels, float32 activations: plain decoding and single-row
  verification compute every layer of each accepted row alike (products of at least two
  rows, reductions over 8-row blocks, the block attended inside the cache in one sum, a
  one-row head), so greedy Kangaroo is identical at batch 4 (mixed prompt lengths) and 1.
  Before, batch 4 flipped a twin after 8 tokens here (deep attention and norms)."""
  model, adapter = _deep_model(WIDE, weights)
  prompts = _prompts()
  for batch in (prompts, prompts[:1]):
    plain = plain_decode(model, batch, max_new_tokens=NEW).tokens
    for gamma in (1, 4):
      assert _kangaroo(model, adapter, batch, gamma=gamma).tokens == plain, \
          f"batch {len(batch)}, gamma {gamma}"


@pytest.mark.slow
def test_cpu_rows_are_identical_where_kernels_depend_on_the_row_count():
  """The CPU design on the emulated backend (block products rounded): identical at
  batch 4 and 1, and with prompt lookup."""
  cpu = dataclasses.replace(ROW_DEPENDENT, min_rows=2, reduce_rows=8)
  model, adapter = _deep_model(products=cpu)
  prompts = _prompts()
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  assert _kangaroo(model, adapter, prompts, gamma=4).tokens == plain, "batch 4"
  # Batch 1: the prompt whose answer the control below shows sensitive (this random
  # model repeats one token after the others, whatever the rounding).
  one = plain_decode(model, prompts[1:2], max_new_tokens=NEW).tokens
  assert _kangaroo(model, adapter, prompts[1:2], gamma=4).tokens == one, "batch 1"
  one = plain_decode(model, prompts[:1], max_new_tokens=NEW).tokens
  out = _kangaroo(model, adapter, prompts[:1], gamma=2, lookup=4)
  assert out.tokens == one and out.stats["lookup_rounds"] > 0, "prompt lookup"


@pytest.mark.slow
def test_single_row_steps_differ_where_kernels_depend_on_the_row_count():
  """The control of the test above: one-row products in plain steps against blocks in
  verification (the CPU's design before it padded products to two rows) are not
  identical on such a backend."""
  model, adapter = _deep_model(products=ROW_DEPENDENT)
  prompts = _prompts()[1:2]
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  assert _kangaroo(model, adapter, prompts, gamma=4).tokens != plain


def test_a_round_longer_than_the_step_width_is_refused():
  model, adapter = _oracle("float32", "float32", step_width=4)
  with pytest.raises(ValueError, match="at most 3 drafts"):
    _kangaroo(model, adapter, _prompts()[:1], gamma=4)


# Known defect, found by this oracle: tree verification attends the committed cache and
# the tree's nodes in two sums (`model.attend_block`), where plain decoding attends one
# cache; in float32 the different order of the sums flips a twin's argmax (48 tokens,
# seed 0: token 949 for plain's 948 after 28 tokens). strict: a fix makes this fail, so
# the marker goes with the defect.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="tree attention sums in another order than plain decoding")
def test_oracle_tree_identical_to_plain_in_float32():
  model, adapter = _oracle("float32", "float32")
  prompts = _prompts()
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  assert _kangaroo(model, adapter, prompts, gamma=4, tree_nodes=8, tree_topk=2).tokens == plain


@pytest.mark.slow
def test_oracle_notices_products_other_than_plain_decodings():
  """The control: the same weights with Kangaroo's products rounding their operands to
  float16 (TF32's 10-bit mantissa, what an NVIDIA GPU does to float32 operands by
  default) must give other tokens than plain decoding in true float32: the comparison
  above is sensitive to a product algorithm, not only to gross errors."""
  model, _ = _oracle("float32", "float32")
  rounded, adapter = _oracle("float32", "float32", Products(PRODUCTS["float32"].precision,
                                                            inputs=jnp.float16))
  prompts = _prompts()
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  out = _kangaroo(rounded, adapter, prompts, gamma=4)
  assert out.tokens != plain
