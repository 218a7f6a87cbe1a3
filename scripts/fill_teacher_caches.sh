#!/usr/bin/env bash
# Grows both ShareGPT teacher caches for the embedded model one shard at a time,
# alternating the self-answered and the teacher-forced pass, until N shards each.
# Every call resumes (finished shards are kept), so this can be killed and rerun.
#   N=8 scripts/fill_teacher_caches.sh     (after `make data`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-8}
for j in $(seq 1 "$N"); do
  "$PY" -m kangaroo_jax.teacher --mode self --out runs/teacher/sharegpt_self \
    --shards "$j" --batch 32 --answer-max 192 --shard-size 128
  "$PY" -m kangaroo_jax.teacher --mode forced --out runs/teacher/sharegpt_forced \
    --shards "$j" --batch 4 --shard-size 128
done
