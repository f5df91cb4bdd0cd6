"""Smoke test of ``examples/exploding_gradients.py`` (the ``make demo`` job)."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parent.parent / "examples"
            / "exploding_gradients.py")

_KEYS = {"final_mse", "best_mse", "diverged", "steps_to_0.05",
         "steps_to_0.01", "pct_clipped", "steps_run", "seconds",
         "compile_seconds", "eval_steps", "heldout_mse", "losses",
         "pre_clip_norms"}


def _load():
  spec = importlib.util.spec_from_file_location(
      "optaxclip_example_exploding_gradients", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(helpers.flax_version() < (0, 11),
                    reason="the demo is run and tested with flax >= 0.11")
def test_adding_batch():
  import jax  # pylint: disable=g-import-not-at-top
  demo = _load()
  x, y = demo.adding_batch(jax.random.key(0), 256, 50)
  x, y = np.asarray(x), np.asarray(y)
  assert x.shape == (256, 50, 2) and y.shape == (256, 1)
  values, markers = x[..., 0], x[..., 1]
  assert ((values >= 0) & (values < 1)).all()
  # Exactly one marker in each half; the target is the sum of the two marked
  # values.
  assert (markers[:, :25].sum(1) == 1).all()
  assert (markers[:, 25:].sum(1) == 1).all()
  np.testing.assert_allclose(y[:, 0], (values * markers).sum(1), rtol=1e-6)
  # Every position is used.
  assert (markers.sum(0) > 0).all()


@pytest.mark.skipif(helpers.flax_version() < (0, 11),
                    reason="the demo is run and tested with flax >= 0.11")
def test_exploding_gradients_demo_writes_summary(tmp_path):
  demo = _load()
  summary = demo.main(steps=50, out=str(tmp_path),
                      runs=["baseline", "clip_by_global_norm"], verbose=False,
                      seeds=2)

  path = tmp_path / "summary.json"
  assert path.exists()
  # The figure needs matplotlib, which is in the examples extra (make demo),
  # not in the test extra.
  try:
    import matplotlib  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
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
    assert run["final_mse"] is None or isinstance(run["final_mse"], float)
    assert 0.0 <= run["pct_clipped"] <= 100.0
    assert run["seconds"] > 0
    # Held-out evaluations before training and every 50 steps (gcd(50, 100)).
    assert run["eval_steps"] == [0, 50]
    assert len(run["heldout_mse"]) == 2
    # Both seeds, vmapped; the headline numbers are seed 0's.
    assert len(run["seeds"]["final_mse"]) == 2
    assert run["seeds"]["final_mse"][0] == run["final_mse"]
  assert on_disk["runs"]["baseline"]["pct_clipped"] == 0.0
  # The demo's point: without clipping the loss blows up within 50 steps
  # (by step ~30 in the full run).
  assert on_disk["runs"]["baseline"]["diverged"]
  assert all(on_disk["runs"]["baseline"]["seeds"]["diverged"])
  assert on_disk["config"]["steps"] == 50
  assert on_disk["config"]["eval_seed"] != on_disk["config"]["data_seed"]
  # Same model and batches: both runs start from the same held-out MSE.
  assert (on_disk["runs"]["baseline"]["heldout_mse"][0]
          == on_disk["runs"]["clip_by_global_norm"]["heldout_mse"][0])

  clipped = summary["runs"]["clip_by_global_norm"]
  losses = clipped["losses"]
  norms = clipped["pre_clip_norms"]
  assert len(losses) == len(norms) == clipped["steps_run"] == 50
  assert all(v is not None and math.isfinite(v) for v in losses)
  assert math.isfinite(clipped["final_mse"])
  assert not clipped["diverged"]
  # The norms are the run's own raw (pre-clip) gradient norms: positive, and
  # some exceed the threshold 0.5 exactly when the clipper acted.
  assert all(v is not None and v > 0 for v in norms)
  acted = sum(v > 0.5 for v in norms)
  assert acted > 0
  assert math.isclose(clipped["pct_clipped"], 100.0 * acted / len(norms))
  assert on_disk["runs"] == json.loads(json.dumps(summary["runs"]))
