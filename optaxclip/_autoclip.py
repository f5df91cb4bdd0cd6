"""AutoClip: clip to a percentile of the history of gradient norms.

Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
Clipping for Source Separation Networks", MLSP 2020 (arXiv:2007.14469),
Algorithm 1: every step appends the current global norm to the history,
then clips the gradient's global norm to the ``percentile``-th percentile of
that history.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _scale, _stats, _tree, _validate

_FN = "autoclip"
DEFAULT_HISTORY_SIZE = 1000


@_stats.register_state("autoclip")
class AutoClipState(NamedTuple):
  """State of :func:`autoclip`."""

  # float[history_size]: the most recent finite global norms; filled from the
  # front, then shifted left (oldest out) once full. The float dtype is the
  # accumulation dtype of the tree given to init (float64 for float64 params
  # under x64, float32 otherwise); every float field below shares it.
  autoclip_history: jax.Array
  # int32 scalar: how many norms were appended (finite norms only). It
  # saturates at 2**31 - 1 instead of wrapping.
  autoclip_count: jax.Array
  # float scalar: the last step's pre-clip global norm.
  autoclip_norm: jax.Array
  # float scalar: the last step's threshold (percentile of the history).
  autoclip_threshold: jax.Array
  # bool scalar: whether the last step was rescaled.
  autoclip_clipped: jax.Array


def _history_percentile(
  history: jax.Array, num_valid: jax.Array, percentile: Any
) -> jax.Array:
  """``np.percentile(history[:num_valid], percentile)`` (linear), traceable.

  Invalid slots are pushed to the end by sorting them as ``+inf``; the
  interpolation is numpy's ``linear`` method, including its two-sided lerp.

  Args:
    history: float array of shape ``(size,)``.
    num_valid: int scalar, how many leading entries are valid (their order
      does not matter); ``0`` gives ``inf`` (no clipping).
    percentile: in [0, 100].

  Returns:
    A scalar of ``history``'s dtype.
  """
  size = history.shape[0]
  # int32 throughout: under x64 a bare arange is int64, which strict dtype
  # promotion refuses to compare with the int32 count.
  num_valid = jnp.asarray(num_valid).astype(jnp.int32)
  valid = jnp.arange(size, dtype=jnp.int32) < num_valid
  ordered = jnp.sort(jnp.where(valid, history, jnp.inf))
  last = jnp.maximum(num_valid - 1, 0)
  position = (
    jnp.asarray(percentile).astype(history.dtype) / 100
  ) * last.astype(history.dtype)
  lower = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, last)
  upper = jnp.minimum(lower + 1, last)
  weight = position - lower.astype(history.dtype)
  a, b = ordered[lower], ordered[upper]
  diff = b - a
  # numpy's _lerp: a + d t below t = 0.5, b - d (1 - t) from there (exact at
  # t = 1); the unused side is masked so inf - inf never reaches the output.
  safe_diff = jnp.where(jnp.isfinite(diff), diff, jnp.zeros_like(diff))
  value = jnp.where(
    weight >= 0.5, b - safe_diff * (1 - weight), a + safe_diff * weight
  )
  value = jnp.where(lower == upper, a, value)
  return jnp.where(num_valid > 0, value, jnp.full_like(value, jnp.inf))


def autoclip(
  percentile: Any = 10.0,
  *,
  history_size: int | None = None,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips the global norm to a percentile of all past global norms.

  Algorithm 1 of Seetharaman et al.: append the global norm :math:`n_t` to
  the history :math:`h`, then clip with the library's scale rule to

  .. math::
    c_t = \mathrm{percentile}(h, p) \quad \text{(linear, as np.percentile)}

  The history keeps the most recent ``history_size`` norms (the paper keeps
  all of them; the two agree for the first ``history_size`` steps).
  Non-finite norms are not appended, and the threshold is not
  differentiated through. ``percentile=100`` never clips. Details:
  ``docs/transforms.md#autoclip``.

  Args:
    percentile: p in [0, 100]; the paper's default is 10. May be scheduled
      under ``optax.inject_hyperparams``.
    history_size: how many recent norms the percentile is taken over, an int
      >= 1; ``None`` means 1000. Static: under ``inject_hyperparams`` pass
      ``static_args=("history_size",)``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the update tree
      is split across (see :func:`optaxclip.global_norm`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AutoClipState`.

  Raises:
    ValueError: for a percentile outside [0, 100] or ``history_size < 1``;
      from ``update``, for ``state=None``.
    TypeError: from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.autoclip(50.0, history_size=4)
    >>> state = tx.init({"g": jnp.zeros(1)})
    >>> for norm in (1.0, 3.0, 2.0):
    ...   updates, state = tx.update({"g": jnp.array([norm])}, state)
    >>> float(state.autoclip_threshold), updates["g"]  # median of 1, 3, 2
    (2.0, Array([2.], dtype=float32))
    >>> _, state = tx.update({"g": jnp.array([9.0])}, state)
    >>> float(state.autoclip_threshold), bool(state.autoclip_clipped)
    (2.5, True)

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
  """
  _validate.check_in_range(
    _FN, "percentile", percentile, 0, 100, low_open=False, high_open=False
  )
  size = _validate.check_static_int_or(
    _FN, "history_size", history_size, DEFAULT_HISTORY_SIZE
  )

  def init_fn(params):
    dtype = _norms.tree_accumulation_dtype(params)
    zero = jnp.zeros((), dtype)
    return AutoClipState(
      autoclip_history=jnp.zeros((size,), dtype),
      autoclip_count=jnp.zeros((), jnp.int32),
      autoclip_norm=zero,
      autoclip_threshold=zero,
      autoclip_clipped=jnp.zeros((), jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    state = _tree.history_state(_FN, updates, state)
    dtype = state.autoclip_history.dtype
    norm = _norms.global_norm_from(updates, 2, axis_name).astype(dtype)
    observed = jax.lax.stop_gradient(norm)
    finite = jnp.isfinite(observed)
    old = state.autoclip_history
    # Filling: write at the first free slot. Full: drop the oldest (front)
    # and append at the end. Either way the valid norms are the leading
    # min(count, size) entries, so the count is only ever compared with
    # size and may saturate without stopping the history from rolling.
    full = state.autoclip_count >= size
    filling = old.at[jnp.minimum(state.autoclip_count, size - 1)].set(observed)
    rolled = jnp.concatenate([old[1:], observed[None]])
    history = jnp.where(finite, jnp.where(full, rolled, filling), old)
    count = jnp.where(
      finite,
      optax.safe_int32_increment(state.autoclip_count),
      state.autoclip_count,
    )
    threshold = _history_percentile(
      history, jnp.minimum(count, size), percentile
    )
    scale, clipped = _scale.clip_scale(norm, threshold)
    updates = jax.tree.map(lambda u: _scale.scale_leaf(u, scale), updates)
    return updates, AutoClipState(
      autoclip_history=history,
      autoclip_count=count,
      autoclip_norm=observed,
      autoclip_threshold=threshold,
      autoclip_clipped=clipped,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
