"""Smoke test of the stability study (``benchmarks/stability/study.py``).

Runs the study's ``--quick`` mode (every task; the baselines and
``clip_by_global_norm``; the two extreme learning rates of each grid, few
steps) and checks the outputs:
their shapes, that every row has a default and (where it has a threshold) a
tuned variant, and that training without clipping diverges at the top
learning rate of the tasks where the study is meant to show it. Every other
clipper of the study takes one jitted step on its task's model, with its
default and its largest candidate threshold.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The quick run takes a minute or two: it runs once, in one test (pytest-xdist
# could otherwise run a module fixture once on each worker), and that test
# starts first (the "expensive" mark, see conftest.py).
_STUDY = (pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
          / "stability" / "study.py")


def _load():
  spec = importlib.util.spec_from_file_location("optaxclip_stability_study",
                                                _STUDY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _quick_run(out: pathlib.Path):
  study = _load()
  # The study's model code (not the library) broadcasts biases implicitly
  # and mixes Python floats into arrays, as user code does; the strict
  # rules of conftest.py are for the library.
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion(
      "standard"):
    study.main(["--quick", "--out", str(out), "--no-plots"])
  return study, json.loads((out / "stability.json").read_text())


@pytest.mark.expensive
def test_quick_run(tmp_path):
  if helpers.flax_version() < (0, 11):
    pytest.skip("the study's LM uses the flax >= 0.11 NNX API")
  study, results = _quick_run(tmp_path)
  _check_every_task_and_clipper_has_a_row(study, tmp_path, results)
  _check_transformer_task_reports_its_rows(study, tmp_path, results)
  _check_no_clipping_diverges_at_the_top_learning_rate(results, "adding")


def _check_every_task_and_clipper_has_a_row(study, out, results):
  assert set(results["tasks"]) == {"lm", "digits", "adding", "dp_digits",
                                   "transformer"}
  for name, task in results["tasks"].items():
    if name == "transformer":
      continue
    expected = (study.clippers_lib.DP_CLIPPERS if name == "dp_digits"
                else study.clippers_lib.CLIPPERS)
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


def _check_transformer_task_reports_its_rows(study, out, results):
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


def test_every_clipper_takes_a_step():
  # The DP task's two rows are both in the quick run.
  study = _load()
  assert {c.name for c in study.clippers_lib.DP_CLIPPERS} <= (
      study.QUICK_CLIPPERS)
  task = study.tasks_lib.TASKS["digits"](steps=1)
  clippers = study.clippers_lib.CLIPPERS
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion(
      "standard"):
    key = jax.random.key(0)
    params = task.init(key)
    _, grads = task.grads(params, key)
    for clipper in clippers:
      # As the study's runner does: the threshold is traced.
      @jax.jit
      def step(thr, clipper=clipper):
        tx = clipper.build(task.base_optimizer(), thr, 0)
        return tx.update(grads, tx.init(params), params)[0]

      thresholds = ((0.0,) if clipper.default is None
                    else (clipper.default, max(clipper.candidates)))
      for thr in thresholds:
        updates = step(jnp.float32(thr))
        assert (jax.tree.structure(updates) == jax.tree.structure(params)
                ), clipper.name
        leaves = [np.asarray(x) for x in jax.tree.leaves(updates)]
        assert all(np.isfinite(x).all() for x in leaves), (clipper.name, thr)
        assert any(np.any(x) for x in leaves), (clipper.name, thr)


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


def _check_no_clipping_diverges_at_the_top_learning_rate(results, task):
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
