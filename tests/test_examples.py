"""Smoke test of the runnable examples in ``examples/`` (``make demo``)."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

import helpers

# The examples are user scripts written for the current flax NNX API
# (``nnx.Optimizer(model, tx, wrt=...)``, ``optimizer.update(model, grads)``);
# the floor-version suite (flax 0.10) has the older API and skips them.
needs_flax_011 = pytest.mark.skipif(
    helpers.flax_version() < (0, 11),
    reason="examples use the flax >= 0.11 nnx.Optimizer API")

_EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
  """Imports ``examples/<name>.py`` by path (examples/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"optaxclip_example_{name}", _EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@needs_flax_011
def test_toy_regression_trains_and_logs_the_raw_norm():
  toy_regression = _load("toy_regression")
  history = toy_regression.main(epochs=10, verbose=False)

  losses = history["losses"]
  logged = history["logged_norms"]
  raw = history["raw_norms"]
  assert len(losses) == len(logged) == len(raw) == 10
  for name in ("losses", "logged_norms", "raw_norms"):
    assert all(math.isfinite(v) for v in history[name]), name
  assert losses[-1] < losses[0]
  # The norm the clipper logged in its state is the norm of the raw gradients
  # the loop computed itself, epoch by epoch.
  np.testing.assert_allclose(logged, raw, rtol=1e-6)
  # The demo is only a demo if the clipper acts: the first step's raw
  # gradients exceed max_norm = 1, and the clipped flag agrees with the norm.
  assert raw[0] > 1.0
  assert history["clipped"] == [n > 1.0 for n in raw]


@pytest.mark.usefixtures("standard_promotion")  # optax.adam in the example
@needs_flax_011
def test_spiky_training_example_runs_and_clipping_helps():
  spiky = _load("spiky_training")
  results = spiky.main(steps=60, out=None, verbose=False)
  baseline = results["no clipping"]["final_loss"]
  for name, history in results.items():
    assert np.isfinite(history["loss"]).all(), name
    if name != "no clipping":
      # Each method contains the two injected spikes (steps 25 and 50).
      assert history["final_loss"] < baseline, name
  # skip_step skips exactly the two spike steps once its warmup has passed.
  assert results["skip_step"]["acted"] == 2


@needs_flax_011
def test_mlp_regression_unclipped_diverges_and_clipped_trains():
  result = _load("mlp_regression").main(epochs=8, verbose=False)
  assert not all(math.isfinite(v) for v in result["unclipped"]["losses"])
  clipped = result["clipped"]
  assert all(math.isfinite(v) for v in clipped["losses"])
  assert clipped["losses"][-1] < clipped["losses"][0]
  np.testing.assert_allclose(clipped["norms"], clipped["raw_norms"], rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")  # optax.adam in the example
def test_linen_train_state_example():
  history = _load("linen_train_state").main(steps=30, verbose=False)
  assert history["losses"][-1] < history["losses"][0]
  np.testing.assert_allclose(history["logged_norms"], history["raw_norms"],
                             rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")  # optax.adam in the example
def test_csv_logging_example(tmp_path):
  import csv  # pylint: disable=g-import-not-at-top
  path = _load("csv_logging").main(steps=50, out=str(tmp_path), plot=False)
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 50
  for row in rows:
    if row["zclip/zclip_clipped"] == "False":
      # Nothing changed the gradients between the two clippers.
      np.testing.assert_allclose(float(row["clip_by_global_norm/global_norm"]),
                                 float(row["zclip/zclip_norm"]), rtol=1e-6)
  assert rows[39]["zclip/zclip_spike"] == "True"  # the injected 50x spike
