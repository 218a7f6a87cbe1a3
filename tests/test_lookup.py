"""Prompt-lookup drafting: the n-gram search, and Kangaroo rounds that verify its proposals
(greedy identical to plain and to a cache-free reference, sampling the target's law,
batches, settings refused)."""
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import make_hf_model
from kangaroo_jax import lookup
from kangaroo_jax import model as M
from kangaroo_jax.adapter import init_adapter
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
from kangaroo_jax.sampling import SamplingParams
from test_kangaroo import (N_SAMPLES, TV_BOUND, _easy_draft_model, _empirical_tv,
                           _peaky_tiny_model, _prompts, _reference_kangaroo, _scale)


def _python_propose(seq, ngram, width):
  """The latest earlier occurrence of seq's last `ngram` tokens; what followed it."""
  if len(seq) < ngram + 1:
    return []
  tail = seq[-ngram:]
  for j in range(len(seq) - ngram - 1, -1, -1):
    if seq[j:j + ngram] == tail:
      return seq[j + ngram:j + ngram + width]
  return []


def test_propose_matches_a_plain_search():
  rs = np.random.RandomState(0)
  size, width = 40, 5
  for ngram in (1, 2, 3):
    seqs = [rs.randint(0, 4, rs.randint(1, size)).tolist() for _ in range(64)]
    history = np.full((len(seqs), size), 7, np.int32)  # 7: stale slots, never matched
    for i, s in enumerate(seqs):
      history[i, :len(s)] = s
    n = jnp.asarray([len(s) - 1 for s in seqs])  # the pending token is the last one
    proposal, count = lookup.propose(jnp.asarray(history), n, ngram, width)
    for i, s in enumerate(seqs):
      want = _python_propose(s, ngram, width)
      assert int(count[i]) == len(want)
      assert np.asarray(proposal[i, :len(want)]).tolist() == want


def test_record_writes_only_the_counted_tokens():
  history = jnp.zeros((2, 8), jnp.int32)
  out = lookup.record(history, jnp.asarray([2, 6]), jnp.asarray([[5, 6, 7], [8, 9, 4]]),
                      jnp.asarray([2, 3]))
  assert np.asarray(out).tolist() == [[0, 0, 5, 6, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 8, 9]]


def _repetitive_prompts(seed=0):
  """Prompts that repeat themselves, so the output often continues a copy."""
  rs = np.random.RandomState(seed)
  phrase = rs.randint(2, 97, 6).tolist()
  return [phrase * 3, rs.randint(2, 97, 4).tolist() + phrase * 2, phrase + [5, 9] + phrase]


@pytest.mark.parametrize("eta, gamma, send, width", [(0.6, 2, False, 8), (0.3, 6, True, 3)])
def test_greedy_identical_to_plain_with_lookup(eta, gamma, send, width):
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  model = M.from_hf_state_dict(cfg, sd)
  adapter = init_adapter(cfg, 2)
  prompts = _repetitive_prompts() + _prompts([5])
  plain = plain_decode(model, prompts, max_new_tokens=40, eos_ids=[1]).tokens
  kp = KangarooParams(eta, gamma, send, lookup=width, lookup_ngram=2)
  # A batch mixes sequences with and without a proposal: a lookup round needs all of them.
  assert kangaroo_decode(model, adapter, prompts, max_new_tokens=40, eos_ids=[1],
                         kparams=kp).tokens == plain
  for prompt, want in zip(prompts, plain):
    single = kangaroo_decode(model, adapter, [prompt], max_new_tokens=40, eos_ids=[1],
                             kparams=kp)
    assert single.tokens[0] == want
  first = kangaroo_decode(model, adapter, prompts[:1], max_new_tokens=40, eos_ids=[1], kparams=kp)
  assert first.stats["lookup_rounds"] > 0  # the lookup path ran


def _reference_with_lookup(model, adapter, prompt, max_new, eta, gamma, width, ngram):
  """`_reference_kangaroo` (no caches at all) with prompt-lookup rounds (the unconfident
  draft is verified, as KangarooParams' default)."""
  def round_drafts(ctx, draft_probs):
    proposal = _python_propose(ctx, ngram, width)
    if proposal:
      return proposal, 0
    d, steps = [], 0
    for _ in range(gamma):
      q = draft_probs(ctx + d)
      steps += 1
      d.append(int(np.argmax(q)))
      if q.max() < eta:
        break
    return d, steps

  return _reference_kangaroo(model, adapter, prompt, max_new, eta, gamma, [],
                             drafts=round_drafts)


def test_matches_cache_free_reference_with_lookup():
  """Same tokens, rounds and draft steps as a cache-free reference that does the same
  lookups: a lookup round must leave the shallow and adapter caches as drafting would
  (a later draft's confidence, and so the draft steps, would differ otherwise)."""
  model, adapter = _easy_draft_model()
  _scale(adapter.attn.o, 30.0)  # attention to earlier slots moves the drafts: a bad slot shows
  for seed in (0, 1):
    prompt = _repetitive_prompts(seed)[1]
    gen, rounds, drafts = _reference_with_lookup(model, adapter, prompt, 30, 0.2, 3, 4, 2)
    out = kangaroo_decode(model, adapter, [prompt], max_new_tokens=30,
                          kparams=KangarooParams(0.2, 3, lookup=4, lookup_ngram=2))
    assert out.tokens[0] == gen
    assert (out.stats["rounds"], out.stats["draft_steps"]) == (rounds, drafts)
    assert 0 < out.stats["lookup_rounds"] < rounds  # both kinds of round ran


def test_sampling_with_lookup_keeps_the_target_law():
  """Every round a lookup round (1-gram, every token in the prompt): a proposal is a
  one-hot draft, accepted with probability p(token); the output law is the target's."""
  model, adapter = _peaky_tiny_model()
  kp = KangarooParams(1e-6, 2, lookup=2, lookup_ngram=1)
  tv = _empirical_tv(model, adapter, [1, 4, 2, 0, 3, 5], SamplingParams(temperature=1.0), kp,
                     N_SAMPLES)
  assert tv < TV_BOUND


@pytest.mark.parametrize("kwargs, problem", [
    (dict(lookup=-1), "--lookup"), (dict(lookup=4, lookup_ngram=0), "lookup_ngram"),
    (dict(lookup=4, tree_nodes=4), "chain drafting only")])
def test_bad_lookup_settings_are_refused(kwargs, problem):
  with pytest.raises(ValueError, match=problem):
    KangarooParams(**kwargs)
