#!/usr/bin/env python
"""A teacher cache made of links to chosen shards of other caches: a fixed data set.

  python scripts/cache_view.py runs/views/self_500 runs/teacher/sharegpt_self:0-4 \
      runs/teacher/self_more:5-9

Each SOURCE:SHARDS names a cache folder and the shards to take from it (`0-4`, `0,2,7`,
or `all`: its complete shards now). The view holds the first source's fingerprint.json
and one symbolic link per shard, so a training run on it sees exactly those shards
whatever the caches grow to later (the first shard in order is the held-out one, as for
any cache). Sources made with other settings (another fingerprint) are refused; a shard
number given twice is an error.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(spec: str, folder: str) -> list[int]:
  """`0-4`, `0,2,7` or `all` -> shard numbers."""
  from kangaroo_jax import teacher
  if spec == "all":
    return [int(os.path.basename(d)[6:]) for d in teacher.shard_dirs(folder)]
  out = []
  for part in spec.split(","):
    lo, _, hi = part.partition("-")
    out += list(range(int(lo), int(hi or lo) + 1))
  return out


def main(argv) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  out, sources = argv[0], argv[1:]
  fp, links = None, {}
  for src in sources:
    folder, _, spec = src.rpartition(":")
    path = os.path.join(folder, "fingerprint.json")
    if not folder or not os.path.isfile(path):
      print(f"error: {src}: expected CACHE_FOLDER:SHARDS with a teacher cache folder", file=sys.stderr)
      return 2
    with open(path) as f:
      this = json.load(f)
    if fp is not None and this != fp:
      print(f"error: {folder} was made with other settings than {sources[0].rpartition(':')[0]}",
            file=sys.stderr)
      return 2
    fp = this
    for j in parse(spec, folder):
      shard = os.path.abspath(os.path.join(folder, f"shard_{j:05d}"))
      if not os.path.isdir(shard):
        print(f"error: {shard} is not a complete shard", file=sys.stderr)
        return 2
      if j in links:
        print(f"error: shard {j} given twice", file=sys.stderr)
        return 2
      links[j] = shard
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fingerprint.json"), "w") as f:
    json.dump(fp, f, indent=1)
  for name in os.listdir(out):
    if name.startswith("shard_"):
      os.remove(os.path.join(out, name))
  for j, shard in sorted(links.items()):
    os.symlink(shard, os.path.join(out, f"shard_{j:05d}"))
  print(json.dumps({"view": out, "shards": sorted(links)}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
