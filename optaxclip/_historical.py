r"""Levanter's historical update-norm clipping.

Levanter (``stanford-crfm/levanter``, ``src/levanter/optim/clip_update_norm.py``,
``clip_update_by_historical_norm``) clips the global norm of the optimizer's
*update* to the mean plus a few standard deviations of the unclipped update
norms of the last ``window`` steps. It is a milder cousin of skipping bad
steps: a spike is scaled down to the edge of the recent distribution instead
of being dropped. Levanter places it after Adam and weight decay and before
the learning-rate scale.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _moments, _norms, _scale, _stats, _tree, _validate

_FN = "clip_by_historical_norm"
DEFAULT_WINDOW = 128
# Levanter's floor on the standard deviation: a flat history (every norm the
# same) still leaves sigmas * 1e-6 of headroom above its mean.
_MIN_STD = 1e-6


@_stats.register_state("clip_by_historical_norm", history=("historical_norms",))
class ClipByHistoricalNormState(NamedTuple):
  """State of :func:`clip_by_historical_norm`.

  Float fields have the accumulation dtype of the tree given to ``init``
  (float64 for float64 params under x64, float32 otherwise).
  """

  # float[window]: ring buffer of the most recent finite pre-clip norms; the
  # first historical_count slots hold norms (in ring order once it wrapped).
  historical_norms: jax.Array
  # int32 scalar: how many norms the buffer holds, at most window.
  historical_count: jax.Array
  # int32 scalar: the slot the next finite norm is written to.
  historical_index: jax.Array
  # float scalar: the last step's pre-clip global norm.
  historical_norm: jax.Array
  # float scalar: the last step's threshold, mean + sigmas * max(std, 1e-6)
  # of the buffer before that step; +inf while fewer than
  # max(2, window // 2) norms were recorded.
  historical_threshold: jax.Array
  # bool scalar: whether the last step was rescaled (norm > threshold, or
  # a non-finite norm).
  historical_clipped: jax.Array


def _historical_threshold(
  norms: jax.Array, count: jax.Array, sigmas: Any
) -> jax.Array:
  """The threshold a step is clipped to, from the buffer before that step.

  Args:
    norms: the ring buffer, float of shape ``(window,)``.
    count: int scalar, how many leading slots hold norms.
    sigmas: how many standard deviations above the mean.

  Returns:
    ``mean + sigmas * max(std, 1e-6)`` of the held norms (population std),
    or ``+inf`` while ``count < max(2, window // 2)``.
  """
  window = norms.shape[0]
  dtype = norms.dtype
  count = jnp.asarray(count).astype(jnp.int32)
  # skip_step's window statistics: two passes in power-of-two units, so
  # norms near the top of the dtype's range neither overflow nor round.
  mean, std = _moments.window_mean_std(norms, count)
  spread = jnp.asarray(sigmas).astype(dtype) * jnp.maximum(std, _MIN_STD)
  active = count >= max(2, window // 2)
  return jnp.where(active, mean + spread, jnp.full((), math.inf, dtype))


def clip_by_historical_norm(
  window: int | None = None,
  sigmas: Any = 3.0,
  *,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips the global norm to the mean plus ``sigmas`` std of recent norms.

  Levanter's ``clip_update_by_historical_norm``, step for step. With
  :math:`h` the unclipped global norms of the last ``window`` steps (before
  this one) and :math:`n_t` this step's norm:

  .. math::
    c_t = \operatorname{mean}(h) + \sigma \max(\operatorname{std}(h),
    10^{-6}), \qquad u_t \leftarrow u_t \min(1, c_t / n_t)

  with the population std, and no clipping while :math:`h` holds fewer than
  ``max(2, window // 2)`` norms. :math:`n_t` itself, not the clipped norm,
  then enters :math:`h`, so the threshold cannot collapse after a run of
  clipped steps. Levanter's placement is on the *update*:
  ``optax.chain(scale_by_adam(), add_decayed_weights(wd), <this>,
  scale(-lr))``. Non-finite norms give NaN updates and are not recorded;
  the scale rule is :func:`optaxclip.clip_by_global_norm`'s. Where this
  differs from Levanter (a non-finite norm; norms below 1e-6 with
  ``sigmas < 1``) is listed in docs/llm_stability.md ("Peer rules").

  Args:
    window: how many recent norms the statistics cover, an int >= 2;
      ``None`` means 128 (Levanter's ``rolling_interval_length``). Static:
      under ``optax.inject_hyperparams`` pass ``static_args=("window",)``.
    sigmas: :math:`\sigma \ge 0`, Levanter's ``sigma_factor`` (default 3).
      May be scheduled under ``optax.inject_hyperparams``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the update
      tree is split across (see :func:`optaxclip.global_norm`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByHistoricalNormState`.

  Raises:
    ValueError: for ``window < 2`` or a negative, NaN or non-scalar
      ``sigmas``.
    TypeError: for a non-integer or traced ``window``; from ``update``, for
      an integer or bool leaf, or ``state=None``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_by_historical_norm(window=4, sigmas=3.0)
    >>> state = tx.init({"u": jnp.zeros(1)})
    >>> for norm in (1.0, 3.0):  # two norms: mean 2, std 1
    ...   _, state = tx.update({"u": jnp.array([norm])}, state)
    >>> updates, state = tx.update({"u": jnp.array([10.0])}, state)
    >>> float(state.historical_threshold), updates["u"]  # 2 + 3 * 1
    (5.0, Array([5.], dtype=float32))

  References:
    Levanter, ``clip_update_by_historical_norm``
    (``src/levanter/optim/clip_update_norm.py``).
  """
  size = _validate.check_static_int_or(
    _FN, "window", window, DEFAULT_WINDOW, minimum=2
  )
  _validate.check_threshold(_FN, "sigmas", sigmas)

  def init_fn(params):
    dtype = _norms.tree_accumulation_dtype(params)
    return ClipByHistoricalNormState(
      historical_norms=jnp.zeros((size,), dtype),
      historical_count=jnp.zeros((), jnp.int32),
      historical_index=jnp.zeros((), jnp.int32),
      historical_norm=jnp.zeros((), dtype),
      historical_threshold=jnp.full((), math.inf, dtype),
      historical_clipped=jnp.zeros((), jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    state = _tree.history_state(_FN, updates, state)
    buffer = state.historical_norms
    count = state.historical_count
    index = state.historical_index
    norm = _norms.global_norm_from(updates, 2, axis_name).astype(buffer.dtype)
    observed = jax.lax.stop_gradient(norm)
    threshold = _historical_threshold(buffer, count, sigmas)
    scale, clipped = _scale.clip_scale(norm, threshold)
    updates = jax.tree.map(lambda u: _scale.scale_leaf(u, scale), updates)
    # Record the unclipped norm, as Levanter does; a non-finite one would
    # make every later mean NaN (never clip again), so it is left out.
    finite = jnp.isfinite(observed)
    slots = jnp.arange(size, dtype=jnp.int32)
    written = jnp.where(slots == index, observed, buffer)
    return updates, ClipByHistoricalNormState(
      historical_norms=jnp.where(finite, written, buffer),
      historical_count=jnp.where(finite, jnp.minimum(count + 1, size), count),
      historical_index=jnp.where(finite, (index + 1) % size, index),
      historical_norm=observed,
      historical_threshold=threshold,
      historical_clipped=clipped,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
