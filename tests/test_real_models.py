"""The docs' "Real models" recipes (examples/real_models.py) run and do what
the page says: per-layer norms for scanned blocks, Equinox row units, float32
norms of bf16 gradients, the MultiSteps NaN pitfall and its fix, frozen
parameters kept out of the norm."""

import importlib.util
import pathlib

import numpy as np
import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parent.parent / "examples"
            / "real_models.py")


@pytest.fixture(scope="module")
def recipes():
  spec = importlib.util.spec_from_file_location("real_models", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(helpers.flax_version() < (0, 11),
                    reason="the recipe uses the flax >= 0.11 nnx API")
def test_nnx_scanned_blocks_train_with_per_layer_stats(recipes,
                                                       standard_promotion):
  losses, stats = recipes.nnx_scanned_blocks(steps=20, layers=3)
  assert losses[-1] < 0.5 * losses[0]
  for key in ("record_norms/blocks/fc/kernel",
              "clip_by_norm/leaf_norms/blocks/fc/kernel",
              "record_norms/blocks/norm/scale"):
    assert stats[key].shape == (3,), key
  assert stats["record_norms/head/kernel"].shape == ()
  # clip_by_norm(1.0) runs after AGC: every layer slice's recorded norm is
  # the pre-clip one, finite and positive.
  assert np.all(np.asarray(stats["record_norms/blocks/fc/kernel"]) > 0)


def test_equinox_recipe_trains(recipes, standard_promotion):
  pytest.importorskip("equinox")
  losses, stats = recipes.equinox_mlp(steps=20)
  assert losses[-1] < losses[0]
  assert "adaptive_grad_clip/num_clipped_units" in stats


def test_bf16_recipe_norm_is_float32_exact(recipes):
  updates, norm, exact = recipes.bf16_gradients()
  np.testing.assert_allclose(norm, exact, rtol=1e-5)
  assert all(str(u.dtype) == "bfloat16" for u in updates.values())


def test_multisteps_pitfall_and_fix(recipes, standard_promotion):
  assert recipes.multisteps_nan_micro_batch(guard=False) == [True] * 4
  assert recipes.multisteps_nan_micro_batch(guard=True) == [False] * 4


def test_frozen_parameters_stay_out_of_the_norm(recipes, standard_promotion):
  updates, norm = recipes.frozen_parameters()
  np.testing.assert_allclose(norm, np.sqrt(32 * 0.25), rtol=1e-6)
  assert float(np.abs(np.asarray(updates["embed"])).max()) == 0.0
