"""The project's cache folder, and JAX's persistent compilation cache inside it.

KANGAROO_JAX_CACHE (default ~/.cache/kangaroo_jax) holds the tokenizers converted from
GGUF files (`tokenizers/`) and compiled XLA programs (`xla/`). With the compilation cache a
second process that decodes the same shapes (model, prompt bucket, cache size, sampling
and Kangaroo settings) loads the compiled loop instead of compiling it again (about 10 s
on a small CPU). KANGAROO_JAX_NO_COMPILE_CACHE=1 (or decode.py --no-compile-cache) turns
it off.
"""
from __future__ import annotations

import os
from typing import Optional

OPT_OUT = "KANGAROO_JAX_NO_COMPILE_CACHE"
_enabled: Optional[str] = None


def cache_root() -> str:
  """The project's cache folder: $KANGAROO_JAX_CACHE, else ~/.cache/kangaroo_jax."""
  return os.environ.get("KANGAROO_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "kangaroo_jax")


def opted_out() -> bool:
  """True when KANGAROO_JAX_NO_COMPILE_CACHE is set to anything but '', '0' or 'false'."""
  return os.environ.get(OPT_OUT, "").strip().lower() not in ("", "0", "false", "no")


def enable_compilation_cache(folder: Optional[str] = None) -> Optional[str]:
  """Points JAX's persistent compilation cache at `folder` (default: <cache root>/xla).

  Returns the folder, or None when opted out. Only programs that take at least a second
  to compile are stored, so the cache holds the decode loops, not every small op.
  Calling it again is cheap; a later call with another folder moves the cache.
  """
  global _enabled
  if opted_out():
    return None
  folder = folder or os.path.join(cache_root(), "xla")
  if folder == _enabled:
    return folder
  import jax  # Deferred: reading the cache root needs no jax.
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _enabled = folder
  return folder
