"""Model settings: one frozen dataclass for every Llama-family checkpoint.

`ModelConfig` is built from a Hugging Face `config.json` dict (`from_hf_dict`) or from
GGUF metadata (see `weights.py`). Everything the forward pass needs is here, nothing else.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

# The checkpoint families the decoder runs: Hugging Face model_type -> architecture. The
# one list; a config.json without "architectures" is read by its model_type.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES.values())


class ConfigError(ValueError):
  """A model configuration this project cannot run; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency scaling ("rope_type": "llama3")."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False  # Llama's `attention_bias` covers o_proj too; Qwen2's q/k/v bias does not
  rope_scaling: Optional[RopeScaling] = None
  max_position_embeddings: int = 4096
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dictionary."""
    archs = d.get("architectures") or [MODEL_TYPES.get(d.get("model_type", "llama"),
                                                       str(d.get("model_type")))]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(f"unsupported architecture {archs[0]!r}; supported: "
                        + ", ".join(SUPPORTED_ARCHITECTURES))
    try:
      heads = int(d["num_attention_heads"])
      hidden = int(d["hidden_size"])
      rope_scaling = None
      rs = d.get("rope_scaling") or d.get("rope_parameters")
      if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        rope_scaling = RopeScaling(
            float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
            int(rs["original_max_position_embeddings"]))
      elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ConfigError(f"unsupported rope_scaling type {rs.get('rope_type', rs.get('type'))!r}")
      theta = d.get("rope_theta") or (rs or {}).get("rope_theta") or 10000.0
      _refuse_sliding_window(d, archs[0])
      eos = d.get("eos_token_id")
      eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
      return cls(
          vocab_size=int(d["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(d["intermediate_size"]),
          num_layers=int(d["num_hidden_layers"]),
          num_heads=heads,
          num_kv_heads=int(d.get("num_key_value_heads") or heads),
          head_dim=int(d.get("head_dim") or hidden // heads),
          rope_theta=float(theta),
          rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
          tie_embeddings=bool(d.get("tie_word_embeddings", False)),
          qkv_bias=bool(d.get("attention_bias", False)) or archs[0] == "Qwen2ForCausalLM",
          o_bias=bool(d.get("attention_bias", False)),
          rope_scaling=rope_scaling,
          max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
          bos_token_id=d.get("bos_token_id"),
          eos_token_ids=eos,
      )
    except KeyError as e:
      raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None


def _refuse_sliding_window(d: dict[str, Any], arch: str) -> None:
  """Raises ConfigError if the checkpoint's attention window is shorter than its context.

  The decoder attends full-causally; a sliding window that decoding can reach (Mistral
  v0.1's 4096 of 32768 positions) would make later tokens differ from the reference.
  Qwen2 configs carry a window that transformers uses only with `use_sliding_window`.
  """
  window = d.get("sliding_window")
  if arch == "Qwen2ForCausalLM" and not d.get("use_sliding_window", False):
    window = None
  max_positions = int(d.get("max_position_embeddings", 4096))
  if window is not None and int(window) < max_positions:
    raise ConfigError(f"sliding-window attention is not supported: sliding_window {window} < "
                      f"max_position_embeddings {max_positions}")
