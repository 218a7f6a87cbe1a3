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


def write_authors_adapter(folder: str, hidden: int, heads: int, seed: int = 0,
                          rms_norm_eps: float = 1e-5, **config) -> dict:
  """A random adapter folder in the paper's authors' published format; returns its tensors.

  config.json is a LlamaConfig of one layer, pytorch_model.bin holds the norms and the
  attention projections in torch's [out, in] layout (GitHub Equationliu/Kangaroo).
  """
  import json
  import os
  torch.manual_seed(seed)
  state = {"layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(hidden),
           "norm.weight": 1 + 0.1 * torch.randn(hidden)}
  for n in "qkvo":
    state[f"layers.0.self_attn.{n}_proj.weight"] = 0.2 * torch.randn(hidden, hidden)
  os.makedirs(folder, exist_ok=True)
  cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
             num_attention_heads=heads, num_hidden_layers=1, intermediate_size=4 * hidden,
             rms_norm_eps=rms_norm_eps, vocab_size=97) | config
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  torch.save(state, os.path.join(folder, "pytorch_model.bin"))
  return state


def authors_adapter_forward(state: dict, h: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
  """The authors' adapter on layer-l states h [B, T, D] at positions 0..T-1, as published:
  RMSNorm, attention with rotate-half RoPE at base 10000 (their rotary embedding takes no
  base), causal softmax, o_proj, residual, final RMSNorm. Written from the description,
  independent of kangaroo_jax."""
  b, t, d = h.shape
  hd = d // heads

  def rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

  def rotate_half(x):
    return torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)

  x = rms(h, state["layers.0.input_layernorm.weight"])
  q, k, v = (torch.nn.functional.linear(x, state[f"layers.0.self_attn.{n}_proj.weight"])
             .view(b, t, heads, hd).transpose(1, 2) for n in "qkv")  # [B, N, T, Hd]
  inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
  freqs = torch.outer(torch.arange(t).float(), inv_freq)
  emb = torch.cat([freqs, freqs], dim=-1)  # [T, Hd]
  cos, sin = emb.cos(), emb.sin()
  q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
  scores = q @ k.transpose(2, 3) / hd ** 0.5
  scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
  out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
  out = h + torch.nn.functional.linear(out, state["layers.0.self_attn.o_proj.weight"])
  return rms(out, state["norm.weight"])
