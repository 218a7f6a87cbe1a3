"""Plain decoding: batches, buckets, stopping, sampling arguments, bad prompts."""
import numpy as np
import pytest

from hf_tiny import make_hf_model
from kangaroo_jax import decoding
from kangaroo_jax import model as M
from kangaroo_jax.decoding import PromptError, bucket, plain_decode
from kangaroo_jax.sampling import SamplingError, SamplingParams

EOS = 1


@pytest.fixture(scope="module")
def tiny():
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=3)
  return M.from_hf_state_dict(cfg, sd)


def _prompts(lengths, seed=0):
  rs = np.random.RandomState(seed)
  return [rs.randint(2, 97, n).tolist() for n in lengths]


def test_greedy_matches_step_by_step_argmax(tiny):
  """The jitted loop equals a host loop of uncached full forwards."""
  import jax.numpy as jnp
  from kangaroo_jax import cache as kv
  prompt = _prompts([6])[0]
  got = plain_decode(tiny, [prompt], max_new_tokens=10).tokens[0]
  seq = list(prompt)
  for _ in range(10):
    t = len(seq)
    logits, _ = tiny(jnp.asarray([seq]), jnp.arange(t)[None], kv.init_model_cache(tiny.cfg, 1, t))
    seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
  assert got == seq[len(prompt):]


def test_batch_of_different_lengths_equals_each_alone(tiny):
  prompts = _prompts([3, 17, 9, 1])
  batch = plain_decode(tiny, prompts, max_new_tokens=25, eos_ids=[EOS]).tokens
  for p, b in zip(prompts, batch):
    assert plain_decode(tiny, [p], max_new_tokens=25, eos_ids=[EOS]).tokens[0] == b


def test_stops_at_eos_and_max_new_tokens(tiny):
  prompt = _prompts([5])[0]
  free = plain_decode(tiny, [prompt], max_new_tokens=12).tokens[0]
  assert len(free) == 12
  eos = free[4]  # pretend the 5th generated token is EOS
  stopped = plain_decode(tiny, [prompt], max_new_tokens=12, eos_ids=[eos]).tokens[0]
  assert stopped == free[:free.index(eos) + 1]


def _compiled_plain() -> tuple[int, int]:
  """How many programs plain decoding has compiled: (prefill, loop)."""
  return decoding._plain_stream_start._cache_size(), decoding._plain_stream_run._cache_size()


def test_same_bucket_does_not_recompile(tiny):
  plain_decode(tiny, _prompts([5]), max_new_tokens=8)
  before = _compiled_plain()
  plain_decode(tiny, _prompts([7], seed=1), max_new_tokens=8)
  plain_decode(tiny, _prompts([30], seed=2), max_new_tokens=8)  # same bucket of 32
  assert _compiled_plain() == before
  assert bucket(5) == bucket(30) == 32 and bucket(33) == 64


def test_budgets_that_fit_one_cache_share_one_compiled_loop(tiny):
  """The token budget is traced: 3 and 90 new tokens after a 32-token bucket both fit a
  128-slot cache, so they run one compiled loop; 97 needs 256 slots, a new one."""
  from kangaroo_jax.decoding import token_capacity
  assert token_capacity(32, 3) == token_capacity(32, 90) == 96 and token_capacity(32, 97) == 224
  long = plain_decode(tiny, _prompts([5]), max_new_tokens=90).tokens[0]
  before = _compiled_plain()
  for n in (3, 17, 64):
    assert plain_decode(tiny, _prompts([5]), max_new_tokens=n).tokens[0] == long[:n]
  assert _compiled_plain() == before
  plain_decode(tiny, _prompts([5]), max_new_tokens=97)
  assert _compiled_plain() == tuple(n + 1 for n in before)


@pytest.mark.parametrize("step_width", [1, 8])
def test_plain_cache_is_the_budget_rounded_up_once(step_width):
  """The cache plain decoding makes for a budget is `cache_size(bucket, budget, W - 1)`:
  its capacity leaves room for the W - 1 slots a fixed-width step reaches past its token,
  so the cache is not rounded up to the next 128 a second time (a 32-token bucket and 64
  new tokens: 128 slots, not 256, with 8-row steps as on an accelerator)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from kangaroo_jax.decoding import _plain_stream_start, cache_size, plain_capacity
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=1)
  model = M.from_hf_state_dict(cfg, sd)
  model.step_width = step_width  # an accelerator's width, traced here on the CPU
  graphdef, state = nnx.split(model)
  capacity = plain_capacity(model, 32, 64)
  st = jax.eval_shape(lambda s, t: _plain_stream_start(
      graphdef, s, t, jnp.asarray([5]), jax.random.key(0), jnp.asarray([EOS]), jnp.int32(64),
      params=SamplingParams(), capacity=capacity), state, jnp.zeros((1, 32), jnp.int32))
  slots = {leaf.shape[1] for leaf in jax.tree.leaves(st["cache"]) if leaf.ndim == 4}
  assert slots == {cache_size(32, 64, step_width - 1)} == {128}
  assert capacity >= 64 and st["out"].shape == (1, capacity)


def test_sampling_is_seeded_and_respects_top_k(tiny):
  prompt = _prompts([4])
  params = SamplingParams(temperature=1.0, top_k=1)
  # top_k=1 is greedy whatever the seed.
  assert (plain_decode(tiny, prompt, max_new_tokens=10, params=params, seed=3).tokens
          == plain_decode(tiny, prompt, max_new_tokens=10).tokens)
  params = SamplingParams(temperature=1.0, top_p=0.9)
  a = plain_decode(tiny, prompt, max_new_tokens=10, params=params, seed=3).tokens
  assert a == plain_decode(tiny, prompt, max_new_tokens=10, params=params, seed=3).tokens
  assert a != plain_decode(tiny, prompt, max_new_tokens=10, params=params, seed=4).tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
  import jax.numpy as jnp
  from kangaroo_jax.sampling import probs
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  p = np.asarray(probs(logits, SamplingParams(temperature=1.0, top_p=0.8)))[0]
  np.testing.assert_allclose(p, [0.625, 0.375, 0, 0], atol=1e-6)
  p = np.asarray(probs(logits, SamplingParams(temperature=1.0, top_k=3)))[0]
  np.testing.assert_allclose(p, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-6)


def test_top_k_above_the_vocabulary_keeps_every_token():
  """A top_k larger than the vocabulary (the draft's is often smaller) truncates nothing."""
  import jax.numpy as jnp
  from kangaroo_jax.sampling import probs
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  p = np.asarray(probs(logits, SamplingParams(temperature=1.0, top_k=9)))[0]
  np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0.05], atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_truncation_keeps_tokens_by_rank(temperature):
  """top-k keeps exactly k tokens and top-p at least one, chosen by rank: no threshold
  compared with recomputed logits (on a GPU that once dropped every token), even where
  every logit ties (bfloat16-rounded logits of a large vocabulary tie often)."""
  import jax
  import jax.numpy as jnp
  from kangaroo_jax.sampling import process_logits
  ties = jnp.zeros((2, 3, 64))  # [B, K, V]: every token tied
  rounded = jax.random.normal(jax.random.key(0), (2, 3, 4096)).astype(jnp.bfloat16)
  for logits in (ties, rounded.astype(jnp.float32)):
    for k in (1, 5):
      kept = np.isfinite(np.asarray(process_logits(logits, SamplingParams(temperature, top_k=k))))
      assert (kept.sum(-1) == k).all()
    for top_p in (1e-6, 0.5, 0.99):
      kept = np.isfinite(np.asarray(process_logits(logits, SamplingParams(temperature, top_p=top_p))))
      assert (kept.sum(-1) >= 1).all()
  # Tied tokens fill the top-p mass in rank order: 4 of 64 equal ones reach 6%.
  kept = np.isfinite(np.asarray(process_logits(ties, SamplingParams(1.0, top_p=0.06))))
  assert (kept.sum(-1) == 4).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_k=-2), "top_k"),
])
def test_invalid_sampling_arguments(kwargs, match):
  with pytest.raises(SamplingError, match=match):
    SamplingParams(**kwargs)


def test_bad_prompts(tiny):
  with pytest.raises(PromptError, match="empty prompt"):
    plain_decode(tiny, [[]], max_new_tokens=4)
  with pytest.raises(PromptError, match="exceeds"):
    plain_decode(tiny, [[3] * 250], max_new_tokens=10)  # the tiny model has 256 positions
  with pytest.raises(PromptError, match="max_new_tokens"):
    plain_decode(tiny, [[3]], max_new_tokens=0)


def _cache_copies_in_loops(hlo_text: str, cache_dims: str) -> int:
  """Counts copies of cache-shaped arrays outside the entry computation (i.e. in loops)."""
  count, computation = 0, None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
    if " copy(" in line and f"[{cache_dims}]" in line and computation != "ENTRY":
      count += 1
  return count


def test_no_cache_copy_per_step(tiny):
  """The while loops update the KV cache in place: no copy of a cache array per token.

  Every Kangaroo configuration (several block sizes, sampling, batches, a mesh) is
  checked the same way in `test_no_cache_copies.py`.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from kangaroo_jax.adapter import init_adapter
  from kangaroo_jax.decoding import cache_size
  from kangaroo_jax.hlo import copies_by_branch
  from kangaroo_jax.kangaroo import _kangaroo_loop
  graphdef, state = nnx.split(tiny)
  agraphdef, astate = nnx.split(init_adapter(tiny.cfg, 1))
  tokens, lens, eos = jnp.zeros((1, 32), jnp.int32), jnp.asarray([5]), jnp.asarray([EOS])
  cfg = tiny.cfg
  plain = decoding._plain_loop.lower(graphdef, state, tokens, lens, jax.random.key(0), eos,
                                     jnp.int32(64), params=SamplingParams(), capacity=64)
  # Fixed-width steps (off a CPU) reach step_width - 1 slots further.
  dims = f"1,{cache_size(32, 64, tiny.step_width - 1)},{cfg.num_kv_heads},{cfg.head_dim}"
  text = plain.compile().as_text()
  assert f"[{dims}]" in text
  assert _cache_copies_in_loops(text, dims) == 0
  spec = _kangaroo_loop.lower(graphdef, state, agraphdef, astate, None, tokens, lens,
                              jax.random.key(0), eos, jnp.float32(0.6), jnp.int32(64),
                              params=SamplingParams(), capacity=64, gamma=1, send_unconfident=True)
  dims = f"1,{cache_size(32, 64, max(3, tiny.step_width))},{cfg.num_kv_heads},{cfg.head_dim}"
  text = spec.compile().as_text()
  assert f"[{dims}]" in text
  if tiny.step_width > 1:
    assert _cache_copies_in_loops(text, dims) == 0
  else:  # single-row verification attends each deep layer's cache in a copy, by design
    per_branch, others = copies_by_branch(text, dims)
    assert others == [] and max(per_branch) <= 2 * (cfg.num_layers - 1)
