"""python -m kangaroo_jax.bench: see the package docstring for the flags and outputs."""
import sys

from kangaroo_jax import cli
from kangaroo_jax.bench.command import main

try:
  status = main()
  sys.stdout.flush()
except BrokenPipeError:  # e.g. `| head`: the reader went away
  cli.exit_quietly_on_broken_pipe()
sys.exit(status)
