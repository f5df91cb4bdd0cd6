"""Adaptive clippers' states checkpoint and restore exactly with orbax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import chex

import optaxclip as oc
import registry

FACTORIES = {
    "autoclip": lambda: oc.autoclip(25.0, history_size=8),
    "zclip": lambda: oc.zclip(warmup_steps=3, max_norm=None),
    "adagc": lambda: oc.adagc(warmup_steps=3),
    "skip_step": lambda: oc.skip_step(optax.sgd(0.1), spike_sigmas=2.0,
                                      window=4, warmup_steps=2),
    "clip_by_global_norm": lambda: oc.clip_by_global_norm(1.0),
}


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.usefixtures("standard_promotion")  # optax.adam's counters
def test_orbax_round_trip_then_identical_next_step(name, tmp_path):
  tx = optax.chain(FACTORIES[name](), optax.adam(1e-2))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
            "b": jnp.zeros((3,), jnp.float32)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for scale in (1.0, 2.0, 0.5, 8.0, 1.5, 50.0):
    grads = jax.tree.map(lambda p, s=scale: jnp.ones_like(p) * s, params)
    _, state = step(grads, state, params)
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / "state"
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(path, jax.tree.map(jnp.zeros_like, state))
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  chex.assert_trees_all_equal(step(grads, restored, params),
                              step(grads, state, params))


@pytest.mark.parametrize("row", registry.ROWS, ids=str)
def test_eager_update_on_host_numpy_state(row):
  """A state restored as NumPy arrays (``jax.device_get``, a pickle of host
  arrays, a msgpack restore) drives an eager update exactly as the device
  state does."""
  tx = row.make()
  params = registry.params(row)
  update = registry.update_fn(row, tx)
  state = host_state = tx.init(params)
  for scale in (1.0, 3.0, 0.5, 20.0):
    grads = registry.updates(row, params, scale)
    host_state = jax.device_get(host_state)
    assert all(isinstance(x, np.ndarray | np.generic)
               for x in jax.tree.leaves(host_state))
    out, state = update(grads, state, params)
    host_out, host_state = update(grads, host_state, params)
    chex.assert_trees_all_equal(host_out, out)
    chex.assert_trees_all_equal(jax.device_get(host_state),
                                jax.device_get(state))
