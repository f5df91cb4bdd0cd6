"""Every registry row's state checkpoints and restores exactly (orbax,
pickle, flax msgpack, host NumPy) and the next step is unchanged."""

import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import helpers
import pytest
import chex

import optaxclip as oc
import registry

@pytest.mark.parametrize("row", registry.ROWS, ids=str)
def test_orbax_round_trip_then_identical_next_step(row, tmp_path):
  tx = row.make()
  params = registry.params(row)
  step = jax.jit(registry.update_fn(row, tx))
  state = tx.init(params)
  if not jax.tree.leaves(state):  # optax.EmptyState (clip): no item to save
    pytest.skip("the state holds no arrays")
  for scale in (1.0, 2.0, 0.5, 8.0, 1.5, 50.0):
    _, state = step(registry.updates(row, params, scale), state, params)
  restored = helpers.orbax_round_trip(state, tmp_path / "state")
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
  grads = registry.updates(row, params, 3.0)
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


def _stepped_state(row, steps=3):
  """A state after a few steps of ``row`` (jitted), and what it needs."""
  tx = row.make()
  params = registry.params(row)
  update = jax.jit(registry.update_fn(row, tx))
  state = tx.init(params)
  for scale in (1.0, 3.0, 0.5)[:steps]:
    _, state = update(registry.updates(row, params, scale), state, params)
  return tx, params, update, state


def _next_step_agrees(row, params, update, restored, state):
  grads = registry.updates(row, params, 2.0)
  chex.assert_trees_all_equal(update(grads, restored, params),
                              update(grads, state, params))


@pytest.mark.parametrize("row", registry.ROWS, ids=str)
def test_flax_msgpack_round_trip(row):
  """``flax.serialization`` bytes restore every state exactly, per-path
  values included (their paths come from the target)."""
  serialization = pytest.importorskip("flax.serialization")
  tx, params, update, state = _stepped_state(row)
  data = serialization.to_bytes(state)
  restored = serialization.from_bytes(tx.init(params), data)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, state)
  _next_step_agrees(row, params, update, restored, state)


@pytest.mark.parametrize("row", registry.ROWS, ids=str)
def test_pickle_round_trip(row):
  tx, params, update, state = _stepped_state(row)
  restored = pickle.loads(pickle.dumps(jax.device_get(state)))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, jax.device_get(state))
  _next_step_agrees(row, params, update, restored, state)


# init(placeholder) must work: optax.tree.map_params calls init on an empty
# params placeholder, even for transforms (qk_clip) whose init otherwise
# needs particular leaves.
@pytest.mark.parametrize("row", registry.ROWS, ids=str)
def test_map_params_reaches_every_state(row):
  """``optax.tree.map_params`` (sharding specs, momentum resets) works on
  every state, inside a chain with a params-shaped optimizer state."""
  tx = optax.chain(row.make(), optax.sgd(0.1, momentum=0.9))
  params = registry.params(row)
  state = tx.init(params)
  map_params = getattr(optax.tree, "map_params", None) or (
    optax.tree_utils.tree_map_params)
  marked = map_params(tx, lambda p: "param", state,
                      transform_non_params=lambda _: "other")
  (trace,) = [s for s in marked[1] if hasattr(s, "trace")]
  assert set(jax.tree.leaves(trace.trace)) == {"param"}
  assert set(jax.tree.leaves(marked[0])) <= {"param", "other"}


_LATE_FLAX = """
import sys
import jax.numpy as jnp
import optaxclip as oc
assert "flax" not in sys.modules, "importing optaxclip imported flax"
tx = oc.adagc(warmup_steps=1, stacked=1)
grads = {"blocks": jnp.arange(6.0).reshape(2, 3), "head": jnp.ones(2)}
_, state = tx.update(grads, tx.init(grads))
from flax import serialization  # after the state exists
restored = serialization.from_bytes(tx.init(grads),
                                    serialization.to_bytes(state))
assert restored.adagc_norms.segments == state.adagc_norms.segments
assert (restored.adagc_norms.values == state.adagc_norms.values).all()
"""


def test_flax_support_is_registered_lazily():
  """optaxclip does not import flax; importing flax later still registers
  the per-path values with flax.serialization."""
  pytest.importorskip("flax")
  run = subprocess.run([sys.executable, "-c", _LATE_FLAX],
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
