"""tree_norms, record_norms, stacked_by_path and clip_stats' logging view.

Every norm is compared with a float64 NumPy computation on the same values
(per layer for stacked leaves), and every key with the path written by hand.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from helpers import maybe_jit

import reference

ORDS = [2, 1, math.inf]


def _np_norm(x, ord, axes=None):
  x = np.abs(np.asarray(x, np.float64))
  if ord == 2:
    return np.sqrt(np.sum(x * x, axis=axes))
  if ord == 1:
    return np.sum(x, axis=axes)
  return np.max(x, axis=axes, initial=0.0)


def _model_grads(rng, dtype=jnp.float32, layers=3):
  """A scanned-transformer-like gradient tree: stacked blocks plus a head."""
  def arr(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  return {
    "blocks": {
      "attn": {"kernel": arr(layers, 8, 4), "bias": arr(layers, 4)},
      "norm": {"scale": arr(layers, 8)},
    },
    "embed": arr(16, 8),
    "head": {"kernel": arr(8, 5), "bias": arr(5)},
  }


@pytest.mark.parametrize("ord", ORDS, ids=["l2", "l1", "linf"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_tree_norms_match_numpy_per_leaf(ord, dtype, use_jit):
  grads = _model_grads(np.random.default_rng(0), dtype)
  got = maybe_jit(lambda g: oc.tree_norms(g, ord=ord), use_jit)(grads)
  assert list(got) == [
    "blocks/attn/bias", "blocks/attn/kernel", "blocks/norm/scale", "embed",
    "head/bias", "head/kernel",
  ]
  flat = {
    "blocks/attn/bias": grads["blocks"]["attn"]["bias"],
    "blocks/attn/kernel": grads["blocks"]["attn"]["kernel"],
    "blocks/norm/scale": grads["blocks"]["norm"]["scale"],
    "embed": grads["embed"],
    "head/bias": grads["head"]["bias"],
    "head/kernel": grads["head"]["kernel"],
  }
  for path, leaf in flat.items():
    assert got[path].dtype == jnp.float32 and got[path].shape == ()
    np.testing.assert_allclose(
      float(got[path]), _np_norm(leaf.astype(jnp.float32), ord), rtol=2e-6)


@pytest.mark.parametrize("ord", ORDS, ids=["l2", "l1", "linf"])
def test_stacked_tree_norms_are_the_per_layer_loop(ord, use_jit):
  rng = np.random.default_rng(1)
  grads = _model_grads(rng)
  rule = oc.stacked_by_path({"blocks": 1})
  got = maybe_jit(lambda g: oc.tree_norms(g, ord=ord, stacked=rule), use_jit)(
    grads)
  for name in ("attn/kernel", "attn/bias", "norm/scale"):
    group, leaf_name = name.split("/")
    leaf = np.asarray(grads["blocks"][group][leaf_name])
    want = [_np_norm(leaf[i], ord) for i in range(leaf.shape[0])]
    assert got[f"blocks/{name}"].shape == (3,)
    np.testing.assert_allclose(np.asarray(got[f"blocks/{name}"]), want,
                               rtol=2e-6)
  np.testing.assert_allclose(float(got["embed"]),
                             _np_norm(grads["embed"], ord), rtol=2e-6)


def test_stacked_forms_agree_int_callable_and_pytree():
  grads = {"a": jnp.ones((2, 3, 4)), "b": jnp.ones((5, 6))}
  as_int = oc.tree_norms(grads, stacked=1)
  as_callable = oc.tree_norms(grads, stacked=lambda path, leaf: 1)
  as_tree = oc.tree_norms(grads, stacked={"a": 1, "b": 1})
  chex.assert_trees_all_equal(as_int, as_callable, as_tree)
  np.testing.assert_allclose(np.asarray(as_int["a"]), [np.sqrt(12)] * 2)
  np.testing.assert_allclose(np.asarray(as_int["b"]), [np.sqrt(6)] * 5)
  two = oc.tree_norms(grads, stacked={"a": 2, "b": 0})
  assert two["a"].shape == (2, 3) and two["b"].shape == ()
  np.testing.assert_allclose(np.asarray(two["a"]), np.full((2, 3), 2.0))


def test_stacked_by_path_rules():
  rule = oc.stacked_by_path({"blocks": 1, "*/experts/*": 2}, default=0)
  assert rule("blocks/fc/kernel", None) == 1
  assert rule("blocks", None) == 1
  assert rule("blocksx/fc", None) == 0  # a prefix is a whole path component
  assert rule("moe/experts/w", None) == 2
  assert rule("head/kernel", None) == 0
  keys = (jax.tree_util.DictKey("blocks"), jax.tree_util.GetAttrKey("value"))
  assert rule(keys, None) == 1
  with pytest.raises(ValueError, match=r"stacked_by_path: the count for "
                     r"pattern 'blocks' must be >= 0, got -1"):
    oc.stacked_by_path({"blocks": -1})
  with pytest.raises(TypeError, match=r"stacked_by_path: every pattern must "
                     r"be a string"):
    oc.stacked_by_path({1: 1})


def test_bad_stacked_values_are_clear_errors():
  grads = {"a": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"tree_norms: stacked must be >= 0"):
    oc.tree_norms(grads, stacked=-1)
  with pytest.raises(TypeError, match=r"tree_norms: stacked must be an int"):
    oc.tree_norms(grads, stacked=True)
  with pytest.raises(ValueError, match=r"tree_norms: stacked=3 for the leaf "
                     r"at 'a' of shape \(2, 3\)"):
    oc.tree_norms(grads, stacked=3)
  with pytest.raises(ValueError, match=r"tree_norms: the stacked pytree has "
                     r"no entry for the leaf at 'a'"):
    oc.tree_norms(grads, stacked={"b": 1})
  with pytest.raises(TypeError, match=r"tree_norms: the stacked callable "
                     r"returned 'x' for the leaf at 'a'"):
    oc.tree_norms(grads, stacked=lambda p, x: "x")


def test_integer_leaf_is_a_type_error_naming_the_path():
  with pytest.raises(TypeError, match=r"tree_norms: .*'step'.*int32"):
    oc.tree_norms({"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)})


def test_non_finite_and_empty_leaves():
  got = oc.tree_norms({"inf": jnp.array([1.0, jnp.inf]),
                       "nan": jnp.array([jnp.nan, 1.0]),
                       "empty": jnp.zeros((0, 3))})
  assert float(got["inf"]) == math.inf
  assert math.isnan(float(got["nan"]))
  assert float(got["empty"]) == 0.0


def test_nnx_state_paths_have_no_value_component():
  nnx = pytest.importorskip("flax.nnx")

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(3, 2, rngs=rngs)

  state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
  got = oc.tree_norms(state)
  assert sorted(got) == ["fc/bias", "fc/kernel"]
  kernel = np.asarray(jax.tree.leaves(state["fc"]["kernel"])[0])
  np.testing.assert_allclose(float(got["fc/kernel"]), _np_norm(kernel, 2),
                             rtol=2e-6)


def test_record_norms_logs_pre_and_post_clip_side_by_side(use_jit):
  grads = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([0.0, 12.0])}}
  tx = optax.chain(oc.record_norms(), oc.clip_by_global_norm(1.3),
                   oc.record_norms())
  updates, state = maybe_jit(tx.update, use_jit)(grads, tx.init(grads))
  stats = oc.clip_stats(state)
  # Pre-clip: 5 and 12 (global 13); post-clip everything is scaled by 0.1.
  np.testing.assert_allclose(float(stats["record_norms/a"]), 5.0, rtol=1e-6)
  np.testing.assert_allclose(float(stats["record_norms/b/c"]), 12.0,
                             rtol=1e-6)
  np.testing.assert_allclose(float(stats["record_norms_1/a"]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(stats["record_norms_1/b/c"]), 1.2,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["a"]), [0.3, 0.4], rtol=1e-6)


def test_record_norms_is_the_identity_and_accepts_state_none(use_jit):
  grads = _model_grads(np.random.default_rng(2))
  tx = oc.record_norms(stacked=oc.stacked_by_path({"blocks": 1}))
  out, state = maybe_jit(tx.update, use_jit)(grads, None)
  chex.assert_trees_all_equal(out, grads)
  chex.assert_trees_all_equal(
    dict(state.recorded_norms.items()),
    oc.tree_norms(grads, stacked=oc.stacked_by_path({"blocks": 1})))


def test_record_norms_in_scan_keeps_a_fixed_shape_state():
  grads = {"w": jnp.ones((2, 3), jnp.bfloat16)}
  tx = oc.record_norms(stacked=1)
  state = tx.init({"w": jnp.zeros((2, 3), jnp.float32)})

  def step(state, scale):
    _, state = tx.update(jax.tree.map(lambda g: g * scale.astype(g.dtype),
                                      grads), state)
    return state, dict(state.recorded_norms.items())["w"]

  _, per_step = jax.lax.scan(step, state, jnp.arange(1.0, 4.0))
  np.testing.assert_allclose(np.asarray(per_step),
                             np.sqrt(3) * np.arange(1, 4)[:, None]
                             * np.ones((1, 2)), rtol=1e-2)


def test_record_norms_rejects_a_state_from_another_tree():
  tx = oc.record_norms()
  state = tx.init({"a": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"record_norms: the state was created "
                     r"by init on a different tree"):
    tx.update({"b": jnp.zeros(2)}, state)


def test_clip_stats_leaves_out_histories_and_keys_unless_asked():
  params = {"w": jnp.ones(3)}
  tx = optax.chain(oc.autoclip(history_size=4),
                   oc.clip_per_example(1.0, noise_multiplier=1.0))
  state = tx.init(params)
  stats = oc.clip_stats(state)
  assert "autoclip/autoclip_history" not in stats
  assert not any("rng" in k for k in stats)
  assert "autoclip/autoclip_threshold" in stats
  full = oc.clip_stats(state, include_history=True)
  assert "autoclip/autoclip_history" in full
  assert "clip_per_example/per_example_rng" in full


def test_clip_stats_shows_injected_hyperparameters_under_the_clipper():
  tx = optax.chain(
    optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=0.25),
    oc.clip_by_global_norm(2.0),
  )
  params = {"w": jnp.zeros(2)}
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
  stats = oc.clip_stats(state)
  assert float(stats["clip_by_global_norm/max_norm"]) == 0.25
  assert float(stats["clip_by_global_norm/global_norm"]) == 5.0
  # The second (plain) clipper sees the first one's output, norm 0.25.
  np.testing.assert_allclose(float(stats["clip_by_global_norm_1/global_norm"]),
                             0.25, rtol=1e-6)
  assert "clip_by_global_norm_1/max_norm" not in stats


def test_paths_that_print_alike_are_an_error_not_a_dropped_key():
  """``{"a/b": x, "a": {"b": y}}`` has two leaves printed ``"a/b"``: a dict
  keyed by path would silently keep one of them."""
  tree = {"a/b": jnp.ones(2), "a": {"b": jnp.ones(3)}}
  with pytest.raises(ValueError, match=r"tree_norms: the leaves at "
                     r"\['a'\]\['b'\] and \['a/b'\] both have the path 'a/b'"):
    oc.tree_norms(tree)
  with pytest.raises(ValueError, match=r"record_norms: .*path 'a/b'"):
    oc.record_norms().update(tree, None)
  # Distinct paths with "/" inside keys are fine and keep their spelling.
  norms = oc.tree_norms({"mlp/~/linear_0": {"w": jnp.ones(4)}})
  assert list(norms) == ["mlp/~/linear_0/w"]


# --- record_norms(ema=...) and top_spikes: which layers spiked --------------


def _ema_steps(rng):
  """Six steps of a tree with a stacked leaf: steady, a zero step for the
  head, then a spike in layer 2 of the stack."""
  base = {"blocks": rng.standard_normal((3, 4, 2)), "head": rng.standard_normal(5)}
  scales = [(1.0, 1.0), (1.1, 0.0), (0.9, 1.2), (1.0, 1.0), (1.05, 0.8)]
  steps = [{"blocks": base["blocks"] * s, "head": base["head"] * h}
           for s, h in scales]
  spike = {"blocks": base["blocks"].copy(), "head": base["head"]}
  spike["blocks"][2] *= 40.0
  return steps + [spike]


def _slice_norms64(tree):
  """float64 per-slice norms in the state's order: 3 layers, then head."""
  blocks = np.asarray(tree["blocks"], np.float64)
  return np.array([np.linalg.norm(b) for b in blocks]
                  + [np.linalg.norm(np.asarray(tree["head"], np.float64))])


def test_record_norms_ema_matches_float64_reference(use_jit):
  steps = _ema_steps(np.random.default_rng(3))
  decay = 0.8
  tx = oc.record_norms(ema=decay, stacked={"blocks": 1, "head": 0})
  grads = [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
           for g in steps]
  state = tx.init(grads[0])
  update = maybe_jit(tx.update, use_jit)
  want_ratios, want_ema, want_count = reference.norm_ema_ratios(
      [_slice_norms64(g) for g in steps], decay)
  for t, g in enumerate(grads):
    out, state = update(g, state)
    assert out is g or use_jit
    np.testing.assert_allclose(np.asarray(state.spike_ratio),
                               want_ratios[t], rtol=2e-6)
  np.testing.assert_allclose(np.asarray(state.spike_norm_ema), want_ema,
                             rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(state.spike_norm_count),
                                want_count)
  stats = oc.clip_stats(state)
  assert set(stats) == {
      "record_norms/spike_norms/blocks", "record_norms/spike_norms/head",
      "record_norms/spike_ratio/blocks",
      "record_norms/spike_ratio/head"}
  assert stats["record_norms/spike_ratio/blocks"].shape == (3,)


def test_top_spikes_names_the_layer_that_spiked():
  steps = _ema_steps(np.random.default_rng(4))
  decay = 0.9
  tx = optax.chain(oc.record_norms(ema=decay, stacked=oc.stacked_by_path(
      {"blocks": 1})), oc.clip_by_global_norm(1.0))
  state = tx.init(steps[0])
  step = jax.jit(tx.update)
  for g in steps:
    _, state = step(jax.tree.map(jnp.asarray, g), state)
  norms = np.array([_slice_norms64(g) for g in steps])
  ratios, _, _ = reference.norm_ema_ratios(norms, decay)
  names = ["blocks[0]", "blocks[1]", "blocks[2]", "head"]
  order = np.argsort(-ratios[-1], kind="stable")
  got = oc.top_spikes(state, k=2)
  assert [p for p, _, _ in got] == [names[i] for i in order[:2]]
  assert got[0][0] == "blocks[2]" and got[0][2] > 30.0
  for (path, norm, ratio), i in zip(got, order):
    np.testing.assert_allclose(norm, norms[-1, i], rtol=1e-6)
    np.testing.assert_allclose(ratio, ratios[-1, i], rtol=2e-6)
  assert len(oc.top_spikes(state, k=None)) == 4


def test_top_spikes_ranks_non_finite_first_and_explains_a_missing_state():
  tx = oc.record_norms(ema=0.5)
  g = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
  state = tx.init(g)
  _, state = tx.update(g, state)
  _, state = tx.update({"a": jnp.ones(2), "b": jnp.array([jnp.nan, 1.0]),
                        "c": jnp.full(2, 3.0)}, state)
  got = oc.top_spikes(state)
  assert [p for p, _, _ in got] == ["b", "c", "a"]
  assert np.isnan(got[0][2]) and got[1][2] == pytest.approx(3.0)
  # The NaN step did not enter b's history: its next ratio is clean.
  _, state = tx.update(g, state)
  assert dict((p, r) for p, _, r in oc.top_spikes(state))["b"] == 1.0
  with pytest.raises(ValueError, match=r"top_spikes: the optimizer state "
                     r"holds 0 record_norms\(ema=\.\.\.\) states"):
    oc.top_spikes(oc.record_norms().init(g))
  with pytest.raises(ValueError, match=r"top_spikes: k must be an int >= 1"):
    oc.top_spikes(state, k=0)


def test_record_norms_ema_dtypes_state_none_and_validation():
  tx = oc.record_norms(ema=0.9)
  g = {"w": jnp.ones(3, jnp.bfloat16)}
  state = tx.init(g)
  assert state.spike_ratio.dtype == jnp.float32
  assert state.spike_norm_count.dtype == jnp.int32
  with pytest.raises(ValueError, match=r"record_norms: .*state=None"):
    tx.update(g, None)
  for bad in (0.0, 1.0, -0.5, float("nan")):
    with pytest.raises(ValueError, match=r"record_norms: ema must be in "
                       r"\(0, 1\)"):
      oc.record_norms(ema=bad)
  with pytest.raises(TypeError, match=r"record_norms: ema"):
    oc.record_norms(ema="0.9")


def test_record_norms_ema_under_inject_hyperparams():
  g = {"w": jnp.array([3.0, 4.0])}
  injected = optax.inject_hyperparams(oc.record_norms)(ema=0.5)
  plain = oc.record_norms(ema=0.5)
  s_inj, s_plain = injected.init(g), plain.init(g)
  step = jax.jit(injected.update)
  for scale in (1.0, 2.0, 8.0):
    _, s_inj = step(jax.tree.map(lambda x: x * scale, g), s_inj)
    _, s_plain = plain.update(jax.tree.map(lambda x: x * scale, g), s_plain)
  np.testing.assert_allclose(np.asarray(s_inj.inner_state.spike_ratio),
                             np.asarray(s_plain.spike_ratio), rtol=1e-6)
  assert oc.top_spikes(s_inj)[0][0] == "w"
