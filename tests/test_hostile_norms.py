"""Hostile inputs for the norm kernel and the norm clippers (docs/design.md#numerics).

Sums of squares that overflow (float32 elements of 1e20, bf16 elements of
1e30) or underflow (elements of 1e-20) while the norm itself is representable;
thresholds of 0 against tiny gradients; subnormals; derivatives at tiny
gradients for every ``ord``; and the input policies of the three transforms of
``_norm_clip.py`` (integer leaves, ``update(g, None)``, a state from another
tree, the empty tree's checkpointable state).

Every expected value is computed here with float64 NumPy (or
``reference.py``), never read back from the library.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from helpers import maybe_jit

import optaxclip as oc

ORDS = {"l1": 1, "l2": 2, "linf": math.inf}


def _f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _big_tree():
  """Float32 elements near 1e20: every sum of squares overflows float32."""
  return {
    "w": jnp.asarray([[1e20, -2e20], [3e19, 0.0]], jnp.float32),
    "b": jnp.asarray([1e20, 5e19, -1e20], jnp.float32),
  }


def _tiny_tree(scale=1e-20):
  """Elements whose squares flush to zero in float32."""
  return {
    "w": jnp.asarray(np.array([[1.0, -2.0], [0.5, 0.0]]) * scale, jnp.float32),
    "b": jnp.asarray(np.array([1.0, 3.0, -1.0]) * scale, jnp.float32),
  }


def _assert_close(actual, expected, rtol=1e-6):
  np.testing.assert_allclose(
    np.asarray(actual, np.float64), expected, rtol=rtol, atol=0
  )


# ---------------------------------------------------------------- overflow


def test_the_hostile_trees_do_overflow_and_underflow_float32():
  """The premise: the plain float32 sums of squares are inf and 0."""
  big = np.concatenate([x.ravel() for x in _f64(_big_tree())]).astype(
    np.float32
  )
  tiny = np.concatenate([x.ravel() for x in _f64(_tiny_tree())]).astype(
    np.float32
  )
  with np.errstate(over="ignore", under="ignore"):
    assert np.isinf(np.sum(np.square(big)))
    assert np.sum(np.square(tiny)) < 1e-38  # flushed or subnormal


@pytest.mark.parametrize("ord_name", list(ORDS))
def test_global_norm_of_1e20_float32(ord_name, use_jit):
  ord_ = ORDS[ord_name]
  tree = _big_tree()
  norm = maybe_jit(lambda t: oc.global_norm(t, ord=ord_), use_jit)(tree)
  assert norm.dtype == jnp.float32
  _assert_close(norm, reference.norm(_f64(tree), ord_))


@pytest.mark.parametrize("ord_name", list(ORDS))
def test_clip_by_global_norm_of_1e20_float32(ord_name, use_jit):
  ord_ = ORDS[ord_name]
  tree = _big_tree()
  tx = oc.clip_by_global_norm(1.0, ord=ord_)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, n = reference.clip_by_global_norm(_f64(tree), 1.0, ord_)
  for a, e in zip(jax.tree.leaves(out), expected):
    assert a.dtype == jnp.float32
    _assert_close(a, e, rtol=2e-6)
  _assert_close(state.global_norm, n)
  assert bool(state.global_norm_clipped)
  assert np.isclose(reference.norm(_f64(out), ord_), 1.0, rtol=1e-5)


def test_bf16_elements_of_1e30(use_jit):
  """bf16 squares accumulate in float32, where 1e60 overflows."""
  tree = {
    "a": jnp.full((4,), 1e30, jnp.bfloat16),
    "b": jnp.ones((3,), jnp.bfloat16),
  }
  ref = _f64(tree)  # the bf16-rounded values, exactly, in float64
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
  ref = _f64(tree)
  norm = maybe_jit(oc.global_norm, use_jit)(tree)
  _assert_close(norm, reference.norm(ref))
  tx = oc.clip_by_norm(1.0)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, norms = reference.clip_by_norm(ref, 1.0)
  _assert_close(state.leaf_norms, norms)
  for a, e in zip(jax.tree.leaves(out), expected):
    assert a.dtype == jnp.float16
    _assert_close(a, e, rtol=1e-3)


@pytest.mark.parametrize("ord_name", list(ORDS))
def test_clip_by_norm_per_leaf_of_1e20(ord_name, use_jit):
  ord_ = ORDS[ord_name]
  tree = _big_tree()
  tx = oc.clip_by_norm(1.0, ord=ord_)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, norms = reference.clip_by_norm(_f64(tree), 1.0, ord_)
  _assert_close(state.leaf_norms, norms)
  for a, e in zip(jax.tree.leaves(out), expected):
    _assert_close(a, e, rtol=2e-6)


def test_clip_by_block_rms_of_1e20(use_jit):
  tree = _big_tree()
  tx = oc.clip_by_block_rms(1.0)
  out, state = maybe_jit(tx.update, use_jit)(tree, tx.init(tree))
  expected, rms = reference.clip_by_block_rms(_f64(tree), 1.0)
  _assert_close(state.block_rms, rms)
  for a, e in zip(jax.tree.leaves(out), expected):
    _assert_close(a, e, rtol=2e-6)


def test_adaptive_grad_clip_unit_norms_of_1e20(use_jit):
  """AGC's unit norms of 1e20 gradients and 1e20 parameters."""
  rng = np.random.default_rng(0)
  grads = {
    "kernel": jnp.asarray(rng.standard_normal((3, 4)) * 1e20, jnp.float32)
  }
  params = {
    "kernel": jnp.asarray(rng.standard_normal((3, 4)) * 1e19, jnp.float32)
  }
  tx = oc.adaptive_grad_clip(0.1, eps=1e-3)
  out, _ = maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)
  # A (fan_in, fan_out) kernel's units are its output columns: axes (0,).
  expected, clipped = reference.adaptive_grad_clip(
    _f64(grads), _f64(params), 0.1, 1e-3, [(0,)]
  )
  assert clipped > 0
  assert np.all(np.isfinite(np.asarray(out["kernel"])))
  _assert_close(out["kernel"], expected[0], rtol=1e-5)


def test_adaptive_grad_clip_unit_norms_of_tiny_grads(use_jit):
  """Gradients of 1e-30 against parameters of 1e-28: clipped, not passed."""
  grads = {"kernel": jnp.full((3, 4), 1e-30, jnp.float32)}
  params = {"kernel": jnp.full((3, 4), 1e-30, jnp.float32)}
  tx = oc.adaptive_grad_clip(0.5, eps=1e-40)
  out, _ = maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)
  expected, clipped = reference.adaptive_grad_clip(
    _f64(grads), _f64(params), 0.5, 1e-40, [(0,)]
  )
  assert clipped == 4
  _assert_close(out["kernel"], expected[0], rtol=1e-5)


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


def test_grad_through_the_overflow_path(use_jit):
  """d||g||/dg = g / ||g||, also where the sum of squares overflows."""
  tree = _big_tree()
  grad = maybe_jit(jax.grad(oc.global_norm), use_jit)(tree)
  ref = _f64(tree)
  n = reference.norm(ref)
  for a, x in zip(jax.tree.leaves(grad), ref):
    _assert_close(a, x / n, rtol=1e-5)


# ---------------------------------------------------------- inf and NaN stay loud


@pytest.mark.parametrize(
  "bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"]
)
@pytest.mark.parametrize("ord_name", list(ORDS))
def test_non_finite_element_still_gives_nan(bad, ord_name, use_jit):
  """Next to 1e20 elements (so the rare path runs) an inf/NaN is still loud."""
  ord_ = ORDS[ord_name]
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


# ----------------------------------------------------------------- underflow


@pytest.mark.parametrize("ord_name", list(ORDS))
def test_global_norm_of_1e20_elements_underflowing(ord_name, use_jit):
  ord_ = ORDS[ord_name]
  norm = maybe_jit(lambda t: oc.global_norm(t, ord=ord_), use_jit)(
    [jnp.full(4, 1e-20, jnp.float32)]
  )
  expected = {1: 4e-20, 2: 2e-20, math.inf: 1e-20}[ord_]
  _assert_close(norm, expected, rtol=1e-6)


def test_tiny_norms_everywhere(use_jit):
  tree = _tiny_tree()
  ref = _f64(tree)
  _assert_close(maybe_jit(oc.global_norm, use_jit)(tree), reference.norm(ref))
  _, state = maybe_jit(oc.clip_by_norm(1.0).update, use_jit)(tree, None)
  _assert_close(state.leaf_norms, [reference.norm([x]) for x in ref])
  _, state = maybe_jit(oc.clip_by_block_rms(1.0).update, use_jit)(tree, None)
  _assert_close(state.block_rms, reference.clip_by_block_rms(ref, 1.0)[1])


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


def test_agc_subnormal_gradient_comes_back_bit_identical(use_jit):
  grads = {"k": jnp.full((2, 3), 1e-40, jnp.float32)}
  params = {"k": jnp.ones((2, 3), jnp.float32)}
  tx = oc.adaptive_grad_clip(0.1)
  out, _ = maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)
  np.testing.assert_array_equal(
    np.asarray(out["k"]).view(np.int32), np.asarray(grads["k"]).view(np.int32)
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


@pytest.mark.parametrize("ord_name", list(ORDS))
@pytest.mark.parametrize("threshold", [1.0, 1e-31], ids=["within", "clipping"])
@pytest.mark.parametrize("per_leaf", [False, True], ids=["global", "per_leaf"])
def test_grad_finite_and_right_at_1e30(ord_name, threshold, per_leaf, use_jit):
  ord_ = ORDS[ord_name]
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


@pytest.mark.parametrize("ord_name", list(ORDS))
def test_grad_of_global_norm_at_1e30(ord_name, use_jit):
  ord_ = ORDS[ord_name]
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
  assert name in message
  assert "with 2 leaves" in message
  assert f"updates have {given} leaves" in message
  assert "init" in message and "same tree" in message


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_block_rms"])
def test_empty_tree_state_is_non_empty_and_orbax_saveable(name, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
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
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
    tmp_path / "state", jax.tree.map(jnp.zeros_like, state)
  )
  chex.assert_trees_all_equal(restored, state)
  # An empty tree directly: same placeholder from init and from update.
  direct = getattr(oc, name)(1.0)
  s0 = direct.init({})
  _, s1 = direct.update({}, s0)
  chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)
  assert s1[0].shape == (1,)


TRANSFORMS = {
  "clip_by_global_norm": lambda: oc.clip_by_global_norm(1.0),
  "clip_by_global_norm_linf": lambda: oc.clip_by_global_norm(1.0, ord="inf"),
  "clip_by_norm": lambda: oc.clip_by_norm(1.0),
  "clip_by_block_rms": lambda: oc.clip_by_block_rms(1.0),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_], ids=["int32", "bool"])
def test_integer_leaf_is_a_type_error_naming_the_path(name, dtype, use_jit):
  tx = TRANSFORMS[name]()
  grads = {"layer": {"w": jnp.ones(3), "step": jnp.zeros((2,), dtype)}}
  fn_name = name.replace("_linf", "")
  with pytest.raises(TypeError, match=rf"{fn_name}.*layer/step.*"):
    maybe_jit(tx.update, use_jit)(grads, tx.init(grads))
  with pytest.raises(TypeError, match=r"global_norm.*layer/step"):
    maybe_jit(oc.global_norm, use_jit)(grads)


def test_low_precision_floats_pass_the_leaf_check():
  tree = {
    "bf16": jnp.ones(2, jnp.bfloat16),
    "f16": jnp.ones(2, jnp.float16),
    "c64": jnp.ones(2, jnp.complex64),
  }
  np.testing.assert_allclose(float(oc.global_norm(tree)), math.sqrt(6.0))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_update_with_state_none_equals_update_with_init(name, use_jit):
  tx = TRANSFORMS[name]()
  rng = np.random.default_rng(3)
  grads = {
    "w": jnp.asarray(rng.standard_normal((4, 3)) * 3, jnp.float32),
    "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
  }
  update = maybe_jit(tx.update, use_jit)
  got, want = update(grads, None), update(grads, tx.init(grads))
  if use_jit:  # two programs (state an input or rebuilt) may round apart
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)
  else:
    chex.assert_trees_all_equal(got, want)
