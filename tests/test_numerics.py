"""Kangaroo equals plain decoding on the oracle model in every precision mode, and the
test notices when the products differ (the control). Fixed-width steps (the default off a
CPU, `kangaroo_jax.precision`) stay identical where a backend computes blocks of rows
with other kernels than single rows, which single-row steps do not.

The oracle (`kangaroo_jax.oracle`) accepts nearly every draft, so every round verifies a
full block; its random weights put near-ties everywhere. On an NVIDIA GPU the default
float32 products (TF32) made exactly this comparison fail; `scripts/accelerator_check.py`
runs it there.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from kangaroo_jax.config import ModelConfig
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
from kangaroo_jax.oracle import ORACLE_ETA, random_oracle
from kangaroo_jax.precision import PRODUCTS, Products

CFG = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=6,
                  num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
# (weights, activations): the modes `decode.py --dtype/--activations` offer.
MODES = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]
NEW = 48


def _prompts():
  """Four prompts; the first repeats a segment, so prompt lookup finds n-grams."""
  rs = np.random.RandomState(0)
  seg = rs.randint(2, CFG.vocab_size, 6).tolist()
  return [seg * 3] + [rs.randint(2, CFG.vocab_size, n).tolist() for n in (5, 17, 9)]


def _oracle(weights, activations, products=None, step_width=1):
  return random_oracle(CFG, 2, dtype=jnp.dtype(weights), activations=jnp.dtype(activations),
                       products=products, step_width=step_width)


def _kangaroo(model, adapter, prompts, **kw):
  return kangaroo_decode(model, adapter, prompts, max_new_tokens=NEW,
                         kparams=KangarooParams(ORACLE_ETA, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("weights, activations", MODES)
def test_oracle_kangaroo_identical_to_plain_in_every_mode(weights, activations):
  model, adapter = _oracle(weights, activations)
  assert model.products == PRODUCTS[activations]
  prompts = _prompts()
  plain = plain_decode(model, prompts, max_new_tokens=NEW).tokens
  for gamma in (1, 4, 6):  # chain, batch 4
    out = _kangaroo(model, adapter, prompts, gamma=gamma)
    assert out.tokens == plain, f"chain gamma {gamma}"
    # The oracle: (nearly) every draft accepted, so every round verifies a full block.
    assert out.stats["mean_accepted_tokens"] > gamma + 0.5
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
# single rows stay float32: what the GPU run showed, emulated on the CPU.
ROW_DEPENDENT = Products(PRODUCTS["float32"].precision, block_inputs=jnp.float16)


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


@pytest.mark.slow
def test_single_row_steps_differ_where_kernels_depend_on_the_row_count():
  """The control of the test above: single-row plain steps and blocks of the smallest
  size that fits (the CPU's design) are not identical on such a backend."""
  model, adapter = _oracle("float32", "float32", ROW_DEPENDENT, step_width=1)
  prompts = _prompts()
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
