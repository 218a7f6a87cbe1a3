"""The Flax model against transformers' PyTorch Llama, and the KV cache against no cache."""
import numpy as np
import jax.numpy as jnp
import pytest
import torch
import transformers

from hf_tiny import VARIANTS, hf_logits, make_hf_model
from kangaroo_jax import cache as kv
from kangaroo_jax import model as M
from kangaroo_jax.config import ModelConfig


def _forward(model, tokens):
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  logits, _ = model(jnp.asarray(tokens), positions, kv.init_model_cache(model.cfg, b, t))
  return np.asarray(logits)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
  hf, cfg, sd = make_hf_model(variant)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))
  np.testing.assert_allclose(_forward(M.from_hf_state_dict(cfg, sd), tokens),
                             hf_logits(hf, tokens), atol=1e-4)


def test_qwen2_bias_matches_transformers():
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=False)
  hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for mod in hf.modules():
      if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
        mod.bias.normal_(0, 0.5)
  cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
  assert cfg.qkv_bias and not cfg.o_bias
  sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  tokens = np.random.RandomState(1).randint(0, 97, (1, 16))
  np.testing.assert_allclose(_forward(M.from_hf_state_dict(cfg, sd), tokens),
                             hf_logits(hf, tokens), atol=1e-4)


def test_layer_ranges_compose():
  """Layers [0, l) then [l, L) equal one pass over [0, L): Kangaroo's split."""
  _, cfg, sd = make_hf_model("gqa_untied", num_layers=4)
  model = M.from_hf_state_dict(cfg, sd)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 10)))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  x = model.embed(tokens)
  full, _ = model.run_layers(x, pos, kv.init_model_cache(cfg, 2, 16))
  cache = kv.init_model_cache(cfg, 2, 16)
  h, cache = model.run_layers(x, pos, cache, 0, 1)
  h, cache = model.run_layers(h, pos, cache, 1, None)
  np.testing.assert_allclose(np.asarray(h), np.asarray(full), atol=1e-5)


def test_cached_decoding_equals_uncached_forward():
  _, cfg, sd = make_hf_model("gqa_untied")
  model = M.from_hf_state_dict(cfg, sd)
  tokens = np.random.RandomState(3).randint(0, 97, (2, 20))
  expected = _forward(model, tokens)
  cache = kv.init_model_cache(cfg, 2, 32)
  # Prefill 12 tokens, then feed the rest one at a time.
  got = []
  logits, cache = model(jnp.asarray(tokens[:, :12]), jnp.broadcast_to(jnp.arange(12), (2, 12)), cache)
  got.append(np.asarray(logits))
  for t in range(12, 20):
    logits, cache = model(jnp.asarray(tokens[:, t:t + 1]), jnp.full((2, 1), t), cache)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=1e-5)


def test_llama3_rope_frequencies_match_transformers():
  _, cfg, _ = make_hf_model("llama3_rope")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_cfg = transformers.LlamaConfig(
      hidden_size=32, num_attention_heads=4, rope_theta=500000.0,
      rope_scaling=VARIANTS["llama3_rope"]["rope_scaling"], max_position_embeddings=256)
  inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
  np.testing.assert_allclose(M.rope_inv_freq(cfg), inv_freq.numpy(), rtol=1e-6)


def test_sequence_forward_equals_the_cached_forward():
  """`run_sequence` (no cache, attention a block of queries at a time, blocks that do not
  divide T) computes what `run_layers` over a fresh cache does."""
  import jax
  from flax import nnx
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  model = M.Llama(cfg, rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 11)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  want, _ = model.run_layers(model.embed(tokens), pos, kv.init_model_cache(cfg, 2, 11))
  q = jax.random.normal(jax.random.key(0), (2, 11, 4, 8))
  k, v = jax.random.normal(jax.random.key(1), (2, 2, 11, 2, 8))
  np.testing.assert_allclose(M.attend_causal(q, k, v, chunk=4), M.attend(q, k, v, pos),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.run_sequence(model.embed(tokens)), want, rtol=1e-5, atol=1e-5)
