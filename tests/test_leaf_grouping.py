"""Small leaves of one shape are computed as one vmapped stack.

``_grouping.map_leaves`` stacks small same-shape leaves and runs a per-leaf
function under ``vmap``. These tests check that the stacked route gives what
the one-leaf route gives: every transform that uses it is applied to a tree
of many same-shape leaves (stacked route) and to each leaf alone in a
one-leaf tree (which never stacks), and the updates and per-leaf
diagnostics must agree to float32 rounding. The leaves include the hostile
cases that must stay per-leaf: an overflowing leaf (elements of 1e20,
rescued), an underflowing one (1e-20), a zero leaf, and inf and NaN leaves,
which must not leak into their neighbours in the stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaxclip as oc
from helpers import maybe_jit
from optaxclip import _grouping


def _leaves(rng, dtype, shape=(4, 3)):
  base = [rng.standard_normal(shape) * s for s in (0.1, 1.0, 10.0, 3.0)]
  special = [
    np.full(shape, 1e20),  # overflows a float32 sum of squares
    np.full(shape, 1e-20),  # underflows it
    np.zeros(shape),
  ]
  if dtype == jnp.bfloat16:
    special = special[2:]  # 1e20 squares are fine in float32 accumulation
  out = [jnp.asarray(a, dtype) for a in base + special]
  bad_inf = np.ones(shape)
  bad_inf[0, 0] = np.inf
  bad_nan = np.ones(shape)
  bad_nan[1, 1] = np.nan
  out += [jnp.asarray(bad_inf, dtype), jnp.asarray(bad_nan, dtype)]
  return out


def _tree(leaves):
  return {f"w{i:02d}": x for i, x in enumerate(leaves)}


TRANSFORMS = {
  "clip_by_norm": lambda: oc.clip_by_norm(1.0),
  "clip_by_norm(axis=0)": lambda: oc.clip_by_norm(1.0, axis=0),
  "clip_by_block_rms": lambda: oc.clip_by_block_rms(0.5),
  "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.05),
}


def _per_leaf_field(state):
  """The per-leaf diagnostic vector of each state, if it has one."""
  for name in ("leaf_norms", "block_rms"):
    if hasattr(state, name):
      return np.asarray(getattr(state, name).values, np.float64)
  return None


def test_map_leaves_stacks_small_same_shape_leaves():
  # The grouping itself: fn sees a batch axis only on the stacked route.
  leaves = [jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.ones((5,)), jnp.ones((3, 2))]
  shapes_seen = []

  def fn(key, x):
    shapes_seen.append(x.shape)
    return x * 2, jnp.sum(x, keepdims=True)

  per_leaf, (flat,) = _grouping.map_leaves(
    fn, [leaves], [x.shape for x in leaves], num_flat=1
  )
  assert [r[0].shape for r in per_leaf] == [(3, 2), (3, 2), (5,), (3, 2)]
  np.testing.assert_array_equal(np.asarray(flat), [6.0, 6.0, 5.0, 6.0])
  # One call for the three (3, 2) leaves (traced once under vmap, where the
  # tracer shows the per-leaf shape), one for the single (5,) leaf.
  assert len(shapes_seen) == 2


def test_map_leaves_traces_large_leaves_once():
  # A large leaf gets the same computation on every platform, so it is traced
  # once, outside the platform switch; small ones once per program.
  big = jnp.ones((_grouping.SMALL_LEAF_SIZE,))
  leaves = [big, jnp.ones((3,)), jnp.ones((3,)), big * 2]
  calls = []

  def fn(key, x):
    calls.append(x.shape)
    return x * 2, jnp.sum(x, keepdims=True)

  def run(leaves):
    per_leaf, (flat,) = _grouping.map_leaves(
      fn, [leaves], [x.shape for x in leaves], num_flat=1
    )
    return [r[0] for r in per_leaf], flat

  out, flat = jax.jit(run)(leaves)
  assert calls.count(big.shape) == 2  # one per large leaf, not per program
  np.testing.assert_array_equal(
    np.asarray(flat), [big.size, 3.0, 3.0, 2.0 * big.size]
  )
  for got, x in zip(out, leaves):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x) * 2)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_stacked_route_equals_one_leaf_route(name, dtype, use_jit):
  rng = np.random.default_rng(0)
  leaves = _leaves(rng, dtype)
  params = [jnp.asarray(rng.standard_normal(x.shape), dtype) for x in leaves]
  tx = TRANSFORMS[name]()
  update = maybe_jit(tx.update, use_jit)

  tree, ptree = _tree(leaves), _tree(params)
  got, state = update(tree, tx.init(ptree), ptree)
  got_vec = _per_leaf_field(state)
  for i, (x, p) in enumerate(zip(leaves, params)):
    one, one_state = update({"w": x}, tx.init({"w": p}), {"w": p})
    want = np.asarray(one["w"], np.float64)
    have = np.asarray(got[f"w{i:02d}"], np.float64)
    np.testing.assert_allclose(have, want, rtol=1e-6, atol=0, equal_nan=True)
    assert got[f"w{i:02d}"].dtype == x.dtype
    want_vec = _per_leaf_field(one_state)
    if want_vec is not None:
      n = want_vec.size
      np.testing.assert_allclose(
        got_vec[i * n:(i + 1) * n], want_vec, rtol=1e-6, equal_nan=True
      )
  if hasattr(state, "num_clipped_units"):
    total = sum(
      int(update({"w": x}, tx.init({"w": p}), {"w": p})[1].num_clipped_units)
      for x, p in zip(leaves, params)
    )
    assert int(state.num_clipped_units) == total


def test_rescue_inside_the_stack_is_exact():
  # Four elements of 1e20 have norm 2e20 although the float32 sum of squares
  # overflows; in a stack with ordinary leaves each leaf keeps its own norm.
  leaves = [jnp.full((2, 2), 1e20, jnp.float32)] + [
    jnp.full((2, 2), v, jnp.float32) for v in (1.0, 2.0, 1e-20)
  ]
  _, state = oc.clip_by_norm(1.0).update(_tree(leaves), None)
  np.testing.assert_allclose(
    np.asarray(state.leaf_norms.values, np.float64),
    [2e20, 2.0, 4.0, 2e-20],
    rtol=1e-6,
  )


def test_gradient_through_the_stacked_route_is_finite():
  leaves = [jnp.ones((3, 2)) * s for s in (0.0, 0.5, 5.0)]

  def loss(tree):
    out, _ = oc.clip_by_norm(1.0).update(tree, None)
    return sum(jnp.sum(v**2) for v in jax.tree.leaves(out))

  grads = jax.jit(jax.grad(loss))(_tree(leaves))
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("n", [2, 5, 32, 33, 70, 144])
@pytest.mark.parametrize("use_jit", [False, True])
def test_split_entries_returns_every_entry_bit_for_bit(n, use_jit):
  """The masked read of one entry per leaf (CPU program) is the slice:
  ``nan``, ``inf``, ``-inf`` and ``-0.0`` included, across block edges."""
  rng = np.random.default_rng(n)
  vec = rng.standard_normal(n).astype(np.float32)
  special = [np.nan, -0.0, np.inf, -np.inf][:n]
  vec[: len(special)] = special
  sizes = [1] * n if n % 2 else [1] * (n - 2) + [2]
  split = maybe_jit(lambda v: _grouping.split_entries(v, sizes), use_jit)
  chunks = split(jnp.asarray(vec))
  assert [c.shape for c in chunks] == [(s,) for s in sizes]
  got = np.concatenate([np.asarray(c) for c in chunks])
  assert got.tobytes() == vec.tobytes()


def test_split_entries_gradient_reaches_only_its_entry():
  vec = jnp.arange(40.0)
  for i in (0, 31, 32, 39):
    g = jax.grad(lambda v, i=i: _grouping.split_entries(v, [1] * 40)[i][0])(
      vec
    )
    np.testing.assert_array_equal(g, np.eye(40)[i])
