"""What the processes of a multi-host run share: joining the run, and exchanging host data.

A multi-host run has one process per host (a TPU VM worker; in the tests, a CPU process
with fake devices). Each process sees only its own devices; arrays that span several
hosts are built from each process's shards (`jax.make_array_from_callback`), and host
data that every process needs whole, such as the tokenised training set, is made in
parts and exchanged here.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0) -> None:
  """Joins the run's other processes (`jax.distributed.initialize`).

  With no coordinator address the cluster says where it is (a TPU VM, SLURM). CPU devices
  exchange collectives over gloo: without it a program spanning CPU processes cannot run.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if coordinator_address:
    kw = dict(coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id)
  jax.distributed.initialize(**kw)


def all_gather_bytes(blob: bytes, chunk: int = 64 << 20) -> list[bytes]:
  """Every process's `blob`, in process order; every process must call it.

  The bytes travel as uint8 arrays through the devices' all-gather, `chunk` bytes at a
  time so that no device holds more than processes x chunk of them at once.
  """
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(blob)))).reshape(-1)  # [P]
  longest = int(sizes.max())
  padded = np.frombuffer(blob.ljust(longest, b"\0"), np.uint8)
  parts = [np.asarray(multihost_utils.process_allgather(padded[i:i + chunk]))  # [P, chunk]
           for i in range(0, longest, chunk)]
  whole = np.concatenate(parts, axis=1) if parts else np.zeros((len(sizes), 0), np.uint8)
  return [whole[p, :int(n)].tobytes() for p, n in enumerate(sizes)]
