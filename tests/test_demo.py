"""Smoke test of ``examples/exploding_gradients.py`` (the ``make demo`` job)."""

import importlib.util
import json
import math
import pathlib

import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parent.parent / "examples"
            / "exploding_gradients.py")

_KEYS = {"final_loss", "best_loss", "diverged", "steps_to_0.05",
         "pct_clipped", "seconds"}


def _load():
  spec = importlib.util.spec_from_file_location(
      "optaxclip_example_exploding_gradients", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(helpers.flax_version() < (0, 11),
                    reason="the demo uses the flax >= 0.11 nnx.Optimizer API")
def test_exploding_gradients_demo_writes_summary(tmp_path):
  demo = _load()
  summary = demo.main(steps=50, out=str(tmp_path),
                      runs=["baseline", "clip_by_global_norm"], verbose=False)

  path = tmp_path / "summary.json"
  assert path.exists()
  # The figure needs matplotlib, which is in the examples extra (make demo),
  # not in the test extra.
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
    has_matplotlib = True
  except ImportError:
    has_matplotlib = False
  assert (tmp_path / "exploding_gradients.png").exists() == has_matplotlib
  on_disk = json.loads(path.read_text())
  assert set(on_disk) >= {"runs", "config"}
  assert set(on_disk["runs"]) == {"baseline", "clip_by_global_norm"}
  for name, run in on_disk["runs"].items():
    assert _KEYS <= set(run), name
    assert isinstance(run["diverged"], bool)
    assert run["final_loss"] is None or isinstance(run["final_loss"], float)
    assert 0.0 <= run["pct_clipped"] <= 100.0
    assert run["seconds"] > 0
  assert on_disk["runs"]["baseline"]["pct_clipped"] == 0.0
  assert on_disk["config"]["steps"] == 50

  clipped = summary["runs"]["clip_by_global_norm"]
  losses = clipped["losses"]
  norms = clipped["pre_clip_norms"]
  assert len(losses) == len(norms) == 50
  assert all(v is not None and math.isfinite(v) for v in losses)
  assert math.isfinite(clipped["final_loss"])
  assert not clipped["diverged"]
  # The norms are the run's own raw (pre-clip) gradient norms: positive, and
  # some exceed the threshold 1.0 exactly when the clipper acted.
  assert all(v is not None and v > 0 for v in norms)
  acted = sum(v > 1.0 for v in norms)
  assert acted > 0
  assert math.isclose(clipped["pct_clipped"], 100.0 * acted / len(norms))
  assert on_disk["runs"] == json.loads(json.dumps(summary["runs"]))
