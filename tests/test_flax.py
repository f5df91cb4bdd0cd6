"""Integration tests with real Flax: NNX ``nnx.Optimizer`` and linen ``TrainState``.

The clippers are used exactly as a Flax user would (``optax.chain`` inside
``nnx.Optimizer`` under ``nnx.jit``, or inside a linen ``TrainState`` under
``jax.jit``), and the trained parameters are compared with independent
computations: plain optax on the pure parameter pytree, clipping written from
the textbook formulas (``reference.py``, float64 NumPy), and SGD by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import helpers
import optaxclip as oc
import reference

NUM_STEPS = 3
LEARNING_RATE = 1e-2


def _data(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """8 samples of 3 features; large targets, so every threshold binds."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((8, 3))
  y = 3.0 * rng.standard_normal((8, 1))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _leaves64(tree) -> list[np.ndarray]:
  return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def _adam() -> optax.GradientTransformation:
  """``optax.adam(1e-2)`` traced under standard dtype promotion.

  tests/conftest.py runs the suite with ``jax_numpy_dtype_promotion="strict"``,
  and optax.adam's bias correction computes ``1 - b1 ** count`` from a Python
  float and the int32 step count, which strict promotion rejects (an optax
  matter; Flax and optaxclip are fine under strict rules). Only adam's own
  ``init``/``update`` are relaxed: the optaxclip clipper in front of it in the
  chain, and the Flax model code, still trace under the strict rules.

  Returns:
    The relaxed ``optax.adam(LEARNING_RATE)``.
  """
  adam = optax.adam(LEARNING_RATE)

  def init_fn(params):
    with jax.numpy_dtype_promotion("standard"):
      return adam.init(params)

  def update_fn(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return adam.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------


class _TinyMLP(nnx.Module):
  """3 -> 4 -> 1, ReLU."""

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(3, 4, rngs=rngs)
    self.l2 = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l2(jax.nn.relu(self.l1(x)))


def _nnx_loss(model: _TinyMLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
  helpers.nnx_optimizer_update(optimizer, model, grads)
  return loss, grads


def _pure_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """The same MLP written out by hand on the pure ``{'l1': ..., 'l2': ...}``."""
  # Biases broadcast explicitly: conftest sets jax_numpy_rank_promotion=raise.
  hidden = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"][None])
  out = hidden @ params["l2"]["kernel"] + params["l2"]["bias"][None]
  return jnp.mean((out - y) ** 2)


def _pure_params(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# (make the clipper, the textbook rule on float64 leaves).
_NNX_CLIPPERS = [
    pytest.param(lambda: oc.clip_by_global_norm(0.5),
                 lambda l: reference.clip_by_global_norm(l, 0.5)[0],
                 id="clip_by_global_norm"),
    pytest.param(lambda: oc.clip_by_norm(0.5),
                 lambda l: reference.clip_by_norm(l, 0.5)[0],
                 id="clip_by_norm"),
    pytest.param(lambda: oc.clip_by_block_rms(0.1),
                 lambda l: reference.clip_by_block_rms(l, 0.1)[0],
                 id="clip_by_block_rms"),
    pytest.param(lambda: oc.clip_by_value(0.1),
                 lambda l: reference.clip_by_value(l, -0.1, 0.1)[0],
                 id="clip_by_value"),
    pytest.param(lambda: oc.clip(0.1),
                 lambda l: reference.clip_by_value(l, -0.1, 0.1)[0],
                 id="clip"),
]


@pytest.mark.parametrize("make_clipper, textbook_clip", _NNX_CLIPPERS)
def test_nnx_optimizer_matches_plain_optax(make_clipper, textbook_clip):
  x, y = _data()
  model = _TinyMLP(nnx.Rngs(0))
  init_params = _pure_params(model)
  optimizer = nnx.Optimizer(
      model, optax.chain(make_clipper(), _adam()), wrt=nnx.Param)

  losses = []
  for _ in range(NUM_STEPS):
    loss, _ = _nnx_step(model, optimizer, x, y)
    losses.append(float(loss))
  nnx_params = _pure_params(model)
  # The optimizer state without nnx's OptArray/OptVariable wrappers.
  nnx_opt_state = helpers.nnx_pure(optimizer.opt_state)

  # Reference 1: the same clipper + adam with plain optax on the pure pytree
  # (no nnx.Optimizer, no nnx.State, no OptArray wrappers).
  tx = optax.chain(make_clipper(), _adam())
  params, opt_state = init_params, tx.init(init_params)
  ref_losses = []
  for _ in range(NUM_STEPS):
    loss, grads = jax.value_and_grad(_pure_loss)(params, x, y)
    ref_losses.append(float(loss))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  optax_params, optax_opt_state = params, opt_state

  # Reference 2: no optaxclip at all -- the textbook clip in float64 NumPy,
  # then plain optax.adam.
  adam = _adam()
  params, adam_state = init_params, adam.init(init_params)
  clip_was_active = []
  for _ in range(NUM_STEPS):
    grads = jax.grad(_pure_loss)(params, x, y)
    leaves, treedef = jax.tree.flatten(grads)
    raw = _leaves64(leaves)
    clipped = textbook_clip(raw)
    clip_was_active.append(
        any(not np.array_equal(a, b) for a, b in zip(raw, clipped)))
    clipped = jax.tree.unflatten(
        treedef, [jnp.asarray(c, jnp.float32) for c in clipped])
    updates, adam_state = adam.update(clipped, adam_state, params)
    params = optax.apply_updates(params, updates)
  textbook_params, textbook_adam_state = params, adam_state

  assert all(np.isfinite(losses))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # The threshold really bound, so the test exercises the clipping.
  assert clip_was_active[0]
  # Training moved every parameter tensor.
  for before, after in zip(_leaves64(init_params), _leaves64(nnx_params)):
    assert not np.array_equal(before, after)
  assert (jax.tree.structure(nnx_params) == jax.tree.structure(optax_params)
          == jax.tree.structure(textbook_params))
  for got, want_optax, want_textbook in zip(
      _leaves64(nnx_params), _leaves64(optax_params),
      _leaves64(textbook_params)):
    np.testing.assert_allclose(got, want_optax, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, want_textbook, rtol=1e-5, atol=1e-7)

  # Adam is nearly invariant to rescaling its input, so matching parameters
  # alone hardly depend on the threshold. Its moments do: after the first step
  # mu = (1 - b1) * clipped grads. Compare them, and every other state leaf
  # (the clipper's diagnostics included) with the plain-optax run.
  assert len(jax.tree.leaves(nnx_opt_state)) == len(
      jax.tree.leaves(optax_opt_state))
  for got, want in zip(jax.tree.leaves(nnx_opt_state),
                       jax.tree.leaves(optax_opt_state)):
    np.testing.assert_allclose(np.asarray(got, np.float64),
                               np.asarray(want, np.float64), rtol=1e-5,
                               atol=1e-9)
  for moment in ("mu", "nu"):
    got = _leaves64(optax.tree.get(nnx_opt_state, moment))
    want = _leaves64(optax.tree.get(textbook_adam_state, moment))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9)


def test_clip_stats_on_nnx_optimizer_returns_plain_arrays_of_this_step():
  x, y = _data(seed=1)
  model = _TinyMLP(nnx.Rngs(1))
  # clip_by_norm after the global clipper: its per-leaf norms are those of the
  # globally clipped gradients, and it adds a non-scalar field to unwrap.
  tx = optax.chain(oc.clip_by_global_norm(0.5), oc.clip_by_norm(0.2), _adam())
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  norms = []
  for _ in range(NUM_STEPS):
    _, grads = _nnx_step(model, optimizer, x, y)
    stats = oc.clip_stats(optimizer.opt_state)

    # Per-leaf norms are keyed by the parameters' paths, with no Variable
    # ".value" component, in jax.tree.leaves order.
    leaf_keys = [f"clip_by_norm/leaf_norms/{p}" for p in oc.tree_norms(grads)]
    assert all("value" not in k.split("/") for k in leaf_keys)
    assert list(stats) == [
        "clip_by_global_norm/global_norm",
        "clip_by_global_norm/global_norm_clipped",
        *leaf_keys,
        "clip_by_norm/num_clipped_leaves",
    ]
    for key, value in stats.items():
      assert isinstance(value, jax.Array), (key, type(value))
      assert not isinstance(value, nnx.Variable), (key, type(value))

    # The logged norm is this step's raw gradient norm: the library's own
    # global_norm, and the float64 textbook norm of the pure gradients.
    raw = _leaves64(nnx.to_pure_dict(grads))
    logged = stats["clip_by_global_norm/global_norm"]
    assert logged.shape == () and logged.dtype == jnp.float32
    np.testing.assert_allclose(logged, oc.global_norm(grads), rtol=1e-6)
    np.testing.assert_allclose(logged, reference.norm(raw), rtol=1e-6)
    assert bool(stats["clip_by_global_norm/global_norm_clipped"]) == (
        reference.norm(raw) > 0.5)
    norms.append(float(logged))

    globally_clipped, _ = reference.clip_by_global_norm(raw, 0.5)
    _, want_leaf_norms = reference.clip_by_norm(globally_clipped, 0.2)
    np.testing.assert_allclose(
        [stats[k] for k in leaf_keys], want_leaf_norms, rtol=1e-5)
    assert int(stats["clip_by_norm/num_clipped_leaves"]) == sum(
        n > 0.2 for n in want_leaf_norms)

  # The state is refreshed every step, not stuck at the first step's value.
  assert len(set(norms)) == NUM_STEPS


# --------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------


class _LinenMLP(nn.Module):
  """3 -> 4 -> 1, ReLU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(1)(nn.relu(nn.Dense(4)(x)))


@jax.jit
def _linen_step(state: train_state.TrainState, x: jax.Array, y: jax.Array):
  def loss_fn(params):
    return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

  grads = jax.grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), grads


def test_linen_train_state_clips_by_global_norm():
  x, y = _data(seed=2)
  module = _LinenMLP()
  lr, max_norm = 0.1, 1.0
  state = train_state.TrainState.create(
      apply_fn=module.apply,
      params=module.init(jax.random.key(0), x)["params"],
      tx=optax.chain(oc.clip_by_global_norm(max_norm), optax.sgd(lr)))

  scales = []
  for _ in range(NUM_STEPS):
    before = _leaves64(state.params)
    state, grads = _linen_step(state, x, y)

    raw = _leaves64(grads)
    norm = reference.norm(raw)
    logged = optax.tree.get(state.opt_state, "global_norm")
    np.testing.assert_allclose(logged, oc.global_norm(grads), rtol=1e-6)
    np.testing.assert_allclose(logged, norm, rtol=1e-6)

    # SGD by hand on the clipped gradients: p - lr * g * min(1, c / ||g||).
    scale = min(1.0, max_norm / norm)
    scales.append(scale)
    for p, g, new in zip(before, raw, _leaves64(state.params)):
      np.testing.assert_allclose(new, p - lr * scale * g, rtol=1e-5,
                                 atol=1e-7)

  assert int(state.step) == NUM_STEPS
  assert min(scales) < 1.0  # at least one step was actually clipped
