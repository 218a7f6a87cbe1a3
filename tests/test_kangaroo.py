"""Kangaroo decoding on tiny models: lossless greedy and sampling, batches, mesh, adapters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_tiny import make_hf_model
from kangaroo_jax import cache as kv
from kangaroo_jax import kangaroo
from kangaroo_jax import model as M
from kangaroo_jax.adapter import AdapterError, init_adapter, load_adapter, save_adapter
from kangaroo_jax.config import ModelConfig
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
from kangaroo_jax.sampling import SamplingParams, probs

EOS = 1


@pytest.fixture(scope="module")
def tiny():
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  return M.from_hf_state_dict(cfg, sd)


def _prompts(lengths, seed=0, vocab=97):
  rs = np.random.RandomState(seed)
  return [rs.randint(2, vocab, n).tolist() for n in lengths]


def _scale(var, factor):
  var.set_value(var[...] * factor)


def _clear_compiled():
  """Forgets the compiled Kangaroo programs, so a monkeypatched piece is traced anew."""
  for jitted in (kangaroo._kangaroo_loop, kangaroo._kangaroo_stream_start,
                 kangaroo._kangaroo_stream_rounds):
    jitted.clear_cache()


def _easy_draft_model(num_layers=4, exit_layer=2, seed=0):
  """Deep layers that leave the state unchanged, so drafts are often all accepted; the
  adapter's (small) attention still moves its logits, so a wrong adapter cache shows."""
  _, cfg, sd = make_hf_model("gqa_untied", seed=seed, num_layers=num_layers)
  model = M.from_hf_state_dict(cfg, sd)
  for layer in model.layers[exit_layer:]:
    _scale(layer.attn.o, 0.0)
    _scale(layer.down, 0.0)
  adapter = init_adapter(cfg, exit_layer, seed=seed)
  adapter.out_norm.weight.set_value(model.norm.weight[...])
  return model, adapter


@pytest.mark.parametrize("eta, gamma, send", [(0.6, 6, True), (1e-6, 1, True), (1e-6, 4, True),
                                              (1.0, 3, True), (0.3, 6, True), (0.05, 4, False),
                                              (1.0, 3, False)])
def test_greedy_identical_to_plain(tiny, eta, gamma, send):
  adapter = init_adapter(tiny.cfg, 2)
  prompts = _prompts([5, 12, 3])
  plain = plain_decode(tiny, prompts, max_new_tokens=30, eos_ids=[EOS]).tokens
  out = kangaroo_decode(tiny, adapter, prompts, max_new_tokens=30, eos_ids=[EOS],
                        kparams=KangarooParams(eta, gamma, send))
  assert out.tokens == plain
  if eta == 1.0:  # every draft is below the threshold: exactly one draft step per round
    assert out.stats["drafts_per_round"] == 1.0
    if not send:  # ... and it is never verified: each round commits one token, as plain does
      assert out.stats["mean_accepted_tokens"] == 1.0 and out.stats["drafts_verified"] == 0
  if send:  # every draft step's draft is verified
    assert out.stats["drafts_verified"] == out.stats["draft_steps"]


@pytest.mark.parametrize("eta, gamma, send", [(0.6, 6, True), (1e-6, 4, True), (0.05, 2, False)])
def test_greedy_identical_to_plain_with_bfloat16_weights(eta, gamma, send):
  """bfloat16 weights, float32 activations (the default): the lossless mode."""
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  model = M.from_hf_state_dict(cfg, sd, jnp.bfloat16)
  assert model.layers[0].gate_up[...].dtype == jnp.bfloat16 and model.activations == jnp.float32
  adapter = init_adapter(cfg, 2, dtype=jnp.bfloat16)
  prompts = _prompts([5, 12, 3])
  plain = plain_decode(model, prompts, max_new_tokens=30, eos_ids=[EOS]).tokens
  out = kangaroo_decode(model, adapter, prompts, max_new_tokens=30, eos_ids=[EOS],
                        kparams=KangarooParams(eta, gamma, send))
  assert out.tokens == plain


def _reference_kangaroo(model, adapter, prompt, max_new, eta, gamma, eos, send=True,
                        drafts=None):
  """Host-side Kangaroo with no caches at all: every step recomputes from scratch.

  Sequences are right-padded to a fixed width (causal attention ignores the padding) so
  the three jitted pieces compile once. `drafts(ctx, draft_probs) -> (drafts, steps)`
  replaces the drafting rule (prompt lookup's tests).
  """
  l, width = adapter.acfg.exit_layer, 64
  pos = jnp.arange(width)[None]

  @jax.jit
  def run(tokens):
    x = model.embed(tokens)
    h_l, cache = model.run_layers(x, pos, kv.init_model_cache(model.cfg, 1, width), 0, l)
    h, _ = model.run_layers(h_l, pos, cache, l, None)
    a, _ = adapter(h_l, pos, adapter.init_cache(1, width))
    return jnp.argmax(model.logits(h)[0], -1), jax.nn.softmax(model.project(a)[0], -1)

  def padded(seq):
    return jnp.asarray([seq + [0] * (width - len(seq))])

  def target(seq):
    return np.asarray(run(padded(seq))[0])[:len(seq)]

  def draft_probs(seq):
    return np.asarray(run(padded(seq))[1])[len(seq) - 1]

  def chain(ctx, draft_probs):
    d, steps = [], 0
    for _ in range(gamma):
      q = draft_probs(ctx + d)
      steps += 1
      if q.max() < eta:
        d += [int(np.argmax(q))] if send else []
        break
      d.append(int(np.argmax(q)))
    return d, steps

  seq = list(prompt)
  gen = [int(target(seq)[-1])]
  rounds = draft_steps = 0
  while len(gen) < max_new and gen[-1] not in eos:
    ctx = seq + gen
    d, steps = (drafts or chain)(ctx, draft_probs)
    t = target(ctx + d)[len(ctx) - 1:]
    acc = 0
    while acc < len(d) and d[acc] == t[acc]:
      acc += 1
    new = d[:acc] + [int(t[acc])]
    for tok in new:
      if len(gen) < max_new and gen[-1] not in eos:
        gen.append(tok)
    rounds += 1
    draft_steps += steps
  return gen, rounds, draft_steps


def _check_against_reference(gamma, seeds=(0, 1), eta=0.2, send=True, sharpen=1.0,
                             min_accepted=1.3):
  model, adapter = _easy_draft_model()
  _scale(adapter.out_norm.weight, sharpen)  # sharper drafts: some confident, some not
  accepted = []
  for seed in seeds:
    prompt = _prompts([6], seed=seed)[0]
    gen, rounds, drafts = _reference_kangaroo(model, adapter, prompt, 24, eta, gamma, [], send)
    out = kangaroo_decode(model, adapter, [prompt], max_new_tokens=24,
                          kparams=KangarooParams(eta, gamma, send))
    assert out.tokens[0] == gen
    assert (out.stats["rounds"], out.stats["draft_steps"]) == (rounds, drafts)
    accepted.append(out.stats["mean_accepted_tokens"])
  # Many rounds accepted drafts (over the seeds: at sharpen 20 one prompt may send too few).
  assert np.mean(accepted) > min_accepted


@pytest.mark.parametrize("gamma, eta, send, sharpen, min_accepted", [
    (1, 0.2, True, 1.0, 1.3), (3, 0.2, True, 1.0, 1.3),
    # Without send_unconfident: many rounds stop early (60) or verify no draft at all (20).
    (3, 0.5, False, 60.0, 1.3), (3, 0.5, False, 20.0, 1.05)])
def test_matches_cache_free_reference_round_by_round(gamma, eta, send, sharpen, min_accepted):
  """Same tokens, rounds and draft steps as a cache-free reference: this catches a wrong
  roll-back or a missing adapter cache entry after a round that accepted every draft (or,
  without send_unconfident, after a round that verified no draft at all)."""
  _check_against_reference(gamma, eta=eta, send=send, sharpen=sharpen, min_accepted=min_accepted)


def test_reference_check_catches_a_broken_adapter_cache(monkeypatch):
  """Feeding the adapter a wrong state for the previous position (as a missed catch-up
  would) must make the round-by-round comparison fail."""
  draft = kangaroo._draft

  def broken(model, adapter, draft_head, draft_ids, st, eta, **kw):
    return draft(model, adapter, draft_head, draft_ids, st.replace(h_prev=0 * st.h_prev), eta, **kw)

  _clear_compiled()
  monkeypatch.setattr(kangaroo, "_draft", broken)
  try:
    with pytest.raises(AssertionError):
      _check_against_reference(3)
  finally:
    _clear_compiled()


def test_eos_and_token_limit_inside_a_round():
  model, adapter = _easy_draft_model()
  prompt = _prompts([6], seed=3)[0]
  free = plain_decode(model, [prompt], max_new_tokens=30).tokens[0]
  kp = KangarooParams(1e-6, 6)
  # Token 1 comes from the prompt's pass; the first round drafts 6 and verifies 7 (tokens
  # 2..8), so these limits and EOS positions end it at every offset (and the second round
  # at its first few). The budget is traced: every limit runs one compiled loop.
  for limit in range(2, 12):
    assert kangaroo_decode(model, adapter, [prompt], max_new_tokens=limit, kparams=kp).tokens[0] \
        == free[:limit]
  for eos in set(free[2:9]):
    want = free[:free.index(eos) + 1]
    got = kangaroo_decode(model, adapter, [prompt], max_new_tokens=30, eos_ids=[eos], kparams=kp)
    assert got.tokens[0] == want


def test_batch_equals_single(tiny):
  adapter = init_adapter(tiny.cfg, 1, seed=1)
  prompts = _prompts([4, 20, 9, 2], seed=5)
  batch = kangaroo_decode(tiny, adapter, prompts, max_new_tokens=20, eos_ids=[EOS],
                          kparams=KangarooParams(0.01, 4)).tokens
  for p, b in zip(prompts, batch):
    single = kangaroo_decode(tiny, adapter, [p], max_new_tokens=20, eos_ids=[EOS],
                             kparams=KangarooParams(0.01, 4)).tokens[0]
    assert single == b


def test_reduced_draft_vocabulary_is_lossless(tiny):
  adapter = init_adapter(tiny.cfg, 2)
  prompts = _prompts([7, 3])
  plain = plain_decode(tiny, prompts, max_new_tokens=20, eos_ids=[EOS]).tokens
  ids = np.arange(0, 97, 3)  # a third of the vocabulary
  out = kangaroo_decode(tiny, adapter, prompts, max_new_tokens=20, eos_ids=[EOS],
                        kparams=KangarooParams(0.01, 3), draft_ids=ids)
  assert out.tokens == plain
  assert out.stats["draft_steps"] > 0


def test_mesh_2x4_equals_single_device():
  assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
  from kangaroo_jax.sharding import make_mesh, shard_module
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  model = M.from_hf_state_dict(cfg, sd)
  adapter = init_adapter(cfg, 2)
  prompts = _prompts([5, 9, 2, 14], seed=7)
  kp = KangarooParams(0.01, 4)
  want = kangaroo_decode(model, adapter, prompts, max_new_tokens=16, eos_ids=[EOS], kparams=kp)
  mesh = make_mesh(2, 4)
  shard_module(model, mesh)
  shard_module(adapter, mesh)
  assert "model" in str(model.layers[0].gate_up[...].sharding.spec)
  got = kangaroo_decode(model, adapter, prompts, max_new_tokens=16, eos_ids=[EOS], kparams=kp,
                        mesh=mesh)
  assert got.tokens == want.tokens
  assert plain_decode(model, prompts, max_new_tokens=16, eos_ids=[EOS], mesh=mesh).tokens == want.tokens


# ---- sampling: the output distribution must be the target's ----

def _peaky_tiny_model(vocab=6, seed=0, dtype=jnp.float32, step_width=None):
  cfg = ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
  model = M.Llama(cfg, dtype, rngs=nnx.Rngs(seed), step_width=step_width)
  _scale(model.embedding, 60.0)  # sharper next-token distributions than a 0.02-scale init
  _scale(model.lm_head, 60.0)
  adapter = init_adapter(cfg, 1, seed=seed + 1, dtype=dtype)
  # A draft that disagrees with the target often, so acceptance and resampling both matter.
  rs = np.random.RandomState(seed)
  adapter.out_norm.weight.set_value(jnp.asarray(rs.normal(0, 1.5, cfg.hidden_size), dtype))
  return model, adapter


def _target_marginals(model, prompt, params, steps):
  """Exact marginal distributions of generated tokens 1..steps, by enumeration."""
  v = model.cfg.vocab_size
  prefixes, weights = [[]], np.ones(1)
  marginals = []
  for _ in range(steps):
    seqs = np.asarray([prompt + p for p in prefixes])
    t = seqs.shape[1]
    logits, _ = model(jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), seqs.shape),
                      kv.init_model_cache(model.cfg, len(seqs), t))
    p = np.asarray(probs(logits[:, -1], params), np.float64)  # [P, V]
    joint = weights[:, None] * p
    marginals.append(joint.sum(0))
    prefixes = [pre + [tok] for pre in prefixes for tok in range(v)]
    weights = joint.reshape(-1)
  return marginals


def _empirical_tv(model, adapter, prompt, params, kp, n, draft_ids=None, steps=3):
  out = kangaroo_decode(model, adapter, [prompt] * n, max_new_tokens=steps, params=params,
                        kparams=kp, seed=11, draft_ids=draft_ids)
  toks = np.asarray(out.tokens)  # [n, steps]
  exact = _target_marginals(model, prompt, params, steps)
  v = model.cfg.vocab_size
  return max(0.5 * np.abs(np.bincount(toks[:, s], minlength=v) / n - exact[s]).sum()
             for s in range(steps))


# With n = 4000 samples over 6 tokens the total-variation noise is about 0.01-0.02.
N_SAMPLES, TV_BOUND = 4000, 0.05


@pytest.mark.parametrize("params, draft_ids, kp", [
    (SamplingParams(temperature=1.0), None, KangarooParams(1e-6, 2)),
    (SamplingParams(temperature=0.7, top_k=4), None, KangarooParams(1e-6, 2)),
    (SamplingParams(temperature=1.0, top_p=0.8), None, KangarooParams(1e-6, 2)),
    (SamplingParams(temperature=1.0), np.asarray([0, 2, 3, 5]), KangarooParams(1e-6, 2)),
    # top_k above the 4-id draft vocabulary: the draft keeps all 4, the target its top 5.
    (SamplingParams(temperature=1.0, top_k=5), np.asarray([0, 2, 3, 5]), KangarooParams(1e-6, 2)),
    # Drafts dropped by confidence (some rounds verify no draft): still the target's law.
    (SamplingParams(temperature=1.0), None, KangarooParams(0.5, 2, send_unconfident=False)),
])
def test_sampling_distribution_equals_target(params, draft_ids, kp):
  model, adapter = _peaky_tiny_model()
  tv = _empirical_tv(model, adapter, [1, 4, 2], params, kp, N_SAMPLES, draft_ids)
  assert tv < TV_BOUND


def test_sampling_distribution_equals_target_with_bfloat16_weights():
  """bfloat16 weights, float32 activations: the exact law of the same bfloat16 model."""
  model, adapter = _peaky_tiny_model(dtype=jnp.bfloat16)
  tv = _empirical_tv(model, adapter, [1, 4, 2], SamplingParams(temperature=1.0),
                     KangarooParams(1e-6, 2), N_SAMPLES)
  assert tv < TV_BOUND


def test_sampling_distribution_equals_target_with_fixed_width_steps():
  """Fixed-width steps (the default off a CPU): verification runs every layer over 8 rows;
  the law is still the target's."""
  model, adapter = _peaky_tiny_model(step_width=8)
  tv = _empirical_tv(model, adapter, [1, 4, 2], SamplingParams(temperature=1.0),
                     KangarooParams(1e-6, 3), N_SAMPLES)
  assert tv < TV_BOUND


def test_a_wrong_acceptance_rule_fails_the_bound(monkeypatch):
  """Accepting every draft the target does not forbid (u = 0) is not lossless: the same
  test must then fail, so the bound is tight enough to mean something."""
  model, adapter = _peaky_tiny_model()
  params = SamplingParams(temperature=1.0)
  _clear_compiled()
  monkeypatch.setattr(kangaroo.jax.random, "uniform", lambda key, shape: jnp.zeros(shape))
  try:
    tv = _empirical_tv(model, adapter, [1, 4, 2], params, KangarooParams(1e-6, 2), N_SAMPLES)
  finally:
    _clear_compiled()
  assert tv > 2 * TV_BOUND


# ---- adapters: files and bad input ----

def test_adapter_file_round_trip(tmp_path, tiny):
  adapter = init_adapter(tiny.cfg, 2, seed=4)
  ids = np.asarray([5, 9, 1, 0])
  save_adapter(str(tmp_path / "a.safetensors"), adapter, ids)
  loaded, loaded_ids = load_adapter(str(tmp_path / "a.safetensors"), tiny.cfg)
  assert loaded.acfg == adapter.acfg
  np.testing.assert_array_equal(loaded_ids, ids)
  for a, b in zip(jax.tree.leaves(nnx.state(adapter)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adapter_bad_input(tmp_path, tiny):
  with pytest.raises(AdapterError, match="exit layer 4 is out of range"):
    init_adapter(tiny.cfg, 4)
  with pytest.raises(AdapterError, match="exit layer 0 is out of range"):
    init_adapter(tiny.cfg, 0)
  with pytest.raises(AdapterError, match="no such adapter file"):
    load_adapter(str(tmp_path / "missing.safetensors"), tiny.cfg)
  path = tmp_path / "a.safetensors"
  save_adapter(str(path), init_adapter(tiny.cfg, 2))
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(AdapterError, match="corrupt or truncated"):
    load_adapter(str(path), tiny.cfg)
  other = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=12)
  save_adapter(str(path), init_adapter(other, 2))
  with pytest.raises(AdapterError, match="hidden size 48"):
    load_adapter(str(path), tiny.cfg)
  with pytest.raises(AdapterError, match="head count 5"):
    init_adapter(tiny.cfg, 2, num_heads=5)
  with pytest.raises(ValueError, match="eta"):
    KangarooParams(eta=0.0)
  with pytest.raises(ValueError, match="eta"):
    KangarooParams(eta=1.5)
  with pytest.raises(ValueError, match="gamma"):
    KangarooParams(gamma=0)


# ---- draft vocabularies: unique ids inside the model's vocabulary, checked on load ----

@pytest.mark.parametrize("ids, problem", [
    ([3, 5, 3], "repeats token id 3"),
    ([3, 5, 97], "id 97 is outside"),
    ([-1, 5], "id -1 is outside"),
])
def test_a_bad_draft_vocabulary_is_refused(tmp_path, tiny, ids, problem):
  """Duplicates lose probability mass in the scatter to the full vocabulary and
  out-of-range ids are clamped by the gather: either breaks lossless sampling."""
  adapter = init_adapter(tiny.cfg, 2)
  path = str(tmp_path / "a.safetensors")
  save_adapter(path, adapter, np.asarray(ids))
  with pytest.raises(AdapterError, match=problem):
    load_adapter(path, tiny.cfg)
  with pytest.raises(AdapterError, match=problem):
    kangaroo_decode(tiny, adapter, [[1, 2]], max_new_tokens=2, draft_ids=np.asarray(ids))
