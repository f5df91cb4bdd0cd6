"""Smoke test of the stability study (``benchmarks/stability/study.py``).

Runs the study's ``--quick`` mode (every task; every clipper on ``digits``
and the baselines plus ``clip_by_global_norm`` on the others; the two
extreme learning rates of each grid, few steps) and checks the outputs:
their shapes, that every row has a default and (where it has a threshold) a
tuned variant, and that training without clipping diverges at the top
learning rate of the tasks where the study is meant to show it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import helpers
import jax
import pytest

# The quick run is a module fixture of a few minutes: under pytest-xdist the
# module's tests stay on one worker so it runs once (make test: --dist
# loadgroup).
pytestmark = pytest.mark.xdist_group("stability_study")

_STUDY = (pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
          / "stability" / "study.py")


def _load():
  spec = importlib.util.spec_from_file_location("optaxclip_stability_study",
                                                _STUDY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  if helpers.flax_version() < (0, 11):
    pytest.skip("the study's LM uses the flax >= 0.11 NNX API")
  out = tmp_path_factory.mktemp("study")
  study = _load()
  # The study's model code (not the library) broadcasts biases implicitly
  # and mixes Python floats into arrays, as user code does; the strict
  # rules of conftest.py are for the library.
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion(
      "standard"):
    study.main(["--quick", "--out", str(out), "--no-plots"])
  return study, out, json.loads((out / "stability.json").read_text())


def test_every_task_and_clipper_has_a_row(quick):
  study, out, results = quick
  assert set(results["tasks"]) == {"lm", "digits", "adding", "dp_digits",
                                   "transformer"}
  for name, task in results["tasks"].items():
    if name == "transformer":
      continue
    expected = (study.clippers_lib.DP_CLIPPERS if name == "dp_digits"
                else study.clippers_lib.CLIPPERS)
    if name != study.QUICK_ALL_CLIPPERS_TASK:
      expected = [c for c in expected if c.name in study.QUICK_CLIPPERS]
    assert [row["clipper"] for row in task["rows"]] == [
        c.name for c in expected]
    n_lr = len(task["learning_rates"])
    assert n_lr == 2
    for row, clipper in zip(task["rows"], expected):
      variants = row["variants"]
      assert set(variants) == ({"default"} if clipper.default is None
                               else {"default", "tuned"})
      for v in variants.values():
        assert len(v["median_metric"]) == n_lr
        assert len(v["any_diverged"]) == n_lr
        assert v["stable_range"] >= 0
      if clipper.default is not None:
        assert row["tuning"]["tuned"] in clipper.candidates
  markdown = (out / "stability.md").read_text()
  for name in results["tasks"]:
    assert f"## {name}:" in markdown


def test_transformer_task_reports_its_rows(quick):
  study, out, results = quick
  task = results["tasks"]["transformer"]
  expected = [r.name for r in study.transformer_lib._rows()
              if r.name in study.transformer_lib.QUICK_ROWS]
  assert [row["clipper"] for row in task["rows"]] == expected
  assert len(task["learning_rates"]) == 2
  for row in task["rows"]:
    v = row["variants"]["default"]
    assert len(v["median_metric"]) == 2
    assert len(v["max_logit_per_layer"]) == 2
    assert all(s >= 0 for s in v["lr_sensitivity"])
  # The smoke run's top learning rate already grows layer-0 logits far past
  # the qk-layernorm model's.
  by_name = {row["clipper"]: row["variants"]["default"] for row in task["rows"]}
  plain = by_name["none"]["max_logit_per_layer"][-1][0]
  normed = by_name["qk_layernorm"]["max_logit_per_layer"][-1][0]
  assert plain > 10 * normed
  assert "### transformer: LR sensitivity" in (out / "stability.md").read_text()


def test_lr_sensitivity_by_hand():
  study = _load()
  import numpy as np  # pylint: disable=g-import-not-at-top
  # Two learning rates x two seeds. Seed 0: losses 2.0 and 3.0 (init 4.0):
  # best 2.0, mean excess (0 + 1) / 2 = 0.5. Seed 1: 2.5 and NaN (init
  # 3.0): NaN counts as init, best 2.5, mean excess (0 + 0.5) / 2 = 0.25.
  final = np.array([[2.0, 2.5], [3.0, np.nan]])
  initial = np.array([[4.0, 3.0], [4.0, 3.0]])
  np.testing.assert_allclose(
      study.transformer_lib.lr_sensitivity(final, initial), [0.5, 0.25])
  # A loss above init is capped at init.
  np.testing.assert_allclose(study.transformer_lib.lr_sensitivity(
      np.array([[1.0], [9.0]]), np.array([[2.0], [2.0]])), [0.5])


@pytest.mark.parametrize("task", ["adding"])
def test_no_clipping_diverges_at_the_top_learning_rate(quick, task):
  _, _, results = quick
  row = results["tasks"][task]["rows"][0]
  assert row["clipper"] == "none"
  assert row["variants"]["default"]["any_diverged"][-1]
  assert not row["variants"]["default"]["any_diverged"][0]


def test_stable_range_and_divergence_rules():
  study = _load()
  assert study.stable_range([1.0, 2.0, 4.0, 8.0],
                            [True, True, False, True]) == 2.0
  assert study.stable_range([1.0, 10.0], [False, False]) == 0.0
  assert study.stable_range([1.0, 10.0, 100.0], [True] * 3) == 100.0
  import numpy as np  # pylint: disable=g-import-not-at-top
  result = {"final_loss": np.array([0.5, 2.0, math.nan, math.inf]),
            "initial": np.array([1.0, 1.0, 1.0, 1.0])}
  assert study.diverged(result).tolist() == [False, True, True, True]
