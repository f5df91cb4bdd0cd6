"""clip_stats: a flat dict of diagnostics from any optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import reference
from helpers import leaves64


def _grads():
  return {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "b": jnp.array([12.0, 0.0])}


def test_keys_are_unambiguous_with_two_clippers_of_one_kind():
  grads = _grads()
  tx = optax.chain(oc.clip_by_value(3.5, diagnostics=True),
                   oc.clip_by_global_norm(100.0),
                   oc.clip_by_global_norm(1.0), oc.clip_by_norm(5.0),
                   oc.clip_by_block_rms(1.0))
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  stats = oc.clip_stats(state)
  assert set(stats) == {
      "clip_by_value/value_max",
      "clip_by_value/value_min",
      "clip_by_value/value_clipped",
      "clip_by_global_norm/global_norm",
      "clip_by_global_norm/global_norm_clipped",
      "clip_by_global_norm_1/global_norm",
      "clip_by_global_norm_1/global_norm_clipped",
      "clip_by_norm/leaf_norms/b",
      "clip_by_norm/leaf_norms/w",
      "clip_by_norm/num_clipped_leaves",
      "clip_by_block_rms/block_rms/b",
      "clip_by_block_rms/block_rms/w",
      "clip_by_block_rms/num_clipped_blocks",
  }
  assert all(isinstance(v, jax.Array) for v in stats.values())
  # Values follow the chain: value clip first (12 -> 3.5), then the norms.
  after_value = [np.minimum(x, 3.5) for x in leaves64(grads)]
  assert bool(stats["clip_by_value/value_clipped"])
  assert float(stats["clip_by_value/value_max"]) == 12.0
  n1 = reference.norm(after_value)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/global_norm"]),
                             n1, rtol=1e-6)
  assert not bool(stats["clip_by_global_norm/global_norm_clipped"])
  np.testing.assert_allclose(float(stats["clip_by_global_norm_1/global_norm"]),
                             n1, rtol=1e-6)
  assert bool(stats["clip_by_global_norm_1/global_norm_clipped"])
  # After the second clip the tree has norm 1: every leaf norm <= 1.
  leaf_norms = np.asarray([stats["clip_by_norm/leaf_norms/b"],
                           stats["clip_by_norm/leaf_norms/w"]])
  np.testing.assert_allclose(np.sqrt(np.sum(leaf_norms**2)), 1.0, rtol=1e-6)


def test_inject_hyperparams_state_is_walked():
  grads = _grads()
  tx = optax.inject_hyperparams(oc.clip_by_global_norm)(
      max_norm=optax.constant_schedule(2.0))
  _, state = tx.update(grads, tx.init(grads))
  stats = oc.clip_stats(state)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/global_norm"]),
                             13.0, rtol=1e-6)


def test_empty_when_no_clipper():
  tx = optax.sgd(0.1)
  assert oc.clip_stats(tx.init(_grads())) == {}
  assert oc.clip_stats(None) == {}


def test_works_inside_jit_and_on_host():
  grads = _grads()
  tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))

  @jax.jit
  def step(g, s):
    updates, s = tx.update(g, s)
    return updates, s, oc.clip_stats(s)

  _, state, stats = step(grads, tx.init(grads))
  np.testing.assert_allclose(float(stats["clip_by_global_norm/global_norm"]),
                             13.0, rtol=1e-6)
  assert oc.clip_stats(state).keys() == stats.keys()


@pytest.mark.parametrize("wrap", ["multisteps", "masked"])
@pytest.mark.usefixtures("standard_promotion")
def test_wrappers(wrap):
  grads = _grads()
  inner = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
  if wrap == "multisteps":
    tx = optax.MultiSteps(inner, every_k_schedule=1)
  else:
    tx = optax.masked(inner, {"w": True, "b": True})
  _, state = tx.update(grads, tx.init(grads), grads)
  np.testing.assert_allclose(
      float(oc.clip_stats(state)["clip_by_global_norm/global_norm"]), 13.0,
      rtol=1e-6)


def test_clippers_inside_skip_step_are_found():
  grads = _grads()
  tx = oc.skip_step(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)),
                    max_norm=100.0)
  _, state = tx.update(grads, tx.init(grads))
  stats = oc.clip_stats(state)
  assert "skip_step/inner_state" not in stats
  assert not bool(stats["skip_step/step_skipped"])
  np.testing.assert_allclose(float(stats["skip_step/skip_norm"]), 13.0,
                             rtol=1e-6)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/global_norm"]),
                             13.0, rtol=1e-6)


def test_numbering_follows_chain_order_through_wrappers():
  """Same-kind clippers are numbered depth-first in chain order, whether
  or not one sits inside a wrapper."""
  # The global norm of _grads() is 13: each threshold leaves a trace.
  tx = optax.chain(
      oc.skip_step(oc.clip_by_global_norm(1.0)),
      oc.clip_by_global_norm(100.0),
      oc.momentum_reset(optax.chain(oc.clip_by_global_norm(2.0),
                                    optax.sgd(1.0, momentum=0.9)),
                        interval=10),
      optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=0.5),
      oc.skip_step(optax.chain(oc.skip_step(oc.clip_by_global_norm(3.0)))),
  )
  grads = _grads()
  _, state = tx.update(grads, tx.init(grads))
  stats = oc.clip_stats(state)
  # Expected pre-clip norms, in chain order: 13, then 1 (the first clipper
  # clipped to 1), 1, 1, then 0.5.
  want = [(1.0, 13.0), (100.0, 1.0), (2.0, 1.0), (0.5, 1.0), (3.0, 0.5)]
  keys = ["clip_by_global_norm"] + [f"clip_by_global_norm_{i}"
                                    for i in range(1, 5)]
  for key, (_, norm) in zip(keys, want):
    np.testing.assert_allclose(float(stats[f"{key}/global_norm"]), norm,
                               rtol=1e-6)
  assert float(stats["clip_by_global_norm_3/max_norm"]) == 0.5
  assert [k for k in stats if k.startswith("skip_step")] == [
      k for k in stats if k.startswith("skip_step") and "/" in k]
  assert {k.split("/")[0] for k in stats if k.startswith("skip_step")} == {
      "skip_step", "skip_step_1", "skip_step_2"}
  # The outer skip_step of the last element comes before the inner one.
  np.testing.assert_allclose(float(stats["skip_step_1/skip_norm"]), 0.5,
                             rtol=1e-6)


def _two_named_record_norms():
  tx = optax.chain(oc.record_norms(name="pre_clip"),
                   oc.clip_by_global_norm(1.0),
                   oc.record_norms(name="post_clip"), oc.record_norms())
  grads = {"w": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([12.0])}}
  return tx, grads


def test_named_record_norms_keys(use_jit):
  tx, grads = _two_named_record_norms()
  update = jax.jit(tx.update) if use_jit else tx.update
  _, state = update(grads, tx.init(grads))
  stats = oc.clip_stats(state)
  assert list(stats) == [
      "pre_clip/b/c", "pre_clip/w",
      "clip_by_global_norm/global_norm",
      "clip_by_global_norm/global_norm_clipped",
      "post_clip/b/c", "post_clip/w",
      "record_norms/b/c", "record_norms/w"]
  np.testing.assert_allclose(float(stats["pre_clip/b/c"]), 12.0)
  np.testing.assert_allclose(float(stats["post_clip/b/c"]), 12.0 / 13.0,
                             rtol=1e-6)
  assert isinstance(state[0], oc.RecordNormsState)
  # Two with one name are numbered like unnamed ones.
  tx = optax.chain(oc.record_norms(name="g"), oc.record_norms(name="g"))
  _, state = tx.update(grads, tx.init(grads))
  assert set(oc.clip_stats(state)) == {"g/w", "g/b/c", "g_1/w", "g_1/b/c"}


def test_named_record_norms_state_round_trips():
  import pickle  # pylint: disable=g-import-not-at-top
  tx, grads = _two_named_record_norms()
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  restored = pickle.loads(pickle.dumps(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert oc.clip_stats(restored).keys() == oc.clip_stats(state).keys()
  host = jax.device_get(state)
  _, again = jax.jit(tx.update)(grads, host)
  assert jax.tree.structure(again) == jax.tree.structure(state)


@pytest.mark.parametrize("name, match", [
    ("", "non-empty"), ("a/b", "'/'"), (3, "string"),
    ("clip_by_global_norm", "clipper"),
])
def test_record_norms_bad_name(name, match):
  with pytest.raises((ValueError, TypeError), match=match):
    oc.record_norms(name=name)


def _adaclip_adagn_state():
  params = {f"l{i}": {"w": jnp.full((3, 2), i + 1.0), "b": jnp.ones(2)}
            for i in range(3)}
  tx = optax.chain(oc.adaclip(), oc.adagn(), oc.clip_by_global_norm(1.0))
  _, state = tx.update(params, tx.init(params), params)
  return state


def test_include_patterns_select_keys():
  state = _adaclip_adagn_state()
  every = oc.clip_stats(state)
  assert len(every) > 30  # per-leaf fields for 6 leaves
  picked = oc.clip_stats(state, include=("*/global_norm", "adaclip/*_num_*"))
  assert set(picked) == {"clip_by_global_norm/global_norm",
                         "adaclip/adaclip_num_clipped"}
  for key, value in picked.items():
    np.testing.assert_array_equal(value, every[key])
  one = oc.clip_stats(state, include="adagn/adagn_scale/l1/*")
  assert set(one) == {"adagn/adagn_scale/l1/b", "adagn/adagn_scale/l1/w"}
  assert oc.clip_stats(state, include=()) == {}


def test_summary_gives_one_scalar_per_field():
  state = _adaclip_adagn_state()
  every = oc.clip_stats(state)
  summary = oc.clip_stats(state, summary=True)
  fields = {k.split("/")[0] + "/" + k.split("/")[1] for k in every}
  assert set(summary) == fields
  assert len(summary) <= 12 < len(every)
  for key, value in summary.items():
    assert np.shape(value) == ()
    per_path = [np.max(v) for k, v in every.items()
                if k == key or k.startswith(key + "/")]
    assert value == max(per_path)  # the worst leaf
  # record_norms, named or not, and stacked leaves: the largest norm.
  tx = optax.chain(oc.record_norms(name="pre_clip"),
                   oc.record_norms(stacked=1))
  grads = {"blocks": jnp.stack([jnp.ones(4), 3 * jnp.ones(4)]),
           "out": jnp.ones(9)}
  _, state = tx.update(grads, tx.init(grads))
  summary = oc.clip_stats(state, summary=True)
  assert set(summary) == {"pre_clip/recorded_norms",
                          "record_norms/recorded_norms"}
  np.testing.assert_allclose(float(summary["pre_clip/recorded_norms"]),
                             np.sqrt(40.0), rtol=1e-6)
  np.testing.assert_allclose(float(summary["record_norms/recorded_norms"]),
                             6.0, rtol=1e-6)
  picked = oc.clip_stats(state, summary=True, include="pre_clip/*")
  assert set(picked) == {"pre_clip/recorded_norms"}


@pytest.mark.parametrize("include", [3, [b"x"], ("a", None)])
def test_bad_include(include):
  with pytest.raises(TypeError, match="include"):
    oc.clip_stats({}, include=include)


def test_history_of_leaves_whose_paths_print_alike_is_an_error():
  """spam_clip's moments mirror the updates; keyed by path, the leaves at
  ["a/b"] and ["a"]["b"] would share one key and one would vanish."""
  grads = {"a/b": jnp.array([1.0, 2.0]), "a": {"b": jnp.array([3.0])}}
  tx = oc.spam_clip()
  _, state = tx.update(grads, tx.init(grads))
  assert "spam_clip/spam_clip_count" in oc.clip_stats(state)
  with pytest.raises(ValueError, match=r"\['a'\]\['b'\] and \['a/b'\].*"
                                       r"both have the path 'a/b'"):
    oc.clip_stats(state, include_history=True)
