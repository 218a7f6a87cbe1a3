"""Streaming runs in the caller's thread, in steps, and equals the one-call decode."""
import jax
import numpy as np
import pytest

from hf_tiny import make_hf_model
from kangaroo_jax import model as M
from kangaroo_jax.adapter import init_adapter
from kangaroo_jax.decoding import plain_decode, plain_stream
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode, kangaroo_stream
from kangaroo_jax.sampling import SamplingParams

import test_kangaroo as tk

EOS = 1


@pytest.fixture(scope="module")
def tiny():
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  return M.from_hf_state_dict(cfg, sd)


def _collect(steps):
  """Concatenates the streamed tokens per sequence; returns (streamed, DecodeResult)."""
  streamed = None
  while True:
    try:
      tokens, counts = next(steps)
    except StopIteration as stop:
      return streamed, stop.value
    streamed = streamed or [[] for _ in counts]
    for i, c in enumerate(counts):
      streamed[i] += tokens[i, :c].tolist()


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_k=5),
                                    SamplingParams(repetition_penalty=1.4)])
def test_plain_stream_equals_plain_decode(tiny, params):
  prompts = tk._prompts([4, 11])
  want = plain_decode(tiny, prompts, max_new_tokens=20, eos_ids=[EOS], params=params, seed=3)
  streamed, result = _collect(plain_stream(tiny, prompts, max_new_tokens=20, eos_ids=[EOS],
                                           params=params, seed=3))
  assert streamed == result.tokens == want.tokens
  assert result.stats["steps"] == want.stats["steps"]


@pytest.mark.parametrize("params, kp", [(SamplingParams(), KangarooParams(1e-6, 4)),
                                        (SamplingParams(temperature=0.8), KangarooParams(0.3, 3)),
                                        (SamplingParams(repetition_penalty=1.3),
                                         KangarooParams(0.2, 4, False))])
def test_kangaroo_stream_equals_kangaroo_decode(params, kp):
  model, adapter = tk._easy_draft_model()
  prompts = tk._prompts([5, 12, 3])
  kw = dict(max_new_tokens=25, eos_ids=[EOS], params=params, kparams=kp, seed=2)
  want = kangaroo_decode(model, adapter, prompts, **kw)
  streamed, result = _collect(kangaroo_stream(model, adapter, prompts, **kw))
  assert streamed == result.tokens == want.tokens
  for key in ("rounds", "steps", "draft_steps", "drafts_verified"):
    assert result.stats[key] == want.stats[key], key


def test_closing_a_stream_early_stops_decoding(tiny):
  steps = plain_stream(tiny, tk._prompts([4]), max_new_tokens=50)
  next(steps), next(steps)
  steps.close()  # no thread or callback is left running: nothing else to wait for
  out = plain_decode(tiny, tk._prompts([4]), max_new_tokens=5)
  assert len(out.tokens[0]) == 5


def test_the_loops_have_no_host_callbacks(tiny):
  """JAX does not store computations with host callbacks in its persistent compilation
  cache, so none of the decode loops may call back into Python."""
  import jax.numpy as jnp
  from flax import nnx
  from kangaroo_jax import decoding, kangaroo
  graphdef, state = nnx.split(tiny)
  agraphdef, astate = nnx.split(init_adapter(tiny.cfg, 2))
  tokens, lens, eos = jnp.zeros((1, 32), jnp.int32), jnp.asarray([5]), jnp.asarray([EOS])
  limit, params = jnp.int32(16), SamplingParams()
  static = dict(params=params, capacity=16)
  kstatic = dict(static, gamma=2, send_unconfident=True)
  st = jax.eval_shape(lambda: decoding._plain_stream_start(
      graphdef, state, tokens, lens, jax.random.key(0), eos, limit, **static))
  kst = jax.eval_shape(lambda: kangaroo._kangaroo_stream_start(
      graphdef, state, agraphdef, astate, tokens, lens, jax.random.key(0), eos, limit, **kstatic))
  lowered = [
      decoding._plain_loop.lower(graphdef, state, tokens, lens, jax.random.key(0), eos, limit,
                                 **static),
      decoding._plain_stream_run.lower(graphdef, state, st, eos, jnp.int32(2), params=params),
      kangaroo._kangaroo_loop.lower(graphdef, state, agraphdef, astate, None, tokens, lens,
                                    jax.random.key(0), eos, jnp.float32(0.6), limit, **kstatic),
      kangaroo._kangaroo_stream_rounds.lower(graphdef, state, agraphdef, astate, None, kst, eos,
                                             jnp.float32(0.6), jnp.int32(2), **kstatic)]
  for low in lowered:
    assert "callback" not in low.as_text()


def test_compile_time_is_kept_out_of_the_decoding_time(tiny):
  """The call that compiles reports its compilation apart (stats["compile_seconds"]), so
  its decoding time and tokens/s are those of the decoding alone; the same shapes again
  compile nothing, streamed or not. Sampling settings no other test uses make every loop
  a new program."""
  model, adapter = tk._easy_draft_model()
  prompts = tk._prompts([6])
  kw = dict(max_new_tokens=40, params=SamplingParams(temperature=0.55, top_k=7), seed=1)
  kp = KangarooParams(0.3, 3)
  calls = {"plain_decode": lambda: plain_decode(tiny, prompts, **kw),
           "plain_stream": lambda: _collect(plain_stream(tiny, prompts, **kw))[1],
           "kangaroo_decode": lambda: kangaroo_decode(model, adapter, prompts, kparams=kp, **kw),
           "kangaroo_stream": lambda: _collect(kangaroo_stream(model, adapter, prompts,
                                                               kparams=kp, **kw))[1]}
  compiled = {}
  for name, call in calls.items():
    first, again = call(), call()
    assert first.tokens == again.tokens, name
    if name.endswith("decode"):
      compiled[name.split("_")[0]] = first.stats["compile_seconds"]
      # Compiling a loop takes seconds; decoding 40 tokens of this model, milliseconds.
      assert first.stats["seconds"] < first.stats["compile_seconds"], (name, first.stats)
    else:  # streaming runs the same two programs (prefill, loop) a step per call
      assert first.stats["compile_seconds"] < 0.2 * compiled[name.split("_")[0]], name
    assert again.stats["compile_seconds"] < 0.2 * compiled[name.split("_")[0]], name
    for r in (first, again):  # the first token is the prompt pass's: not in tokens/s
      assert r.stats["tokens_per_second"] == pytest.approx(
          (r.stats["new_tokens"] - 1) / r.stats["seconds"]), name


class _SlowPrefill:
  """A jitted prefill that takes `delay` seconds longer (compiles as the real one)."""

  def __init__(self, jitted, delay: float):
    self.jitted, self.delay, self.lower = jitted, delay, jitted.lower

  def __call__(self, *args, **kwargs):
    import time
    time.sleep(self.delay)
    return self.jitted(*args, **kwargs)


@pytest.mark.parametrize("mode", ["plain", "kangaroo"])
@pytest.mark.parametrize("stream", [False, True])
def test_tokens_per_second_excludes_the_prompt_pass(tiny, monkeypatch, mode, stream):
  """A long prompt's pass (here made 1.5 s slower) is reported apart, as prefill_seconds;
  tokens/s and `seconds` are the steps after the first token; total_seconds is the whole
  request (the bench's request column)."""
  from kangaroo_jax import decoding, kangaroo
  model, adapter = tk._easy_draft_model()
  prompts = tk._prompts([200])  # 256 positions: a long prompt for this model
  kw = dict(max_new_tokens=12, seed=1)
  if mode == "plain":
    module, name = decoding, "_plain_stream_start"
    run = (lambda: _collect(plain_stream(model, prompts, **kw))[1]) if stream else (
        lambda: plain_decode(model, prompts, **kw))
  else:
    module, name, kp = kangaroo, "_kangaroo_stream_start", KangarooParams(0.3, 3)
    run = (lambda: _collect(kangaroo_stream(model, adapter, prompts, kparams=kp, **kw))[1]) if (
        stream) else (lambda: kangaroo_decode(model, adapter, prompts, kparams=kp, **kw))
  run()  # compiled: the timed call below measures decoding only
  monkeypatch.setattr(module, name, _SlowPrefill(getattr(module, name), 1.5))
  s = run().stats
  assert s["prefill_seconds"] >= 1.5 and s["seconds"] < 1.5, s
  assert s["decoded_tokens"] == s["new_tokens"] - 1 == 11
  assert s["tokens_per_second"] == pytest.approx(s["decoded_tokens"] / s["seconds"])
  assert s["total_seconds"] == pytest.approx(s["prefill_seconds"] + s["seconds"])
  assert s["request_tokens_per_second"] == pytest.approx(s["new_tokens"] / s["total_seconds"])
