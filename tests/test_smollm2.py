"""The embedded SmolLM2-135M-Instruct: parity with transformers and lossless Kangaroo.

These load the real 135M model (about 10-20 s) and are marked slow.
"""
import collections
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from kangaroo_jax import cache as kv  # noqa: E402
from kangaroo_jax.api import encode_prompt, eos_ids, load_adapter_for, load_model  # noqa: E402
from kangaroo_jax.bench.questions import DEFAULT_QUESTIONS  # noqa: E402
from kangaroo_jax.decoding import bucket, plain_decode  # noqa: E402
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode  # noqa: E402
from kangaroo_jax.weights import default_model_path  # noqa: E402

# The first two questions of each Spec-Bench category, shipped with the package: a clean
# clone needs nothing beside the repository.
QUESTIONS = DEFAULT_QUESTIONS


@pytest.fixture(scope="module")
def smol():
  return load_model()


@pytest.fixture(scope="module")
def hf_model():
  path = default_model_path()
  torch.set_num_threads(2)
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def test_logits_match_transformers_on_the_same_gguf(smol, hf_model):
  model, tok = smol
  ids = encode_prompt(tok, "Write a short poem about the ocean.")
  with torch.no_grad():
    want = hf_model(torch.tensor([ids])).logits.numpy()
  t = len(ids)
  got, _ = model(jnp.asarray([ids]), jnp.arange(t)[None], kv.init_model_cache(model.cfg, 1, t))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=1e-3)
  assert (np.asarray(got).argmax(-1) == want.argmax(-1)).all()


def test_64_token_greedy_continuation_equals_transformers_generate(smol, hf_model):
  model, tok = smol
  ids = encode_prompt(tok, "Explain why the sky is blue in a few sentences.")
  with torch.no_grad():
    want = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                             min_new_tokens=64)[0, len(ids):].tolist()
  assert plain_decode(model, [ids], max_new_tokens=64).tokens[0] == want


def _spec_bench_prompts():
  """Two first turns per category; one each for the long-context ones (rag, summarization)."""
  by_cat = collections.defaultdict(list)
  with open(QUESTIONS) as f:
    for line in f:
      q = json.loads(line)
      n = 1 if q["category"] in ("rag", "summarization") else 2
      if len(by_cat[q["category"]]) < n:
        by_cat[q["category"]].append(q["turns"][0])
  return by_cat


def test_kangaroo_greedy_identical_on_spec_bench(smol):
  """24 prompts over all 13 categories: the 22 short ones (64-256 tokens) in one batch, the
  two long ones (rag, summarization: 1024-token bucket) one at a time, so few loops
  compile. The token limit falls inside rounds, and the short answers (qa, translation)
  end on EOS mid-round."""
  model, tok = smol
  by_cat = _spec_bench_prompts()
  assert len(by_cat) == 13
  prompts = [encode_prompt(tok, q) for qs in by_cat.values() for q in qs]
  assert len(prompts) >= 20
  eos = eos_ids(model, tok)
  adapter, draft_ids = load_adapter_for(model)
  short = [p for p in prompts if bucket(len(p)) <= 256]
  groups = [short] + [[p] for p in prompts if bucket(len(p)) > 256]
  assert len(short) >= 20 and len(groups) >= 3
  plain, spec = [], []
  for group in groups:
    plain += plain_decode(model, group, max_new_tokens=40, eos_ids=eos).tokens
    spec += kangaroo_decode(model, adapter, group, max_new_tokens=40, eos_ids=eos,
                            kparams=KangarooParams(0.6, 6), draft_ids=draft_ids).tokens
  mismatched = [i for i, (a, b) in enumerate(zip(plain, spec)) if a != b]
  assert not mismatched, f"prompts {mismatched} differ from plain decoding"
  assert sum(t[-1] in eos and len(t) < 40 for t in plain) >= 1  # stopped by EOS
  assert sum(len(t) == 40 for t in plain) >= 1  # stopped by the token limit


def test_prompt_lookup_rounds_identical_on_spec_bench(smol):
  """The tuned CPU setting with prompt lookup, one prompt at a time, on a short prompt whose
  answer copies from the question (extraction) and a long one (RAG, a 1024-token bucket):
  lookup rounds run and the text is plain's."""
  model, tok = smol
  by_cat = _spec_bench_prompts()
  eos = eos_ids(model, tok)
  adapter, draft_ids = load_adapter_for(model)
  kp = KangarooParams(0.6, 2, send_unconfident=False, lookup=4)
  looked_up = 0
  for cat in ("extraction", "rag"):
    ids = encode_prompt(tok, by_cat[cat][0])
    want = plain_decode(model, [ids], max_new_tokens=48, eos_ids=eos).tokens[0]
    out = kangaroo_decode(model, adapter, [ids], max_new_tokens=48, eos_ids=eos, kparams=kp,
                          draft_ids=draft_ids)
    assert out.tokens[0] == want, f"{cat}: differs from plain decoding"
    looked_up += out.stats["lookup_rounds"]
  assert looked_up > 0


def test_kangaroo_greedy_identical_with_bfloat16_weights():
  """bfloat16 weights, float32 activations (the lossless mode): three Spec-Bench prompts,
  48 tokens, each decoded alone as `decode.py --compare` does (all three in the 64-token
  bucket: one compiled loop each way)."""
  model, tok = load_model(dtype="bfloat16")
  eos = eos_ids(model, tok)
  adapter, draft_ids = load_adapter_for(model)
  by_cat = _spec_bench_prompts()
  for cat in ("writing", "roleplay", "coding"):
    ids = encode_prompt(tok, by_cat[cat][0])
    plain = plain_decode(model, [ids], max_new_tokens=48, eos_ids=eos).tokens
    spec = kangaroo_decode(model, adapter, [ids], max_new_tokens=48, eos_ids=eos,
                           kparams=KangarooParams(0.6, 6), draft_ids=draft_ids).tokens
    assert spec == plain, f"{cat}: differs from plain decoding"


def test_bfloat16_activations_identical_with_fixed_width_steps():
  """bfloat16 activations round every layer's output: with single-row steps (a CPU's
  default) greedy Kangaroo then differs from plain decoding (the control, "writing"); with
  fixed-width steps (the accelerators' default, `--step-width 8`) it is identical by
  construction. Three Spec-Bench prompts, 96 tokens, the paper's eta 0.6 and gamma 6."""
  model, tok = load_model(dtype="bfloat16", activations="bfloat16", step_width=8)
  eos = eos_ids(model, tok)
  adapter, draft_ids = load_adapter_for(model)
  by_cat = _spec_bench_prompts()

  def both(cat):
    ids = encode_prompt(tok, by_cat[cat][0])
    plain = plain_decode(model, [ids], max_new_tokens=96, eos_ids=eos).tokens
    spec = kangaroo_decode(model, adapter, [ids], max_new_tokens=96, eos_ids=eos,
                           kparams=KangarooParams(0.6, 6), draft_ids=draft_ids).tokens
    return plain, spec

  for cat in ("writing", "roleplay", "coding"):
    plain, spec = both(cat)
    assert spec == plain, f"{cat}: differs from plain decoding with fixed-width steps"
  model.step_width = 1
  plain, spec = both("writing")
  assert spec != plain, "single-row steps in bfloat16 activations: the control must differ"
