"""Shared fixtures: tiny random configs and the embedded SmolLM2 model."""
import os

# Tests run on the CPU; several fake devices let the mesh tests run too.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The converted-tokenizer cache (weights.load_tokenizer) lives in a fresh folder per run, so
# tests never read a stale cache from the user's home, yet share one conversion.
if "KANGAROO_JAX_CACHE" not in os.environ:
  import tempfile
  os.environ["KANGAROO_JAX_CACHE"] = tempfile.mkdtemp(prefix="kangaroo_jax_cache_")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: uses the 135M model or takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
  # The slow tests (the 135M model, subprocesses) first: with `make test`'s two workers both
  # then start on them and end on short ones, instead of one worker running a long test
  # alone at the end. The sort is stable, so each module's tests stay together.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
