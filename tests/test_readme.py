"""Every ```python block of README.md runs, in order, in one namespace, so docs and code
cannot drift. Token budgets are capped to keep the 135M model's run short."""
import functools
import os
import re

import pytest

import kangaroo_jax
from kangaroo_jax import api

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MAX_NEW_TOKENS = 6


def python_blocks(text: str) -> list[str]:
  """The bodies of the ```python fenced blocks of a markdown text."""
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
  with open(README) as f:
    assert python_blocks(f.read())


def _capped(fn):
  @functools.wraps(fn)
  def call(*args, **kwargs):
    kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens", MAX_NEW_TOKENS), MAX_NEW_TOKENS)
    return fn(*args, **kwargs)
  return call


@pytest.mark.slow
def test_readme_python_blocks_run(monkeypatch, capsys):
  for name in ("generate", "stream"):
    capped = _capped(getattr(api, name))
    monkeypatch.setattr(kangaroo_jax, name, capped)  # what `from kangaroo_jax import` reads
    monkeypatch.setattr(api, name, capped)
  with open(README) as f:
    blocks = python_blocks(f.read())
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
  printed = capsys.readouterr().out
  assert printed.strip()
  # The batch example printed one text per prompt: the loop runs over results.
  outs = namespace.get("outs")
  assert outs is not None and len(outs) == 2 and [o.text for o in outs] == outs.texts
