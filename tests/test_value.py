"""clip_by_value and clip: element-wise clamping."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import reference
from helpers import enable_x64, leaves64, maybe_jit, run, small_tree


@pytest.mark.parametrize("max_value", [0.0, 0.3, 1.0, np.inf])
def test_clip_by_value_matches_reference_and_optax(max_value, use_jit):
  tree = small_tree(np.random.default_rng(0), scale=2.0)
  # clip (the optax drop-in) records nothing unless asked to.
  for tx in (oc.clip_by_value(max_value), oc.clip(max_value),
             oc.clip(max_value, diagnostics=True),
             oc.clip_by_value(max_value, diagnostics=True)):
    out, state = run(tx, tree, use_jit=use_jit)
    want, count = reference.clip_by_value(leaves64(tree), -max_value, max_value)
    for got, ref in zip(leaves64(out), want):
      np.testing.assert_array_equal(got, ref.astype(np.float32))
    if isinstance(state, optax.EmptyState):
      continue
    assert bool(state.value_clipped) == (count > 0)
    assert (float(state.value_max), float(state.value_min)) == (
        reference.value_range(leaves64(tree)))
    want_optax, _ = optax.clip(max_value).update(tree, optax.EmptyState())
    chex.assert_trees_all_equal(out, want_optax)


def test_asymmetric_bounds(use_jit):
  x = jnp.array([-3.0, -1.5, 0.0, 0.75, 2.0])
  out, state = run(oc.clip_by_value(1.0, min_value=-2.0, diagnostics=True), x,
                   use_jit=use_jit)
  np.testing.assert_array_equal(np.asarray(out), [-2.0, -1.5, 0.0, 0.75, 1.0])
  assert (float(state.value_max), float(state.value_min)) == (2.0, -3.0)
  assert bool(state.value_clipped)
  _, state = run(oc.clip_by_value(2.0, min_value=-3.0, diagnostics=True), x,
                 use_jit=use_jit)
  assert not bool(state.value_clipped)
  # A bound of either sign is fine when min_value is given.
  out, _ = run(oc.clip_by_value(-1.0, min_value=-2.0, diagnostics=True), x,
               use_jit=use_jit)
  np.testing.assert_array_equal(np.asarray(out), [-2.0, -1.5, -1.0, -1.0, -1.0])


def test_nan_stays_nan_and_inf_is_clamped(use_jit):
  x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5])
  out, state = run(oc.clip_by_value(1.0, diagnostics=True), x, use_jit=use_jit)
  out = np.asarray(out)
  assert np.isnan(out[0])
  np.testing.assert_array_equal(out[1:], [1.0, -1.0, 0.5])
  # The NaN is visible in the state, and counts as "not within bounds".
  assert np.isnan(float(state.value_max)) and np.isnan(float(state.value_min))
  assert bool(state.value_clipped)
  _, state = run(oc.clip_by_value(1.0, diagnostics=True), x[1:],
                 use_jit=use_jit)
  assert (float(state.value_max), float(state.value_min)) == (np.inf, -np.inf)
  assert bool(state.value_clipped)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_kept(dtype):
  x = {"a": jnp.array([-5.0, 0.25, 5.0], dtype), "b": jnp.array(3.0, dtype)}
  out, state = run(oc.clip_by_value(1.0, diagnostics=True), x, use_jit=True)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, x)
  np.testing.assert_array_equal(np.asarray(out["a"], np.float32),
                                [-1.0, 0.25, 1.0])
  assert (float(state.value_max), float(state.value_min)) == (5.0, -5.0)
  assert state.value_max.dtype == jnp.float32


def test_grad_through_clip_by_value():
  import jax  # pylint: disable=g-import-not-at-top
  tx = oc.clip_by_value(1.0, diagnostics=True)
  g = jax.grad(lambda u: jnp.sum(tx.update(u, tx.init(u))[0] * 2.0))(
      jnp.array([-3.0, 0.5, 0.0, 3.0]))
  np.testing.assert_array_equal(np.asarray(g), [0.0, 2.0, 2.0, 0.0])


def test_complex_leaves_are_rejected_with_a_clear_message():
  with pytest.raises(TypeError, match=r"^clip_by_value: complex leaves have no"
                     r" order to clamp"):
    run(oc.clip_by_value(1.0, diagnostics=True),
        jnp.array([1 + 1j], jnp.complex64))


def test_extremes_over_many_small_and_large_leaves(use_jit):
  # Exercises the bucketed path (many small leaves) and the large-leaf path.
  rng = np.random.default_rng(1)
  tree = [jnp.asarray(rng.standard_normal((7,)), jnp.float32) for _ in range(30)]
  tree.append(jnp.asarray(rng.standard_normal((200, 200)), jnp.bfloat16))
  _, state = run(oc.clip_by_value(10.0, diagnostics=True), tree,
                 use_jit=use_jit)
  assert (float(state.value_max), float(state.value_min)) == (
      reference.value_range(leaves64(tree)))
  assert not bool(state.value_clipped)
  _, state = run(oc.clip_by_value(10.0, diagnostics=True), [],
                 use_jit=use_jit)
  assert (float(state.value_max), float(state.value_min)) == (0.0, 0.0)


# --------------------------------------------------------------------------
# Donation (clamped in place), traced bounds (loud NaN, never a sign flip),
# state=None with non-finite leaves, float64, derivatives, diagnostics.
# --------------------------------------------------------------------------


# name -> factory(threshold) with every other argument at its default.
_FACTORIES = {
    "clip_by_value": lambda c: oc.clip_by_value(c),
    "clip_by_value_diag": lambda c: oc.clip_by_value(c, diagnostics=True),
    "clip": lambda c: oc.clip(c),
    "clip_diag": lambda c: oc.clip(c, diagnostics=True),
}


def _tree(rng, scale=2.0):
  return {
      "w": jnp.asarray(scale * rng.standard_normal((5, 3)), jnp.float32),
      "b": [jnp.asarray(scale * rng.standard_normal((4,)), jnp.float32),
            jnp.asarray(scale * rng.standard_normal(()), jnp.float32)],
  }


# --------------------------------------------------------------------------
# Memory: a donated gradient is clamped in place.
# --------------------------------------------------------------------------


def _temp_bytes(fn, grads, state, donate):
  jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
  compiled = jitted.lower(grads, state).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", sorted(_FACTORIES))
@pytest.mark.parametrize("donate", [True, False], ids=["donated", "kept"])
def test_temp_memory_is_no_more_than_optax(name, donate):
  rng = np.random.default_rng(0)
  # 4.2 MB of large leaves and a few small ones (the small ones may share a
  # bucket: at most one copy of their bytes).
  grads = {f"k{i}": jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
           for i in range(4)}
  grads.update({f"b{i}": jnp.asarray(rng.standard_normal((512,)), jnp.float32)
                for i in range(4)})
  small_bytes = 4 * 512 * 4
  tx = _FACTORIES[name](0.5)
  base = optax.clip(0.5)
  ours = _temp_bytes(tx.update, grads, tx.init(grads), donate)
  theirs = _temp_bytes(base.update, grads, base.init(grads), donate)
  assert ours <= theirs + small_bytes + 4096, (ours, theirs)


def _train_step_temp_bytes(tx, params):
  """Temporary bytes of a donated jitted step grad -> tx -> sgd -> apply,
  whose gradient is an element-wise fusion XLA can fuse into the update."""
  opt = optax.chain(tx, optax.sgd(0.1))

  def step(p, s, x):
    loss = lambda p: sum(jnp.sum(jnp.tanh(v) * x) for v in jax.tree.leaves(p))
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt.init(params), jnp.float32(1.0)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_default_train_step_needs_no_more_memory_than_optax_clip():
  # The default records nothing, so the gradient is never materialised to be
  # read twice: the fused train step is optax.clip's. With diagnostics=True
  # the extremes must be read before the clamp, which costs one gradient.
  rng = np.random.default_rng(0)
  params = {f"k{i}": jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
            for i in range(4)}
  grad_bytes = 4 * 512 * 512 * 4
  theirs = _train_step_temp_bytes(optax.clip(0.5), params)
  assert _train_step_temp_bytes(oc.clip_by_value(0.5), params) <= (
      theirs + grad_bytes // 100)
  assert isinstance(oc.clip_by_value(0.5).init(params), optax.EmptyState)
  diag = _train_step_temp_bytes(oc.clip_by_value(0.5, diagnostics=True),
                                params)
  assert diag >= theirs + grad_bytes


def test_donated_update_is_correct():
  rng = np.random.default_rng(1)
  grads = {"a": jnp.asarray(rng.standard_normal((300, 200)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((7,)), jnp.float32)}
  want = [np.clip(x, -0.5, 0.5) for x in leaves64(grads)]
  want_max = max(float(x.max()) for x in leaves64(grads))
  tx = oc.clip_by_value(0.5, diagnostics=True)
  state = tx.init(grads)
  out, state = jax.jit(tx.update, donate_argnums=0)(grads, state)
  for got, ref in zip(leaves64(out), want):
    np.testing.assert_array_equal(got, ref.astype(np.float32))
  assert float(state.value_max) == want_max
  assert bool(state.value_clipped)


# --------------------------------------------------------------------------
# Traced invalid bounds are loud (NaN), never a silent sign flip or clamp.
# --------------------------------------------------------------------------


def _steps(tx, grads, n, use_jit):
  """n updates of the same grads through one (possibly jitted) function."""
  update = maybe_jit(tx.update, use_jit)
  state = tx.init(grads)
  outs = []
  for _ in range(n):
    out, state = update(grads, state)
    outs.append(out)
  return outs, state, update


@pytest.mark.parametrize("name,arg", [("clip_by_value", "max_value"),
                                      ("clip_by_value_diag", "max_value"),
                                      ("clip", "max_delta"),
                                      ("clip_diag", "max_delta")])
def test_traced_negative_threshold_gives_nan_not_a_sign_flip(name, arg,
                                                             use_jit):
  grads = _tree(np.random.default_rng(2))
  # 0.5 at step 0, -1 from step 1 on.
  schedule = lambda count: jnp.where(count < 1, 0.5, -1.0)  # noqa: E731
  factory = {"clip_by_value": oc.clip_by_value, "clip": oc.clip}[
      name.replace("_nodiag", "").replace("_diag", "")]
  extra = {}
  if name.endswith("nodiag"):
    extra = {"diagnostics": False}
  elif name.endswith("diag"):
    extra = {"diagnostics": True}
  tx = optax.inject_hyperparams(factory)(**{arg: schedule}, **extra)
  if not use_jit:
    # Concrete (eager) hyperparameters are validated at construction:
    # loud too, as a ValueError at the first bad step.
    with pytest.raises(ValueError, match=rf"{arg} must be"):
      _steps(tx, grads, 2, use_jit)
    return
  outs, state, update = _steps(tx, grads, 3, use_jit)
  for got, ref in zip(leaves64(outs[0]), leaves64(grads)):
    np.testing.assert_array_equal(got, np.clip(ref, -0.5, 0.5).astype(
        np.float32))
  for out in outs[1:]:
    for got in leaves64(out):
      assert np.all(np.isnan(got)), got
  inner = state.inner_state
  if isinstance(inner, oc.ClipByValueState):
    assert bool(inner.value_clipped)
  assert update._cache_size() == 1  # pylint: disable=protected-access


def test_traced_min_above_max_gives_nan(use_jit):
  grads = _tree(np.random.default_rng(3))
  # min_value 0.0 at step 0 (valid), then 2.0 > max_value = 1.0.
  schedule = lambda count: jnp.where(count < 1, 0.0, 2.0)  # noqa: E731
  for diagnostics in (True, False):
    tx = optax.inject_hyperparams(oc.clip_by_value)(
        max_value=1.0, min_value=schedule, diagnostics=diagnostics)
    if not use_jit:  # concrete: validated at construction
      with pytest.raises(ValueError, match="min_value must be <= max_value"):
        _steps(tx, grads, 2, use_jit)
      continue
    outs, _, _ = _steps(tx, grads, 2, use_jit)
    for got, ref in zip(leaves64(outs[0]), leaves64(grads)):
      np.testing.assert_array_equal(got, np.clip(ref, 0.0, 1.0).astype(
          np.float32))
    for got in leaves64(outs[1]):
      assert np.all(np.isnan(got)), got


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("diagnostics", [True, False])
@pytest.mark.parametrize("factory", [oc.clip_by_value, oc.clip])
def test_traced_nan_bound_gives_nan_in_every_dtype(factory, diagnostics, dtype,
                                                   use_jit):
  grads = {"a": jnp.asarray([-3.0, 0.25, 3.0], dtype), "b": jnp.ones((), dtype)}
  tx = optax.inject_hyperparams(factory)(1.0, diagnostics=diagnostics)
  state = tx.init(grads)
  (arg,) = state.hyperparams
  state.hyperparams[arg] = jnp.asarray(jnp.nan)
  if not use_jit:  # concrete: validated at construction
    with pytest.raises(ValueError, match="got nan"):
      tx.update(grads, state)
    return
  out, _ = jax.jit(tx.update)(grads, state)
  for leaf, ref in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    assert leaf.dtype == ref.dtype
    assert np.all(np.isnan(np.asarray(leaf, np.float32)))


def test_valid_traced_bounds_match_numpy_and_do_not_retrace():
  grads = _tree(np.random.default_rng(4))
  tx = optax.inject_hyperparams(oc.clip_by_value)(max_value=1.0,
                                                  min_value=-0.25,
                                                  diagnostics=True)
  update = jax.jit(tx.update)
  state = tx.init(grads)
  for hi, lo in [(1.0, -0.25), (0.1, -2.0), (3.0, 3.0), (0.0, -0.0)]:
    state.hyperparams["max_value"] = jnp.asarray(hi)
    state.hyperparams["min_value"] = jnp.asarray(lo)
    out, state = update(grads, state)
    for got, ref in zip(leaves64(out), leaves64(grads)):
      np.testing.assert_array_equal(got, np.clip(ref, lo, hi).astype(
          np.float32))
    values = np.concatenate([x.ravel() for x in leaves64(grads)])
    inner = state.inner_state
    assert bool(inner.value_clipped) == bool(np.any((values > hi) |
                                                   (values < lo)))
  assert update._cache_size() == 1  # pylint: disable=protected-access


# --------------------------------------------------------------------------
# Policies: int/bool leaves, update(updates, None).
# --------------------------------------------------------------------------


# The registry rows are in test_policy (clip_by_value with diagnostics, clip
# without); here the other two configurations.
@pytest.mark.parametrize("name", ["clip_by_value", "clip_diag"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_], ids=["int", "bool"])
def test_integer_and_bool_leaves_raise_naming_the_path(name, dtype, use_jit):
  grads = _tree(np.random.default_rng(5))
  grads["opt"] = {"step": jnp.zeros((2,), dtype)}
  tx = _FACTORIES[name](1.0)
  fn = "clip" if name.startswith("clip_diag") or name == "clip" else (
      "clip_by_value")
  with pytest.raises(TypeError, match=rf"^{fn}: .*'opt/step'.*"
                     + np.dtype(dtype).name):
    maybe_jit(tx.update, use_jit)(grads, tx.init(grads))


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_state_none_rebuilds_the_state(name, use_jit):
  grads = _tree(np.random.default_rng(6))
  grads["x"] = jnp.asarray([np.nan, np.inf, -np.inf, 0.1], jnp.float32)
  tx = _FACTORIES[name](0.5)
  want = tx.update(grads, tx.init(grads))
  got = maybe_jit(lambda g: tx.update(g, None), use_jit)(grads)
  chex.assert_trees_all_equal(got, want)
  out = leaves64(got[0])
  ref = [np.clip(x, -0.5, 0.5) for x in leaves64(grads)]
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, b.astype(np.float32))
  state = got[1]
  if name in ("clip", "clip_by_value"):
    assert isinstance(state, optax.EmptyState)
  else:
    assert np.isnan(float(state.value_max))
    assert bool(state.value_clipped)


def test_float64_leaves_state_dtype_and_none_state():
  with enable_x64():
    grads = {"a": jnp.asarray([-3.0, 0.5], jnp.float64),
             "b": jnp.asarray([2.0], jnp.float32)}
    tx = oc.clip_by_value(1.0, diagnostics=True)
    out, state = tx.update(grads, None)
    assert state.value_max.dtype == jnp.float64
    assert out["a"].dtype == jnp.float64 and out["b"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["a"]), [-1.0, 0.5])
    assert (float(state.value_max), float(state.value_min)) == (2.0, -3.0)


# --------------------------------------------------------------------------
# Kept behaviour under the new code paths.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_grad_is_finite_including_at_zero(name):
  tx = _FACTORIES[name](1.0)
  for x in (jnp.array([-3.0, 0.5, 0.0, 3.0]), jnp.zeros((4,))):
    g = jax.grad(lambda u: jnp.sum(tx.update(u, tx.init(u))[0] * 2.0))(x)
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    inside = np.abs(np.asarray(x)) < 1.0
    np.testing.assert_array_equal(g[inside], 2.0)
    np.testing.assert_array_equal(g[~inside], 0.0)


def test_large_leaves_with_nan_and_inf_are_seen_by_the_diagnostics(use_jit):
  # Large enough that vectorised CPU max/min reductions would drop the NaN.
  x = np.linspace(-0.4, 0.4, 300_000).astype(np.float32)
  x[123_456] = np.nan
  tx = oc.clip_by_value(0.5, diagnostics=True)
  out, state = maybe_jit(tx.update, use_jit)({"x": jnp.asarray(x)},
                                              tx.init(None))
  got = np.asarray(out["x"])
  assert np.isnan(got[123_456])
  np.testing.assert_array_equal(np.delete(got, 123_456), np.delete(x, 123_456))
  assert np.isnan(float(state.value_max)) and np.isnan(float(state.value_min))
  assert bool(state.value_clipped)
  x[123_456] = np.inf
  out, state = maybe_jit(tx.update, use_jit)({"x": jnp.asarray(x)},
                                              tx.init(None))
  assert float(np.asarray(out["x"])[123_456]) == 0.5
  assert float(state.value_max) == np.inf
  assert float(state.value_min) == np.float32(-0.4)


def test_diagnostics_must_be_a_bool():
  with pytest.raises(TypeError, match="clip_by_value: diagnostics"):
    oc.clip_by_value(1.0, diagnostics="yes")
  with pytest.raises(TypeError, match="clip: diagnostics"):
    oc.clip(1.0, diagnostics=1)
