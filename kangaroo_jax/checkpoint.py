"""Orbax checkpoints of a training run: adapter params, optimizer state, step, data position.

A checkpoint is one pytree {"params", "opt_state", "step", "epoch", "index", "draft_ids",
"data_fingerprint"}. Orbax writes each step into a temporary folder and renames it
when complete, so a run killed mid-save (kill -9) leaves the previous checkpoint intact
and the half-written one is ignored.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """A manager that keeps the last `keep` checkpoints under `directory`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                         enable_async_checkpointing=False)
  # gs://... stays as it is (orbax writes object stores); a local folder is made absolute.
  return ocp.CheckpointManager(directory if "://" in directory else os.path.abspath(directory),
                               options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: dict[str, Any]) -> None:
  """Saves `state` as checkpoint `step` (every process calls this; orbax coordinates)."""
  mgr.save(step, args=ocp.args.StandardSave(_arrays(state)), force=True)
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, like: dict[str, Any]) -> Optional[dict[str, Any]]:
  """The latest checkpoint restored with the structure, dtypes and shardings of `like`; None if none."""
  step = mgr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(like))
  return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def _arrays(tree):
  """Numpy scalars -> 0-d arrays (orbax stores arrays, not numpy scalar types)."""
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)
