"""Reading optimized HLO text: which instructions run once per loop iteration.

The decode loops must update their KV caches in place. A `copy` of a cache-shaped array
inside a computation that a while loop or a conditional calls runs every iteration: the
check used by `tests/test_no_cache_copies.py` and, on an accelerator's own compiled
programs, by `scripts/accelerator_check.py`.
"""
from __future__ import annotations

import re


def computations_of(hlo: str) -> dict[str, list[str]]:
  """The HLO's computations by name ("ENTRY" for the entry one): their lines."""
  found, name = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      name = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
      found[name] = []
    elif name is not None:
      found[name].append(line)
  return found


_CALL = re.compile(r"(calls|to_apply|body|condition|branch_computations|true_computation|"
                   r"false_computation)=(\{[^}]*\}|%[\w.\-]+)")
_PER_ITERATION = {"body", "condition", "branch_computations", "true_computation",
                  "false_computation"}


def loop_computations(computations: dict[str, list[str]]) -> set[str]:
  """Computations that run once per loop iteration or per taken conditional branch:
  while bodies and conditions, branches, and everything they call."""
  callees, todo = {}, []
  for name, lines in computations.items():
    callees[name] = set()
    for line in lines:
      for kind, target in _CALL.findall(line):
        called = re.findall(r"%[\w.\-]+", target)
        callees[name].update(called)
        if kind in _PER_ITERATION:
          todo += called
  seen: set[str] = set()
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.add(c)
      todo += callees.get(c, ())
  return seen


def ops_in_loops(hlo: str, ops: tuple[str, ...], shape: str) -> list[str]:
  """Instructions `ops` (e.g. copy, convert) producing arrays of `shape` inside loops."""
  found = computations_of(hlo)
  pattern = re.compile(r"\[" + re.escape(shape) + r"\]\S* (" + "|".join(map(re.escape, ops)) + r")\(")
  return [l.strip()[:160] for name in loop_computations(found)
          for l in found.get(name, ()) if pattern.search(l)]


def copies_in_loops(hlo: str, shape: str) -> list[str]:
  """`copy` instructions of arrays of `shape` inside loops."""
  return ops_in_loops(hlo, ("copy", "copy-start"), shape)


def copies_by_branch(hlo: str, shape: str) -> tuple[list[int], list[str]]:
  """`copy` instructions of arrays of `shape` inside loops, split by where they run: the
  count in each conditional branch (with what it calls), and the lines of the others.

  CPU verification branches copy each deep layer's cache once (they attend the block
  inside a copy, `model.Attention`), so checks bound the first and require no other."""
  found = computations_of(hlo)
  per_loop = loop_computations(found)
  pattern = _copy_pattern(shape)
  per_branch, inside = [], set()
  for lines in found.values():
    for line in lines:
      for kind, target in _CALL.findall(line):
        if kind != "branch_computations":
          continue
        for branch in re.findall(r"%[\w.\-]+", target):
          reach = _reachable(found, branch)
          inside |= reach
          per_branch.append(sum(1 for c in reach for l in found.get(c, ()) if pattern.search(l)))
  others = [l.strip()[:160] for c in per_loop - inside for l in found.get(c, ())
            if pattern.search(l)]
  return per_branch, others


def _copy_pattern(shape: str):
  return re.compile(r"\[" + re.escape(shape) + r"\]\S* (copy|copy-start)\(")


def _reachable(found: dict[str, list[str]], start: str) -> set[str]:
  """`start` and every computation it calls, transitively."""
  seen, todo = set(), [start]
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.add(c)
      todo += [t for line in found.get(c, ()) for _, target in _CALL.findall(line)
               for t in re.findall(r"%[\w.\-]+", target)]
  return seen
