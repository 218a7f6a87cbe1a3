"""What the command lines (decode.py, python -m kangaroo_jax.bench) share.

An argument parser whose errors are one line, the offline and quiet environment they
run in, and the exit on bad input: one `error: <message>` line on stderr and status 2.
Light on purpose (no jax): a command imports it before anything slow, so bad flags fail
at once and the environment is set before jax or transformers read it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

# No hub is reachable from these machines, and the libraries' logs and progress bars
# would bury the commands' own output on stderr.
OFFLINE_QUIET_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
    "TOKENIZERS_PARALLELISM": "false"}


def set_offline_quiet_environment() -> None:
  """Sets OFFLINE_QUIET_ENVIRONMENT where the user has not; call before jax/transformers load."""
  for key, value in OFFLINE_QUIET_ENVIRONMENT.items():
    os.environ.setdefault(key, value)


def tree_flag_checks(args) -> list[tuple[bool, str]]:
  """(ok, message) checks of --tree-nodes / --tree-topk / --lookup, for a command's
  `validate`."""
  return [(args.tree_nodes is None or args.tree_nodes >= 0,
           f"--tree-nodes must be >= 0, got {args.tree_nodes}"),
          (args.tree_topk is None or args.tree_topk >= 1,
           f"--tree-topk must be >= 1, got {args.tree_topk}"),
          (args.lookup is None or args.lookup >= 0, f"--lookup must be >= 0, got {args.lookup}"),
          (not (args.lookup and args.tree_nodes), "prompt lookup (--lookup) works with chain "
           "drafting only: use --tree-nodes 0 or --lookup 0")]


class OneLineParser(argparse.ArgumentParser):
  """An ArgumentParser that raises `error_type(message)` instead of printing its usage block."""

  def __init__(self, *args, error_type: type[Exception] = ValueError, **kwargs):
    super().__init__(*args, **kwargs)
    self.error_type = error_type

  def error(self, message):
    raise self.error_type(message)


def one_line(error: BaseException) -> str:
  """An exception's message on one line (its type name when it has none)."""
  return " ".join(str(error).split()) or type(error).__name__


def exit_status(command: Callable[[], object], interrupted: str = "") -> int:
  """Runs `command`; returns 0, or EXIT_ERROR after one `error:` line for bad input.

  Every library error subclasses ValueError; OSError covers unreadable files. Ctrl-C
  returns EXIT_INTERRUPTED (printing `interrupted` if given). A closed stdout
  (BrokenPipeError) propagates: writing an error line could fail the same way, so the
  caller ends quietly (`exit_quietly_on_broken_pipe`).
  """
  try:
    command()
  except BrokenPipeError:
    raise
  except (ValueError, OSError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return EXIT_ERROR
  except KeyboardInterrupt:
    if interrupted:
      print(interrupted, file=sys.stderr)
    return EXIT_INTERRUPTED
  return 0


def exit_quietly_on_broken_pipe() -> None:
  """The reader of stdout went away (e.g. `| head -2`): exit at once, printing nothing."""
  try:
    # Point stdout at /dev/null so that nothing flushes to the dead pipe again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except OSError:
    pass
  os._exit(EXIT_BROKEN_PIPE)
