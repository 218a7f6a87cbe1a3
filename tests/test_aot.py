"""kangaroo_jax.aot and scripts/tpu_aot.py on this host's CPU devices (no libtpu needed):
the same compile, report and verdict that a TPU topology gets."""
from __future__ import annotations

import json
import os
import sys

import pytest

from kangaroo_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import tpu_aot  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_topology_names():
  t = aot.parse_topology("v5e:2x4")
  assert (t.chip.name, t.chips) == ("TPU v5e", 8)
  assert aot.parse_topology("v4:2x2x1").chips == 4
  for bad in ("v9:2x2", "v5e", "v5e:2xx4"):
    with pytest.raises(aot.TopologyError):
      aot.parse_topology(bad)


def test_collectives_are_counted_from_hlo_text():
  hlo = """HloModule m

%body (p: f32[4]) -> f32[4] {
  %ar = f32[4]{0} all-reduce(%p), to_apply=%add
}

ENTRY %main (a: f32[1024,1024]) -> f32[4] {
  %ag = bf16[8,4]{1,0} all-gather-start(%x), dimensions={0}
  %agd = bf16[8,4]{1,0} all-gather-done(%ag)
  %c = f32[1024,1024]{1,0} copy(%a)
  %w = f32[4] while(%i), condition=%cond, body=%body
}
"""
  got = aot.collectives(hlo)
  assert (got["all-reduce"], got["all-gather"], got["in_loops"], got["copies_1mib"]) == (1, 1, 1, 1)


def _run(tmp_path, *extra):
  out = tmp_path / "report.json"
  code = tpu_aot.main(["--program", "train", "--config", TINY, "--topology", "cpu:8", "--layers",
                       "2", "--json", str(out), *extra])
  return code, (json.load(open(out)) if out.exists() else None)


@pytest.mark.slow  # compiles the 135M shape's train step (2 layers): ~30 s
def test_train_step_compiles_and_reports(tmp_path, capsys):
  code, r = _run(tmp_path)
  assert code == 0, capsys.readouterr()
  assert r["fits"] and r["layers"] == 2 and r["model_layers"] == 30  # SmolLM2-135M's shape
  assert r["peak_bytes"] > r["argument_bytes"] > 0 and r["flops"] > 0
  assert r["mesh"] == {"data": 8, "model": 1} and r["collectives"]["all-reduce"] > 0
  assert "2 of 30 layers" in capsys.readouterr().out
  code, cached = _run(tmp_path, "--teacher", "cache")
  assert code == 0 and cached["flops"] < r["flops"]  # no deep layers, no teacher head


@pytest.mark.slow  # compiles the 135M shape's train step (2 layers): ~30 s
def test_a_program_over_the_chips_memory_exits_1(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(aot.CHIPS, "cpu", aot.Chip("CPU", 0.001, 1e11, 1e12, ""))
  code, r = _run(tmp_path)
  assert code == 1 and not r["fits"]
  assert "error: train needs" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  for args in (["--topology", "v9:2x2"], ["--topology", "cpu:3"]):  # decode compiles: test_aot_decode
    argv = ["--program", "train", "--config", TINY, "--topology", "cpu:8", *args]
    assert tpu_aot.main(argv) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
