"""Tests for clip_per_example (per-example clipping, DP-SGD noise, quantiles)."""

import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
import pytest

from optaxclip import _stats
from helpers import maybe_jit
from reference import automatic_clip_reference
import reference


def per_example_reference(leaves, max_norm, reduce="sum"):
  """Float64 NumPy DP-SGD clipping (Abadi et al. 2016, Alg. 1, no noise).

  Each example b is scaled by min(1, C / ||g_b||_2), its norm taken over all
  leaves; examples with a non-finite norm are dropped; the clipped examples
  are summed, or divided by the full batch size for "mean".

  Returns:
    (list of float64 output leaves, number of clipped finite examples,
    number of non-finite examples).
  """
  leaves = [np.asarray(x, np.float64) for x in leaves]
  batch = leaves[0].shape[0]
  outs = [np.zeros(x.shape[1:]) for x in leaves]
  num_clipped = num_nonfinite = 0
  for b in range(batch):
    norm = math.sqrt(sum(float(np.sum(x[b] ** 2)) for x in leaves))
    if not math.isfinite(norm):
      num_nonfinite += 1
      continue
    scale = 1.0 if norm <= max_norm else max_norm / norm
    num_clipped += norm > max_norm
    for out, x in zip(outs, leaves):
      out += x[b] * scale
  if reduce == "mean":
    outs = [out / batch for out in outs]
  return outs, num_clipped, num_nonfinite


def _batch(batch=6, seed=0, dtype=jnp.float32, spread=3.0):
  rng = np.random.default_rng(seed)
  # Example b is scaled by a factor spread over [0.1, spread] so some
  # examples are clipped and some are not.
  factors = np.linspace(0.1, spread, batch)
  w = rng.normal(size=(batch, 3, 4)) * factors[:, None, None]
  bias = rng.normal(size=(batch, 4)) * factors[:, None]
  return {"w": jnp.asarray(w, dtype), "b": jnp.asarray(bias, dtype)}


def _params(grads):
  return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)


def _run(tx, grads, use_jit=False, state=None):
  if state is None:
    state = tx.init(_params(grads))
  return maybe_jit(tx.update, use_jit)(grads, state)


def _close(got, want64, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), want64):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 2.0, math.inf])
def test_sum_matches_optax(max_norm, use_jit):
  grads = _batch()
  out, state = _run(oc.clip_per_example(max_norm, reduce="sum"), grads, use_jit)
  want, want_count = optax.per_example_global_norm_clip(
      jax.tree.leaves(grads), max_norm)
  for g, w in zip(jax.tree.leaves(out), want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  assert int(state.num_clipped_examples) == int(want_count)
  assert int(state.num_nonfinite_examples) == 0


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 3.0])
def test_matches_reference(reduce, max_norm, use_jit):
  grads = _batch(batch=7, seed=1)
  out, state = _run(oc.clip_per_example(max_norm, reduce=reduce), grads, use_jit)
  want, num_clipped, _ = per_example_reference(
      jax.tree.leaves(grads), max_norm, reduce)
  _close(out, want)
  assert int(state.num_clipped_examples) == num_clipped
  assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape,
                                                       _params(grads))
  norms = [np.sqrt(sum(np.sum(np.asarray(x[b], np.float64) ** 2)
                       for x in jax.tree.leaves(grads))) for b in range(7)]
  np.testing.assert_allclose(state.per_example_norm_mean, np.mean(norms),
                             rtol=1e-5)


def test_mean_is_sum_over_batch_size():
  grads = _batch(batch=5)
  total, _ = _run(oc.clip_per_example(1.0, reduce="sum"), grads)
  mean, _ = _run(oc.clip_per_example(1.0, reduce="mean"), grads)
  for t, m in zip(jax.tree.leaves(total), jax.tree.leaves(mean)):
    np.testing.assert_allclose(m, t / 5, rtol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_non_finite_example_is_excluded_and_counted(bad, reduce, use_jit):
  grads = _batch(batch=6)
  grads["w"] = grads["w"].at[2, 1, 1].set(bad)
  out, state = _run(oc.clip_per_example(1.0, reduce=reduce), grads, use_jit)
  for leaf in jax.tree.leaves(out):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  # Same as the batch without example 2, but divided by the full batch size.
  kept = jax.tree.map(lambda x: np.delete(np.asarray(x), 2, axis=0), grads)
  want, num_clipped, _ = per_example_reference(jax.tree.leaves(kept), 1.0)
  if reduce == "mean":
    want = [w / 6 for w in want]
  _close(out, want)
  assert int(state.num_nonfinite_examples) == 1
  assert int(state.num_clipped_examples) == num_clipped
  assert bool(jnp.isfinite(state.per_example_norm_mean))


def test_all_examples_non_finite_gives_zero():
  grads = {"w": jnp.full((3, 2), jnp.nan, jnp.float32)}
  out, state = _run(oc.clip_per_example(1.0, target_quantile=0.5), grads)
  np.testing.assert_array_equal(out["w"], np.zeros(2, np.float32))
  assert int(state.num_nonfinite_examples) == 3
  assert float(state.per_example_max_norm) == 1.0  # C unchanged
  assert float(state.per_example_norm_mean) == 0.0


def test_noise_statistics():
  # Zero gradients: the output is pure noise with std sigma * C / 1 (sum).
  grads = {"a": jnp.zeros((2, 200, 100), jnp.float32),
           "b": jnp.zeros((2, 5000), jnp.float32)}
  tx = oc.clip_per_example(1.0, reduce="sum", noise_multiplier=1.0, seed=3)
  out, _ = _run(tx, grads)
  noise = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
  assert noise.size == 25000
  assert abs(np.mean(noise)) < 0.03  # 4.7 standard errors
  assert abs(np.std(noise) - 1.0) < 0.03
  # Noise std scales with noise_multiplier * max_norm, before the mean.
  tx = oc.clip_per_example(0.5, reduce="mean", noise_multiplier=2.0, seed=3)
  out, _ = _run(tx, grads)
  noise = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
  assert abs(np.std(noise) - 0.5) < 0.015


def test_noise_changes_every_step_and_is_deterministic(use_jit):
  grads = {"w": jnp.zeros((4, 50), jnp.float32)}
  tx = oc.clip_per_example(1.0, noise_multiplier=1.0, seed=7)
  update = maybe_jit(tx.update, use_jit)
  state0 = tx.init(_params(grads))
  first, state1 = update(grads, state0)
  second, _ = update(grads, state1)
  assert not np.allclose(first["w"], second["w"])
  again, again_state = update(grads, state0)
  np.testing.assert_array_equal(first["w"], again["w"])
  np.testing.assert_array_equal(state1.per_example_rng,
                                again_state.per_example_rng)
  other, _ = oc.clip_per_example(1.0, noise_multiplier=1.0, seed=8).update(
      grads, oc.clip_per_example(1.0, noise_multiplier=1.0, seed=8).init(
          _params(grads)))
  assert not np.allclose(first["w"], other["w"])
  # The key is a plain uint32 array (checkpoint-friendly).
  assert state0.per_example_rng.dtype == jnp.uint32
  assert state0.per_example_rng.shape == (2,)


def test_quantile_adaptation_matches_numpy_loop(use_jit):
  gamma, lr, steps, batch = 0.5, 0.2, 50, 16
  rng = np.random.default_rng(0)
  data = rng.normal(size=(steps, batch, 8)) * rng.uniform(
      0.1, 3.0, size=(steps, batch, 1))
  tx = oc.clip_per_example(20.0, target_quantile=gamma, quantile_lr=lr)
  update = maybe_jit(tx.update, use_jit)
  state = tx.init({"w": jnp.zeros(8, jnp.float32)})
  c = 20.0
  got, want = [], []
  for t in range(steps):
    grads = {"w": jnp.asarray(data[t], jnp.float32)}
    out, state = update(grads, state)
    norms = np.linalg.norm(data[t], axis=1)
    # The output is clipped with the C in force before the update.
    ref, _, _ = per_example_reference([data[t]], c, "mean")
    np.testing.assert_allclose(out["w"], ref[0], rtol=2e-4, atol=1e-5)
    c = c * math.exp(-lr * (np.mean(norms <= c) - gamma))
    got.append(float(state.per_example_max_norm))
    want.append(c)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # It moved from 20 down to about the median per-example norm.
  median = np.median(np.linalg.norm(data[-10:], axis=2))
  assert abs(want[-1] / median - 1.0) < 0.3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float64])
def test_dtypes_kept(dtype):
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    pytest.skip("float64 needs jax_enable_x64")
  grads = _batch(dtype=dtype)
  out, state = _run(oc.clip_per_example(1.0, noise_multiplier=0.1), grads)
  for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out)):
    assert o.dtype == g.dtype
    assert o.shape == g.shape[1:]
  if dtype != jnp.float64:
    out, _ = _run(oc.clip_per_example(1.0), grads)
    want, _, _ = per_example_reference(
        [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)], 1.0,
        "mean")
    _close(out, want, rtol=1e-2, atol=1e-2)
  assert state.per_example_max_norm.dtype == jnp.float32
  assert state.per_example_norm_mean.dtype == jnp.float32


def test_jit_compiles_once_over_ten_steps():
  tx = oc.clip_per_example(1.0, noise_multiplier=0.5, target_quantile=0.5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  state = tx.init(_params(_batch()))
  for i in range(10):
    _, state = step(_batch(seed=i), state)
  assert state.per_example_max_norm.dtype == jnp.float32


def test_grad_through_update_is_finite_at_zero():
  tx = oc.clip_per_example(1.0)
  grads = jax.tree.map(jnp.zeros_like, _batch())
  state = tx.init(_params(grads))

  def loss(g):
    out, _ = tx.update(g, state)
    return sum(jnp.sum(x) for x in jax.tree.leaves(out))

  for leaf in jax.tree.leaves(jax.grad(loss)(grads)):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  # A non-finite example does not poison the other examples' gradients (its
  # own is NaN: the backward pass of its norm sees the NaN input).
  bad = _batch()
  bad["b"] = bad["b"].at[0, 0].set(jnp.nan)
  g = jax.grad(loss)(bad)
  for leaf in jax.tree.leaves(g):
    assert bool(jnp.all(jnp.isfinite(leaf[1:])))


def test_inject_hyperparams_and_clip_stats():
  tx = optax.inject_hyperparams(oc.clip_per_example)(max_norm=0.5)
  grads = _batch()
  out, state = tx.update(grads, tx.init(_params(grads)))
  want, _, _ = per_example_reference(jax.tree.leaves(grads), 0.5, "mean")
  _close(out, want)
  stats = _stats.clip_stats(state)
  assert "clip_per_example/num_clipped_examples" in stats
  assert float(optax.tree.get(state, "per_example_max_norm")) == 0.5


def test_mismatched_batch_sizes():
  tx = oc.clip_per_example(1.0)
  grads = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((4, 2))}
  with pytest.raises(ValueError, match=r"clip_per_example.*\(3, 2\).*\(4, 2\)"):
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match="batch"):
    tx.update({"a": jnp.zeros(()), "b": jnp.zeros((1,))}, tx.init(None))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_norm=-1.0), r"clip_per_example: max_norm .*-1\.0"),
    (dict(max_norm=math.nan), "clip_per_example: max_norm"),
    (dict(max_norm=1.0, reduce="max"), r"reduce must be one of 'mean', 'sum'"),
    (dict(max_norm=1.0, noise_multiplier=-0.5),
     r"clip_per_example: noise_multiplier .*-0\.5"),
    (dict(max_norm=math.inf, noise_multiplier=1.0),
     "noise_multiplier needs a finite max_norm"),
    (dict(max_norm=1.0, target_quantile=1.5),
     r"clip_per_example: target_quantile must be in \[0, 1\], got 1\.5"),
    (dict(max_norm=1.0, target_quantile=-0.1), r"target_quantile .*\[0, 1\]"),
    (dict(max_norm=1.0, target_quantile=0.5, quantile_lr=-0.2),
     r"clip_per_example: quantile_lr .*-0\.2"),
    (dict(max_norm=1.0, seed=1.5), r"clip_per_example: seed must be an int"),
    (dict(max_norm=1.0, seed=True), r"seed must be an int"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    oc.clip_per_example(**kwargs)


# ---------------------------------------------------------------------------
# Automatic clipping (AUTO-S, Bu et al.), flat and per layer, against a
# float64 reference and Opacus' own optimizers.

OPACUS = pathlib.Path(__file__).parent / "data" / "opacus_trajectories.npz"
OPACUS_LEAVES = ("w1", "b1", "w2", "b2")


def _wide_batch(seed=0, batch=6, dtype=jnp.float32):
  """Per-example norms from 1e-4 to 1e3, one all-zero example."""
  rng = np.random.default_rng(seed)
  factors = 10.0 ** np.linspace(-4, 3, batch)
  factors[2] = 0.0
  w = rng.normal(size=(batch, 3, 4)) * factors[:, None, None]
  bias = rng.normal(size=(batch, 4)) * factors[:, None] * 7.0
  return {"w": jnp.asarray(w, dtype), "b": jnp.asarray(bias, dtype)}


@pytest.mark.parametrize("per_layer", [False, True], ids=["flat", "layer"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_automatic_matches_reference(per_layer, reduce, use_jit):
  grads = _wide_batch()
  tx = oc.clip_per_example(
    0.8, rule="automatic", per_layer=per_layer, reduce=reduce
  )
  update = maybe_jit(tx.update, use_jit)
  out, state = update(grads, tx.init(_params(grads)))
  want = automatic_clip_reference(
    [grads["b"], grads["w"]], 0.8, per_layer=per_layer, reduce=reduce
  )
  _close(out, want, rtol=2e-6)
  # Small examples are scaled *up*: AUTO-S never clamps.
  assert int(state.num_clipped_examples) < 6
  assert int(state.num_nonfinite_examples) == 0


def test_automatic_hand_computed():
  tx = oc.clip_per_example(1.0, rule="automatic", reduce="sum")
  grads = {"w": jnp.array([[3.0, 4.0], [0.03, 0.04], [0.0, 0.0]])}
  out, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
  # 1 / (5 + 0.01) * (3, 4) + 1 / (0.05 + 0.01) * (0.03, 0.04) + 0.
  want = np.array([3.0, 4.0]) / 5.01 + np.array([0.03, 0.04]) / 0.06
  np.testing.assert_allclose(out["w"], want, rtol=1e-6)
  assert int(state.num_clipped_examples) == 1  # only the first shrinks
  tx = oc.clip_per_example(
    2.0, rule="automatic", per_layer=True, reduce="sum", stability=0.5
  )
  grads = {"a": jnp.array([[3.0, 4.0]]), "b": jnp.array([[0.5]])}
  out, _ = tx.update(grads, tx.init({"a": jnp.zeros(2), "b": jnp.zeros(1)}))
  np.testing.assert_allclose(out["a"], [2 * 3 / 5.5, 2 * 4 / 5.5], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [2 * 0.5 / 1.0], rtol=1e-6)


@pytest.mark.parametrize("case", ["flat_mean", "flat_sum", "layer_mean"])
def test_automatic_matches_opacus(case, use_jit):
  """Opacus' DP(PerLayer)AutomaticClippingOptimizer, recorded by
  tests/data/make_opacus_trajectories.py, step for step."""
  data = np.load(OPACUS)
  max_norm, mean, per_layer = data[f"{case}_config"]
  tx = oc.clip_per_example(
    float(max_norm),
    rule="automatic",
    per_layer=bool(per_layer),
    reduce="mean" if mean else "sum",
  )
  update = maybe_jit(tx.update, use_jit)
  steps = data[f"{case}_in_w1"].shape[0]
  state = None
  for t in range(steps if use_jit else 3):
    grads = {k: jnp.asarray(data[f"{case}_in_{k}"][t]) for k in OPACUS_LEAVES}
    state = tx.init(_params(grads)) if state is None else state
    out, state = update(grads, state)
    for k in OPACUS_LEAVES:
      np.testing.assert_allclose(
        out[k], data[f"{case}_out_{k}"][t], rtol=2e-5, atol=1e-9,
        err_msg=f"{case} step {t} {k}",
      )


@pytest.mark.parametrize("case", ["flat_mean", "layer_mean"])
def test_automatic_noise_std_matches_opacus(case):
  """The noise std Opacus uses: sigma * C, and sigma * C * sqrt(L) per layer
  (the norm of the L per-layer bounds). Measured on zero gradients."""
  data = np.load(OPACUS)
  max_norm, _, per_layer = data[f"{case}_config"]
  shapes = {"w1": (3, 400), "b1": (300,), "w2": (2, 300), "b2": (200,)}
  grads = {k: jnp.zeros((2, *s)) for k, s in shapes.items()}
  tx = oc.clip_per_example(
    float(max_norm),
    rule="automatic",
    per_layer=bool(per_layer),
    reduce="sum",
    noise_multiplier=1.3,
    seed=3,
  )
  out, _ = tx.update(grads, tx.init(_params(grads)))
  sample = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
  assert sample.size == 2300
  np.testing.assert_allclose(
    np.std(sample), data[f"{case}_noise_std"], rtol=0.05
  )


def test_automatic_nonfinite_example_is_excluded_whole():
  grads = _wide_batch()
  grads["b"] = grads["b"].at[4, 1].set(jnp.inf)
  for per_layer in (False, True):
    tx = oc.clip_per_example(1.0, rule="automatic", per_layer=per_layer)
    out, state = tx.update(grads, tx.init(_params(grads)))
    assert int(state.num_nonfinite_examples) == 1
    want = automatic_clip_reference(
      [grads["b"], grads["w"]], 1.0, per_layer=per_layer
    )
    _close(out, want, rtol=2e-6)


def test_automatic_grad_is_finite_at_zero():
  grads = jax.tree.map(jnp.zeros_like, _batch())
  for per_layer in (False, True):
    tx = oc.clip_per_example(1.0, rule="automatic", per_layer=per_layer)
    state = tx.init(_params(grads))

    def loss(g, tx=tx, state=state):
      out, _ = tx.update(g, state)
      return sum(jnp.sum(x) for x in jax.tree.leaves(out))

    for leaf in jax.tree.leaves(jax.grad(loss)(grads)):
      assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_automatic_low_precision(dtype):
  grads = _wide_batch(dtype=dtype)
  tx = oc.clip_per_example(1.0, rule="automatic", per_layer=True)
  out, state = jax.jit(tx.update)(grads, tx.init(_params(grads)))
  assert out["w"].dtype == dtype and out["w"].shape == (3, 4)
  assert state.per_example_norm_mean.dtype == jnp.float32
  want = automatic_clip_reference(
    [np.asarray(grads["b"], np.float32), np.asarray(grads["w"], np.float32)],
    1.0,
    per_layer=True,
  )
  _close(out, want, rtol=1e-2)


def test_automatic_injected_threshold():
  schedule = optax.linear_schedule(1.0, 0.5, 4)
  tx = optax.inject_hyperparams(oc.clip_per_example)(
    max_norm=schedule, rule="automatic", per_layer=True
  )
  grads = _wide_batch()
  state = tx.init(_params(grads))
  step = jax.jit(tx.update)
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(3):
      out, state = step(grads, state)
  # The third update runs at schedule count 2: C = 1 - 0.5 * 2 / 4.
  want = automatic_clip_reference(
    [grads["b"], grads["w"]], 0.75, per_layer=True
  )
  _close(out, want, rtol=2e-6)


@pytest.mark.parametrize(
  "kwargs,error,pattern",
  [
    (dict(rule="auto"), ValueError, "rule must be one of 'clamp', 'automatic'"),
    (dict(rule="automatic", stability=0.0), ValueError, "stability must be"),
    (dict(stability=-1.0), ValueError, "stability must be in"),
    (dict(stability=float("nan")), ValueError, "stability must be"),
    (dict(per_layer="yes"), TypeError, "per_layer must be a bool"),
    (
      dict(rule="automatic", target_quantile=0.5),
      ValueError,
      "cannot be combined",
    ),
    (dict(per_layer=True, target_quantile=0.5), ValueError, "cannot be"),
    (
      dict(max_norm=float("inf"), rule="automatic"),
      ValueError,
      "needs a finite max_norm",
    ),
  ],
)
def test_automatic_validation(kwargs, error, pattern):
  kwargs = {"max_norm": 1.0, **kwargs}
  with pytest.raises(error, match="clip_per_example: .*" + pattern):
    oc.clip_per_example(**kwargs)


def test_state_threshold_is_documented_and_is_the_next_steps():
  doc = oc.clip_per_example.__doc__
  # The public example uses the public API only (no private module).
  assert "optaxclip._" not in doc and "import optaxclip as oc" in doc
  assert "*next* step's" in doc
  # With target_quantile, step t is clipped with the C that step t - 1 left
  # in the state, and leaves the adapted C for step t + 1.
  tx = oc.clip_per_example(1.0, reduce="sum", target_quantile=0.0,
                           quantile_lr=1.0)
  grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]], jnp.float32)}
  out, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
  ref, _, _ = per_example_reference([np.asarray(grads["w"])], 1.0)
  np.testing.assert_allclose(out["w"], ref[0], rtol=1e-6)
  # One of two examples within C = 1: C <- C * exp(-(1/2 - 0)).
  c_next = math.exp(-0.5)
  np.testing.assert_allclose(float(state.per_example_max_norm), c_next,
                             rtol=1e-6)
  out, _ = tx.update(grads, state)
  ref, _, _ = per_example_reference([np.asarray(grads["w"])], c_next)
  np.testing.assert_allclose(out["w"], ref[0], rtol=1e-6)
  # Without it, each step reads max_norm (a schedule's current value) and
  # the state shows that value.
  schedule = lambda count: 1.0 / (1.0 + count.astype(jnp.float32))
  tx = optax.inject_hyperparams(oc.clip_per_example)(max_norm=schedule,
                                                      reduce="sum")
  state = tx.init({"w": jnp.zeros(2)})
  for step in range(3):
    out, state = tx.update(grads, state)
    c = 1.0 / (1.0 + step)
    assert float(state.inner_state.per_example_max_norm) == np.float32(c)
    ref, _, _ = per_example_reference([np.asarray(grads["w"])], c)
    np.testing.assert_allclose(out["w"], ref[0], rtol=1e-6)


def test_clamp_per_layer_hand_computed():
  """Opacus' per-layer clipping with one C for every leaf: each leaf by its
  own norm, min(1, C / ||g_l||)."""
  tx = oc.clip_per_example(1.0, per_layer=True, reduce="sum")
  grads = {"a": jnp.array([[3.0, 4.0], [0.3, 0.4]]), "b": jnp.array([[2.0], [0.5]])}
  out, state = tx.update(grads, tx.init({"a": jnp.zeros(2), "b": jnp.zeros(1)}))
  np.testing.assert_allclose(out["a"], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [1.0 + 0.5], rtol=1e-6)
  assert int(state.num_clipped_examples) == 1


# --------------------------------------------------------------------------
# An example whose sum of squares overflows float32.
# --------------------------------------------------------------------------


def _assert_close(actual, expected, rtol=1e-6):
  np.testing.assert_allclose(
    np.asarray(actual, np.float64), expected, rtol=rtol, atol=0
  )


def test_clip_per_example_1e20_example_is_finite(use_jit):
  """An example with 1e20 elements has a finite norm: clipped, not excluded."""
  batch = {
    "w": jnp.asarray(
      [[1e20, -1e20, 1e20, 1e20], [0.3, 0.4, 0.0, 0.0]], jnp.float32
    )
  }
  tx = oc.clip_per_example(1.0, reduce="sum")
  out, state = maybe_jit(tx.update, use_jit)(batch, tx.init(batch))
  assert int(state.num_nonfinite_examples) == 0
  assert int(state.num_clipped_examples) == 1
  rows = np.asarray(batch["w"], np.float64)
  expected = sum(r * reference.clip_scale(np.linalg.norm(r), 1.0) for r in rows)
  _assert_close(out["w"], expected, rtol=2e-6)


# --------------------------------------------------------------------------
# Thresholds and batches at the edges: bf16 thresholds, a forgotten vmap,
# the adaptive threshold's range, empty batches, traced invalid rules.
# --------------------------------------------------------------------------


F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)


def test_bf16_threshold_clips_like_its_float64_value(use_jit):
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(5, 3)) * np.linspace(0.1, 2.0, 5)[:, None]
  tx = oc.clip_per_example(jnp.asarray(0.75, jnp.bfloat16), reduce="sum")
  state = tx.init({"w": jnp.zeros(3)})
  out, _ = maybe_jit(tx.update, use_jit)(
    {"w": jnp.asarray(grads, jnp.float32)}, state
  )
  g64 = np.asarray(grads, np.float32).astype(np.float64)
  norms = np.sqrt(np.sum(g64**2, axis=1))
  want = np.sum(g64 * np.minimum(1.0, 0.75 / norms)[:, None], axis=0)
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), want, rtol=1e-6)


# --- Defect 5: clip_per_example ---------------------------------------------


def test_forgotten_vmap_is_detected_with_params(use_jit):
  tx = oc.clip_per_example(1.0)
  params = {"w": jnp.zeros((64, 10))}
  mean_grad = {"w": jnp.ones((64, 10))}  # jax.grad of the batch loss
  with pytest.raises(
    ValueError,
    match=r"^clip_per_example: the per-example gradients at 'w' have shape"
    r" \(64, 10\), but their parameter has shape \(64, 10\): expected"
    r" \(batch,\) \+ \(64, 10\).*jax\.vmap",
  ):
    maybe_jit(tx.update, use_jit)(mean_grad, tx.init(params), params)


def test_per_example_leaf_shape_must_match_its_parameter():
  tx = oc.clip_per_example(1.0)
  params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
  grads = {"dense": {"kernel": jnp.zeros((8, 3, 4)), "bias": jnp.zeros((8, 3))}}
  with pytest.raises(
    ValueError, match=r"at 'dense/bias' have shape \(8, 3\).*shape \(4,\)"
  ):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(
    ValueError,
    match=r"^clip_per_example: params must have the structure of the"
    r" per-example gradients.*gradients are PyTreeDef",
  ):
    tx.update({"w": jnp.zeros((8, 4))}, tx.init(params), params)


def test_per_example_with_matching_params_matches_float64(use_jit):
  rng = np.random.default_rng(3)
  w = rng.normal(size=(6, 3, 2)) * np.linspace(0.2, 3.0, 6)[:, None, None]
  b = rng.normal(size=(6, 2))
  grads = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = oc.clip_per_example(1.5)
  out, _ = maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)
  w64 = np.asarray(grads["w"], np.float64)
  b64 = np.asarray(grads["b"], np.float64)
  norms = np.sqrt(np.sum(w64**2, axis=(1, 2)) + np.sum(b64**2, axis=1))
  scale = np.minimum(1.0, 1.5 / norms)
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float64),
    np.sum(w64 * scale[:, None, None], axis=0) / 6,
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    np.asarray(out["b"], np.float64),
    np.sum(b64 * scale[:, None], axis=0) / 6,
    rtol=1e-5,
  )


def _adaptive_reference(c0, norms_per_step, gamma, lr):
  """Float64 Andrew et al. update with the documented float32 bounds."""
  c, trajectory = c0, []
  for norms in norms_per_step:
    fraction = np.mean(np.asarray(norms) <= c)
    c = min(max(c * math.exp(-lr * (fraction - gamma)), F32_TINY), F32_MAX)
    trajectory.append(c)
  return trajectory


def test_adaptive_threshold_cannot_collapse_to_zero(use_jit):
  gamma, lr = 0.5, 20.0  # C shrinks by e^-10 per all-zero step
  tx = oc.clip_per_example(1.0, target_quantile=gamma, quantile_lr=lr)
  step = maybe_jit(tx.update, use_jit)
  state = tx.init({"w": jnp.zeros(3)})
  zeros = {"w": jnp.zeros((4, 3))}
  # Unit-norm examples: (0.6, 0.8, 0) has norm 1 exactly in float32.
  ones = {"w": jnp.tile(jnp.asarray([[0.6, 0.8, 0.0]]), (4, 1))}
  got = []
  for _ in range(12):  # e^-120 < float32 tiny: the exact update underflows
    _, state = step(zeros, state)
    got.append(float(state.per_example_max_norm))
  for _ in range(12):
    out, state = step(ones, state)
    got.append(float(state.per_example_max_norm))
  want = _adaptive_reference(
    1.0, [np.zeros(4)] * 12 + [np.ones(4)] * 12, gamma, lr
  )
  assert min(got) > 0.0
  assert got[11] == pytest.approx(F32_TINY, rel=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # Recovered: C > 1 >= every norm, so the last update is the plain mean.
  assert got[-2] > 1.0
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float64), [0.6, 0.8, 0.0], rtol=1e-6
  )


def test_infinite_initial_threshold_can_come_down(use_jit):
  gamma, lr = 0.5, 20.0
  tx = oc.clip_per_example(math.inf, target_quantile=gamma, quantile_lr=lr)
  step = maybe_jit(tx.update, use_jit)
  state = tx.init({"w": jnp.zeros(3)})
  ones = {"w": jnp.tile(jnp.asarray([[0.6, 0.8, 0.0]]), (4, 1))}
  got = []
  for _ in range(5):
    _, state = step(ones, state)
    got.append(float(state.per_example_max_norm))
  want = _adaptive_reference(math.inf, [np.ones(4)] * 5, gamma, lr)
  assert got[0] == F32_MAX
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_empty_batch_mean_is_a_clear_error(use_jit):
  tx = oc.clip_per_example(1.0)
  empty = {"w": jnp.zeros((0, 3))}
  with pytest.raises(
    ValueError,
    match=r"^clip_per_example: the batch is empty \(leading axis of size 0\),"
    r' and reduce="mean" would divide by 0',
  ):
    maybe_jit(tx.update, use_jit)(empty, tx.init(None))


def test_empty_batch_sum_is_zero(use_jit):
  tx = oc.clip_per_example(1.0, reduce="sum")
  out, state = maybe_jit(tx.update, use_jit)(
    {"w": jnp.zeros((0, 3))}, tx.init({"w": jnp.zeros(3)})
  )
  np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros(3))
  assert out["w"].shape == (3,)
  assert int(state.num_clipped_examples) == 0
  assert int(state.num_nonfinite_examples) == 0
  assert float(state.per_example_norm_mean) == 0.0


def test_per_example_sum_of_integer_leaves_no_longer_truncates():
  # Defect 5d: reduce="sum" used to cast the clipped float sum back to int.
  tx = oc.clip_per_example(1.0, reduce="sum")
  with pytest.raises(TypeError, match=r"'w' has dtype int32"):
    tx.update({"w": jnp.asarray([[3, 4], [0, 1]], jnp.int32)}, tx.init(None))


@pytest.mark.parametrize(
  "hparams",
  [
    dict(target_quantile=lambda count: jnp.where(count >= 1, 1.5, 0.5)),
    dict(
      target_quantile=0.5,
      quantile_lr=lambda count: jnp.where(count >= 1, -0.2, 0.2),
    ),
  ],
  ids=["quantile-1.5", "negative-lr"],
)
def test_traced_invalid_quantile_rule_is_loud(hparams):
  tx = optax.inject_hyperparams(oc.clip_per_example)(max_norm=2.0, **hparams)
  step = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(3)})
  ones = {"w": jnp.tile(jnp.asarray([[0.6, 0.8, 0.0]]), (4, 1))}
  out, state = step(ones, state)  # valid rule: all 4 within C = 2
  np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8, 0.0], rtol=1e-6)
  assert float(state.inner_state.per_example_max_norm) == pytest.approx(
    2.0 * math.exp(-0.2 * (1.0 - 0.5)), rel=1e-6
  )
  _, state = step(ones, state)  # invalid rule: C becomes NaN ...
  assert math.isnan(float(state.inner_state.per_example_max_norm))
  out, _ = step(ones, state)  # ... and every later update is NaN
  assert np.all(np.isnan(np.asarray(out["w"])))
