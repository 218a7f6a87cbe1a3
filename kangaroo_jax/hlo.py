"""Reading optimized HLO text: which instructions run once per loop iteration.

The decode loops must update their KV caches in place. A `copy` of a cache-shaped array
inside a computation that a while loop or a conditional calls runs every iteration: the
check used by `tests/test_no_cache_copies.py` and, on an accelerator's own compiled
programs, by `scripts/accelerator_check.py`. Across calls, a loop call updates the caches
of the state it is donated in place when its program aliases their parameters to outputs
(`aliased_parameters`).
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


def _calls(lines: list[str]):
  """(kind, callee) for every computation the lines call."""
  return [(kind, c) for line in lines for kind, target in _CALL.findall(line)
          for c in re.findall(r"%[\w.\-]+", target)]


def _reachable(computations: dict[str, list[str]], starts) -> set[str]:
  """`starts` and every computation they call, transitively."""
  seen, todo = set(), list(starts)
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.add(c)
      todo += [callee for _, callee in _calls(computations.get(c, ()))]
  return seen


def loop_computations(computations: dict[str, list[str]]) -> set[str]:
  """Computations that run once per loop iteration or per taken conditional branch:
  while bodies and conditions, branches, and everything they call."""
  return _reachable(computations, [c for lines in computations.values()
                                   for kind, c in _calls(lines) if kind in _PER_ITERATION])


def _op_pattern(ops: tuple[str, ...], shape: str):
  return re.compile(r"\[" + re.escape(shape) + r"\]\S* (" + "|".join(map(re.escape, ops)) + r")\(")


_COPIES = ("copy", "copy-start")


def ops_in_loops(hlo: str, ops: tuple[str, ...], shape: str) -> list[str]:
  """Instructions `ops` (e.g. copy, convert) producing arrays of `shape` inside loops."""
  found = computations_of(hlo)
  pattern = _op_pattern(ops, shape)
  return [l.strip()[:160] for name in loop_computations(found)
          for l in found.get(name, ()) if pattern.search(l)]


def ops_outside_loops(hlo: str, ops: tuple[str, ...], shape: str) -> list[str]:
  """Instructions `ops` producing arrays of `shape` outside loops: once per program call."""
  found = computations_of(hlo)
  pattern = _op_pattern(ops, shape)
  return [l.strip()[:160] for name in set(found) - loop_computations(found)
          for l in found[name] if pattern.search(l)]


def copies_in_loops(hlo: str, shape: str) -> list[str]:
  """`copy` instructions of arrays of `shape` inside loops."""
  return ops_in_loops(hlo, _COPIES, shape)


def copies_by_branch(hlo: str, shape: str) -> tuple[list[int], list[str]]:
  """`copy` instructions of arrays of `shape` inside loops, split by where they run: the
  count in each conditional branch (with what it calls), and the lines of the others.

  CPU verification branches copy each deep layer's cache once (they attend the block
  inside a copy, `model.Attention`), so checks bound the first and require no other."""
  found = computations_of(hlo)
  pattern = _op_pattern(_COPIES, shape)
  count = lambda names: sum(1 for c in names for l in found.get(c, ()) if pattern.search(l))
  branches = [_reachable(found, [c]) for lines in found.values()
              for kind, c in _calls(lines) if kind == "branch_computations"]
  inside = set().union(*branches)
  others = [l.strip()[:160] for c in loop_computations(found) - inside
            for l in found.get(c, ()) if pattern.search(l)]
  return [count(b) for b in branches], others


def entry_parameters(hlo: str, shape: str) -> list[int]:
  """Numbers of the entry computation's parameters of arrays of `shape`."""
  pattern = re.compile(r"\[" + re.escape(shape) + r"\]\S* parameter\((\d+)\)")
  return [int(m.group(1)) for l in computations_of(hlo).get("ENTRY", ())
          for m in [pattern.search(l)] if m]


# One entry of the module header's input_output_alias: "{output index}: (parameter, {index
# within it}, may-alias)".
_ALIAS = re.compile(r"\{[\d,\s]*\}: \((\d+), \{[\d,\s]*\}, [\w-]+\)")


def aliased_parameters(hlo: str) -> set[int]:
  """Parameters whose buffers the program's outputs reuse (`input_output_alias` in the
  HloModule header, which donating an argument asks for): updated in place, not copied."""
  header = next((l for l in hlo.splitlines() if l.startswith("HloModule")), "")
  return {int(p) for p in _ALIAS.findall(header)}
