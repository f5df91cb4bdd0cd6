"""The norm kernel: precision, orders, bucketing, structure and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import optaxclip as oc
from optaxclip import _grouping, _norms
import reference
from helpers import ORD_BY_NAME, big_tree as _big_tree, tiny_tree as _tiny_tree, assert_close_f64 as _assert_close
from helpers import leaves64, maybe_jit, small_tree

ORDS = [2, 1, math.inf]


@pytest.mark.parametrize("ord", ORDS + ["inf", 2.0, 1.0, None])
def test_global_norm_matches_float64_reference(ord, use_jit):
  tree = small_tree(np.random.default_rng(0))
  got = maybe_jit(lambda t: oc.global_norm(t, ord=ord), use_jit)(tree)
  ref_ord = 2 if ord is None else ord
  np.testing.assert_allclose(float(got), reference.norm(leaves64(tree), ref_ord),
                             rtol=1e-6)
  assert got.dtype == jnp.float32 and got.shape == ()


def test_global_norm_hand_computed():
  tree = {"a": jnp.array([3.0, -4.0]), "b": [jnp.array([[12.0]])], "c": None}
  assert float(oc.global_norm(tree)) == 13.0
  assert float(oc.global_norm(tree, ord=1)) == 19.0
  assert float(oc.global_norm(tree, ord=jnp.inf)) == 12.0


@pytest.mark.parametrize("ord", ORDS)
def test_bucketed_and_large_leaves_agree_with_reference(ord):
  # Leaves on both sides of the bucketing threshold, and many small ones.
  rng = np.random.default_rng(1)
  size = _grouping.SMALL_LEAF_SIZE
  tree = [jnp.asarray(rng.standard_normal(n), jnp.float32)
          for n in (size - 1, size, size + 1, 1, 7)]
  tree += [jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
           for _ in range(40)]
  got = jax.jit(lambda t: oc.global_norm(t, ord=ord))(tree)
  np.testing.assert_allclose(float(got), reference.norm(leaves64(tree), ord),
                             rtol=2e-6)


def test_bf16_many_leaves_accumulates_in_float32():
  # optax accumulates a bf16 tree in bf16: on 1000 leaves it comes out ~29% low.
  rng = np.random.default_rng(2)
  tree = [jnp.asarray(rng.standard_normal((16,)), jnp.bfloat16)
          for _ in range(1000)]
  want = reference.norm(leaves64(tree))
  got = oc.global_norm(tree)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The independent reference really is what optax gets wrong.
  assert abs(float(optax.tree.norm(tree)) - want) / want > 0.05


def test_fp16_squares_do_not_overflow():
  # 300^2 = 90000 > float16 max (65504): squares must be taken after the cast.
  tree = {"g": jnp.full((4,), 300.0, jnp.float16)}
  got = oc.global_norm(tree)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), 600.0, rtol=1e-6)
  assert not np.isfinite(float(optax.tree.norm(tree)))


def test_empty_and_none_trees_have_norm_zero():
  for tree in ({}, [], None, {"a": None}, [jnp.zeros((0, 3))]):
    for ord in ORDS:
      got = oc.global_norm(tree, ord=ord)
      assert float(got) == 0.0 and got.dtype == jnp.float32


def test_complex_leaves_use_modulus():
  tree = [jnp.array([3 + 4j, 0j], jnp.complex64), jnp.array([1.0, -2.0])]
  np.testing.assert_allclose(float(oc.global_norm(tree)), math.sqrt(30), rtol=1e-6)
  np.testing.assert_allclose(float(oc.global_norm(tree, ord=1)), 8.0, rtol=1e-6)
  np.testing.assert_allclose(float(oc.global_norm(tree, ord="inf")), 5.0,
                             rtol=1e-6)
  # Bucketed complex leaves too.
  many = [jnp.full((3,), 1 + 1j, jnp.complex64) for _ in range(10)]
  np.testing.assert_allclose(float(oc.global_norm(many)), math.sqrt(60), rtol=1e-6)


def test_float64_leaves_accumulate_in_float64():
  with helpers.enable_x64():
    tree = {"a": jnp.array([1.0, 1e-9], jnp.float64),
            "b": jnp.array([2.0], jnp.float32)}
    got = oc.global_norm(tree)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), math.sqrt(5 + 1e-18), rtol=1e-15)


@pytest.mark.parametrize("ord", ORDS)
def test_non_finite_leaves_give_non_finite_norm(ord):
  base = [jnp.ones((3,)), jnp.ones((50000,))]
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    for i in range(2):  # in the bucket and in a large leaf
      tree = list(base)
      tree[i] = tree[i].at[1].set(bad)
      got = float(oc.global_norm(tree, ord=ord))
      if np.isnan(bad):
        assert np.isnan(got)
      else:
        assert got == np.inf


@pytest.mark.parametrize("ord", ORDS)
def test_gradient_is_finite_at_zero_and_correct_elsewhere(ord):
  zero = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  g0 = jax.grad(lambda t: oc.global_norm(t, ord=ord))(zero)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g0))
  if ord == 2:
    # d||x||/dx = x / ||x|| away from zero.
    x = {"a": jnp.array([3.0, 0.0, 0.0]), "b": jnp.array([[0.0, 4.0], [0.0, 0.0]])}
    g = jax.grad(oc.global_norm)(x)
    np.testing.assert_allclose(np.asarray(g["a"]), [0.6, 0, 0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(g["b"]), [[0, 0.8], [0, 0]], atol=1e-7)


def test_safe_sqrt():
  x = jnp.array([0.0, 4.0, jnp.inf, jnp.nan])
  y = _norms.safe_sqrt(x)
  np.testing.assert_array_equal(np.asarray(y)[:3], [0.0, 2.0, np.inf])
  assert np.isnan(np.asarray(y)[3])
  assert float(jax.grad(lambda v: _norms.safe_sqrt(v))(0.0)) == 0.0
  np.testing.assert_allclose(float(jax.grad(_norms.safe_sqrt)(4.0)), 0.25)


def test_global_norm_rejects_bad_ord():
  with pytest.raises(ValueError, match=r"global_norm: ord must be one of"):
    oc.global_norm({"a": jnp.ones(2)}, ord=3)


@pytest.mark.parametrize("ord", [2, 1, "inf"])
def test_every_element_its_own_slice_matches_float64(ord, use_jit):
  # stacked= equal to the leaf's rank (or axis=()) makes each element a slice:
  # its norm is |x|, so 1e20 must not overflow and 1e-25 must not flush to 0.
  x = np.array([1e20, 1e-25, -3.0, 0.0], np.float32)
  want = np.abs(x.astype(np.float64))
  norms = maybe_jit(lambda t: oc.tree_norms(t, ord=ord, stacked=1),
                    use_jit)({"w": jnp.asarray(x)})
  np.testing.assert_allclose(np.asarray(norms["w"], np.float64), want,
                             rtol=1e-6)
  # clip_by_norm clips each element to magnitude 1 (0 stays 0).
  ref = [np.where(want > 1, x / np.where(want > 1, want, 1), x)]
  for tx in (oc.clip_by_norm(1.0, ord=ord, stacked=1),
             oc.clip_by_norm(1.0, ord=ord, axis=())):
    out, state = maybe_jit(tx.update, use_jit)({"w": jnp.asarray(x)},
                                               tx.init({"w": jnp.asarray(x)}))
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), ref[0],
                               rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(dict(state.leaf_norms.items())["w"], np.float64), want,
        rtol=1e-6)


def test_donated_update_needs_no_copy_of_a_leaf():
  # The rescue branch once shared one broadcast of its scale between the
  # reductions of same-shape leaves, and XLA:CPU kept it as a 1 MiB buffer.
  tree = {f"w{i}": jnp.ones((512, 512), jnp.float32) for i in range(4)}
  grad_bytes = 4 * 512 * 512 * 4

  def temp(tx):
    fn = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=(0,))
    analysis = fn.lower(tree, tx.init(tree)).compile().memory_analysis()
    return analysis.temp_size_in_bytes

  ours = temp(oc.clip_by_global_norm(1.0))
  assert ours <= temp(optax.clip_by_global_norm(1.0)) + 0.01 * grad_bytes


# --------------------------------------------------------------------------
# Sums of squares that overflow (float32 elements of 1e20, bf16 of 1e30) or
# underflow (1e-20) while the norm is representable; float64 expectations.
# --------------------------------------------------------------------------


# ORD_BY_NAME and the overflowing / underflowing trees: tests/helpers.py.


# ---------------------------------------------------------------- overflow


def test_the_hostile_trees_do_overflow_and_underflow_float32():
  """The premise: the plain float32 sums of squares are inf and 0."""
  big = np.concatenate([x.ravel() for x in leaves64(_big_tree())]).astype(
    np.float32
  )
  tiny = np.concatenate([x.ravel() for x in leaves64(_tiny_tree())]).astype(
    np.float32
  )
  with np.errstate(over="ignore", under="ignore"):
    assert np.isinf(np.sum(np.square(big)))
    assert np.sum(np.square(tiny)) < 1e-38  # flushed or subnormal


@pytest.mark.parametrize("ord_name", list(ORD_BY_NAME))
def test_global_norm_of_1e20_float32(ord_name, use_jit):
  ord_ = ORD_BY_NAME[ord_name]
  tree = _big_tree()
  norm = maybe_jit(lambda t: oc.global_norm(t, ord=ord_), use_jit)(tree)
  assert norm.dtype == jnp.float32
  _assert_close(norm, reference.norm(leaves64(tree), ord_))


def test_bf16_elements_of_1e30(use_jit):
  """bf16 squares accumulate in float32, where 1e60 overflows."""
  tree = {
    "a": jnp.full((4,), 1e30, jnp.bfloat16),
    "b": jnp.ones((3,), jnp.bfloat16),
  }
  ref = leaves64(tree)  # the bf16-rounded values, exactly, in float64
  norm = maybe_jit(oc.global_norm, use_jit)(tree)
  assert norm.dtype == jnp.float32
  _assert_close(norm, reference.norm(ref), rtol=1e-6)
  tx = oc.clip_by_global_norm(1.0)
  out, _ = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, _ = reference.clip_by_global_norm(ref, 1.0)
  for a, e in zip(jax.tree.leaves(out), expected):
    assert a.dtype == jnp.bfloat16
    _assert_close(a, e, rtol=1e-2)  # one bf16 rounding
  per_leaf, _ = maybe_jit(oc.clip_by_norm(1.0).update, use_jit)(tree, None)
  expected, _ = reference.clip_by_norm(ref, 1.0)
  for a, e in zip(jax.tree.leaves(per_leaf), expected):
    _assert_close(a, e, rtol=1e-2)


def test_fp16_large_and_small(use_jit):
  """fp16 is squared in float32: 6e4 (near fp16's max) and 1e-4 both work."""
  tree = {
    "big": jnp.full((4,), 6e4, jnp.float16),
    "small": jnp.full((4,), 1e-4, jnp.float16),
  }
  ref = leaves64(tree)
  norm = maybe_jit(oc.global_norm, use_jit)(tree)
  _assert_close(norm, reference.norm(ref))
  tx = oc.clip_by_norm(1.0)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, norms = reference.clip_by_norm(ref, 1.0)
  _assert_close(state.leaf_norms, norms)
  for a, e in zip(jax.tree.leaves(out), expected):
    assert a.dtype == jnp.float16
    _assert_close(a, e, rtol=1e-3)


def test_shard_style_axis_name_overflow(use_jit):
  """With ``axis_name``, the rare path combines maxima and sums across it."""
  shards = jnp.asarray(
    [[1e20, 2e20], [3e19, 0.0], [-1e20, 1e19], [0.0, 0.0]], jnp.float32
  )
  ref = np.asarray(shards, np.float64)
  for ord_ in (1, 2, math.inf):
    fn = jax.vmap(
      lambda x, o=ord_: oc.global_norm({"x": x}, ord=o, axis_name="d"),
      axis_name="d",
    )
    norms = maybe_jit(fn, use_jit)(shards)
    _assert_close(norms, np.full(4, reference.norm([ref], ord_)))


# ----------------------------------------------------------------- underflow


@pytest.mark.parametrize("ord_name", list(ORD_BY_NAME))
def test_global_norm_of_1e20_elements_underflowing(ord_name, use_jit):
  ord_ = ORD_BY_NAME[ord_name]
  norm = maybe_jit(lambda t: oc.global_norm(t, ord=ord_), use_jit)(
    [jnp.full(4, 1e-20, jnp.float32)]
  )
  expected = {1: 4e-20, 2: 2e-20, math.inf: 1e-20}[ord_]
  _assert_close(norm, expected, rtol=1e-6)


def test_tiny_norms_everywhere(use_jit):
  tree = _tiny_tree()
  ref = leaves64(tree)
  _assert_close(maybe_jit(oc.global_norm, use_jit)(tree), reference.norm(ref))
  _, state = maybe_jit(oc.clip_by_norm(1.0).update, use_jit)(tree, None)
  _assert_close(state.leaf_norms, [reference.norm([x]) for x in ref])
  _, state = maybe_jit(oc.clip_by_block_rms(1.0).update, use_jit)(tree, None)
  _assert_close(state.block_rms, reference.clip_by_block_rms(ref, 1.0)[1])


@pytest.mark.parametrize("ord_name", list(ORD_BY_NAME))
def test_grad_of_global_norm_at_1e30(ord_name, use_jit):
  ord_ = ORD_BY_NAME[ord_name]
  g = jnp.asarray([1e-30, -3e-30, 2e-30], jnp.float32)
  grad = maybe_jit(jax.grad(lambda x: oc.global_norm(x, ord=ord_)), use_jit)(g)
  g64 = np.asarray(g, np.float64)
  if ord_ == 2:
    expected = g64 / np.linalg.norm(g64)
  elif ord_ == 1:
    expected = np.sign(g64)
  else:
    expected = np.array([0.0, -1.0, 0.0])
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)
