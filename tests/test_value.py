"""clip_by_value and clip: element-wise clamping."""

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import reference
from helpers import leaves64, run, small_tree


@pytest.mark.parametrize("max_value", [0.0, 0.3, 1.0, np.inf])
def test_clip_by_value_matches_reference_and_optax(max_value, use_jit):
  tree = small_tree(np.random.default_rng(0), scale=2.0)
  # clip (the optax drop-in) records nothing unless asked to.
  for tx in (oc.clip_by_value(max_value), oc.clip(max_value),
             oc.clip(max_value, diagnostics=True),
             oc.clip_by_value(max_value, diagnostics=False)):
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
  out, state = run(oc.clip_by_value(1.0, min_value=-2.0), x, use_jit=use_jit)
  np.testing.assert_array_equal(np.asarray(out), [-2.0, -1.5, 0.0, 0.75, 1.0])
  assert (float(state.value_max), float(state.value_min)) == (2.0, -3.0)
  assert bool(state.value_clipped)
  _, state = run(oc.clip_by_value(2.0, min_value=-3.0), x, use_jit=use_jit)
  assert not bool(state.value_clipped)
  # A bound of either sign is fine when min_value is given.
  out, _ = run(oc.clip_by_value(-1.0, min_value=-2.0), x, use_jit=use_jit)
  np.testing.assert_array_equal(np.asarray(out), [-2.0, -1.5, -1.0, -1.0, -1.0])


def test_nan_stays_nan_and_inf_is_clamped(use_jit):
  x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5])
  out, state = run(oc.clip_by_value(1.0), x, use_jit=use_jit)
  out = np.asarray(out)
  assert np.isnan(out[0])
  np.testing.assert_array_equal(out[1:], [1.0, -1.0, 0.5])
  # The NaN is visible in the state, and counts as "not within bounds".
  assert np.isnan(float(state.value_max)) and np.isnan(float(state.value_min))
  assert bool(state.value_clipped)
  _, state = run(oc.clip_by_value(1.0), x[1:], use_jit=use_jit)
  assert (float(state.value_max), float(state.value_min)) == (np.inf, -np.inf)
  assert bool(state.value_clipped)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_kept(dtype):
  x = {"a": jnp.array([-5.0, 0.25, 5.0], dtype), "b": jnp.array(3.0, dtype)}
  out, state = run(oc.clip_by_value(1.0), x, use_jit=True)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, x)
  np.testing.assert_array_equal(np.asarray(out["a"], np.float32),
                                [-1.0, 0.25, 1.0])
  assert (float(state.value_max), float(state.value_min)) == (5.0, -5.0)
  assert state.value_max.dtype == jnp.float32


def test_grad_through_clip_by_value():
  import jax  # pylint: disable=g-import-not-at-top
  tx = oc.clip_by_value(1.0)
  g = jax.grad(lambda u: jnp.sum(tx.update(u, tx.init(u))[0] * 2.0))(
      jnp.array([-3.0, 0.5, 0.0, 3.0]))
  np.testing.assert_array_equal(np.asarray(g), [0.0, 2.0, 2.0, 0.0])


def test_complex_leaves_are_rejected_with_a_clear_message():
  with pytest.raises(TypeError, match=r"^clip_by_value: complex leaves have no"
                     r" order to clamp"):
    run(oc.clip_by_value(1.0), jnp.array([1 + 1j], jnp.complex64))


def test_extremes_over_many_small_and_large_leaves(use_jit):
  # Exercises the bucketed path (many small leaves) and the large-leaf path.
  rng = np.random.default_rng(1)
  tree = [jnp.asarray(rng.standard_normal((7,)), jnp.float32) for _ in range(30)]
  tree.append(jnp.asarray(rng.standard_normal((200, 200)), jnp.bfloat16))
  _, state = run(oc.clip_by_value(10.0), tree, use_jit=use_jit)
  assert (float(state.value_max), float(state.value_min)) == (
      reference.value_range(leaves64(tree)))
  assert not bool(state.value_clipped)
  _, state = run(oc.clip_by_value(10.0), [], use_jit=use_jit)
  assert (float(state.value_max), float(state.value_min)) == (0.0, 0.0)
