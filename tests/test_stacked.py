"""Stacked (scanned) layers: a stacked leaf is clipped as its layer slices.

For every per-tensor transform, the update of a tree whose blocks are
stacked along a leading layer axis must equal the same transform applied to
the unstacked tree (one leaf per layer), slice by slice; and the diagnostics
become per-layer. TF-style ``axis=`` is checked against a float64 NumPy
transcription of ``tf.clip_by_norm``.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaxclip as oc
from helpers import maybe_jit

LAYERS = 4


def _stacked_tree(rng, dtype=jnp.float32):
  def arr(*shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)

  # Layer 1 is much larger than the others, so some layers clip and some
  # do not: a whole-stack norm would clip all of them alike.
  kernel = np.array(arr(LAYERS, 6, 5), np.float32)
  kernel[1] *= 20.0
  return {
    "blocks": {
      "fc": {"kernel": jnp.asarray(kernel, dtype), "bias": arr(LAYERS, 5)},
      "norm": {"scale": arr(LAYERS, 6, scale=3.0)},
    },
    "head": arr(6, 3),
  }


def _unstack(tree):
  """The same parameters as an unstacked tree: blocks -> [layer_0, ...]."""
  blocks = tree["blocks"]
  return {
    "blocks": [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(LAYERS)],
    "head": tree["head"],
  }


_CASES = {
  "clip_by_norm": (lambda **kw: oc.clip_by_norm(5.0, **kw)),
  "clip_by_norm_l1": (lambda **kw: oc.clip_by_norm(12.0, ord=1, **kw)),
  "clip_by_norm_linf": (lambda **kw: oc.clip_by_norm(2.5, ord=math.inf, **kw)),
  "clip_by_block_rms": (lambda **kw: oc.clip_by_block_rms(1.5, **kw)),
}


@pytest.mark.parametrize("name", sorted(_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_stacked_equals_the_per_slice_loop(name, dtype, use_jit):
  rng = np.random.default_rng(0)
  tree = _stacked_tree(rng, dtype)
  stacked_tx = _CASES[name](stacked=oc.stacked_by_path({"blocks": 1}))
  plain_tx = _CASES[name]()
  out, state = maybe_jit(stacked_tx.update, use_jit)(tree, None)
  want, want_state = maybe_jit(plain_tx.update, use_jit)(_unstack(tree), None)
  # Equal up to the summation order of a batched vs a single reduction.
  rtol = 2e-6 if dtype == jnp.float32 else 8e-3
  chex.assert_trees_all_close(_unstack(out), want, rtol=rtol, atol=0)
  # Diagnostics: per-layer values, equal to the unstacked per-leaf values.
  stacked_values = dict(state[0].items())
  plain_values = dict(want_state[0].items())
  for leaf in ("fc/bias", "fc/kernel", "norm/scale"):
    got = np.asarray(stacked_values[f"blocks/{leaf}"])
    assert got.shape == (LAYERS,)
    np.testing.assert_allclose(
      got, [np.asarray(plain_values[f"blocks/{i}/{leaf}"])
            for i in range(LAYERS)], rtol=2e-6)
  assert int(state[1]) == int(want_state[1])
  assert 0 < int(state[1]) < LAYERS * 3 + 1  # some slices clip, not all


def test_without_stacked_the_whole_stack_is_one_tensor():
  tree = _stacked_tree(np.random.default_rng(1))
  whole, _ = oc.clip_by_norm(2.0).update(tree, None)
  per_layer, _ = oc.clip_by_norm(2.0, stacked=1).update(
    {"blocks": tree["blocks"]}, None)
  kernel = np.asarray(tree["blocks"]["fc"]["kernel"], np.float64)
  # Whole-stack clip: one factor for all four layers.
  factor = 2.0 / np.linalg.norm(kernel)
  np.testing.assert_allclose(np.asarray(whole["blocks"]["fc"]["kernel"]),
                             kernel * factor, rtol=1e-5)
  # Per-layer clip: each layer by its own norm, small layers untouched.
  for i in range(LAYERS):
    n = np.linalg.norm(kernel[i])
    want = kernel[i] * min(1.0, 2.0 / n)
    np.testing.assert_allclose(
      np.asarray(per_layer["blocks"]["fc"]["kernel"][i]), want, rtol=1e-5)


def test_stacked_pytree_form_from_an_nnx_state():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.Param(jnp.ones((3, 4, 2)))
      self.head = nnx.Linear(2, 2, rngs=rngs)

  state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  grads = jax.tree.map(lambda x: x * 3.0, state)
  # A stacked spec built from the model's own state (Variable-wrapped ints).
  spec = jax.tree.map(lambda x: 1 if x.ndim == 3 else 0, state)
  out_tree, st = oc.clip_by_norm(1.0, stacked=spec).update(grads, None)
  out_rule, _ = oc.clip_by_norm(
    1.0, stacked=oc.stacked_by_path({"blocks": 1})).update(grads, None)
  chex.assert_trees_all_equal(out_tree, out_rule)
  got = dict(st.leaf_norms.items())
  np.testing.assert_allclose(np.asarray(got["blocks"]),
                             [3.0 * np.sqrt(8.0)] * 3, rtol=1e-6)


def test_stacked_pytree_form_from_an_equinox_module():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.PRNGKey(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  grads = jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), params)
  # An eqx.Module is callable: it must still be read as a pytree of counts.
  spec = jax.tree.map(lambda x: 0, params)
  out, st = oc.clip_by_norm(1.0, stacked=spec).update(grads, None)
  for g in jax.tree.leaves(out):
    np.testing.assert_allclose(float(jnp.linalg.norm(g)), 1.0, rtol=1e-5)
  assert all(k.startswith("layers/") for k, _ in st.leaf_norms.items())


def _tf_clip_by_norm(t, clip_norm, axes):
  """float64 transcription of tf.clip_by_norm(t, clip_norm, axes)."""
  t = np.asarray(t, np.float64)
  l2 = np.sqrt(np.sum(t * t, axis=axes, keepdims=True))
  return t * clip_norm / np.maximum(l2, clip_norm)


@pytest.mark.parametrize("axis", [0, 1, (0, 1), -1])
def test_axis_matches_tf_clip_by_norm(axis, use_jit):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((5, 7)) * 3.0, jnp.float32)
  out, state = maybe_jit(oc.clip_by_norm(2.0, axis=axis).update, use_jit)(
    {"w": x}, None)
  want = _tf_clip_by_norm(x, 2.0, axis)
  np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-5)
  kept = tuple(d for a, d in enumerate(x.shape)
               if a not in np.atleast_1d(np.asarray(axis)) % 2)
  assert dict(state.leaf_norms.items())["w"].shape == kept


def test_axis_counts_within_a_layer_when_stacked():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((3, 5, 7)) * 3.0, jnp.float32)
  out, _ = oc.clip_by_norm(2.0, stacked=1, axis=0).update({"w": x}, None)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(out["w"][i]),
                               _tf_clip_by_norm(x[i], 2.0, 0), rtol=1e-5)


def test_bad_axis_and_stacked_are_clear_errors():
  g = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"clip_by_norm: axis 2 is out of range "
                     r"for the leaf at 'w' of shape \(2, 3\)"):
    oc.clip_by_norm(1.0, axis=2).update(g, None)
  with pytest.raises(TypeError, match=r"clip_by_norm: axis must be None, an "
                     r"int"):
    oc.clip_by_norm(1.0, axis=1.5)
  with pytest.raises(ValueError, match=r"clip_by_block_rms: stacked must be "
                     r">= 0"):
    oc.clip_by_block_rms(1.0, stacked=-2)
  with pytest.raises(ValueError, match=r"clip_by_norm: stacked=3 for the leaf "
                     r"at 'w'"):
    oc.clip_by_norm(1.0, stacked=3).update(g, None)


def test_stacked_state_round_trips_and_scans():
  tree = _stacked_tree(np.random.default_rng(5))
  tx = oc.clip_by_norm(2.0, stacked=oc.stacked_by_path({"blocks": 1}))
  state = tx.init(tree)

  def step(state, scale):
    _, state = tx.update(jax.tree.map(lambda g: g * scale, tree), state)
    return state, state.num_clipped_leaves

  final, counts = jax.lax.scan(step, state, jnp.array([0.01, 1.0, 100.0]))
  assert counts.tolist()[0] == 0 and counts.tolist()[2] == 3 * LAYERS + 1
  flat, treedef = jax.tree.flatten(final)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in flat])
  _, again = tx.update(tree, restored)
  chex.assert_trees_all_equal_shapes_and_dtypes(again, final)


# --- adaptive_grad_clip: stacked layers, torch layout, pytree axes ----------

import optax  # noqa: E402  (kept beside the AGC tests that use it)

import reference  # noqa: E402


def test_agc_stacked_equals_the_per_slice_loop(use_jit):
  rng = np.random.default_rng(6)
  grads = _stacked_tree(rng)
  params = _stacked_tree(rng)
  rule = oc.stacked_by_path({"blocks": 1})
  tx = oc.adaptive_grad_clip(0.05, stacked=rule)
  out, state = maybe_jit(tx.update, use_jit)(grads, None, params)
  want, want_state = maybe_jit(oc.adaptive_grad_clip(0.05).update, use_jit)(
    _unstack(grads), None, _unstack(params))
  chex.assert_trees_all_close(_unstack(out), want, rtol=2e-6, atol=0)
  assert int(state.num_clipped_units) == int(want_state.num_clipped_units)
  # And against the float64 paper formula with hand-written per-layer units:
  # kernel (in, out) -> columns, bias / scale vectors -> one unit per layer.
  g64 = jax.tree.leaves(_unstack(grads))
  p64 = jax.tree.leaves(_unstack(params))
  axes = [(0,) if np.ndim(g) == 2 else (0,) for g in g64]
  ref, clipped = reference.adaptive_grad_clip(g64, p64, 0.05, 1e-3, axes)
  for got, r in zip(jax.tree.leaves(_unstack(out)), ref, strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float64), r, rtol=1e-5)
  assert int(state.num_clipped_units) == clipped


def test_agc_without_stacked_misreads_a_stack_as_a_3d_kernel():
  rng = np.random.default_rng(7)
  grads, params = _stacked_tree(rng), _stacked_tree(rng)
  blocks = lambda t: {"blocks": t["blocks"]}
  naive, _ = oc.adaptive_grad_clip(0.05).update(blocks(grads), None,
                                                blocks(params))
  right, _ = oc.adaptive_grad_clip(0.05, stacked=1).update(
    blocks(grads), None, blocks(params))
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), naive, right)
  assert max(jax.tree.leaves(diff)) > 1e-3  # the rank rule is wrong there


def test_agc_torch_layout_uses_rows_as_units(use_jit):
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(6, 3, 8, 1, key=jax.random.PRNGKey(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  rng = np.random.default_rng(8)
  grads = jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.5, p.dtype), params)
  tx = oc.adaptive_grad_clip(0.1, layout="torch")
  out, state = maybe_jit(tx.update, use_jit)(grads, None, params)
  g_leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  # eqx.nn.Linear weight is (out, in): one unit per row; biases: one unit.
  axes = [(1,) if g.ndim == 2 else (0,) for g in g_leaves]
  ref, clipped = reference.adaptive_grad_clip(
    g_leaves, [np.asarray(p) for p in jax.tree.leaves(params)], 0.1, 1e-3,
    axes)
  for got, r in zip(jax.tree.leaves(out), ref, strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float64), r, rtol=1e-5)
  assert int(state.num_clipped_units) == clipped > 0
  # The Flax default takes columns of these (out, in) weights: different.
  flax_out, _ = oc.adaptive_grad_clip(0.1).update(grads, None, params)
  assert not all(np.allclose(a, b) for a, b in
                 zip(jax.tree.leaves(out), jax.tree.leaves(flax_out)))


def test_default_unit_axes_layouts():
  assert oc.default_unit_axes((5, 7)) == (0,)
  assert oc.default_unit_axes((5, 7), layout="torch") == (1,)
  assert oc.default_unit_axes((8, 3, 3, 3), layout="torch") == (1, 2, 3)
  assert oc.default_unit_axes((3, 3, 4, 8)) == (0, 1, 2)
  assert oc.default_unit_axes((7,), layout="torch") == (0,)
  assert oc.default_unit_axes((2,) * 6) is None
  with pytest.raises(ValueError, match=r"default_unit_axes: layout must be "
                     r"one of 'flax', 'torch', got 'jax'"):
    oc.default_unit_axes((2, 2), layout="jax")
  with pytest.raises(ValueError, match=r"adaptive_grad_clip: layout must be "):
    oc.adaptive_grad_clip(0.1, layout="tf")


def test_agc_axis_pytree_from_an_equinox_module_is_a_pytree():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(4, 2, 5, 1, key=jax.random.PRNGKey(1))
  params = eqx.filter(model, eqx.is_inexact_array)
  grads = jax.tree.map(lambda p: 3.0 * p, params)
  # An eqx.Module is callable: it must still be read as a pytree of axes.
  axis = jax.tree.map(lambda p: (1,) if p.ndim == 2 else None, params)
  out, _ = oc.adaptive_grad_clip(0.1, axis=axis).update(grads, None, params)
  want, _ = oc.adaptive_grad_clip(0.1, layout="torch").update(
    grads, None, params)
  chex.assert_trees_all_equal(out, want)


def test_agc_axis_pytree_and_callable_paths_are_the_same_on_both_nnx_routes(
  standard_promotion,
):
  nnx = pytest.importorskip("flax.nnx")
  import helpers  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 3, rngs=rngs)
      self.head = nnx.Linear(3, 2, rngs=rngs)

  seen = []

  def axis_rule(path, leaf):
    seen.append(oc_path(path))
    return (1,) if oc_path(path) == "fc/kernel" else None

  def oc_path(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k)))
                    for k in path)

  model = Model(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: 5.0 * p, params)
  # Route 1: a direct tx.update on nnx.state(...).
  tx = oc.adaptive_grad_clip(0.01, axis=axis_rule)
  direct, _ = tx.update(grads, None, params)
  direct_paths = sorted(set(seen))
  # A pytree of axes built from the model's own (Variable-wrapped) state.
  axis_tree = jax.tree.map(lambda p: (1,) if p.shape == (4, 3) else None,
                           params)
  from_tree, _ = oc.adaptive_grad_clip(0.01, axis=axis_tree).update(
    grads, None, params)
  chex.assert_trees_all_equal(from_tree, direct)
  # Route 2: nnx.Optimizer with SGD(lr=1): the parameter moves by -update.
  seen.clear()
  if helpers.flax_version() < (0, 11):
    pytest.skip("the nnx.Optimizer route needs flax >= 0.11")
  optimizer = nnx.Optimizer(model, optax.chain(
    oc.adaptive_grad_clip(0.01, axis=axis_rule), optax.sgd(1.0)),
    wrt=nnx.Param)
  before = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  after = nnx.state(model, nnx.Param)
  assert sorted(set(seen)) == direct_paths == [
    "fc/bias", "fc/kernel", "head/bias", "head/kernel"]
  moved = jax.tree.map(lambda a, b: a - b, before, after)
  # before - after loses the low bits of a small update to cancellation.
  chex.assert_trees_all_close(moved, direct, rtol=1e-6, atol=1e-7)


def test_adagc_stacked_equals_the_per_slice_loop(use_jit):
  """AdaGC over a sequence: stacked state and updates = the unstacked run."""
  rng = np.random.default_rng(9)
  rule = oc.stacked_by_path({"blocks": 1})
  stacked_tx = oc.adagc(warmup_steps=2, stacked=rule)
  plain_tx = oc.adagc(warmup_steps=2)
  tree0 = _stacked_tree(rng)
  s_state, p_state = stacked_tx.init(tree0), plain_tx.init(_unstack(tree0))
  s_update = maybe_jit(stacked_tx.update, use_jit)
  p_update = maybe_jit(plain_tx.update, use_jit)
  for step in range(6):
    grads = _stacked_tree(rng)
    if step == 4:  # a spike in one layer after warmup
      grads["blocks"]["fc"]["kernel"] = grads["blocks"]["fc"]["kernel"].at[2].mul(
        50.0)
    out, s_state = s_update(grads, s_state)
    want, p_state = p_update(_unstack(grads), p_state)
    chex.assert_trees_all_close(_unstack(out), want, rtol=2e-6, atol=0)
    assert int(s_state.adagc_num_clipped) == int(p_state.adagc_num_clipped)
  assert int(s_state.adagc_num_clipped) >= 1
  got = dict(s_state.adagc_gamma.items())
  plain = dict(p_state.adagc_gamma.items())
  np.testing.assert_allclose(
    np.asarray(got["blocks/fc/kernel"]),
    [np.asarray(plain[f"blocks/{i}/fc/kernel"]) for i in range(LAYERS)],
    rtol=2e-6)


# --- paths that print alike, traced stacked= --------------------------------

# Two leaves whose "/"-joined paths are both "a/b": a key with a "/" in it
# prints like a nested key (Haiku names modules "mlp/~/linear_0").
_ALIKE = {"a/b": jnp.ones((2, 3)), "a": {"b": 2.0 * jnp.ones((2, 3))}}
_BOTH = r".*\['a/b'\].*\['a'\]\['b'\]|.*\['a'\]\['b'\].*\['a/b'\]"


@pytest.mark.parametrize("make", [
    lambda: oc.clip_by_norm(1.0),
    lambda: oc.clip_by_norm(1.0, stacked=1),
    lambda: oc.clip_by_block_rms(1.0),
    lambda: oc.adagc(),
    lambda: oc.adaclip(),
    lambda: oc.adagn(),
    oc.record_norms,
], ids=["clip_by_norm", "stacked", "block_rms", "adagc", "adaclip", "adagn",
        "record_norms"])
def test_per_path_state_of_paths_that_print_alike_is_an_error(make):
  """A state keyed by path could not tell the two leaves apart."""
  with pytest.raises(ValueError, match=r"path 'a/b'" + _BOTH):
    make().init(_ALIKE)


@pytest.mark.parametrize("spec", [
    {"a/b": 1, "a": {"b": 0}},  # a pytree spec: which 'a/b' gets which?
    lambda path, leaf: 1,
], ids=["pytree", "callable"])
def test_stacked_spec_for_paths_that_print_alike(spec):
  if callable(spec):
    # A callable sees the key path, not the string: no ambiguity, and a
    # transform without per-path state is fine.
    out, _ = optax.adaptive_grad_clip(1.0).update(_ALIKE, None, _ALIKE)
    mine, _ = oc.adaptive_grad_clip(1.0, stacked=spec).update(
        _ALIKE, None, _ALIKE)
    chex.assert_trees_all_close(mine, out)
    return
  with pytest.raises(ValueError, match=r"adaptive_grad_clip: the leaves at "
                     r"\['a'\]\['b'\] and \['a/b'\] both have the path "
                     r"'a/b'.*stacked pytree"):
    oc.adaptive_grad_clip(1.0, stacked=spec).update(_ALIKE, None, _ALIKE)


def test_traced_stacked_says_to_pass_static_args():
  """inject_hyperparams turns stacked=1 into an array: the error says how to
  keep it static, and with static_args it works."""
  grads = {"blocks": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
  tx = optax.inject_hyperparams(oc.clip_by_norm)(max_norm=1.0, stacked=1)
  with pytest.raises(TypeError, match=r"clip_by_norm: stacked .*static_args="
                     r"\('stacked',\)"):
    tx.init(grads)
  tx = optax.inject_hyperparams(oc.clip_by_norm, static_args=("stacked",))(
      max_norm=1.0, stacked=1)
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_allclose(np.asarray(out["blocks"]),
                             [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)
  for make in (oc.clip_by_block_rms, oc.adagc, oc.tree_norms):
    with pytest.raises(TypeError, match=r"stacked .*static_args"):
      if make is oc.tree_norms:
        make(grads, stacked=jnp.asarray(1))
      elif make is oc.adagc:
        make(stacked=jnp.asarray(1))
      else:
        make(1.0, stacked=jnp.asarray(1))
  with pytest.raises(TypeError, match=r"clip_by_norm: axis .*static_args="
                     r"\('axis',\)"):
    oc.clip_by_norm(1.0, axis=jnp.asarray(0))
