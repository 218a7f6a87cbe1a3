"""train.py: Ctrl-C prints one line saying where training stopped and that rerunning resumes."""
import importlib.util
import os
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train_cli():
  """train.py imported once (it defines absl flags, which may be defined only once)."""
  spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _interrupt_at(step_to_stop: int):
  """A stand-in for training.train whose loop is interrupted at a step."""
  def train(c):
    for step in range(0, c.steps):
      if step == step_to_stop:
        raise KeyboardInterrupt
  return train


def test_message_names_the_step_and_the_checkpoint(train_cli, tmp_path):
  for name in ("100", "200", "tmp_garbage"):
    os.makedirs(tmp_path / "checkpoints" / name)
  config = types.SimpleNamespace(workdir=str(tmp_path), steps=800)
  train = _interrupt_at(237)
  try:
    train(config)
  except KeyboardInterrupt as e:
    line = train_cli.interrupted_message(e, train, config)
  assert "\n" not in line
  assert "interrupted at step 237 of 800" in line
  assert "last checkpoint is step 200" in line and "rerun the same command to resume" in line


def test_message_without_a_checkpoint_or_a_step(train_cli, tmp_path):
  config = types.SimpleNamespace(workdir=str(tmp_path), steps=10)
  try:
    raise KeyboardInterrupt
  except KeyboardInterrupt as e:
    line = train_cli.interrupted_message(e, _interrupt_at(3), config)
  assert line.startswith("interrupted before the first training step")
  assert "starts over" in line
