"""kangaroo-jax: Kangaroo self-speculative decoding (double early exiting) in JAX/Flax.

The public names load on first use, so that light modules (kangaroo_jax.cli, the bench
command's argument checks) import without jax: commands set their environment and
reject bad flags before the slow import. The installed jax and flax are checked first
(`kangaroo_jax.versions`): a pair that cannot work is one ImportError line naming the fix.
"""
import importlib

from kangaroo_jax import versions

versions.check_installed()

_HOMES = {"Generation": "api", "generate": "api", "stream": "api", "load_model": "api",
          "load_adapter_for": "api", "memory_report": "api", "KangarooParams": "kangaroo",
          "kangaroo_decode": "kangaroo", "plain_decode": "decoding", "SamplingParams": "sampling"}

__all__ = list(_HOMES)


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f"module 'kangaroo_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(f"kangaroo_jax.{_HOMES[name]}"), name)
