"""The paper's authors' adapter folder: read as published, converted, and checked against
an independent torch implementation of their forward pass."""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_tiny import authors_adapter_forward, make_hf_model, write_authors_adapter
from kangaroo_jax import authors_adapter
from kangaroo_jax.adapter import AdapterError, load_adapter
from kangaroo_jax.model import from_hf_state_dict

EXIT = 2
HEADS = 4
EPS = 1e-5  # not LlamaConfig's default: the folder's eps must be the one used


@pytest.fixture(scope="module")
def target():
  # Llama-3 RoPE (theta 500000, scaled): the adapter must still rotate at 10000.
  return make_hf_model("llama3_rope", seed=3, num_layers=4)


def draft_logits(model, adapter, tokens: np.ndarray) -> np.ndarray:
  b, t = tokens.shape
  h = model.run_fresh(jnp.asarray(tokens), end=adapter.acfg.exit_layer)  # [B, T, D]
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  out, _ = adapter(h, positions, adapter.init_cache(b, t))
  return np.asarray(model.project(out))  # [B, T, V]


def reference_logits(hf_model, state, tokens: np.ndarray, exit_layer: int) -> np.ndarray:
  with torch.no_grad():
    h = hf_model(torch.tensor(tokens), output_hidden_states=True).hidden_states[exit_layer]
    out = authors_adapter_forward(state, h, HEADS, EPS)
    return (out @ hf_model.lm_head.weight.T).numpy()


def test_folder_gives_the_authors_draft_logits(target, tmp_path):
  hf_model, cfg, sd = target
  folder = str(tmp_path / "adapter")
  state = write_authors_adapter(folder, cfg.hidden_size, HEADS, rms_norm_eps=EPS)
  model = from_hf_state_dict(cfg, sd)
  tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 11))
  for exit_layer in (EXIT, 1):  # the folder does not store it: the caller's choice
    adapter, ids = load_adapter(folder, cfg, exit_layer=exit_layer)
    assert ids is None and adapter.acfg.exit_layer == exit_layer
    assert adapter.acfg.rope_theta == 10000.0 and adapter.acfg.rms_norm_eps == EPS
    got, want = draft_logits(model, adapter, tokens), reference_logits(hf_model, state, tokens,
                                                                        exit_layer)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
  # The default exit layer is the authors' 2.
  assert load_adapter(folder, cfg)[0].acfg.exit_layer == 2


def test_conversion_keeps_the_logits_and_stores_the_exit_layer(target, tmp_path):
  hf_model, cfg, sd = target
  folder = str(tmp_path / "adapter")
  write_authors_adapter(folder, cfg.hidden_size, HEADS, rms_norm_eps=EPS)
  out = str(tmp_path / "converted.safetensors")
  assert authors_adapter.main([folder, out, "--exit-layer", "3"]) == 0
  converted, _ = load_adapter(out, cfg)
  direct, _ = load_adapter(folder, cfg, exit_layer=3)
  assert converted.acfg == direct.acfg and converted.acfg.exit_layer == 3
  model = from_hf_state_dict(cfg, sd)
  tokens = np.arange(2, 9)[None]
  np.testing.assert_array_equal(draft_logits(model, converted, tokens),
                                draft_logits(model, direct, tokens))


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.pop("layers.0.self_attn.k_proj.weight"), "lacks the tensor 'layers.0.self_attn.k_proj.weight'"),
    (lambda s: s.update(**{"norm.weight": torch.ones(7)}), "norm.weight has shape (7,)"),
    (lambda s: s.update(**{"layers.0.mlp.up_proj.weight": torch.ones(2, 2)}),
     "layer tensors the adapter does not use: layers.0.mlp.up_proj.weight"),
])
def test_damaged_folder_is_one_clear_error(target, tmp_path, change, fragment):
  _, cfg, _ = target
  folder = str(tmp_path / "adapter")
  state = write_authors_adapter(folder, cfg.hidden_size, HEADS)
  change(state)
  torch.save(state, os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(AdapterError, match="^[^\n]*$") as e:
    load_adapter(folder, cfg)
  assert fragment in str(e.value)


def test_folder_errors_in_the_users_words(target, tmp_path, monkeypatch):
  _, cfg, _ = target
  folder = str(tmp_path / "adapter")
  write_authors_adapter(folder, cfg.hidden_size, HEADS, num_hidden_layers=32)
  with pytest.raises(AdapterError, match="describes 32 layers.*pass it as --model"):
    load_adapter(folder, cfg)
  write_authors_adapter(folder, 2 * cfg.hidden_size, HEADS)
  with pytest.raises(AdapterError, match="hidden size 64 != model hidden size 32"):
    load_adapter(folder, cfg)
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(AdapterError, match="has no config.json"):
    load_adapter(folder, cfg)
  write_authors_adapter(folder, cfg.hidden_size, HEADS)
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(AdapterError, match="needs torch: `pip install torch`"):
    load_adapter(folder, cfg)


def test_folder_with_safetensors_needs_no_torch(target, tmp_path, monkeypatch):
  from safetensors.numpy import save_file
  hf_model, cfg, sd = target
  folder = str(tmp_path / "adapter")
  state = write_authors_adapter(folder, cfg.hidden_size, HEADS, rms_norm_eps=EPS)
  os.remove(os.path.join(folder, "pytorch_model.bin"))
  save_file({k: v.numpy() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
  tokens = np.arange(3, 10)[None]
  want = reference_logits(hf_model, state, tokens, EXIT)
  monkeypatch.setitem(sys.modules, "torch", None)
  adapter, _ = load_adapter(folder, cfg)
  np.testing.assert_allclose(draft_logits(from_hf_state_dict(cfg, sd), adapter, tokens), want,
                             rtol=1e-5, atol=2e-5)


def test_converted_file_without_rope_theta_reads_in_older_format(target, tmp_path):
  """Our own adapters keep files without the new field (older versions read them)."""
  from safetensors import safe_open
  from kangaroo_jax.adapter import init_adapter, save_adapter
  _, cfg, _ = target
  path = str(tmp_path / "a.safetensors")
  save_adapter(path, init_adapter(cfg, EXIT))
  with safe_open(path, framework="numpy") as f:
    assert "rope_theta" not in json.loads(f.metadata()["config"])
