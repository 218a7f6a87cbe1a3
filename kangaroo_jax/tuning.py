"""Per-backend Kangaroo settings (eta, gamma, draft vocabulary) found by the benchmark sweep.

The best setting depends on the hardware: on a CPU verification of a long block costs
more than one plain step and the LM head dominates a draft step, so short drafts over a
reduced vocabulary win; on an accelerator verifying 8 positions costs about as much as
one, so longer drafts pay. `python -m kangaroo_jax.bench --sweep` measures and writes
`tuned/<backend>.json`; `tuned_settings()` reads it (defaults when absent).

    {"eta": 0.6, "gamma": 6, "draft_vocab": null, "send_unconfident": true, "measured": {...}}

`draft_vocab`: null = the adapter's stored draft vocabulary (if any), 0 = the full
vocabulary, N = the first N stored ids (stored most frequent first).
`send_unconfident`: whether the draft that fell below eta is verified too (the paper's
rule; see `kangaroo.KangarooParams`). Files without it mean true.
`tree_nodes`, `tree_topk`: 0 nodes = chain drafting; N > 0 = a draft tree verified N nodes
at a time, top-k children per node (`kangaroo_jax/tree.py`). Files without them mean chain.
`lookup`: N > 0 = prompt-lookup rounds proposing up to N tokens (`kangaroo_jax/lookup.py`);
0 (or absent) = off.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Sequence

import numpy as np

TUNED_DIR = os.path.join(os.path.dirname(__file__), "tuned")
DEFAULTS = {"eta": 0.6, "gamma": 6, "draft_vocab": None, "send_unconfident": True,
            "tree_nodes": 0, "tree_topk": 4, "lookup": 0}


class TuningError(ValueError):
  """A tuned-settings file or value that cannot be used."""


def current_backend() -> str:
  """jax's default backend name ('cpu', 'gpu', 'tpu')."""
  import jax  # Deferred: reading settings for another backend needs no jax.
  return jax.default_backend()


def tuned_path(backend: Optional[str] = None) -> str:
  """Where the tuned settings of `backend` (default: the current one) live."""
  return os.path.join(TUNED_DIR, f"{backend or current_backend()}.json")


def check_settings(s: dict) -> dict:
  """Validates eta/gamma/draft_vocab/send_unconfident/tree settings; returns just those.

  Raises TuningError naming the bad value."""
  try:
    eta, gamma, vocab = float(s["eta"]), s["gamma"], s.get("draft_vocab")
  except (KeyError, TypeError, ValueError) as e:
    raise TuningError(f"settings need numeric 'eta' and 'gamma': {e}") from None
  if not 0 < eta <= 1:
    raise TuningError(f"eta must be in (0, 1], got {eta}")
  if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
    raise TuningError(f"gamma must be an integer >= 1, got {gamma!r}")
  if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 0):
    raise TuningError(f"draft_vocab must be null or an integer >= 0, got {vocab!r}")
  send = s.get("send_unconfident", True)
  if not isinstance(send, bool):
    raise TuningError(f"send_unconfident must be true or false, got {send!r}")
  tree = {name: s.get(name, DEFAULTS[name]) for name in ("tree_nodes", "tree_topk", "lookup")}
  for name, value in tree.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < (name == "tree_topk"):
      raise TuningError(f"{name} must be an integer >= {int(name == 'tree_topk')}, got {value!r}")
  return {"eta": eta, "gamma": gamma, "draft_vocab": vocab, "send_unconfident": send} | tree


def tuned_settings(backend: Optional[str] = None, path: Optional[str] = None) -> dict:
  """The tuned {eta, gamma, draft_vocab, send_unconfident, tree_nodes, tree_topk, lookup}
  of a backend, else DEFAULTS.

  Args:
    backend: 'cpu', 'gpu', 'tpu'; None = jax's default backend.
    path: read this file instead of `tuned/<backend>.json`.
  Returns:
    A new dict: eta (float), gamma (int), draft_vocab (None or int), send_unconfident
    (bool), tree_nodes, tree_topk and lookup (int). A damaged
    file warns and yields the defaults: a bad tuning file must not stop decoding.
  """
  path = path or tuned_path(backend)
  if not os.path.isfile(path):
    return dict(DEFAULTS)
  try:
    with open(path) as f:
      return check_settings(json.load(f))
  except (OSError, json.JSONDecodeError, TuningError, AttributeError) as e:
    warnings.warn(f"ignoring tuned settings {path}: {' '.join(str(e).split())}")
    return dict(DEFAULTS)


def resolve(**given) -> dict:
  """The tuned settings of this backend with every given value that is not None in place,
  and the tuned values that conflict with a given one adapted (`resolve_with_notes`)."""
  return resolve_with_notes(**given)[0]


def resolve_with_notes(gamma_flag: str = "--max-draft", greedy: bool = True,
                       **given) -> tuple[dict, list[str]]:
  """`resolve`, plus one `note:` line per tuned value changed to fit a given one.

  A value the caller gives always wins; a tuned value that cannot go with it gives way:
  prompt lookup goes with the chain, so a given tree turns the tuned lookup off and a
  given lookup the tuned tree; a given tree of N nodes deepens (or widens) the tuned tree
  until top-k x depth holds N; a given depth or top-k cuts the tuned tree's nodes to fit.
  Given values that conflict among themselves are refused.

  Raises:
    TuningError: given tree nodes exceed the given top-k x depth.

  Args:
    gamma_flag: how the notes name gamma (decode.py: --max-draft, the benchmark: --gamma).
    greedy: False drops a tuned tree (tree drafting is greedy only), as `api.generate` does.
    **given: eta, gamma, draft_vocab, send_unconfident, tree_nodes, tree_topk, lookup;
      None = not given.
  """
  typed = {k: v for k, v in given.items() if v is not None}
  out = tuned_settings() | typed
  flags = {"gamma": gamma_flag, "tree_nodes": "--tree-nodes", "tree_topk": "--tree-topk",
           "lookup": "--lookup"}
  notes: list[str] = []

  def adapt(name: str, value: int, why: str) -> None:
    notes.append(f"note: the tuned {flags[name]} {out[name]} becomes {value}: {why}")
    out[name] = value

  if not greedy and "tree_nodes" not in typed:
    out["tree_nodes"] = 0  # a tuned tree is for greedy decoding only: sampling drafts a chain
  if typed.get("tree_nodes") and "lookup" not in typed and out["lookup"]:
    adapt("lookup", 0, f"prompt lookup works with chain drafting only, and --tree-nodes "
          f"{typed['tree_nodes']} asks for a tree")
  if typed.get("lookup") and "tree_nodes" not in typed and out["tree_nodes"]:
    adapt("tree_nodes", 0, f"--lookup {typed['lookup']} works with chain drafting only")
  _fit_tree(out, typed, flags, adapt)
  return out, notes


def _fit_tree(out: dict, typed: dict, flags: dict, adapt) -> None:
  """Makes a tree's nodes fit top-k x depth (gamma) by adapting the tuned one of the three.

  A given node count raises the tuned depth first (a deeper tree drafts further ahead),
  else the tuned top-k; given top-k or depth cut the tuned node count.
  """
  nodes, topk, gamma = out["tree_nodes"], out["tree_topk"], out["gamma"]
  if not nodes or nodes <= topk * gamma:
    return
  k, g = flags["tree_topk"], flags["gamma"]
  if "tree_nodes" not in typed:
    adapt("tree_nodes", topk * gamma, f"at most {k} {topk} x {g} {gamma} nodes fit")
  elif "gamma" not in typed:
    adapt("gamma", -(-nodes // topk), f"--tree-nodes {nodes} needs {k} {topk} x {g} >= {nodes}")
  elif "tree_topk" not in typed:
    adapt("tree_topk", -(-nodes // gamma), f"--tree-nodes {nodes} needs {k} x {g} {gamma} >= "
          f"{nodes}")
  else:  # all three given: the caller's own values conflict, nothing tuned to adapt
    raise TuningError(f"--tree-nodes {nodes} does not fit {k} {topk} x {g} {gamma} = "
                      f"{topk * gamma} nodes: lower --tree-nodes or raise {k} or {g}")


def write_tuned(settings: dict, path: str, measured: Optional[dict] = None) -> str:
  """Writes checked settings (plus what they were measured with) to `path`; returns it."""
  out = dict(check_settings(settings), measured=measured or {})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)  # readers never see a half-written file
  return path


def select_draft_ids(stored: Optional[Sequence[int]], n: Optional[int],
                     strict: bool = True) -> Optional[np.ndarray]:
  """The draft vocabulary: the adapter's own (n None), the full one (n 0), or its first n ids.

  Args:
    stored: the adapter's stored draft ids (most frequent first) or None.
    n: as `draft_vocab` above.
    strict: raise TuningError when n does not fit `stored`; else fall back to `stored`
      (for tuned defaults, which may have been measured with another adapter).
  """
  if n is None:
    return None if stored is None else np.asarray(stored)
  if n == 0:
    return None
  if stored is None or n > len(stored):
    if strict:
      have = "no draft vocabulary" if stored is None else f"{len(stored)} draft ids"
      raise TuningError(f"draft vocabulary of {n} ids: the adapter has {have}")
    return None if stored is None else np.asarray(stored)
  return np.asarray(stored[:n])
