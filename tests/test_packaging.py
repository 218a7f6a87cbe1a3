"""The package declares version ranges; requirements.txt pins versions inside them; the
ranges admit the jax/flax pairs accelerator images ship, and each extra resolves."""
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from kangaroo_jax import versions

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


def _ranges(extra: str = "") -> dict[str, Requirement]:
  """pyproject's requirements by name: the dependencies, or one extra's."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
  return {_name(r): r for r in map(Requirement, reqs)}


# (jax, flax) pairs accelerator images ship: the H200 image's (the project's GPU runs) and the
# newest releases; and this machine's CPU pins.
WORKING_PAIRS = [("0.11.2", "0.12.10"), ("0.12.0.1", "0.12.12"), ("0.10.2", "0.12.8")]
# flax 0.12.8 fails inside `import flax` with jax 0.11.x (seen on the H200 image).
BROKEN_PAIRS = [("0.11.2", "0.12.8"), ("0.11.0", "0.12.8"), ("0.12.0.1", "0.12.9")]
ACCELERATOR_EXTRAS = {"cuda12": "jax-cuda12-plugin", "cuda13": "jax-cuda13-plugin",
                      "tpu": "libtpu"}


def _accepted(jax_version: str, flax_version: str) -> bool:
  """Whether the package takes this pair: inside pyproject's ranges and past the import check."""
  ranges = _ranges()
  return (ranges["jax"].specifier.contains(jax_version)
          and ranges["flax"].specifier.contains(flax_version)
          and versions.incompatibility(jax_version, flax_version) is None)


@pytest.mark.parametrize("jax_version,flax_version", WORKING_PAIRS)
def test_ranges_admit_the_pairs_accelerator_images_ship(jax_version, flax_version):
  assert _accepted(jax_version, flax_version)
  for extra in ACCELERATOR_EXTRAS:  # each extra keeps the package's jax range
    assert _ranges(extra)["jax"].specifier.contains(jax_version), extra


@pytest.mark.parametrize("jax_version,flax_version", BROKEN_PAIRS)
def test_a_pair_that_does_not_import_is_refused(jax_version, flax_version):
  # pip cannot express it (flax's range would depend on jax's version), so the ranges admit
  # the pair and the import check refuses it, naming the fix.
  assert not _accepted(jax_version, flax_version)
  assert "flax>=0.12.10" in versions.incompatibility(jax_version, flax_version)


def test_extras_keep_the_packages_jax_range():
  base = _ranges()["jax"].specifier
  for extra in ACCELERATOR_EXTRAS:
    req = _ranges(extra)["jax"]
    assert req.specifier == base and req.extras == {extra}, extra


def _fake_distributions(folder, **dists: str) -> str:
  """A folder of bare .dist-info entries (name -> version), to shadow installed metadata."""
  for name, version in dists.items():
    info = os.path.join(folder, f"{name}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
      f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  return str(folder)


def test_decode_names_a_broken_pair_in_one_line(tmp_path):
  """With flax 0.12.8 next to jax 0.11.2 (their metadata first on the path), decode.py stops
  before importing either, with one `error:` line and status 2."""
  fake = _fake_distributions(tmp_path, jax="0.11.2", flax="0.12.8")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([fake, ROOT]))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "decode.py"), "--prompt", "Hi"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: kangaroo-jax: flax 0.12.8 does not import with jax 0.11.2 (jax >= 0.11 needs "
      "flax >= 0.12.10): pip install -U \"flax>=0.12.10,<0.13\""]


def test_a_working_pair_imports(tmp_path):
  fake = _fake_distributions(tmp_path, jax="0.12.0.1", flax="0.12.12")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([fake, ROOT]))
  proc = subprocess.run([sys.executable, "-c", "import kangaroo_jax.cli, importlib.metadata as m;"
                         "print(m.version('jax'), m.version('flax'))"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["0.12.0.1", "0.12.12"]  # the fake metadata was the one read


# What each extra must bring besides jax, jaxlib, flax and sentencepiece.
EXTRA_PACKAGES = {"": [], "cuda12": ["jax-cuda12-plugin", "jax-cuda12-pjrt"],
                  "cuda13": ["jax-cuda13-plugin", "jax-cuda13-pjrt"], "tpu": ["libtpu"],
                  "torch": ["torch"]}
OFFLINE_SIGNS = ("NewConnectionError", "Temporary failure in name resolution",
                 "Network is unreachable", "Failed to establish a new connection",
                 "No route to host", "ProxyError")


@pytest.mark.slow
def test_each_extra_resolves_against_the_package_index(tmp_path):
  """`pip install --dry-run --report` of the package with each extra, as on a fresh machine
  (--ignore-installed), all at once (the time is the index's, not this CPU's). Each must
  bring jax, jaxlib and its plugin (or libtpu) of one version, a flax that imports with it,
  and sentencepiece. The index this runs against decides which jax: here at most 0.10.2."""
  runs = {}
  for extra in EXTRA_PACKAGES:
    # A copy per run: setuptools writes its metadata folder into the source tree.
    src = tmp_path / f"src_{extra or 'base'}"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "tests", "__pycache__", "*.egg-info", "build", ".m*"))
    report = tmp_path / f"report_{extra or 'base'}.json"
    target = f"{src}[{extra}]" if extra else str(src)
    runs[extra] = (report, subprocess.Popen(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), target],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = {extra: proc.communicate(timeout=900)[0] for extra, (_, proc) in runs.items()}
  failed = {extra: out for extra, out in outputs.items() if runs[extra][1].returncode}
  if failed and all(any(s in out for s in OFFLINE_SIGNS) for out in failed.values()):
    pytest.skip("the package index is unreachable (offline): nothing to resolve against")
  assert not failed, {extra: out[-2000:] for extra, out in failed.items()}
  for extra, (report, _) in runs.items():
    with open(report) as f:
      got = {_name(Requirement(i["metadata"]["name"])): i["metadata"]["version"]
             for i in json.load(f)["install"]}
    for name in ["jax", "jaxlib", "flax", "sentencepiece", *EXTRA_PACKAGES[extra]]:
      assert name in got, (extra, name)
    assert got["jaxlib"] == got["jax"], (extra, got["jax"], got["jaxlib"])
    for plugin in EXTRA_PACKAGES[extra]:
      if plugin.startswith("jax-"):  # the CUDA plugin and its PJRT: jax's own version
        assert got[plugin] == got["jax"], (extra, plugin, got[plugin])
    assert versions.incompatibility(got["jax"], got["flax"]) is None, (extra, got)
    assert _ranges()["jax"].specifier.contains(got["jax"]), (extra, got["jax"])


def test_a_checkpoint_whose_tokenizer_is_only_tokenizer_model_loads(tmp_path):
  """sentencepiece is declared for checkpoints like Vicuna-7B-v1.3 whose tokenizer is only a
  sentencepiece `tokenizer.model` (without it transformers cannot read the file)."""
  spm = pytest.importorskip("sentencepiece", reason="sentencepiece: requirements.txt")
  from kangaroo_jax import weights
  lines = ["the quick brown fox jumps over the lazy dog", "kangaroo drafts tokens",
           "the deep layers verify the drafts in one pass"] * 20
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                 vocab_size=60, model_type="bpe", minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
  tokenizer = weights.load_tokenizer(str(tmp_path))
  ids = tokenizer.encode("the lazy fox", add_special_tokens=False)
  assert len(ids) > 1 and tokenizer.decode(ids) == "the lazy fox"


def test_the_installed_jax_and_flax_are_a_pair_the_package_accepts():
  """Here the CPU pins; on a lent device (scripts/accelerator_check.py) the image's own."""
  jax_version, flax_version = versions.installed("jax"), versions.installed("flax")
  assert _accepted(jax_version, flax_version), (jax_version, flax_version)
