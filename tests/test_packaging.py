"""The package declares version ranges; requirements.txt pins versions inside them."""
import os
import tomllib

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _name(req: Requirement) -> str:
  return req.name.lower().replace("_", "-")


def test_every_pin_lies_in_the_packages_range():
  """`pip install -e .` must keep an accelerator's own jax where it fits (ranges), while
  CI installs the exact pins: the pins must satisfy the ranges, package for package."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    ranges = {_name(r): r for r in map(Requirement, tomllib.load(f)["project"]["dependencies"])}
  pins = {}
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line and not line.startswith("-"):
        pins[_name(Requirement(line))] = Requirement(line)
  assert set(pins) == set(ranges)
  for name, pin in pins.items():
    exact = [s.version for s in pin.specifier if s.operator == "=="]
    assert all(ranges[name].specifier.contains(v) for v in exact), (name, exact)
    assert not any(s.operator == "==" for s in ranges[name].specifier), f"{name} pinned exactly"
