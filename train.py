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
  from kangaroo_jax import data, training
  try:
    training.train(_CONFIG.value)
  except (training.ConfigError, data.DataError) as e:
    # Input the user can fix: one line, not a traceback through absl (other errors keep theirs).
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    os._exit(2)
  except KeyboardInterrupt as e:
    # One line instead of a traceback through jax and orbax; os._exit skips an interpreter
    # teardown under XLA's threads (checkpoint saves are synchronous: none is half done).
    # A leading newline ends the progress bar's line.
    print("\n" + interrupted_message(e, training.train, _CONFIG.value), file=sys.stderr,
          flush=True)
    os._exit(130)


def interrupted_message(error: BaseException, train_fn, c) -> str:
  """Where Ctrl-C stopped training and what rerunning does, in one line."""
  step = None
  tb = error.__traceback__
  while tb is not None:  # the training loop's own frame holds the step in progress
    if tb.tb_frame.f_code is getattr(train_fn, "__code__", None):
      step = tb.tb_frame.f_locals.get("step")
    tb = tb.tb_next
  folder = os.path.join(c.workdir, "checkpoints")
  saved = sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []
  where = (f"interrupted at step {step} of {c.steps}" if isinstance(step, int)
           else "interrupted before the first training step")
  if saved:
    return (f"{where}; the last checkpoint is step {saved[-1]} in {folder}: rerun the same "
            "command to resume from it")
  return f"{where}; no checkpoint was saved yet: rerunning the same command starts over"


if __name__ == "__main__":
  app.run(main)
