"""clip_by_global_norm(..., groups=...): one global norm per group of leaves."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import maybe_jit
from hypothesis import given
from hypothesis import strategies as st
from reference import (
  global_norm_reference,
  grouped_global_norm_reference,
)

import optaxclip as oc

# A small MoE-like tree: dense layers, stacked experts, an embedding, a norm
# scale that is excluded from clipping.
SHAPES = {
  "dense": {"kernel": (4, 3), "bias": (3,)},
  "moe": {"experts": {"w1": (2, 3, 4), "w2": (2, 4, 3)}, "router": (3, 2)},
  "embed": (5, 3),
  "ln_scale": (3,),
}
LABELS = {
  "dense": {"kernel": "dense", "bias": "dense"},
  "moe": {"experts": {"w1": "experts", "w2": "experts"}, "router": "dense"},
  "embed": 0,
  "ln_scale": None,
}
# The groups in order of first appearance in jax.tree.leaves order (dense/
# bias, dense/kernel, embed, ln_scale, moe/experts/w1, ...).
GROUP_KEYS = ["dense", "0", "experts"]


def _grads(seed, scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s) * scale, dtype), SHAPES,
    is_leaf=lambda x: isinstance(x, tuple))


def _labels_list(tree, labels=LABELS):
  flat = jax.tree.leaves(labels, is_leaf=lambda x: x is None)
  assert len(flat) == len(jax.tree.leaves(tree))
  return flat


def _subtree(tree, label):
  """The leaves of one group, as a dict keyed by position."""
  leaves = jax.tree.leaves(tree)
  return {i: x for i, (x, lab) in enumerate(zip(leaves, _labels_list(tree)))
          if lab == label}


def _path_label(path, leaf):
  del leaf
  name = jax.tree_util.keystr(path)
  if "experts" in name:
    return "experts"
  if "ln_scale" in name:
    return None
  return 0 if "embed" in name else "dense"


@pytest.mark.parametrize("groups", [LABELS, _path_label],
                         ids=["pytree", "callable"])
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_equals_optax_per_group(groups, max_norm, use_jit):
  grads = _grads(0)
  tx = oc.clip_by_global_norm(max_norm, groups=groups)
  out, state = maybe_jit(tx.update, use_jit)(grads, tx.init(grads))
  leaves_out = jax.tree.leaves(out)
  for label in ("dense", 0, "experts"):
    sub = _subtree(grads, label)
    want, _ = optax.clip_by_global_norm(max_norm).update(
      sub, optax.EmptyState())
    for i, x in want.items():
      np.testing.assert_allclose(leaves_out[i], x, rtol=1e-6, atol=1e-7)
  # The excluded leaf is the very same array.
  assert jnp.array_equal(out["ln_scale"], grads["ln_scale"])
  assert [k for k, _ in state.group_norms.items()] == GROUP_KEYS
  for (key, norm), label in zip(state.group_norms.items(),
                                ("dense", 0, "experts")):
    want_norm = global_norm_reference(list(_subtree(grads, label).values()))
    np.testing.assert_allclose(float(norm), want_norm, rtol=1e-6)
    clipped = dict(state.group_clipped.items())[key]
    assert bool(clipped) == (want_norm > max_norm)


@pytest.mark.parametrize("ord_", [1, 2, "inf"])
def test_matches_float64_reference(ord_, use_jit):
  ord_ref = math.inf if ord_ == "inf" else ord_
  grads = _grads(1, scale=3.0)
  tx = oc.clip_by_global_norm(2.0, ord=ord_, groups=LABELS)
  out, state = maybe_jit(tx.update, use_jit)(grads, None)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  want, norms, clipped = grouped_global_norm_reference(
    leaves, _labels_list(grads), 2.0, ord_ref)
  for got, exp in zip(jax.tree.leaves(out), want):
    np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=1e-6)
  assert dict(state.group_norms.items()).keys() == norms.keys()
  for key, norm in state.group_norms.items():
    np.testing.assert_allclose(float(norm), norms[key], rtol=1e-6)
    assert bool(dict(state.group_clipped.items())[key]) == clipped[key]


def test_excluded_leaves_are_untouched_even_if_not_finite(use_jit):
  grads = _grads(2, scale=10.0)
  grads["ln_scale"] = jnp.array([np.nan, np.inf, -1e30], jnp.float32)
  tx = oc.clip_by_global_norm(1.0, groups=LABELS)
  out, state = maybe_jit(tx.update, use_jit)(grads, None)
  np.testing.assert_array_equal(np.asarray(out["ln_scale"]),
                                np.asarray(grads["ln_scale"]))
  # Nothing else is NaN: the excluded leaf is in no norm.
  rest = {k: v for k, v in out.items() if k != "ln_scale"}
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(rest))
  assert np.isfinite(np.asarray(state.group_norms)).all()
  finite = dict(grads, ln_scale=jnp.zeros(3))
  same, _ = tx.update(finite, None)
  chex.assert_trees_all_equal({k: v for k, v in same.items()
                               if k != "ln_scale"}, rest)


def test_a_non_finite_group_is_nan_and_the_others_are_not(use_jit):
  grads = _grads(3)
  grads["moe"]["experts"]["w2"] = grads["moe"]["experts"]["w2"].at[0, 0, 0].set(
    jnp.inf)
  tx = oc.clip_by_global_norm(1.0, groups=LABELS)
  out, state = maybe_jit(tx.update, use_jit)(grads, None)
  for x in jax.tree.leaves(out["moe"]["experts"]):
    assert np.isnan(np.asarray(x)).all()
  for x in jax.tree.leaves({k: out[k] for k in ("dense", "embed")}):
    assert np.isfinite(np.asarray(x)).all()
  norms = dict(state.group_norms.items())
  assert np.isinf(norms["experts"]) and np.isfinite(norms["dense"])


def test_zero_groups_and_zero_threshold(use_jit):
  grads = jax.tree.map(jnp.zeros_like, _grads(4))
  tx = oc.clip_by_global_norm(1.0, groups=LABELS)
  out, state = maybe_jit(tx.update, use_jit)(grads, None)
  chex.assert_trees_all_equal(out, grads)
  assert float(jnp.max(state.group_norms.values)) == 0.0
  out, state = maybe_jit(oc.clip_by_global_norm(0.0, groups=LABELS).update,
                         use_jit)(_grads(4), None)
  for key in ("dense", "embed"):
    assert all(float(jnp.max(jnp.abs(x))) == 0.0
               for x in jax.tree.leaves(out[key]))
  assert jnp.array_equal(out["ln_scale"], _grads(4)["ln_scale"])


def test_every_leaf_excluded_or_empty_tree(use_jit):
  grads = {"a": jnp.ones(2), "b": jnp.full(3, jnp.nan)}
  tx = oc.clip_by_global_norm(0.1, groups=lambda path, leaf: None)
  out, state = maybe_jit(tx.update, use_jit)(grads, tx.init(grads))
  chex.assert_trees_all_equal(out, grads)
  # No group, no paths: each field is the plain placeholder array [0].
  assert state.group_norms.shape == (1,)
  assert not isinstance(state.group_norms, oc.PathValues)
  assert not any(np.any(v) for v in oc.clip_stats(state).values())
  out, state = maybe_jit(tx.update, use_jit)({}, tx.init({}))
  assert out == {} and state.group_clipped.shape == (1,)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_and_structure_kept(dtype, use_jit):
  grads = _grads(5, scale=100.0, dtype=dtype)  # fp16 squares overflow
  grads["dense"]["bias"] = grads["dense"]["bias"].astype(jnp.float32)
  tx = oc.clip_by_global_norm(1.0, groups=LABELS)
  state = tx.init(grads)
  assert state.group_norms.dtype == jnp.float32
  out, state = maybe_jit(tx.update, use_jit)(grads, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  want, norms, _ = grouped_global_norm_reference(
    leaves, _labels_list(grads), 1.0)
  rtol = 1e-6 if dtype == jnp.float32 else 1e-2
  for got, exp in zip(jax.tree.leaves(out), want):
    np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=rtol,
                               atol=1e-3 * rtol)
  for key, norm in state.group_norms.items():
    assert np.isfinite(norm)
    np.testing.assert_allclose(float(norm), norms[key], rtol=1e-5)


def test_grad_through_update_is_finite():
  tx = oc.clip_by_global_norm(1.0, groups=LABELS)

  def loss(grads):
    out, _ = tx.update(grads, None)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

  grad = jax.jit(jax.grad(loss))
  zeros = jax.tree.map(jnp.zeros_like, _grads(6))
  for point in (zeros, _grads(6), _grads(6, scale=1e-30)):
    grads = grad(point)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))
  chex.assert_trees_all_close(grad(zeros), jax.tree.map(jnp.ones_like, zeros))


def test_nnx_state_labels_and_optimizer_route(standard_promotion):
  nnx = pytest.importorskip("flax.nnx")
  import helpers  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 3, rngs=rngs)
      self.experts = nnx.Linear(3, 2, rngs=rngs)

  model = Model(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: 5.0 * p + 1.0, params)
  seen = []

  def by_path(path, leaf):
    del leaf
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k)))
                    for k in path)
    seen.append(name)
    if name == "dense/bias":
      return None
    return "experts" if name.startswith("experts") else "dense"

  # A pytree of labels built from the model's own (Variable-wrapped) state.
  label_tree = jax.tree_util.tree_map_with_path(
    lambda path, _: by_path(oc_path_keys(path), None), params)
  seen.clear()
  direct, state = oc.clip_by_global_norm(1.0, groups=by_path).update(
    grads, None)
  assert sorted(set(seen)) == [
    "dense/bias", "dense/kernel", "experts/bias", "experts/kernel"]
  from_tree, state_tree = oc.clip_by_global_norm(
    1.0, groups=label_tree).update(grads, None)
  chex.assert_trees_all_equal(from_tree, direct)
  chex.assert_trees_all_equal(state_tree, state)
  assert [k for k, _ in state.group_norms.items()] == ["dense", "experts"]
  named_grads, named_out = _by_name(grads), _by_name(direct)
  norms = dict(state.group_norms.items())
  np.testing.assert_allclose(
    float(norms["dense"]), global_norm_reference([named_grads["dense/kernel"]]),
    rtol=1e-6)
  np.testing.assert_allclose(
    float(norms["experts"]),
    global_norm_reference([named_grads["experts/kernel"],
                           named_grads["experts/bias"]]), rtol=1e-6)
  assert jnp.array_equal(named_out["dense/bias"], named_grads["dense/bias"])
  if helpers.flax_version() < (0, 11):
    pytest.skip("the nnx.Optimizer route needs flax >= 0.11")
  # Through nnx.Optimizer (SGD, lr 1): the same paths, the same update.
  seen.clear()
  optimizer = nnx.Optimizer(model, optax.chain(
    oc.clip_by_global_norm(1.0, groups=by_path), optax.sgd(1.0)),
    wrt=nnx.Param)
  before = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
  helpers.nnx_optimizer_update(optimizer, model, grads)
  assert sorted(set(seen)) == [
    "dense/bias", "dense/kernel", "experts/bias", "experts/kernel"]
  moved = jax.tree.map(lambda a, b: a - b, before, nnx.state(model, nnx.Param))
  chex.assert_trees_all_close(moved, direct, rtol=1e-5, atol=1e-6)
  stats = oc.clip_stats(optimizer.opt_state)
  assert set(stats) == {
    "clip_by_global_norm/group_norms/dense",
    "clip_by_global_norm/group_norms/experts",
    "clip_by_global_norm/group_clipped/dense",
    "clip_by_global_norm/group_clipped/experts",
  }


def _by_name(tree):
  """``{"dense/kernel": leaf, ...}`` for an nnx.State on any flax version."""
  return {
    "/".join(str(getattr(k, "key", getattr(k, "name", k)))
             for k in oc_path_keys(path)): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def oc_path_keys(path):
  """The key path without Flax's ``.value`` component (what callables see)."""
  return tuple(k for k in path
               if not (isinstance(k, jax.tree_util.GetAttrKey)
                       and k.name in ("value", "raw_value")))


def test_equinox_module_labels():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.PRNGKey(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  grads = jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), params)
  # An eqx.Module is callable: it must still be read as a pytree of labels.
  labels = jax.tree.map(lambda x: "weights" if x.ndim == 2 else "biases",
                        params)
  out, state = oc.clip_by_global_norm(1.0, groups=labels).update(grads, None)
  weights = [x for x in jax.tree.leaves(out) if x.ndim == 2]
  np.testing.assert_allclose(global_norm_reference(weights), 1.0, rtol=1e-5)
  assert sorted(k for k, _ in state.group_norms.items()) == [
    "biases", "weights"]


def test_clip_stats_names_in_a_chain(standard_promotion):
  tx = optax.chain(oc.clip_by_global_norm(10.0),
                   oc.clip_by_global_norm(1.0, groups=LABELS),
                   optax.sgd(0.1))
  params = _grads(7)
  state = tx.init(params)
  _, state = tx.update(_grads(8), state, params)
  stats = oc.clip_stats(state)
  assert set(stats) == {
    "clip_by_global_norm/global_norm",
    "clip_by_global_norm/global_norm_clipped",
    *(f"clip_by_global_norm_1/group_norms/{k}" for k in GROUP_KEYS),
    *(f"clip_by_global_norm_1/group_clipped/{k}" for k in GROUP_KEYS),
  }
  assert optax.tree.get(state, "group_norms").shape == (3,)


def test_groups_none_keeps_the_plain_state(use_jit):
  grads = _grads(9)
  tx = oc.clip_by_global_norm(1.0, groups=None)
  out, state = maybe_jit(tx.update, use_jit)(grads, tx.init(grads))
  assert type(state) is oc.ClipByGlobalNormState
  assert state._fields == ("global_norm", "global_norm_clipped")
  want, _ = maybe_jit(oc.clip_by_global_norm(1.0).update, use_jit)(
    grads, None)
  chex.assert_trees_all_equal(out, want)


def test_traced_max_norm_with_static_groups():
  schedule = optax.linear_schedule(0.5, 5.0, transition_steps=4)
  # inject_hyperparams calls every callable argument as a schedule: a
  # callable groups (or an Equinox module of labels) must be static_args.
  tx = optax.inject_hyperparams(oc.clip_by_global_norm,
                                static_args=("groups",))(
    max_norm=schedule, groups=_path_label)
  tx_tree = optax.inject_hyperparams(oc.clip_by_global_norm)(
    max_norm=schedule, groups=LABELS)
  grads = _grads(10)

  @jax.jit
  @chex.assert_max_traces(n=2)
  def step(grads, state, state_tree):
    out, state = tx.update(grads, state)
    out_tree, state_tree = tx_tree.update(grads, state_tree)
    return out, state, out_tree, state_tree

  state, state_tree = tx.init(grads), tx_tree.init(grads)
  for t in range(6):
    out, state, out_tree, state_tree = step(grads, state, state_tree)
    chex.assert_trees_all_equal(out, out_tree)
    want = oc.clip_by_global_norm(float(schedule(t)), groups=LABELS).update(
      grads, None)[0]
    chex.assert_trees_all_close(out, want, rtol=1e-6)
  chex.clear_trace_counter()
  assert "clip_by_global_norm/max_norm" in oc.clip_stats(state)


def test_no_retrace_over_steps():
  tx = oc.clip_by_global_norm(1.0, groups=_path_label)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  state = tx.init(_grads(0))
  for seed in range(4):
    _, state = step(_grads(seed, scale=0.1 * (seed + 1)), state)
  chex.clear_trace_counter()


def test_numpy_round_trip():
  tx = oc.clip_by_global_norm(1.0, groups=LABELS)
  _, state = tx.update(_grads(11), tx.init(_grads(11)))
  flat, treedef = jax.tree.flatten(state)
  assert len(flat) == 2  # two arrays; the labels are static metadata
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in flat])
  assert type(restored) is type(state)
  assert restored.group_norms.segments == state.group_norms.segments
  out_a, state_a = tx.update(_grads(12), state)
  out_b, state_b = tx.update(_grads(12), restored)
  chex.assert_trees_all_equal(out_a, out_b)
  chex.assert_trees_all_equal(state_a, state_b)


def test_axis_name_combines_each_group_across_a_split_tree(use_jit):
  grads = {"a": jnp.arange(8.0).reshape(2, 4), "b": jnp.ones((2, 3)),
           "c": jnp.full((2, 2), 7.0)}
  labels = {"a": "x", "b": "y", "c": None}
  tx = oc.clip_by_global_norm(2.0, groups=labels, axis_name="d")
  mapped = maybe_jit(jax.vmap(lambda g: tx.update(g, None), axis_name="d"),
                     use_jit)
  out, state = mapped(grads)
  whole = {"a": grads["a"].reshape(-1), "b": grads["b"].reshape(-1),
           "c": grads["c"].reshape(-1)}
  want, want_state = oc.clip_by_global_norm(2.0, groups=labels).update(
    whole, None)
  for key in whole:
    np.testing.assert_allclose(np.asarray(out[key]).reshape(-1), want[key],
                               rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.group_norms.values),
                             np.stack([want_state.group_norms.values] * 2),
                             rtol=1e-6)


_STEP = {}


@given(
  scales=st.lists(st.sampled_from([0.0, 1e-3, 0.3, 1.0, 7.0, 1e4]),
                  min_size=3, max_size=3),
  max_norm=st.sampled_from([0.0, 0.5, 2.0, math.inf]),
)
def test_property_each_group_is_clipped_alone(scales, max_norm):
  if max_norm not in _STEP:
    _STEP[max_norm] = jax.jit(
      oc.clip_by_global_norm(max_norm, groups=LABELS).update)
  base = _grads(13)
  factors = {"dense": scales[0], 0: scales[1], "experts": scales[2]}
  labels = _labels_list(base)
  leaves = [x * factors[lab] if lab is not None else x
            for x, lab in zip(jax.tree.leaves(base), labels)]
  grads = jax.tree.unflatten(jax.tree.structure(base), leaves)
  out, state = _STEP[max_norm](grads, None)
  want, norms, _ = grouped_global_norm_reference(
    [np.asarray(x, np.float64) for x in leaves], labels, max_norm)
  for got, exp in zip(jax.tree.leaves(out), want):
    np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=1e-5,
                               atol=1e-30)
  for label in factors:
    n = global_norm_reference(list(_subtree(out, label).values()))
    assert n <= max_norm * (1 + 1e-5) or n == 0.0
  for key, norm in state.group_norms.items():
    np.testing.assert_allclose(float(norm), norms[key], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_leaf_is_a_type_error_even_when_excluded(dtype):
  tx = oc.clip_by_global_norm(1.0, groups={"a": "x", "step": None})
  with pytest.raises(TypeError, match=r"clip_by_global_norm: .*'step'"):
    tx.update({"a": jnp.ones(2), "step": jnp.zeros((), dtype)}, None)


BAD_GROUPS = [
  ("dense", TypeError, r"clip_by_global_norm: groups must be a callable "
   r"\(path, leaf\) -> label or a pytree of labels.*got 'dense'.*groups=None"),
  (3, TypeError, r"clip_by_global_norm: groups must be a callable"),
  (1.5, TypeError, r"clip_by_global_norm: groups must be a callable"),
  (True, TypeError, r"clip_by_global_norm: groups must be a callable"),
]


@pytest.mark.parametrize("groups,error,message", BAD_GROUPS,
                         ids=[repr(a[0]) for a in BAD_GROUPS])
def test_bad_groups_argument(groups, error, message):
  with pytest.raises(error, match=message):
    oc.clip_by_global_norm(1.0, groups=groups)


def test_update_time_errors():
  grads = {"a": jnp.ones(2), "b": jnp.ones(3)}
  # A label that is not a string, an int or None, from a callable.
  tx = oc.clip_by_global_norm(1.0, groups=lambda path, leaf: 1.5)
  with pytest.raises(TypeError, match=r"the groups callable returned 1\.5 for "
                     r"the leaf at 'a'; it must return a string or int label"):
    tx.update(grads, None)
  tx = oc.clip_by_global_norm(1.0, groups={"a": "x", "b": True})
  with pytest.raises(TypeError, match=r"the groups entry for the leaf at 'b'"
                     r" is True"):
    tx.update(grads, None)
  # A pytree of labels without an entry for a leaf.
  tx = oc.clip_by_global_norm(1.0, groups={"a": "x"})
  with pytest.raises(ValueError, match=r"the groups pytree has no entry for "
                     r"the leaf at 'b'"):
    tx.update(grads, None)
  # Labels that print alike.
  tx = oc.clip_by_global_norm(1.0, groups={"a": 1, "b": "1"})
  with pytest.raises(ValueError, match=r"the group labels 1 and '1' are "
                     r"different but both print as '1'"):
    tx.update(grads, None)
  # A state initialised with other groups.
  tx = oc.clip_by_global_norm(1.0, groups=lambda path, leaf: leaf.size)
  state = tx.init({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"initialised with the groups \['2'\],"
                     r" but the updates fall into the groups \['2', '3'\]"):
    tx.update(grads, state)
  # One precomputed norm cannot serve several groups.
  tx = oc.clip_by_global_norm(1.0, groups={"a": "x", "b": "y"})
  with pytest.raises(ValueError, match=r"global_norm= extra argument .*"
                     r"cannot be used with groups="):
    tx.update(grads, None, global_norm=jnp.asarray(1.0))


def test_labels_for_paths_that_print_alike_are_an_error():
  """A labels pytree keyed ``"a/b"`` twice cannot say which leaf is which."""
  grads = {"a/b": jnp.ones(2), "a": {"b": jnp.ones(3)}}
  labels = {"a/b": "x", "a": {"b": "y"}}
  with pytest.raises(ValueError, match=r"clip_by_global_norm: the leaves at "
                     r"\['a'\]\['b'\] and \['a/b'\] both have the path 'a/b'"):
    oc.clip_by_global_norm(1.0, groups=labels).update(grads, None)
  # A callable sees key paths: one group per top-level key works.
  tx = oc.clip_by_global_norm(1.0, groups=lambda path, leaf: len(path))
  out, state = tx.update(grads, None)
  np.testing.assert_allclose(np.asarray(out["a/b"]), [0.5 ** 0.5] * 2,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["a"]["b"]), [3 ** -0.5] * 3,
                             rtol=1e-6)
  assert set(oc.clip_stats(state)) == {
      "clip_by_global_norm/group_norms/1", "clip_by_global_norm/group_norms/2",
      "clip_by_global_norm/group_clipped/1",
      "clip_by_global_norm/group_clipped/2"}
