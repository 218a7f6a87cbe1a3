"""Tiny random transformers Llama models, the PyTorch reference for parity tests."""
import numpy as np
import torch
import transformers

from kangaroo_jax.config import ModelConfig

VARIANTS = {
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
    "qkv_bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
}


def make_hf_model(variant: str, seed: int = 0, num_layers: int = 3):
  """A tiny random LlamaForCausalLM and its state dict as float32 numpy arrays."""
  torch.manual_seed(seed)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
      max_position_embeddings=256, rms_norm_eps=1e-5, **VARIANTS[variant])
  hf_cfg.eos_token_id = 1
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # biases start at zero; make them matter
    for mod in model.modules():
      if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
        mod.bias.normal_(0, 0.5)
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
  return model, cfg, sd


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()
