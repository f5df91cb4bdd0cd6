"""Adaptive gradient clipping on a real Flax NNX CNN.

Checks that ``oc.adaptive_grad_clip``'s default unit axes fit Flax's layouts
(``nnx.Conv`` kernels HWIO -> one unit per output channel, ``nnx.Linear``
kernels ``(in, out)`` -> one unit per output, biases -> one unit), and that the
final classifier can be exempted as in Brock et al. 2021, either with
``optax.masked`` or with ``optax.multi_transform``, inside ``nnx.Optimizer``
under ``nnx.jit``. Every result is compared with the float64 textbook rule of
``reference.py``, applied unit by unit with axes derived here from the layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import helpers
import optaxclip as oc
import reference

CLIPPING = 0.02
EPS = 1e-3
LEARNING_RATE = 0.1
NUM_STEPS = 3
# Kernel shapes fixed by the model below; they pin the layouts the test assumes.
_SHAPES = {
    "conv1": (3, 3, 1, 4),  # HWIO: (kh, kw, in, out)
    "conv2": (3, 3, 4, 4),
    "dense": (4, 8),  # (in, out)
    "head": (8, 3),
}
# Units that AGC sees when the head is exempt: output channels / neurons of
# every other kernel, plus one unit per bias.
_NUM_UNITS_WITHOUT_HEAD = 4 + 1 + 4 + 1 + 8 + 1


class _CNN(nnx.Module):
  """Conv 3x3 (1->4) -> relu -> Conv 3x3 (4->4) -> relu -> mean-pool ->
  Linear (4->8) -> relu -> Linear (8->3), the last named ``head``."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, kernel_size=(3, 3), rngs=rngs)
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = jnp.mean(x, axis=(1, 2))  # global mean-pool: (N, H, W, C) -> (N, C)
    x = jax.nn.relu(self.dense(x))
    return self.head(x)


def _loss(model: _CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels."""
  log_probs = jax.nn.log_softmax(model(x))
  return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def _data(seed: int = 3) -> tuple[jax.Array, jax.Array]:
  """16 NHWC images 8x8x1 and labels in {0, 1, 2}."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((16, 8, 8, 1))
  y = rng.integers(0, 3, 16)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def _model() -> _CNN:
  # With this seed and _data(3), the first gradients clip some units of every
  # kernel and leave others alone (see the asserts in the tests).
  return _CNN(nnx.Rngs(5))


def _flat64(tree) -> dict[tuple[str, str], np.ndarray]:
  """``{(layer, 'kernel' | 'bias'): float64 array}`` of an nnx State or of
  a pure dict of the same structure."""
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return {(layer, name): np.asarray(value, np.float64)
          for layer, sub in tree.items() for name, value in sub.items()}


def _layout_axes(layer: str, name: str, shape: tuple[int, ...]):
  """Axes one AGC unit spans, derived from Flax's layouts (not from
  optaxclip's rank rules)."""
  if name == "bias":
    return (0,)  # a bias vector is one unit
  assert shape == _SHAPES[layer], (layer, shape)
  if layer.startswith("conv"):
    return (0, 1, 2)  # HWIO: kh, kw, in -> one unit per output channel
  return (0,)  # (in, out): in -> one unit per output neuron


def _wrong_axes(layer: str, name: str, shape: tuple[int, ...]):
  """Per-*input* units: what a layout mix-up would compute."""
  if name == "bias":
    return (0,)
  return (0, 1, 3) if layer.startswith("conv") else (1,)


def _reference_agc(grads: dict, params: dict, axes_fn=_layout_axes):
  """Float64 textbook AGC of every leaf in ``grads`` (a ``_flat64`` dict).

  Returns:
    ``({key: clipped}, number of clipped units, smallest relative distance of
    a unit's ||G_i|| / max(||W_i||, eps) from ``CLIPPING``)``; the last makes
    sure no unit sits so close to the threshold that float32 rounding could
    decide it.
  """
  keys = sorted(grads)
  axes_list = [axes_fn(*key, grads[key].shape) for key in keys]
  clipped, count = reference.adaptive_grad_clip(
      [grads[k] for k in keys], [params[k] for k in keys], CLIPPING, EPS,
      axes_list)
  margin = np.inf
  for key, axes in zip(keys, axes_list):
    g_norm = np.sqrt(np.sum(grads[key] ** 2, axis=axes))
    w_norm = np.sqrt(np.sum(params[key] ** 2, axis=axes))
    ratio = g_norm / np.maximum(w_norm, EPS)
    nonzero = ratio[g_norm > 0]
    if nonzero.size:
      margin = min(margin, float(np.min(np.abs(nonzero / CLIPPING - 1.0))))
  return dict(zip(keys, clipped)), count, margin


def _is_clipped(raw: np.ndarray, clipped: np.ndarray) -> bool:
  return not np.array_equal(raw, clipped)


def _not_head(path, _) -> bool:
  """Mask leaf: True (clip) for every param outside the ``head`` module."""
  return path[0] != jax.tree_util.DictKey("head")


def _mask_fn(params):
  # nnx.Optimizer calls tx.init with the nnx.State of Param variables and
  # tx.update with the pure nnx.State of arrays: in both the key path starts
  # with DictKey('<module name>').
  return jax.tree_util.tree_map_with_path(_not_head, params)


def _labels_fn(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: "agc" if _not_head(path, leaf) else "plain", params)


@nnx.jit
def _train_step(model, optimizer, x, y):
  grads = nnx.grad(_loss)(model, x, y)
  updates = helpers.nnx_optimizer_update(optimizer, model, grads)
  return grads, updates


def test_default_unit_axes_match_flax_layouts():
  x, y = _data()
  model = _model()
  params = nnx.state(model, nnx.Param)
  grads = nnx.grad(_loss)(model, x, y)
  assert isinstance(params, nnx.State) and isinstance(grads, nnx.State)

  tx = oc.adaptive_grad_clip(CLIPPING)
  # The nnx States go in as they are, Param variables and all.
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  got = _flat64(updates)

  raw, params64 = _flat64(grads), _flat64(params)
  assert set(got) == set(raw) == {
      (layer, name) for layer in _SHAPES for name in ("kernel", "bias")}
  want, want_count, margin = _reference_agc(raw, params64)
  assert margin > 1e-4
  for key in sorted(want):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-12,
                               err_msg=str(key))

  assert int(state.num_clipped_units) == want_count
  total_units = _NUM_UNITS_WITHOUT_HEAD + 3 + 1
  np.testing.assert_allclose(float(state.clipped_unit_fraction),
                             want_count / total_units, rtol=1e-6)

  # The test can fail: in every kernel some units are clipped and some are
  # not, so a wrong unit axis or a wrong threshold changes the result.
  assert 0 < want_count < total_units
  for layer, shape in _SHAPES.items():
    key = (layer, "kernel")
    unit_axes = _layout_axes(layer, "kernel", shape)
    changed = np.any(want[key] != raw[key], axis=unit_axes)
    assert changed.shape == (shape[-1],)
    assert 0 < changed.sum() < shape[-1], (layer, changed)
  # And per-input units (a layout mix-up) would give different updates.
  wrong, _, _ = _reference_agc(raw, params64, axes_fn=_wrong_axes)
  for layer in _SHAPES:
    key = (layer, "kernel")
    assert not np.allclose(wrong[key], want[key], rtol=1e-3), layer


def _check_step(grads, params_before, updates, params_after):
  """One optimizer step against SGD by hand: head on the raw gradient, every
  other layer on the float64 reference AGC. Returns the reference count of
  clipped units (head excluded)."""
  raw = _flat64(grads)
  got = _flat64(updates)
  after = _flat64(params_after)
  others = {k: v for k, v in raw.items() if k[0] != "head"}
  want, count, margin = _reference_agc(others, params_before)
  assert margin > 1e-4

  for key in sorted(raw):
    if key[0] == "head":
      expected = -LEARNING_RATE * raw[key]
    else:
      expected = -LEARNING_RATE * want[key]
    np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-12,
                               err_msg=str(key))
    # The model moved by those updates.
    np.testing.assert_allclose(after[key], params_before[key] + got[key],
                               rtol=1e-6, atol=1e-7, err_msg=str(key))

  # The exemption matters: AGC would have clipped the head's gradient.
  head = {k: v for k, v in raw.items() if k[0] == "head"}
  head_agc, head_count, _ = _reference_agc(head, params_before)
  assert head_count > 0
  assert any(_is_clipped(head[k], head_agc[k]) for k in head)
  # And AGC did act on the other layers, but not on all of their units.
  assert 0 < count < _NUM_UNITS_WITHOUT_HEAD
  return count


@pytest.mark.skipif(helpers.flax_version() < (0, 11),
                    reason="flax 0.10's Optimizer.update returns no updates")
def test_masked_agc_exempts_head_in_nnx_optimizer():
  x, y = _data()
  model = _model()
  tx = optax.chain(
      optax.masked(oc.adaptive_grad_clip(CLIPPING), _mask_fn),
      optax.sgd(LEARNING_RATE))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  counts = []
  for _ in range(NUM_STEPS):
    before = _flat64(nnx.state(model, nnx.Param))
    grads, updates = _train_step(model, optimizer, x, y)
    count = _check_step(grads, before, updates, nnx.state(model, nnx.Param))
    counts.append(count)

    stats = oc.clip_stats(optimizer.opt_state)
    assert set(stats) == {"adaptive_grad_clip/num_clipped_units",
                          "adaptive_grad_clip/clipped_unit_fraction"}
    for key, value in stats.items():
      assert isinstance(value, jax.Array), (key, type(value))
      assert not isinstance(value, nnx.Variable), (key, type(value))
      assert value.shape == ()
    num_clipped = stats["adaptive_grad_clip/num_clipped_units"]
    assert num_clipped.dtype == jnp.int32
    assert int(num_clipped) == count
    np.testing.assert_allclose(
        stats["adaptive_grad_clip/clipped_unit_fraction"],
        count / _NUM_UNITS_WITHOUT_HEAD, rtol=1e-6)

  assert int(optimizer.step[...]) == NUM_STEPS


@pytest.mark.skipif(helpers.flax_version() < (0, 11),
                    reason="flax 0.10's Optimizer.update returns no updates")
def test_multi_transform_agc_exempts_head_in_nnx_optimizer():
  x, y = _data()
  model = _model()
  tx = optax.multi_transform(
      {"agc": optax.chain(oc.adaptive_grad_clip(CLIPPING),
                          optax.sgd(LEARNING_RATE)),
       "plain": optax.sgd(LEARNING_RATE)},
      _labels_fn)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  before = _flat64(nnx.state(model, nnx.Param))
  grads, updates = _train_step(model, optimizer, x, y)
  count = _check_step(grads, before, updates, nnx.state(model, nnx.Param))

  stats = oc.clip_stats(optimizer.opt_state)
  assert isinstance(stats["adaptive_grad_clip/num_clipped_units"], jax.Array)
  assert int(stats["adaptive_grad_clip/num_clipped_units"]) == count
