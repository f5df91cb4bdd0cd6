"""Library-wide input policies, checked on every public transform.

* Integer and bool gradient leaves: a ``TypeError`` naming the leaf's path
  (docs/design.md#rules, item 4), whatever the transform.
* ``update(updates, None)`` (as optax's own clipping tests call it): the
  transforms whose state only records diagnostics rebuild it and give exactly
  the result of ``update(updates, init(params))``; the transforms that carry
  history between steps raise a ``ValueError`` that says to call ``init``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from helpers import maybe_jit

# name -> (factory of the transform, whether updates carry a batch axis)
_DIAGNOSTIC_ONLY = {
  "clip_by_value": lambda: oc.clip_by_value(0.5),
  "clip": lambda: oc.clip(0.5),
  "clip_by_norm": lambda: oc.clip_by_norm(0.5),
  "clip_by_global_norm": lambda: oc.clip_by_global_norm(0.5),
  "clip_by_global_norm_l1": lambda: oc.clip_by_global_norm(0.5, ord=1),
  "clip_by_block_rms": lambda: oc.clip_by_block_rms(0.5),
  "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.1),
  "clip_by_global_norm_groups": lambda: oc.clip_by_global_norm(
    0.5, groups=lambda path, leaf: "bias" if leaf.ndim == 1 else "kernel"
  ),
}
_WITH_HISTORY = {
  "autoclip": lambda: oc.autoclip(),
  "zclip": lambda: oc.zclip(),
  "adagc": lambda: oc.adagc(),
  "skip_step": lambda: oc.skip_step(optax.sgd(0.1), max_norm=10.0),
  "clip_per_example": lambda: oc.clip_per_example(0.5),
  "skip_step_loss": lambda: oc.skip_step(
    optax.sgd(0.1), max_norm=10.0, loss_window=8, record_skipped=True
  ),
  "clip_norm_growth": lambda: oc.clip_norm_growth(),
  "spam_clip": lambda: oc.spam_clip(),
  "momentum_reset": lambda: oc.momentum_reset(optax.sgd(0.1)),
  "adaclip": lambda: oc.adaclip(),
  "adagn": lambda: oc.adagn(),
}
_ALL = {**_DIAGNOSTIC_ONLY, **_WITH_HISTORY}


def _grads(name, rng):
  tree = {
    "dense": {
      "kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
      "bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    }
  }
  if name == "clip_per_example":  # a batch of 5 per-example gradients
    tree = jax.tree.map(lambda x: jnp.stack([x] * 5), tree)
  return tree


def _params(rng):
  return {
    "dense": {
      "kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
      "bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    }
  }


@pytest.mark.parametrize("name", sorted(_ALL))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_], ids=["int32", "bool"])
def test_integer_and_bool_leaves_are_a_type_error_naming_the_path(
  name, dtype, use_jit
):
  rng = np.random.default_rng(0)
  tx = _ALL[name]()
  grads = _grads(name, rng)
  params = _params(rng)
  state = tx.init(params)
  bad = dict(grads)
  bad["step"] = {"count": jnp.zeros((5,) if name == "clip_per_example" else (),
                                    dtype)}
  update = maybe_jit(tx.update, use_jit)
  with pytest.raises(TypeError, match=r"step/count.*" + np.dtype(dtype).name):
    update(bad, state, params)


@pytest.mark.parametrize("name", sorted(_DIAGNOSTIC_ONLY))
def test_state_none_rebuilds_a_diagnostic_state(name, use_jit):
  rng = np.random.default_rng(1)
  tx = _DIAGNOSTIC_ONLY[name]()
  grads, params = _grads(name, rng), _params(rng)
  update = maybe_jit(tx.update, use_jit)
  want = update(grads, tx.init(params), params)
  got = update(grads, None, params)
  # Two programs (the state is an input in one, rebuilt in the other) may
  # round differently in the last place.
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(_WITH_HISTORY))
def test_state_none_on_a_transform_with_history_says_call_init(name):
  rng = np.random.default_rng(2)
  tx = _WITH_HISTORY[name]()
  with pytest.raises(ValueError, match=r"state=None.*tx\.init"):
    tx.update(_grads(name, rng), None, _params(rng))
