"""Trains a Kangaroo adapter.

  python train.py --config configs/smollm2_135m.py [--config.steps=2000 --config.workdir=...]

Rerunning the same command resumes from the last checkpoint in `workdir`. See TRAINING.md.
"""
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/ import each other
_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  logging.getLogger("kangaroo_jax").setLevel(logging.INFO)
  from kangaroo_jax.training import train
  train(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
