"""kangaroo-jax: Kangaroo self-speculative decoding (double early exiting) in JAX/Flax."""
from kangaroo_jax.api import (Generation, generate, load_adapter_for, load_model, memory_report,
                              stream)
from kangaroo_jax.kangaroo import KangarooParams, kangaroo_decode
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.sampling import SamplingParams

__all__ = ["Generation", "generate", "stream", "load_model", "load_adapter_for", "memory_report",
           "KangarooParams", "kangaroo_decode", "plain_decode", "SamplingParams"]
