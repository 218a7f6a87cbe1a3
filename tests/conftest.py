"""Shared fixtures: tiny random configs and the embedded SmolLM2 model."""
import os

# Tests run on the CPU; several fake devices let the mesh tests run too.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: uses the 135M model or takes more than a few seconds")
