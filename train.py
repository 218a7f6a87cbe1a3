"""Trains a Kangaroo adapter.

  python train.py --config configs/smollm2_135m.py [--config.steps=2000 --config.workdir=...]

Rerunning the same command resumes from the last checkpoint in `workdir`. See TRAINING.md.
"""
import logging
import os
import re
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
  from kangaroo_jax import data, training, weights
  try:
    training.train(_CONFIG.value)
  except (training.ConfigError, data.DataError, weights.WeightsError) as e:
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


def parse_flags(argv: list) -> list:
  """absl's flag parsing, the config file loaded; a mistake is one `error:` line, exit 2.

  absl and ml_collections report a missing config file, an unknown override or a value of
  the wrong type with a traceback (or a FATAL line and status 1); all are input the user
  can fix.
  """
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a config file that failed to load raises only when first read
    return rest
  except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {flag_error(e, argv[1:])}", file=sys.stderr, flush=True)
    sys.exit(2)


def flag_error(error: BaseException, args: list) -> str:
  """The one-line message for a flag-parsing failure (`parse_flags`), in the user's words."""
  text = str(error.args[0] if error.args else error)
  config = _config_path(args)
  if config is not None and not os.path.isfile(config.split(":", 1)[0]):
    return f"no such config file: {config} (e.g. --config configs/smollm2_135m.py)"
  if config is None or "must have a value other than None" in text:
    return "--config FILE is required (e.g. --config configs/smollm2_135m.py)"
  if isinstance(error, (AttributeError, KeyError)):  # an override naming no config field
    # ml_collections' text: '\'stepz\'\nDid you mean "steps" instead of "stepz"?'
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    name = hint.group(2) if hint else re.search(r"\w+", text).group(0)
    flag = next((a.split("=", 1)[0] for a in args
                 if re.match(rf"-{{1,2}}config\.(.+\.)?{name}(=|$)", a)), f"--config.{name}")
    fix = f" (did you mean {flag[:-len(name)]}{hint.group(1)}?)" if hint else ""
    return f"{flag}: {config} has no field {name!r}{fix}"
  typed = re.match(r"flag (--config\.[\w.]+)=(.*?): (.*)", text, re.S)
  if typed:  # absl: "flag --config.steps=abc: invalid literal for int() with base 10: 'abc'"
    flag, value, why = typed.groups()
    kind = re.search(r"for (\w+)\(\)|to (\w+):|expected (\w+)", why)
    want = next((k for k in kind.groups() if k), None) if kind else None
    return (f"{flag}={value}: {value!r} is not {_TYPE_WORDS.get(want, 'a valid value')}" if want
            else f"{flag}={value}: {why.splitlines()[0]}")
  if isinstance(error, OSError):  # the file exists but does not load
    return f"cannot load config file {config}: {text.strip().splitlines()[-1].strip()}"
  order = re.match(r"Found (\S+) in argv before a value for --config", text)
  if order:
    return f"{order.group(1)} comes before --config FILE: put --config first"
  return text.strip().splitlines()[0]


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _config_path(args: list):
  """The --config value in the command-line arguments (None when absent)."""
  for i, a in enumerate(args):
    if a in ("--config", "-config") and i + 1 < len(args):
      return args[i + 1]
    if re.match(r"-{1,2}config=", a):
      return a.split("=", 1)[1]
  return None


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
  app.run(main, flags_parser=parse_flags)
