"""train.py: mistakes in --config and its overrides are one `error:` line and status 2."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join("configs", "tiny.py")


def _train(*args):
  return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("args, expected", [
    (("--config", "configs/nope.py"), "error: no such config file: configs/nope.py"),
    (("--config=configs/nope.py", "--config.steps=3"),
     "error: no such config file: configs/nope.py"),
    (("--config", TINY, "--config.stepz=5"),
     f"error: --config.stepz: {TINY} has no field 'stepz' (did you mean --config.steps?)"),
    (("--config", TINY, "--config.data.pathz=x"),
     f"error: --config.data.pathz: {TINY} has no field 'pathz' (did you mean --config.data.path?)"),
    (("--config", TINY, "--config.steps=abc"), "error: --config.steps=abc: 'abc' is not an integer"),
    (("--config", TINY, "--config.lr=fast"), "error: --config.lr=fast: 'fast' is not a number"),
    (("--config.steps=5", "--config", TINY),
     "error: --config.steps=5 comes before --config FILE: put --config first"),
    ((), "error: --config FILE is required"),
])
def test_config_mistakes_are_one_line(args, expected):
  r = _train(*args)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert lines[0].startswith(expected), lines[0]
  assert "Traceback" not in r.stderr and not r.stdout


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                                        if f.endswith(".py") and not f.startswith("_")))
def test_every_shipped_config_loads_and_passes_the_checks(name):
  """Each configs/*.py builds a config that `check_config` accepts once the user gives the
  paths it asks for (the 7B/13B data), and any adapter file it starts from exists (the
  recipes name the shipped one)."""
  import importlib
  from kangaroo_jax.training import ConfigError, check_config
  c = importlib.import_module(f"configs.{name}").get_config()
  try:
    check_config(c)
  except ConfigError as e:
    assert "config.data.path is required" in str(e), e
    c.data.path = "sharegpt.json"
    check_config(c)
  assert not c.get("init_from") or os.path.isfile(c.init_from), c.init_from
