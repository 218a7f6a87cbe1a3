"""HF config.json -> ModelConfig: what the forward pass cannot honour is refused."""
import pytest
import transformers

from kangaroo_jax.config import ConfigError, ModelConfig

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def test_mistral_with_a_sliding_window_inside_the_context_is_refused():
  """Attention here is full-causal: past the window it would differ from Mistral's."""
  d = transformers.MistralConfig(**TINY, sliding_window=16).to_dict()
  with pytest.raises(ConfigError, match="sliding_window 16 < max_position_embeddings 256") as e:
    ModelConfig.from_hf_dict(d)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("window", [None, 256, 4096])
def test_mistral_whose_window_covers_the_context_loads(window):
  """A window the decoder can never reach attends like full-causal attention."""
  d = transformers.MistralConfig(**TINY, sliding_window=window).to_dict()
  assert ModelConfig.from_hf_dict(d).max_position_embeddings == 256


def test_qwen2_sliding_window_counts_only_when_enabled():
  """Qwen2 configs carry a sliding_window that transformers ignores unless use_sliding_window."""
  off = transformers.Qwen2Config(**TINY, sliding_window=16, use_sliding_window=False).to_dict()
  assert ModelConfig.from_hf_dict(off).qkv_bias
  on = transformers.Qwen2Config(**TINY, sliding_window=16, use_sliding_window=True).to_dict()
  with pytest.raises(ConfigError, match="sliding_window 16"):
    ModelConfig.from_hf_dict(on)
