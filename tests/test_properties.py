"""Properties every clipper must have, run over every clipper in helpers.

Hypothesis draws trees (fixed small shapes, so compiles are reused), values,
dtypes and thresholds; the properties come from docs/design.md#numerics: the clipped
quantity is at most the threshold, clipping twice changes nothing, the
direction is kept (global clippers) or each sign is kept (element-wise),
structure and dtype are kept, finite input gives finite output, and the
result equals the float64 reference.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import CLIPPERS, leaves64, maybe_jit
import reference

SHAPES = [(3, 4), (5,), (), (2, 1, 3)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Relative slack for "measured <= threshold" and for comparisons, from the
# rounding of the output to its own dtype (half an ulp, twice).
EPS = {jnp.float32: 2e-6, jnp.bfloat16: 2 ** -7, jnp.float16: 2 ** -10}
# Absolute slack: the spacing of float16 subnormals (below 6.1e-5).
ATOL = {jnp.float32: 1e-30, jnp.bfloat16: 1e-30, jnp.float16: 2 ** -24}


@st.composite
def trees(draw):
  dtype = draw(st.sampled_from(DTYPES))
  magnitude = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e3]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  values = [magnitude * rng.standard_normal(s) for s in SHAPES]
  if draw(st.booleans()):  # some exact zeros
    values[0] = np.zeros(SHAPES[0])
  tree = {"k": values[0], "b": values[1], "s": values[2],
          "nested": [values[3], None]}
  return dtype, jax.tree.map(lambda v: jnp.asarray(v).astype(dtype), tree)


thresholds = st.sampled_from([0.0, 1e-3, 0.1, 1.0, 7.5, 1e4])


@functools.cache
def _transform(clipper, threshold, use_jit):
  # One transform (and one jitted update) per clipper and threshold: the
  # properties below draw the same thresholds and shapes again and again.
  tx = clipper.make(threshold)
  return tx, maybe_jit(tx.update, use_jit)


def _apply(clipper, threshold, tree, use_jit=True):
  tx, update = _transform(clipper, threshold, use_jit)
  return update(tree, tx.init(tree))[0]


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
@given(data=trees(), threshold=thresholds)
def test_bounded_idempotent_and_equal_to_reference(clipper, data, threshold):
  dtype, tree = data
  out = _apply(clipper, threshold, tree)
  eps = EPS[dtype]
  # Structure and dtype are kept; finite in, finite out.
  chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
  assert all(np.isfinite(x).all() for x in leaves64(out))
  # The clipped quantity is at most the threshold.
  for measured, limit in clipper.bound(leaves64(out), threshold):
    assert measured <= limit * (1 + 2 * eps) + 64 * ATOL[dtype], (measured, limit)
  # Equal to the float64 reference (computed from the rounded input).
  want = clipper.reference(leaves64(tree), threshold)
  for got, ref in zip(leaves64(out), want):
    np.testing.assert_allclose(got, ref, rtol=2 * eps, atol=ATOL[dtype])
  # Clipping twice changes nothing beyond output rounding.
  twice = _apply(clipper, threshold, out)
  for a, b in zip(leaves64(twice), leaves64(out)):
    np.testing.assert_allclose(a, b, rtol=4 * eps, atol=ATOL[dtype])


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
@given(data=trees(), threshold=thresholds)
def test_direction_is_kept(clipper, data, threshold):
  dtype, tree = data
  out = leaves64(_apply(clipper, threshold, tree))
  inp = leaves64(tree)
  if clipper.direction_kept:
    # One non-negative factor for the whole tree.
    x, y = np.concatenate([v.ravel() for v in inp]), np.concatenate(
        [v.ravel() for v in out])
    if np.any(y):
      scale = np.dot(x, y) / np.dot(x, x)
      assert 0 <= scale <= 1 + 1e-2
      np.testing.assert_allclose(
          y, scale * x, rtol=1e-2,
          atol=max(1e-6 * np.abs(x).max(), 2 * ATOL[dtype]))
  for x, y in zip(inp, out):
    # Element-wise, nothing flips sign and nothing grows.
    assert np.all(x * y >= 0)
    assert np.all(np.abs(y) <= np.abs(x) * (1 + 1e-2))


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
def test_jit_and_eager_agree(clipper):
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.standard_normal((4, 3)) * 5, jnp.float32),
          "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32)}
  chex.assert_trees_all_close(_apply(clipper, 0.7, tree, use_jit=False),
                              _apply(clipper, 0.7, tree, use_jit=True),
                              rtol=1e-6)


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
@pytest.mark.parametrize("point", ["zero", "random", "unclipped"])
def test_grad_through_update_is_finite(clipper, point):
  rng = np.random.default_rng(1)
  tree = {"a": jnp.asarray(rng.standard_normal((4, 3)) * 5, jnp.float32),
          "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32)}
  if point == "zero":
    tree = jax.tree.map(jnp.zeros_like, tree)
  threshold = 1e3 if point == "unclipped" else 0.5
  tx = clipper.make(threshold)
  weights = jax.tree.map(lambda x: jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), tree)

  def loss(g):
    out, _ = tx.update(g, tx.init(g))
    return sum(jnp.sum(o * w) for o, w in
               zip(jax.tree.leaves(out), jax.tree.leaves(weights)))

  grads = jax.jit(jax.grad(loss))(tree)
  for leaf in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(leaf)).all()
  if point == "unclipped":  # identity map: gradient is the weights
    chex.assert_trees_all_close(grads, weights, rtol=1e-6)


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
def test_scheduled_threshold_under_inject_hyperparams_never_retraces(clipper):
  # All other arguments stay at their defaults (the factory must survive
  # inject_hyperparams binding them); a non-default ord is passed as the
  # error message advises, through static_args.
  schedule = optax.linear_schedule(0.1, 2.0, transition_steps=9)
  options = dict(clipper.options)
  tx = optax.inject_hyperparams(clipper.factory, static_args=tuple(options))(
      **{clipper.threshold_arg: schedule}, **options)
  rng = np.random.default_rng(2)
  tree = {"a": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32)}
  state = tx.init(tree)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  for i in range(10):
    out, state = step(tree, state)
    want = clipper.reference(leaves64(tree), float(schedule(i)))
    for got, ref in zip(leaves64(out), want):
      np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
  chex.clear_trace_counter()


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
def test_state_is_stable_and_round_trips_through_numpy(clipper):
  tree = {"a": jnp.ones((4, 3)) * 3.0, "b": jnp.ones((3,), jnp.bfloat16)}
  tx = clipper.make(0.5)
  state0 = tx.init(tree)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  _, state1 = step(tree, state0)
  _, state2 = step(tree, state1)
  # Same structure, shapes and dtypes at every step (no retrace above).
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1, state2)
  leaves, treedef = jax.tree.flatten(state2)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  chex.assert_trees_all_equal(restored, state2)
  chex.assert_trees_all_equal(step(tree, restored), step(tree, state2))
  chex.clear_trace_counter()


def test_every_clipper_specialises_a_registry_row():
  import registry  # pylint: disable=g-import-not-at-top

  for clipper in CLIPPERS:
    row = registry.by_name(clipper.row)
    assert row.factory is clipper.factory, clipper
    assert row.threshold_arg == clipper.threshold_arg, clipper
