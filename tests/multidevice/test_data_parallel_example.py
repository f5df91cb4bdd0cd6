"""Smoke test of ``examples/data_parallel.py`` on the 8 simulated devices."""

import importlib.util
import math
import pathlib

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

_EXAMPLES = (pathlib.Path(__file__).resolve().parent.parent.parent /
             "examples")


def _load(name: str):
  """Imports ``examples/<name>.py`` by path (examples/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"optaxclip_example_{name}", _EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_data_parallel_norms_match_one_device_and_loss_decreases():
  data_parallel = _load("data_parallel")
  # optax.adamw promotes its int32 step count against floats, which the
  # strict promotion of conftest.py rejects (as tests/conftest.py notes).
  with jax.numpy_dtype_promotion("standard"):
    history = data_parallel.main(steps=5, verbose=False)

  norms, single = history["norms"], history["single_norms"]
  losses = history["losses"]
  assert len(norms) == len(single) == len(losses) == 5
  for key in ("losses", "norms", "single_losses", "single_norms"):
    assert all(math.isfinite(v) for v in history[key]), key
  # The norm logged by the clipper on the sharded model is the single-device
  # norm, step by step (so the whole trajectories agree too).
  np.testing.assert_allclose(norms, single, rtol=1e-4)
  np.testing.assert_allclose(losses, history["single_losses"], rtol=1e-4)
  assert losses[-1] < losses[0]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  # The clipper acts: the raw norms are above max_norm = 1.
  assert history["clipped"] == [n > data_parallel.MAX_NORM for n in norms]
  assert any(history["clipped"])
  # The model really is split over "model".
  shardings = history["param_shardings"]
  assert shardings["l1/kernel"] == P(None, "model")
  assert shardings["l2/bias"] == P("model")
