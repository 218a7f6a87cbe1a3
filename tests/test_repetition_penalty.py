"""Repetition penalty (transformers' `repetition_penalty`) for plain and Kangaroo decoding.

Plain decoding must equal transformers' generate with the same penalty; Kangaroo must stay
lossless: token-identical to plain decoding under greedy, the target's law under sampling.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_tiny import make_hf_model
from kangaroo_jax import cache as kv
from kangaroo_jax import model as M
from kangaroo_jax.adapter import init_adapter
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
from kangaroo_jax.sampling import SamplingError, SamplingParams, penalize, probs

import test_kangaroo as tk

EOS = 1


@pytest.fixture(scope="module")
def tiny_pair():
  hf, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  return hf, M.from_hf_state_dict(cfg, sd)


def test_penalize_follows_transformers_definition():
  from transformers import RepetitionPenaltyLogitsProcessor
  rs = np.random.RandomState(0)
  logits = rs.normal(0, 3, (2, 11)).astype(np.float32)
  ids = np.asarray([[3, 3, 7, 0], [10, 1, 2, 5]])
  want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(ids), torch.tensor(logits)).numpy()
  seen = np.zeros((2, 11), bool)
  np.put_along_axis(seen, ids, True, axis=1)
  got = penalize(jnp.asarray(logits), jnp.asarray(seen), SamplingParams(repetition_penalty=1.7))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("penalty", [0, -1.0])
def test_invalid_penalty(penalty):
  with pytest.raises(SamplingError, match="repetition_penalty must be > 0"):
    SamplingParams(repetition_penalty=penalty)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_plain_greedy_equals_transformers_generate(tiny_pair, penalty):
  hf, model = tiny_pair
  prompt = tk._prompts([7])[0]
  with torch.no_grad():
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                       do_sample=False, repetition_penalty=penalty, pad_token_id=0,
                       eos_token_id=None)[0, len(prompt):].tolist()
  got = plain_decode(model, [prompt], max_new_tokens=24,
                     params=SamplingParams(repetition_penalty=penalty)).tokens[0]
  assert got == want
  assert got != plain_decode(model, [prompt], max_new_tokens=24).tokens[0]  # it does act


def test_batch_of_different_lengths_ignores_padding(tiny_pair):
  """Pad id 0 fills short prompts; it must not count as a seen token."""
  _, model = tiny_pair
  params = SamplingParams(repetition_penalty=1.5)
  prompts = tk._prompts([2, 13, 6], seed=3)
  batch = plain_decode(model, prompts, max_new_tokens=16, params=params).tokens
  assert batch == [plain_decode(model, [p], max_new_tokens=16, params=params).tokens[0]
                   for p in prompts]


@pytest.mark.parametrize("penalty, eta, gamma, send, vocab", [
    (1.3, 0.6, 6, True, None), (1.3, 1e-6, 4, True, None), (2.0, 0.05, 4, False, None),
    (0.7, 1e-6, 3, True, None), (1.5, 1e-6, 5, True, 40)])
def test_kangaroo_greedy_equals_plain_with_the_same_penalty(penalty, eta, gamma, send, vocab):
  # Deep layers that mostly keep the state: many drafts per round get accepted, so the
  # per-position penalty inside a verification block is exercised.
  model, adapter = tk._easy_draft_model()
  params = SamplingParams(repetition_penalty=penalty)
  prompts = tk._prompts([5, 12, 3])
  draft_ids = None if vocab is None else np.arange(vocab)
  plain = plain_decode(model, prompts, max_new_tokens=30, eos_ids=[EOS], params=params).tokens
  out = kangaroo_decode(model, adapter, prompts, max_new_tokens=30, eos_ids=[EOS], params=params,
                        kparams=KangarooParams(eta, gamma, send), draft_ids=draft_ids)
  assert out.tokens == plain
  if eta < 0.01:
    assert out.stats["mean_accepted_tokens"] > 1.2  # blocks of several tokens were verified
  assert plain != plain_decode(model, prompts, max_new_tokens=30, eos_ids=[EOS]).tokens


def test_a_penalty_ignoring_the_drafts_in_the_block_is_caught(monkeypatch):
  """Penalizing every block position with the committed tokens only (not the drafts
  before it) is not lossless: the identity test must notice it."""
  from kangaroo_jax import kangaroo
  model, adapter = tk._easy_draft_model()
  params = SamplingParams(repetition_penalty=3.0)
  prompts = tk._prompts([5, 12, 3])
  plain = plain_decode(model, prompts, max_new_tokens=30, eos_ids=[EOS], params=params).tokens
  tk._clear_compiled()
  monkeypatch.setattr(kangaroo, "_block_seen", lambda seen, Y, params: seen[:, None])
  try:
    out = kangaroo_decode(model, adapter, prompts, max_new_tokens=30, eos_ids=[EOS],
                          params=params, kparams=KangarooParams(1e-6, 4))
  finally:
    tk._clear_compiled()
  assert out.tokens != plain


def _penalized_marginals(model, prompt, params, steps):
  """Exact marginals of generated tokens 1..steps under the penalty, by enumeration."""
  v = model.cfg.vocab_size
  prefixes, weights = [[]], np.ones(1)
  marginals = []
  for _ in range(steps):
    seqs = np.asarray([prompt + p for p in prefixes])
    t = seqs.shape[1]
    logits, _ = model(jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), seqs.shape),
                      kv.init_model_cache(model.cfg, len(seqs), t))
    seen = np.zeros((len(seqs), v), bool)
    np.put_along_axis(seen, seqs, True, axis=1)
    p = np.asarray(probs(penalize(logits[:, -1], jnp.asarray(seen), params), params), np.float64)
    joint = weights[:, None] * p
    marginals.append(joint.sum(0))
    prefixes = [pre + [tok] for pre in prefixes for tok in range(v)]
    weights = joint.reshape(-1)
  return marginals


@pytest.mark.parametrize("params, draft_ids, kp", [
    (SamplingParams(temperature=1.0, repetition_penalty=2.5), None, KangarooParams(1e-6, 2)),
    (SamplingParams(temperature=0.8, top_k=4, repetition_penalty=0.6), np.asarray([0, 2, 3, 5]),
     KangarooParams(1e-6, 2)),
])
def test_kangaroo_sampling_with_penalty_has_the_target_law(params, draft_ids, kp):
  model, adapter = tk._peaky_tiny_model()
  prompt, steps, n = [1, 4, 2], 3, tk.N_SAMPLES
  out = kangaroo_decode(model, adapter, [prompt] * n, max_new_tokens=steps, params=params,
                        kparams=kp, seed=11, draft_ids=draft_ids)
  toks = np.asarray(out.tokens)  # [n, steps]
  exact = _penalized_marginals(model, prompt, params, steps)
  # The penalty must change the law, or this test would not test it.
  plain_law = _penalized_marginals(model, prompt, SamplingParams(params.temperature,
                                                                 params.top_k), steps)
  assert max(np.abs(a - b).sum() for a, b in zip(exact, plain_law)) > 0.2
  v = model.cfg.vocab_size
  tv = max(0.5 * np.abs(np.bincount(toks[:, s], minlength=v) / n - exact[s]).sum()
           for s in range(steps))
  assert tv < tk.TV_BOUND
