"""clip_by_global_norm, clip_by_norm, clip_by_block_rms: semantics and peers."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import reference
import helpers
from helpers import ORD_BY_NAME, big_tree as _big_tree, tiny_tree as _tiny_tree, assert_close_f64 as _assert_close
from helpers import leaves64, maybe_jit, run, small_tree

ORDS = [2, 1, math.inf]


def _assert_tree_close(got, want64, rtol=1e-6, atol=0.0):
  got_leaves = jax.tree.leaves(got)
  assert len(got_leaves) == len(want64)
  for g, w in zip(got_leaves, want64):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


# --- clip_by_global_norm ----------------------------------------------------


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("max_norm", [0.0, 0.3, 1e6, math.inf])
def test_global_matches_reference(ord, max_norm, use_jit):
  tree = small_tree(np.random.default_rng(0))
  out, state = run(oc.clip_by_global_norm(max_norm, ord=ord), tree,
                   use_jit=use_jit)
  want, norm = reference.clip_by_global_norm(leaves64(tree), max_norm, ord)
  _assert_tree_close(out, want, atol=1e-7)
  np.testing.assert_allclose(float(state.global_norm), norm, rtol=1e-6)
  assert bool(state.global_norm_clipped) == (norm > max_norm)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 2.5, 1e3])
def test_global_matches_optax_on_finite_input(max_norm, use_jit):
  tree = small_tree(np.random.default_rng(1), scale=2.0)
  out, _ = run(oc.clip_by_global_norm(max_norm), tree, use_jit=use_jit)
  want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
  chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ord", ORDS)
def test_clipped_norm_is_exactly_threshold_and_unclipped_is_bit_identical(ord):
  tree = small_tree(np.random.default_rng(2), scale=3.0)
  norm = reference.norm(leaves64(tree), ord)
  out, _ = run(oc.clip_by_global_norm(norm / 4, ord=ord), tree, use_jit=True)
  np.testing.assert_allclose(reference.norm(leaves64(out), ord), norm / 4,
                             rtol=2e-7)
  same, state = run(oc.clip_by_global_norm(norm * 1.01, ord=ord), tree,
                    use_jit=True)
  chex.assert_trees_all_equal(same, tree)  # bit-identical
  assert not bool(state.global_norm_clipped)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_trees(dtype, use_jit):
  rng = np.random.default_rng(3)
  tree = {"a": jnp.asarray(rng.standard_normal((8, 8)) * 300).astype(dtype),
          "b": jnp.asarray(rng.standard_normal((5,)) * 300).astype(dtype)}
  out, state = run(oc.clip_by_global_norm(1.0), tree, use_jit=use_jit)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
  assert state.global_norm.dtype == jnp.float32
  want, norm = reference.clip_by_global_norm(leaves64(tree), 1.0)
  np.testing.assert_allclose(float(state.global_norm), norm, rtol=1e-6)
  tol = {jnp.bfloat16: 1e-2, jnp.float16: 1e-3, jnp.float32: 1e-6}[dtype]
  _assert_tree_close(out, want, rtol=tol, atol=tol * 1e-2)
  assert np.isfinite(float(state.global_norm))  # fp16 squares did not overflow


def test_zero_gradients_and_zero_threshold(use_jit):
  zeros = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2), jnp.bfloat16)}
  for max_norm in (0.0, 1.0):
    out, state = run(oc.clip_by_global_norm(max_norm), zeros, use_jit=use_jit)
    chex.assert_trees_all_equal(out, zeros)
    assert float(state.global_norm) == 0.0
  tree = small_tree(np.random.default_rng(4))
  out, state = run(oc.clip_by_global_norm(0.0), tree, use_jit=use_jit)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert bool(state.global_norm_clipped)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("ord", ORDS)
def test_non_finite_norm_gives_nan_everywhere(bad, ord, use_jit):
  tree = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([0.5, 0.25])}
  tree["a"] = tree["a"].at[1].set(bad)
  out, state = run(oc.clip_by_global_norm(1.0, ord=ord), tree, use_jit=use_jit)
  for leaf in jax.tree.leaves(out):
    assert np.isnan(np.asarray(leaf)).all()
  assert not np.isfinite(float(state.global_norm))


@pytest.mark.parametrize("ord", ORDS)
def test_grad_through_update_is_finite_and_correct(ord):
  tx = oc.clip_by_global_norm(1.0, ord=ord)

  def loss(g):
    out, _ = tx.update(g, tx.init(g))
    return sum(jnp.sum(x * w) for x, w in zip(jax.tree.leaves(out), (1.0, 2.0)))

  zero = {"a": jnp.zeros((3,)), "b": jnp.zeros((2,))}
  for point in (zero, {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.zeros((2,))},
                {"a": jnp.array([0.1, 0.0, 0.2]), "b": jnp.zeros((2,))}):
    grads = jax.jit(jax.grad(loss))(point)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
  if ord == 2:
    # Clipped branch: d/dg [c g / |g|] . w = c (w - (w.g) g / |g|^2) / |g|.
    g = np.array([3.0, 0.0, 4.0, 0.0, 0.0])
    w = np.array([1.0, 1.0, 1.0, 2.0, 2.0])
    n = np.linalg.norm(g)
    want = (w - (w @ g) * g / n**2) / n
    grads = jax.grad(loss)({"a": jnp.asarray(g[:3], jnp.float32),
                            "b": jnp.asarray(g[3:], jnp.float32)})
    np.testing.assert_allclose(np.concatenate([grads["a"], grads["b"]]), want,
                               rtol=1e-6, atol=1e-7)


def test_grad_with_respect_to_threshold():
  g = {"a": jnp.array([3.0, 4.0])}

  def out_sum(c):
    tx = oc.clip_by_global_norm(c)
    return jnp.sum(tx.update(g, tx.init(g))[0]["a"])

  # Clipped: sum(c g / 5) = 7c/5 -> d/dc = 1.4. Unclipped: 0.
  np.testing.assert_allclose(float(jax.grad(out_sum)(1.0)), 1.4, rtol=1e-6)
  assert float(jax.grad(out_sum)(10.0)) == 0.0


def test_precomputed_norm_skips_the_reduction():
  tree = {"a": jnp.array([3.0, 4.0])}
  tx = oc.clip_by_global_norm(1.0)
  # A deliberately different norm is trusted: scale = 1 / 10.
  out, state = tx.update(tree, tx.init(tree), global_norm=jnp.float32(10.0))
  np.testing.assert_allclose(np.asarray(out["a"]), [0.3, 0.4], rtol=1e-6)
  assert float(state.global_norm) == 10.0
  jaxpr = str(jax.make_jaxpr(
      lambda t, n: tx.update(t, tx.init(t), global_norm=n))(tree, 10.0))
  assert "reduce_sum" not in jaxpr and "sqrt" not in jaxpr
  # Through a chain, the extra argument reaches the clipper.
  chain = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0))
  out, _ = chain.update(tree, chain.init(tree), tree, global_norm=10.0)
  np.testing.assert_allclose(np.asarray(out["a"]), [-0.3, -0.4], rtol=1e-6)


# --- clip_by_norm (per tensor) ------------------------------------------------


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 2.0, math.inf])
def test_per_tensor_matches_reference(ord, max_norm, use_jit):
  tree = small_tree(np.random.default_rng(5), scale=1.5)
  out, state = run(oc.clip_by_norm(max_norm, ord=ord), tree, use_jit=use_jit)
  want, norms = reference.clip_by_norm(leaves64(tree), max_norm, ord)
  _assert_tree_close(out, want, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state.leaf_norms), norms, rtol=1e-6)
  assert int(state.num_clipped_leaves) == sum(n > max_norm for n in norms)


def test_per_tensor_non_finite_leaf_only_poisons_itself():
  tree = {"a": jnp.array([1.0, jnp.inf]), "b": jnp.array([3.0, 4.0])}
  out, state = run(oc.clip_by_norm(1.0), tree)
  assert np.isnan(np.asarray(out["a"])).all()
  np.testing.assert_allclose(np.asarray(out["b"]), [0.6, 0.8], rtol=1e-6)
  assert np.isinf(np.asarray(state.leaf_norms)[0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_per_tensor_low_precision(dtype):
  tree = {"a": jnp.full((16,), 300.0, dtype), "b": jnp.full((2,), 0.1, dtype)}
  out, state = run(oc.clip_by_norm(1.0), tree, use_jit=True)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
  np.testing.assert_allclose(np.asarray(state.leaf_norms),
                             [1200.0, reference.norm([np.asarray(tree["b"])])],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["a"], np.float64), 0.25, rtol=1e-2)
  chex.assert_trees_all_equal(out["b"], tree["b"])


# --- clip_by_block_rms --------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 0.2, 1.0, 100.0])
def test_block_rms_matches_reference_and_optax(threshold, use_jit):
  tree = small_tree(np.random.default_rng(6), scale=1.5)
  out, state = run(oc.clip_by_block_rms(threshold), tree, use_jit=use_jit)
  want, rms = reference.clip_by_block_rms(leaves64(tree), threshold)
  _assert_tree_close(out, want, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state.block_rms), rms, rtol=1e-6)
  assert int(state.num_clipped_blocks) == sum(r > threshold for r in rms)
  if threshold > 0:  # optax divides by max(1, rms / 0): NaN at 0 for zeros
    want_optax, _ = optax.clip_by_block_rms(threshold).update(
        tree, optax.EmptyState())
    chex.assert_trees_all_close(out, want_optax, rtol=1e-6, atol=1e-7)


def test_block_rms_zero_and_empty_leaves():
  tree = {"z": jnp.zeros((3,)), "e": jnp.zeros((0, 2)), "x": jnp.ones((4,)) * 2}
  out, state = run(oc.clip_by_block_rms(0.0), tree, use_jit=True)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  np.testing.assert_allclose(np.asarray(state.block_rms), [0.0, 2.0, 0.0])


# --- composition with optax ---------------------------------------------------


def _params_and_grads():
  rng = np.random.default_rng(7)
  params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
            "b": jnp.zeros((2,))}
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
  return params, grads


@pytest.mark.usefixtures("standard_promotion")
def test_chain_with_adam_matches_manual_composition():
  params, grads = _params_and_grads()
  tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-2))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  norm = reference.norm(leaves64(grads))
  clipped = jax.tree.map(lambda g: g / np.float32(norm), grads)
  adam = optax.adam(1e-2)
  want, _ = adam.update(clipped, adam.init(params), params)
  chex.assert_trees_all_close(updates, want, rtol=1e-5)
  np.testing.assert_allclose(float(optax.tree.get(state, "global_norm")), norm,
                             rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")
def test_multisteps_masked_and_multi_transform():
  params, grads = _params_and_grads()
  norm = reference.norm(leaves64(grads))
  # MultiSteps: accumulate 2 mini-steps, clip the averaged gradient.
  ms = optax.MultiSteps(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0)),
                        every_k_schedule=2)
  state = ms.init(params)
  step = jax.jit(ms.update)
  for _ in range(2):
    updates, state = step(grads, state, params)
  chex.assert_trees_all_close(
      updates, jax.tree.map(lambda g: -g / np.float32(norm), grads), rtol=1e-6)
  np.testing.assert_allclose(
      float(oc.clip_stats(state)["clip_by_global_norm/global_norm"]), norm,
      rtol=1e-6)
  # masked: only "w" is clipped, "b" passes through.
  masked = optax.masked(oc.clip_by_global_norm(1.0), {"w": True, "b": False})
  out, state = masked.update(grads, masked.init(params), params)
  w_norm = reference.norm([np.asarray(grads["w"])])
  chex.assert_trees_all_close(out["w"], grads["w"] / np.float32(w_norm),
                              rtol=1e-6)
  chex.assert_trees_all_equal(out["b"], grads["b"])
  np.testing.assert_allclose(float(optax.tree.get(state, "global_norm")), w_norm,
                             rtol=1e-6)
  # multi_transform: two clippers, one per label; clip_stats keeps both.
  mt = optax.multi_transform(
      {"kernel": oc.clip_by_global_norm(1.0), "bias": oc.clip_by_norm(0.5)},
      {"w": "kernel", "b": "bias"})
  out, state = mt.update(grads, mt.init(params), params)
  b_norm = reference.norm([np.asarray(grads["b"])])
  chex.assert_trees_all_close(out["b"], grads["b"] * np.float32(0.5 / b_norm),
                              rtol=1e-6)
  stats = oc.clip_stats(state)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/global_norm"]),
                             w_norm, rtol=1e-6)
  np.testing.assert_allclose(float(stats["clip_by_norm/leaf_norms/b"]),
                             b_norm, rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")
def test_apply_if_finite_wrapping_keeps_state_dtype():
  params, grads = _params_and_grads()
  tx = optax.apply_if_finite(oc.clip_by_global_norm(1.0), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  step = jax.jit(tx.update)
  out, state = step(bad, state, params)
  assert int(state.notfinite_count) == 1
  out, state = step(grads, state, params)
  assert int(state.notfinite_count) == 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))


# --------------------------------------------------------------------------
# Overflowing and underflowing sums of squares, zero thresholds, subnormals,
# derivatives at 1e30, a state from another tree, the empty tree's state.
# --------------------------------------------------------------------------


# ORD_BY_NAME and the overflowing / underflowing trees: tests/helpers.py.


@pytest.mark.parametrize("ord_name", list(ORD_BY_NAME))
def test_clip_by_global_norm_of_1e20_float32(ord_name, use_jit):
  ord_ = ORD_BY_NAME[ord_name]
  tree = _big_tree()
  tx = oc.clip_by_global_norm(1.0, ord=ord_)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, n = reference.clip_by_global_norm(leaves64(tree), 1.0, ord_)
  for a, e in zip(jax.tree.leaves(out), expected):
    assert a.dtype == jnp.float32
    _assert_close(a, e, rtol=2e-6)
  _assert_close(state.global_norm, n)
  assert bool(state.global_norm_clipped)
  assert np.isclose(reference.norm(leaves64(out), ord_), 1.0, rtol=1e-5)


@pytest.mark.parametrize("ord_name", list(ORD_BY_NAME))
def test_clip_by_norm_per_leaf_of_1e20(ord_name, use_jit):
  ord_ = ORD_BY_NAME[ord_name]
  tree = _big_tree()
  tx = oc.clip_by_norm(1.0, ord=ord_)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, norms = reference.clip_by_norm(leaves64(tree), 1.0, ord_)
  _assert_close(state.leaf_norms, norms)
  for a, e in zip(jax.tree.leaves(out), expected):
    _assert_close(a, e, rtol=2e-6)


def test_clip_by_block_rms_of_1e20(use_jit):
  tree = _big_tree()
  tx = oc.clip_by_block_rms(1.0)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, rms = reference.clip_by_block_rms(leaves64(tree), 1.0)
  _assert_close(state.block_rms, rms)
  for a, e in zip(jax.tree.leaves(out), expected):
    _assert_close(a, e, rtol=2e-6)


def test_grad_through_the_overflow_path(use_jit):
  """d||g||/dg = g / ||g||, also where the sum of squares overflows."""
  tree = _big_tree()
  grad = maybe_jit(jax.grad(oc.global_norm), use_jit)(tree)
  ref = leaves64(tree)
  n = reference.norm(ref)
  for a, x in zip(jax.tree.leaves(grad), ref):
    _assert_close(a, x / n, rtol=1e-5)


# ---------------------------------------------------------- inf and NaN stay loud


@pytest.mark.parametrize(
  "bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"]
)
@pytest.mark.parametrize("ord_name", list(ORD_BY_NAME))
def test_non_finite_element_still_gives_nan(bad, ord_name, use_jit):
  """Next to 1e20 elements (so the rare path runs) an inf/NaN is still loud."""
  ord_ = ORD_BY_NAME[ord_name]
  tree = {
    "a": jnp.asarray([1e20, 1e20, bad], jnp.float32),
    "b": jnp.asarray([1.0, 2.0], jnp.float32),
  }
  for tx in (
    oc.clip_by_global_norm(1.0, ord=ord_),
    oc.clip_by_norm(1.0, ord=ord_),
  ):
    out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
    assert np.all(np.isnan(np.asarray(out["a"])))
    assert not np.isfinite(np.asarray(state[0]).ravel()[0])
  out, state = maybe_jit(oc.clip_by_block_rms(1.0).update, use_jit)(tree, None)
  assert np.all(np.isnan(np.asarray(out["a"])))
  assert not np.isfinite(float(state.block_rms[0]))
  norm = maybe_jit(lambda t: oc.global_norm(t, ord=ord_), use_jit)(tree)
  if np.isnan(bad):
    assert np.isnan(float(norm))
  else:
    assert float(norm) == np.inf


@pytest.mark.parametrize(
  "make",
  [
    lambda: oc.clip_by_global_norm(0.0),
    lambda: oc.clip_by_global_norm(0.0, ord=1),
    lambda: oc.clip_by_norm(0.0),
    lambda: oc.clip_by_norm(0.0, ord=math.inf),
    lambda: oc.clip_by_block_rms(0.0),
  ],
  ids=["global", "global_l1", "per_leaf", "per_leaf_linf", "block_rms"],
)
@pytest.mark.parametrize(
  "scale", [1e-30, 1e-40, 0.0], ids=["1e-30", "1e-40", "0"]
)
def test_threshold_zero_gives_zero_updates(make, scale, use_jit):
  """docs/design.md#numerics, item 3: c = 0 yields zero updates, even for 1e-30 and subnormals."""
  tree = _tiny_tree(scale) if scale else _tiny_tree(1.0)
  if not scale:
    tree = jax.tree.map(jnp.zeros_like, tree)
  tx = make()
  out, _ = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.parametrize(
  "make",
  [
    lambda: oc.clip_by_global_norm(1.0),
    lambda: oc.clip_by_global_norm(1.0, ord=1),
    lambda: oc.clip_by_global_norm(1.0, ord=math.inf),
    lambda: oc.clip_by_norm(1.0),
    lambda: oc.clip_by_block_rms(1.0),
  ],
  ids=["global", "global_l1", "global_linf", "per_leaf", "block_rms"],
)
def test_subnormal_gradient_comes_back_bit_identical(make, use_jit):
  bits = np.array([1e-40, -1e-40, 1e-45, 0.0], np.float32)
  assert np.all(np.abs(bits[bits != 0]) < np.finfo(np.float32).tiny)
  tree = {"a": jnp.asarray(bits), "b": jnp.asarray(bits[:2].copy())}
  tx = make()
  out, _ = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  for a, x in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(
      np.asarray(a).view(np.int32), np.asarray(x).view(np.int32)
    )


# --------------------------------------------- derivatives at tiny gradients


def _reference_clip_jacobian_vector(g, v, c, ord_):
  """d/dg sum(v * clip(g)) in float64, for one flat g with a unique max."""
  g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
  n = reference.norm([g], ord_)
  if n <= c:
    return v
  if ord_ == 2:
    dn = g / n
  elif ord_ == 1:
    dn = np.sign(g)
  else:
    dn = np.zeros_like(g)
    i = int(np.argmax(np.abs(g)))
    dn[i] = np.sign(g[i])
  # clip(g) = c g / n  =>  d/dg (v . clip) = c v / n - c (v . g) dn / n^2
  return c * v / n - c * float(v @ g) * dn / n**2


@pytest.mark.parametrize("ord_name", list(ORD_BY_NAME))
@pytest.mark.parametrize("threshold", [1.0, 1e-31], ids=["within", "clipping"])
@pytest.mark.parametrize("per_leaf", [False, True], ids=["global", "per_leaf"])
def test_grad_finite_and_right_at_1e30(ord_name, threshold, per_leaf, use_jit):
  ord_ = ORD_BY_NAME[ord_name]
  g = jnp.asarray([1e-30, -3e-30, 2e-30, 0.5e-30], jnp.float32)
  v = jnp.asarray([0.5, 1.0, -2.0, 3.0], jnp.float32)
  if per_leaf:
    tx = oc.clip_by_norm(threshold, ord=ord_)
  else:
    tx = oc.clip_by_global_norm(threshold, ord=ord_)

  def loss(g):
    out, _ = tx.update({"g": g}, None)
    return jnp.sum(v * out["g"])

  grad = maybe_jit(jax.grad(loss), use_jit)(g)
  assert np.all(np.isfinite(np.asarray(grad)))
  expected = _reference_clip_jacobian_vector(
    np.asarray(g, np.float64), np.asarray(v, np.float64), threshold, ord_
  )
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- policies


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_block_rms"])
@pytest.mark.parametrize("given", [1, 3, 0])
def test_state_from_another_tree_is_a_clear_error(name, given):
  tx = getattr(oc, name)(1.0)
  state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
  updates = {f"x{i}": jnp.ones(2) for i in range(given)}
  with pytest.raises(ValueError) as info:
    tx.update(updates, state)
  message = str(info.value)
  assert message.startswith(f"{name}: the state was created by init on a"
                            " different tree")
  assert "holds statistics for 2 tensors at a, b" in message
  assert f"updates have {given} leaves" in message
  assert "Call init on a tree with the structure of the updates" in message


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_block_rms"])
def test_empty_tree_state_is_non_empty_and_orbax_saveable(name, tmp_path):
  pytest.importorskip("orbax.checkpoint")
  tx = optax.multi_transform(
    {"clip": getattr(oc, name)(1.0), "none": optax.identity()},
    {"w": "none"},  # the "clip" group is empty
  )
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  inner = state.inner_states["clip"].inner_state
  for field in inner:
    assert field.size > 0
  updates, state = jax.jit(tx.update)(params, state, params)
  inner = state.inner_states["clip"].inner_state
  assert inner[0].shape == (1,) and float(inner[0][0]) == 0.0
  restored = helpers.orbax_round_trip(state, tmp_path / "state")
  chex.assert_trees_all_equal(restored, state)
  # An empty tree directly: same placeholder from init and from update.
  direct = getattr(oc, name)(1.0)
  s0 = direct.init({})
  _, s1 = direct.update({}, s0)
  chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)
  assert s1[0].shape == (1,)
