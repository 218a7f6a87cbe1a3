"""Which jax and flax releases work together, checked before either is imported.

pip cannot make one package's range depend on another's version (flax 0.12.8 declares
`jax>=0.10.0` with no upper bound), so `pip install` happily keeps an old flax next to an
accelerator image's newer jax. flax before 0.12.10 then fails inside `import flax` with an
error that names neither package's version. `kangaroo_jax/__init__.py` calls
`check_installed()` first, which names the pair and the fix in one line instead.
Light on purpose: metadata only, no jax import.
"""
from __future__ import annotations

import re
from importlib import metadata
from typing import Optional

# (jax from this version, flax at least this version). jax 0.11 removed the hijax
# primitive flax <= 0.12.9 imports (flax 0.12.10's notes: "Migrate all usages of
# HiPrimitive ..."); seen on the H200 image: flax 0.12.8 does not import with jax 0.11.2,
# flax 0.12.10 does.
FLAX_FOR_JAX = (("0.11", "0.12.10"),)


def release(version: str) -> tuple[int, ...]:
  """The release numbers of a version string: "0.12.0.1" -> (0, 12, 0, 1), "0.11.2rc1" ->
  (0, 11, 2). Enough to order releases without `packaging` (not a declared dependency)."""
  match = re.match(r"\d+(\.\d+)*", version.strip())
  if not match:
    raise ValueError(f"not a release version: {version!r}")
  return tuple(int(part) for part in match.group(0).split("."))


def incompatibility(jax_version: str, flax_version: str) -> Optional[str]:
  """Why this jax and flax do not work together (one line), or None when they do."""
  for jax_from, flax_min in FLAX_FOR_JAX:
    if release(jax_version) >= release(jax_from) and release(flax_version) < release(flax_min):
      return (f"flax {flax_version} does not import with jax {jax_version} (jax >= {jax_from} "
              f"needs flax >= {flax_min}): pip install -U \"flax>={flax_min},<0.13\"")
  return None


def installed(name: str) -> Optional[str]:
  """The installed version of a distribution, or None when it is not installed."""
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def check_installed() -> None:
  """Raises ImportError (one line) when the installed jax and flax do not work together.

  Missing packages are left to the import that needs them.
  """
  jax_version, flax_version = installed("jax"), installed("flax")
  if jax_version and flax_version:
    problem = incompatibility(jax_version, flax_version)
    if problem:
      raise ImportError(f"kangaroo-jax: {problem}")
