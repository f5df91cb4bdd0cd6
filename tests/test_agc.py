"""adaptive_grad_clip: the paper's rule, optax parity, axes, numerics."""

import inspect
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import _agc
import reference
from helpers import leaves64, maybe_jit

# optax's own AGC gained ``axis=`` (and ranks above 4) after 0.2.5; against
# older optax only the float64 reference is compared.
OPTAX_AGC_HAS_AXIS = "axis" in inspect.signature(
    optax.adaptive_grad_clip).parameters

SHAPES_BY_RANK = {1: (6,), 2: (5, 4), 3: (4, 3, 2), 4: (3, 3, 2, 4),
                  5: (2, 2, 2, 3, 3)}


def _tree(rng, shapes, scale=1.0, dtype=jnp.float32):
  return {f"x{i}": jnp.asarray(scale * rng.standard_normal(s)).astype(dtype)
          for i, s in enumerate(shapes)}


def _run(tx, grads, params, use_jit=False):
  fn = maybe_jit(tx.update, use_jit)
  return fn(grads, tx.init(params), params)


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_matches_optax_and_the_paper(rank, clipping, use_jit):
  rng = np.random.default_rng(rank)
  shapes = [SHAPES_BY_RANK[rank], (1, 7), ()]
  grads, params = _tree(rng, shapes), _tree(rng, shapes)
  params["x1"] = jnp.zeros((1, 7))  # a zero-initialised unit: the eps floor
  out, state = _run(oc.adaptive_grad_clip(clipping), grads, params, use_jit)
  if rank <= 4 or OPTAX_AGC_HAS_AXIS:  # optax < 0.2.6 stops at rank 4
    want_optax, _ = optax.adaptive_grad_clip(clipping).update(
        grads, optax.EmptyState(), params)
    chex.assert_trees_all_close(out, want_optax, rtol=1e-6, atol=1e-9)
  axes = [_agc.default_unit_axes(s) for s in shapes]
  want, clipped = reference.adaptive_grad_clip(
      leaves64(grads), leaves64(params), clipping, 1e-3, axes)
  for got, ref in zip(leaves64(out), want):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
  assert int(state.num_clipped_units) == clipped
  units = sum(int(np.prod([d for a, d in enumerate(s) if a not in ax]))
              for s, ax in zip(shapes, axes))
  np.testing.assert_allclose(float(state.clipped_unit_fraction), clipped / units,
                             rtol=1e-6)


def test_default_axes():
  rule = _agc.default_unit_axes
  assert rule(()) == () and rule((5,)) == (0,) and rule((1, 5)) == (0, 1)
  assert rule((3, 1, 1)) == (0, 1, 2)
  assert rule((4, 3)) == (0,) and rule((4, 3, 2)) == (0,)
  assert rule((3, 3, 2, 4)) == (0, 1, 2) and rule((2,) * 5) == (0, 1, 2, 3)
  assert rule((2,) * 6) is None


def _axes_case():
  rng = np.random.default_rng(7)
  shapes = {"conv1d": (3, 4, 5), "dense": (4, 5), "bias": (5,)}
  grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in shapes.items()}
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()}
  # Conv1D (width, in, out): one unit per output spans axes (0, 1).
  axes = [(0,), (0, 1), (0,)]  # in leaves order: bias, conv1d, dense
  want, _ = reference.adaptive_grad_clip(leaves64(grads), leaves64(params),
                                         0.05, 1e-3, axes)
  return grads, params, want


@pytest.mark.parametrize("form", ["pytree", "callable"])
def test_per_leaf_axes(form, use_jit):
  grads, params, want = _axes_case()
  if form == "pytree":
    axis = {"conv1d": (0, 1), "dense": None, "bias": None}
  else:
    axis = lambda path, leaf: (0, 1) if "conv1d" in jax.tree_util.keystr(
        path) else None
  out, _ = _run(oc.adaptive_grad_clip(0.05, axis=axis), grads, params, use_jit)
  for got, ref in zip(leaves64(out), want):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)


def test_global_axis_applies_to_every_leaf(use_jit):
  rng = np.random.default_rng(8)
  shapes = [(4, 3), (4, 2)]
  grads, params = _tree(rng, shapes), _tree(rng, shapes)
  for axis, axes in ((1, [(1,), (1,)]), ((0, 1), [(0, 1), (0, 1)]),
                     (-1, [(1,), (1,)])):
    out, _ = _run(oc.adaptive_grad_clip(0.1, axis=axis), grads, params, use_jit)
    want, _ = reference.adaptive_grad_clip(leaves64(grads), leaves64(params),
                                           0.1, 1e-3, axes)
    for got, ref in zip(leaves64(out), want):
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
    if OPTAX_AGC_HAS_AXIS:  # optax's axis= is newer than the optax floor
      want_optax, _ = optax.adaptive_grad_clip(0.1, axis=axis).update(
          grads, optax.EmptyState(), params)
      chex.assert_trees_all_close(out, want_optax, rtol=1e-6)


def test_rank_six_needs_axes_and_says_how():
  g = {"big": jnp.ones((2,) * 6)}
  with pytest.raises(ValueError, match=r"^adaptive_grad_clip: the leaf at "
                     r"'big' has shape \(2, 2, 2, 2, 2, 2\).*axis="):
    _run(oc.adaptive_grad_clip(0.1), g, g)
  # With axes, ||G_i|| = ||W_i|| > 0.1 ||W_i||: every unit is cut to a tenth.
  out, state = _run(oc.adaptive_grad_clip(0.1, axis=(0, 1, 2, 3, 4)), g, g)
  np.testing.assert_allclose(np.asarray(out["big"]), 0.1, rtol=1e-6)
  assert int(state.num_clipped_units) == 2


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"^adaptive_grad_clip: clipping must be"
                     r" a non-negative scalar.*got -0.1"):
    oc.adaptive_grad_clip(-0.1)
  with pytest.raises(ValueError, match=r"^adaptive_grad_clip: eps must be a"
                     r" non-negative scalar.*got nan"):
    oc.adaptive_grad_clip(0.1, eps=float("nan"))
  with pytest.raises(TypeError, match=r"^adaptive_grad_clip: axis must be"):
    oc.adaptive_grad_clip(0.1, axis={"a": "rows"})
  g = {"a": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match=r"^adaptive_grad_clip: update needs"
                     r" params"):
    oc.adaptive_grad_clip(0.1).update(g, oc.adaptive_grad_clip(0.1).init(g))
  with pytest.raises(ValueError, match=r"axis 2 is out of range for the leaf"
                     r" at 'a' of shape \(3, 2\)"):
    _run(oc.adaptive_grad_clip(0.1, axis=2), g, g)
  with pytest.raises(ValueError, match=r"axis pytree must have the structure"):
    _run(oc.adaptive_grad_clip(0.1, axis={"b": None, "c": 0}), g, g)


@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_gradients_keep_their_dtype(grad_dtype, use_jit):
  rng = np.random.default_rng(9)
  shapes = [(8, 4), (3, 3, 2, 4), (4,)]
  grads = _tree(rng, shapes, scale=300.0, dtype=grad_dtype)
  params = _tree(rng, shapes)  # float32 params
  out, _ = _run(oc.adaptive_grad_clip(0.05), grads, params, use_jit)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
  axes = [_agc.default_unit_axes(x.shape) for x in jax.tree.leaves(grads)]
  want, _ = reference.adaptive_grad_clip(leaves64(grads), leaves64(params),
                                         0.05, 1e-3, axes)
  tol = {jnp.bfloat16: 1e-2, jnp.float16: 1e-3, jnp.float32: 1e-6}[grad_dtype]
  for got, ref in zip(leaves64(out), want):
    np.testing.assert_allclose(got, ref, rtol=tol, atol=1e-6)
    assert np.isfinite(got).all()  # fp16 squares did not overflow


def test_unclipped_units_are_bit_identical():
  rng = np.random.default_rng(10)
  params = _tree(rng, [(6, 5)])
  grads = {"x0": params["x0"] * 0.01}
  grads["x0"] = grads["x0"].at[:, 2].multiply(100.0)  # only unit 2 too big
  out, state = _run(oc.adaptive_grad_clip(0.05), grads, params, True)
  keep = [0, 1, 3, 4]
  np.testing.assert_array_equal(np.asarray(out["x0"])[:, keep],
                                np.asarray(grads["x0"])[:, keep])
  assert int(state.num_clipped_units) == 1


def test_zeros_and_zero_init_params(use_jit):
  zeros = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
  out, state = _run(oc.adaptive_grad_clip(0.01), zeros, zeros, use_jit)
  chex.assert_trees_all_equal(out, zeros)
  assert int(state.num_clipped_units) == 0
  # A zero-initialised bias with a unit gradient moves by clipping * eps.
  grads = {"w": jnp.zeros((4, 3)), "b": jnp.ones((3,))}
  out, _ = _run(oc.adaptive_grad_clip(0.01), grads, zeros, use_jit)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["b"])), 0.01 * 1e-3,
                             rtol=1e-5)


def test_non_finite_unit_is_nan_and_others_are_untouched():
  params = {"w": jnp.ones((2, 3))}
  grads = {"w": jnp.full((2, 3), 0.001).at[0, 1].set(jnp.inf)}
  out, _ = _run(oc.adaptive_grad_clip(0.1), grads, params, True)
  out = np.asarray(out["w"])
  assert np.isnan(out[:, 1]).all()
  np.testing.assert_array_equal(out[:, [0, 2]], 0.001 * np.ones((2, 2),
                                                                np.float32))


@pytest.mark.parametrize("point", ["zero", "random"])
def test_grad_through_update_is_finite(point):
  rng = np.random.default_rng(11)
  params = _tree(rng, [(4, 3), (3,)])
  grads = _tree(rng, [(4, 3), (3,)])
  if point == "zero":
    grads = jax.tree.map(jnp.zeros_like, grads)
    params = jax.tree.map(jnp.zeros_like, params)
  tx = oc.adaptive_grad_clip(0.1)

  def loss(g, p):
    out, _ = tx.update(g, tx.init(p), p)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

  for d in jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(grads,
                                                                   params)):
    assert np.isfinite(np.asarray(d)).all()


def test_scheduled_clipping_never_retraces():
  rng = np.random.default_rng(12)
  params, grads = _tree(rng, [(5, 4), (4,)]), _tree(rng, [(5, 4), (4,)])
  schedule = optax.linear_schedule(0.01, 1.0, transition_steps=9)
  tx = optax.inject_hyperparams(oc.adaptive_grad_clip)(clipping=schedule)
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, s, p):
    return tx.update(g, s, p)

  axes = [_agc.default_unit_axes(x.shape) for x in jax.tree.leaves(params)]
  for i in range(10):
    out, state = step(grads, state, params)
    want, _ = reference.adaptive_grad_clip(
        leaves64(grads), leaves64(params), float(schedule(i)), 1e-3, axes)
    for got, ref in zip(leaves64(out), want):
      np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-9)
  chex.clear_trace_counter()
  np.testing.assert_allclose(
      float(oc.clip_stats(state)["adaptive_grad_clip/clipped_unit_fraction"]),
      reference.adaptive_grad_clip(leaves64(grads), leaves64(params), 1.0,
                                   1e-3, axes)[1] / (4 + 1), rtol=1e-6)


from hypothesis import given  # pylint: disable=g-import-not-at-top,wrong-import-position
from hypothesis import strategies as st  # pylint: disable=g-import-not-at-top,wrong-import-position


@given(seed=st.integers(0, 2**31 - 1),
       grad_scale=st.sampled_from([0.0, 1e-3, 1.0, 100.0]),
       param_scale=st.sampled_from([0.0, 1e-4, 1.0]),
       clipping=st.sampled_from([0.0, 0.01, 0.5, 10.0]))
def test_every_unit_is_bounded_and_clipping_twice_changes_nothing(
    seed, grad_scale, param_scale, clipping):
  rng = np.random.default_rng(seed)
  shapes = [(5, 4), (3, 3, 2, 4), (4,)]
  grads = _tree(rng, shapes, scale=grad_scale)
  params = _tree(rng, shapes, scale=param_scale)
  tx = oc.adaptive_grad_clip(clipping)
  step = jax.jit(tx.update)
  out, _ = step(grads, tx.init(params), params)
  for g, w in zip(leaves64(out), leaves64(params)):
    axes = _agc.default_unit_axes(g.shape)
    g_norm = np.sqrt(np.sum(g**2, axis=axes))
    w_norm = np.sqrt(np.sum(w**2, axis=axes))
    assert np.isfinite(g).all()
    assert np.all(g_norm <= clipping * np.maximum(w_norm, 1e-3) * (1 + 1e-6)
                  + 1e-30)
  twice, _ = step(out, tx.init(params), params)
  for a, b in zip(leaves64(twice), leaves64(out)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("shape, axes", [
    ((5, 1), (1,)),  # Linear(1, 5) weight (out, in): five rows
    ((1, 5), (1,)),  # Linear(5, 1): one row
    ((4, 1, 1, 1), (1, 2, 3)),  # a 1x1 conv on one channel: four filters
    ((4, 1, 3), (1, 2)),
    ((1, 1), (1,)),
    ((5,), (0,)),
    ((), ()),
])
def test_torch_units_are_rows_for_any_shape(shape, axes):
  # timm's unitwise_norm: every dim but 0 for ndim > 1, whatever the sizes.
  assert oc.default_unit_axes(shape, layout="torch") == axes


@pytest.mark.parametrize("shape, axes", [
    ((1, 5), (0, 1)),  # optax's rule: squeezes to a vector, one unit
    ((5, 1), (0, 1)),  # Dense(1) on 5 inputs: one output, one unit
    ((1, 1, 1, 4), (0, 1, 2, 3)),
    ((2, 1), (0, 1)),
    ((3, 1, 4), (0,)),
])
def test_flax_squeeze_rule_is_optaxs(shape, axes):
  assert oc.default_unit_axes(shape) == axes
  if not OPTAX_AGC_HAS_AXIS:
    return
  rng = np.random.default_rng(0)
  grads = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
  params = {"w": jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)}
  out, _ = _run(oc.adaptive_grad_clip(0.05), grads, params)
  want, _ = optax.adaptive_grad_clip(0.05).update(grads, optax.EmptyState(),
                                                  params)
  chex.assert_trees_all_close(out, want, rtol=1e-6)


@pytest.mark.parametrize("in_features", [1, "scalar"])
def test_equinox_scalar_input_linear_clips_each_row(in_features, use_jit):
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.Linear(in_features, 5, key=jax.random.PRNGKey(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  weight = np.asarray(params.weight, np.float64)
  assert weight.shape == (5, 1)
  # Row 0's gradient is far above its weight, the others are small: only
  # row 0 may be clipped.
  grad_weight = np.full(weight.shape, 1e-4)
  grad_weight[0, 0] = 100.0
  grads = eqx.tree_at(lambda m: (m.weight, m.bias), params,
                      (jnp.asarray(grad_weight, jnp.float32),
                       jnp.zeros(5, jnp.float32)))
  tx = oc.adaptive_grad_clip(0.1, layout="torch")
  out, state = _run(tx, grads, params, use_jit)
  want, clipped = reference.adaptive_grad_clip(
      [grad_weight], [weight], 0.1, 1e-3, [(1,)])
  np.testing.assert_allclose(np.asarray(out.weight, np.float64), want[0],
                             rtol=1e-6)
  assert clipped == 1 and int(state.num_clipped_units) == 1
  np.testing.assert_array_equal(out.weight[1:], grads.weight[1:])


# --------------------------------------------------------------------------
# Unit norms whose sums of squares overflow or underflow float32; subnormals.
# --------------------------------------------------------------------------


def _f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _assert_close(actual, expected, rtol=1e-6):
  np.testing.assert_allclose(
    np.asarray(actual, np.float64), expected, rtol=rtol, atol=0
  )


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


def test_agc_subnormal_gradient_comes_back_bit_identical(use_jit):
  grads = {"k": jnp.full((2, 3), 1e-40, jnp.float32)}
  params = {"k": jnp.ones((2, 3), jnp.float32)}
  tx = oc.adaptive_grad_clip(0.1)
  out, _ = maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)
  np.testing.assert_array_equal(
    np.asarray(out["k"]).view(np.int32), np.asarray(grads["k"]).view(np.int32)
  )


# --------------------------------------------------------------------------
# Params that do not match the gradients; scalar leaves; integer params.
# --------------------------------------------------------------------------


# --- Defect 4: AGC params that do not match the gradients --------------------


def test_agc_params_with_other_keys_name_both_structures(use_jit):
  tx = oc.adaptive_grad_clip(0.1)
  grads = {"a": jnp.ones((3, 4)), "b": jnp.ones(2)}
  params = {"a": jnp.ones((3, 4)), "c": jnp.ones(2)}
  with pytest.raises(
    ValueError,
    match=r"^adaptive_grad_clip: params must have the structure of the"
    r" gradients.*gradients are PyTreeDef\(\{'a': \*, 'b': \*\}\), params are"
    r" PyTreeDef\(\{'a': \*, 'c': \*\}\)",
  ):
    maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)


def test_agc_params_deeper_than_gradients_are_a_structure_error():
  tx = oc.adaptive_grad_clip(0.1)
  grads = {"a": jnp.ones((3, 4))}
  params = {"a": {"kernel": jnp.ones((3, 4))}}
  with pytest.raises(ValueError, match=r"params must have the structure"):
    tx.update(grads, None, params)


@pytest.mark.parametrize("param_shape", [(1, 4), (4,), (3, 4, 1)])
def test_agc_broadcastable_param_shapes_are_rejected(param_shape, use_jit):
  tx = oc.adaptive_grad_clip(0.1)
  grads = {"layer": {"kernel": jnp.ones((3, 4))}}
  params = {"layer": {"kernel": jnp.ones(param_shape)}}
  with pytest.raises(
    ValueError,
    match=r"^adaptive_grad_clip: the gradient at 'layer/kernel' has shape"
    rf" \(3, 4\) but its parameter has shape {re_shape(param_shape)}",
  ):
    maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)


def re_shape(shape):
  return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("axis", [0, -1, (0,)])
def test_agc_explicit_axis_on_a_scalar_leaf(axis, use_jit):
  tx = oc.adaptive_grad_clip(0.1, axis=axis)
  g = {"dense": jnp.ones((3, 2)), "temperature": jnp.ones(())}
  first = axis[0] if isinstance(axis, tuple) else axis
  with pytest.raises(
    ValueError,
    match=rf"^adaptive_grad_clip: axis {first} is out of range for the leaf at"
    r" 'temperature' of shape \(\) \(a scalar has no axes",
  ):
    maybe_jit(tx.update, use_jit)(g, tx.init(g), g)


def test_agc_scalar_leaf_with_a_callable_axis_follows_the_hint(use_jit):
  tx = oc.adaptive_grad_clip(
    0.1, axis=lambda path, leaf: None if leaf.ndim == 0 else 0
  )
  g = {"dense": jnp.asarray([[3.0, 1.0], [4.0, 0.0]]), "t": jnp.asarray(2.0)}
  p = {"dense": jnp.asarray([[1.0, 1.0], [0.0, 1.0]]), "t": jnp.asarray(5.0)}
  out, state = maybe_jit(tx.update, use_jit)(g, tx.init(p), p)
  # Units (columns): grad norms 5, 1 vs 0.1 * param norms 1, sqrt(2) ->
  # scales 0.1 / 5, 0.1 sqrt(2) / 1; the scalar: |2| vs 0.1 * 5 -> 0.25.
  g64 = np.array([[3.0, 1.0], [4.0, 0.0]])
  want = g64 * np.array([0.1 * 1.0 / 5.0, 0.1 * math.sqrt(2.0) / 1.0])
  np.testing.assert_allclose(
    np.asarray(out["dense"], np.float64), want, rtol=1e-6
  )
  np.testing.assert_allclose(float(out["t"]), 2.0 * 0.1 * 5.0 / 2.0, rtol=1e-6)
  assert int(state.num_clipped_units) == 3


def test_agc_integer_params_are_type_errors_naming_the_path():
  g = {"w": jnp.ones((2, 3))}
  p = {"w": jnp.ones((2, 3), jnp.int32)}
  tx = oc.adaptive_grad_clip(0.1)
  with pytest.raises(
    TypeError,
    match=r"^adaptive_grad_clip: every leaf of params must be a"
    r" floating-point.*'w' has dtype int32",
  ):
    tx.update(g, None, p)


# --- Policy 6b: update(updates, None) -----------------------------------------


def test_agc_accepts_state_none(use_jit):
  rng = np.random.default_rng(4)
  g = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  p = {"w": jnp.asarray(rng.normal(size=(3, 2)) * 0.1, jnp.float32)}
  tx = oc.adaptive_grad_clip(0.5)
  update = maybe_jit(tx.update, use_jit)
  got_out, got_state = update(g, None, p)
  want_out, want_state = update(g, tx.init(p), p)
  np.testing.assert_array_equal(
    np.asarray(got_out["w"]), np.asarray(want_out["w"])
  )
  assert type(got_state) is oc.AdaptiveGradClipState
  assert int(got_state.num_clipped_units) == int(want_state.num_clipped_units)
  # Independent count: units are columns; clipped when ||g|| > 0.5 max(||p||,
  # 1e-3).
  g64, p64 = np.asarray(g["w"], np.float64), np.asarray(p["w"], np.float64)
  gn = np.linalg.norm(g64, axis=0)
  pn = np.maximum(np.linalg.norm(p64, axis=0), 1e-3)
  assert int(got_state.num_clipped_units) == int(np.sum(gn > 0.5 * pn))
  assert float(got_state.clipped_unit_fraction) == np.sum(gn > 0.5 * pn) / 2
