"""shadow: every transform of the registry run without being applied.

For every row: the updates come back unchanged, the wrapped state is the
applied transform's state on the same inputs, step after step, and
``clip_stats`` reports the same keys and values. Plus a check that under
``jit`` the discarded updates cost nothing (XLA removes them).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry

import optaxclip as oc

STEPS = 3


def _grads(row, params, step):
  # Growing updates with a spike on the last step, so clippers, skippers
  # and history-keeping rules all have something to react to.
  scale = (1.0, 1.5, 40.0)[step]
  return registry.updates(row, params, scale=scale)


def _assert_same_arrays(got, want, rtol=0.0):
  chex.assert_trees_all_equal_structs(got, want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    if rtol and np.issubdtype(w.dtype, np.inexact):
      np.testing.assert_allclose(g, w, rtol=rtol, atol=0)
    else:
      np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("row", registry.ROWS, ids=repr)
def test_shadow_of_every_transform(row, use_jit):
  params = registry.params(row)
  applied = row.make()
  shadowed = oc.shadow(row.make())
  step_applied = registry.update_fn(row, applied)
  step_shadow = registry.update_fn(row, shadowed)
  if use_jit:
    step_applied, step_shadow = jax.jit(step_applied), jax.jit(step_shadow)
  state_applied = applied.init(params)
  state_shadow = shadowed.init(params)
  _assert_same_arrays(state_shadow.shadow_inner_state, state_applied)
  for step in range(STEPS):
    grads = _grads(row, params, step)
    _, state_applied = step_applied(grads, state_applied, params)
    out, state_shadow = step_shadow(grads, state_shadow, params)
    # The updates pass through bit-identical, whatever the inner did.
    _assert_same_arrays(out, grads)
    # The inner state is the applied transform's state on the same inputs:
    # identical eagerly; under jit XLA compiles the shadow without the
    # clipped updates, and fusing the rest differently may round the last
    # place differently.
    _assert_same_arrays(
      state_shadow.shadow_inner_state, state_applied, 1e-6 if use_jit else 0
    )
  stats_applied = oc.clip_stats(state_applied)
  stats_shadow = oc.clip_stats(state_shadow)
  assert stats_shadow.keys() == stats_applied.keys()
  _assert_same_arrays(stats_shadow, stats_applied, 1e-6 if use_jit else 0)
  assert bool(stats_shadow) == row.stats or row.name.startswith("shadow")


def test_would_have_clipped_and_skipped_flags():
  grads = {"w": jnp.array([3.0, 4.0])}
  tx = optax.chain(
    oc.shadow(oc.clip_by_global_norm(1.0)),
    oc.shadow(oc.skip_step(optax.identity(), max_norm=2.0)),
    optax.sgd(1.0),
  )
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(updates["w"], [-3.0, -4.0])
  stats = oc.clip_stats(state)
  assert bool(stats["clip_by_global_norm/global_norm_clipped"])
  assert float(stats["clip_by_global_norm/global_norm"]) == 5.0
  assert bool(stats["skip_step/step_skipped"])
  assert int(stats["skip_step/num_skipped"]) == 1


def test_wrapped_optimizer_state_moves_as_if_applied():
  """shadow(skip_step(adam)): adam's moments stay put on the step the rule
  would have skipped, as under the applied wrapper."""
  params = {"w": jnp.zeros(3)}
  inner = oc.skip_step(optax.adam(0.1), max_norm=10.0)
  tx = oc.shadow(inner)
  state = tx.init(params)
  with jax.numpy_dtype_promotion("standard"):  # adam's int counter
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    mu = state.shadow_inner_state.inner_state[0].mu["w"]
    _, state = tx.update({"w": jnp.full(3, 100.0)}, state, params)
  assert bool(state.shadow_inner_state.step_skipped)
  np.testing.assert_array_equal(
    state.shadow_inner_state.inner_state[0].mu["w"], mu
  )


def test_schedule_inside_a_shadow_is_logged_under_the_inner_name():
  tx = oc.shadow(
    optax.inject_hyperparams(oc.clip_by_global_norm)(
      max_norm=optax.linear_schedule(1.0, 3.0, 2)
    )
  )
  grads = {"w": jnp.array([3.0, 4.0])}
  state = tx.init(grads)
  with jax.numpy_dtype_promotion("standard"):
    _, state = tx.update(grads, state)
  stats = oc.clip_stats(state)
  assert float(stats["clip_by_global_norm/max_norm"]) == 1.0


def test_state_none_follows_the_inner_transform():
  grads = {"w": jnp.array([3.0, 4.0])}
  out, state = oc.shadow(oc.clip_by_global_norm(1.0)).update(grads, None)
  assert out is grads
  assert bool(state.shadow_inner_state.global_norm_clipped)
  with pytest.raises(ValueError, match="init"):
    oc.shadow(oc.zclip()).update(grads, None)


def test_not_a_transformation():
  with pytest.raises(TypeError, match="shadow: inner must be an optax"):
    oc.shadow(oc.clip_by_global_norm)


def _compiled(tx, tree):
  state = tx.init(tree)
  return jax.jit(tx.update).lower(tree, state).compile()


@pytest.mark.parametrize(
  "make",
  [
    lambda: oc.clip_by_global_norm(0.5),
    lambda: oc.zclip(max_norm=0.5, warmup_steps=1),
    lambda: oc.spectral_clip(0.5),
  ],
  ids=["clip_by_global_norm", "zclip", "spectral_clip"],
)
def test_discarded_updates_cost_nothing_under_jit(make):
  """XLA removes the inner's clipped updates: the shadow's program does at
  most the inner program's work and needs at most its temporary memory."""
  tree = {
    "a": jnp.ones((256, 128), jnp.float32),
    "b": jnp.ones((64, 64), jnp.float32),
    "c": jnp.ones((300,), jnp.float32),
  }
  inner = _compiled(make(), tree)
  shadowed = _compiled(oc.shadow(make()), tree)

  def flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost.get("flops", 0.0)

  assert flops(shadowed) < flops(inner)
  inner_mem, shadow_mem = inner.memory_analysis(), shadowed.memory_analysis()
  # The norm kernel's rescue keeps copies of some leaves in temporary memory
  # (the bare global norm of this tree needs them too); an applied clipper
  # hides them in its output buffers, a shadow has no output to hide them
  # in. Beyond that the shadow needs nothing.
  norm_temp = (
    jax.jit(oc.global_norm)
    .lower(tree)
    .compile()
    .memory_analysis()
    .temp_size_in_bytes
  )
  assert (
    shadow_mem.temp_size_in_bytes <= inner_mem.temp_size_in_bytes + norm_temp
  )
  # The outputs are the unchanged updates (and the state): no larger.
  assert shadow_mem.output_size_in_bytes <= inner_mem.output_size_in_bytes
