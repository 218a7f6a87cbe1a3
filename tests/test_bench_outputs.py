"""The benchmark writes to a new run folder by default and leaves shipped files alone."""
import json
import os

from kangaroo_jax import bench, tuning

from test_bench import COMMON, qfile, tiny  # noqa: F401  (pytest fixtures)


def test_default_out_dir_is_a_new_run_folder(tmp_path):
  root = str(tmp_path / "runs" / "bench")
  first = bench.default_out_dir(root)
  os.makedirs(first)
  second = bench.default_out_dir(root)
  assert os.path.dirname(first) == root and second != first
  assert bench.build_parser().parse_args([]).out is None


def test_sweep_writes_the_tuned_file_only_when_asked(tiny, qfile, tmp_path, monkeypatch):  # noqa: F811
  shipped = tmp_path / "tuned" / "cpu.json"
  monkeypatch.setattr(tuning, "tuned_path", lambda backend=None: str(shipped))
  monkeypatch.chdir(tmp_path)
  args = ["--sweep", "--model", tiny, "--questions", qfile, "--categories", "qa",
          "--sweep-eta", "0.5", "--sweep-gamma", "3", "--sweep-draft-vocab", "0",
          "--sweep-send-unconfident", "yes", *COMMON]
  results = bench.bench(args)
  assert not shipped.exists()
  (run,) = os.listdir(tmp_path / "runs" / "bench")  # the default: one new run folder
  folder = tmp_path / "runs" / "bench" / run
  assert {"results.json", "results.md", "speedup.png", "tuned.json"} <= set(os.listdir(folder))
  assert json.loads((folder / "tuned.json").read_text())["eta"] == results["sweep"]["best"]["eta"]
  bench.bench(args + ["--write-tuned", "--out", str(tmp_path / "second")])
  assert tuning.tuned_settings(path=str(shipped))["eta"] == 0.5
