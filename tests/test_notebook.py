"""notebooks/colab.ipynb runs end to end on the CPU with the embedded model, and says what
it should: the install cell's CPU path, an answer from `generate` that `stream` repeats,
Kangaroo identical to plain decoding with at least one token per step, and a plot."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab.ipynb")


def _text(cell) -> str:
  """A code cell's stream and text outputs, joined."""
  parts = []
  for out in cell.get("outputs", []):
    if out["output_type"] == "stream":
      parts.append(out["text"])
    elif "text/plain" in out.get("data", {}):
      parts.append(out["data"]["text/plain"])
  return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_on_the_cpu_and_its_outputs_hold(tmp_path):
  nbformat = pytest.importorskip("nbformat", reason="nbformat: requirements-dev.txt")
  nbclient = pytest.importorskip("nbclient", reason="nbclient: requirements-dev.txt")
  pytest.importorskip("ipykernel", reason="ipykernel (the notebook's kernel): requirements-dev.txt")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel imports this checkout, on one device (the CPU unless a device run names its
  # platform, e.g. KANGAROO_NOTEBOOK_PLATFORM=cuda), with the notebook's small sizes.
  platform = os.environ.get("KANGAROO_NOTEBOOK_PLATFORM", "cpu")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=platform, XLA_FLAGS="",
             KANGAROO_NOTEBOOK_QUICK="1")
  env.pop("MPLBACKEND", None)  # the notebook's %matplotlib inline decides
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
  finally:
    nbformat.write(nb, str(tmp_path / "colab.executed.ipynb"))  # to read after a failure

  code = [c for c in nb.cells if c.cell_type == "code"]
  texts = [_text(c) for c in code]
  errors = [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
  assert not errors, errors
  assert "not on Colab: using the installed kangaroo-jax" in texts[0]
  assert f"backend {'gpu' if platform == 'cuda' else platform}" in texts[1]
  assert any("same text as generate: True" in t for t in texts), texts
  assert any("identical to plain decoding: 2/2 prompts" in t for t in texts), texts
  images = [o for o in code[-2].get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 1, code[-2].get("outputs")

  summary = json.loads(texts[-1].strip().splitlines()[-1])
  assert summary["backend"] in texts[1] and summary["max_new_tokens"] == 24
  assert [r["category"] for r in summary["rows"]] == ["writing", "translation"]
  for row in summary["rows"]:
    assert row["identical"] and row["tokens"] > 0, row
    assert row["tokens_per_step"] >= 1.0, row  # the target's own token counts: at least one
    assert row["kangaroo_tps"] > 0 and row["plain_tps"] > 0, row
