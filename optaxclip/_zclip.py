"""ZClip: z-score based adaptive clipping of gradient-norm spikes.

Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
arXiv:2504.02507. An exponential moving average of the global norm's mean
and variance flags spikes by their z-score; a spike is clipped to an
adaptive threshold below the running mean plus ``z_thresh`` standard
deviations. This module reproduces the authors' reference implementation
(``bluorion-com/ZClip``, ``zclip/zclip.py``) step for step, except where the
docstring of :func:`zclip` says otherwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _moments, _norms, _scale, _stats, _tree, _validate

_FN = "zclip"
DEFAULT_WARMUP_STEPS = 25


@_stats.register_state("zclip")
class ZClipState(NamedTuple):
  """State of :func:`zclip`."""

  # float[warmup_steps]: the norms recorded during warmup. The float dtype is
  # the accumulation dtype of the tree given to init (float64 for float64
  # params under x64, float32 otherwise); every float field shares it.
  zclip_buffer: jax.Array
  # int32 scalar: how many finite, nonzero norms were recorded; saturates at
  # 2**31 - 1 instead of wrapping (so warmup is never re-entered).
  zclip_count: jax.Array
  # float scalars: EMA of the norm's mean and standard deviation (0 during
  # warmup). The deviation is kept, not the variance: norms near 1e20 have a
  # variance beyond float32's range, and norms near 1e-30 one below it.
  zclip_mean: jax.Array
  zclip_std: jax.Array
  # float scalar: the last step's pre-clip global norm.
  zclip_norm: jax.Array
  # float scalar: the cap the last step was clipped to (inf: no cap).
  zclip_threshold: jax.Array
  # bool scalars: whether the last step was rescaled / flagged as a spike.
  zclip_clipped: jax.Array
  zclip_spike: jax.Array


def zclip(
  *,
  alpha: Any = 0.97,
  z_thresh: Any = 2.5,
  max_norm: Any | None = 1.0,
  eps: Any = 1e-6,
  warmup_steps: int | None = None,
  mode: str = "zscore",
  clip_option: str = "adaptive_scaling",
  clip_factor: Any = 1.0,
  skip_update_on_spike: bool = False,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips global-norm spikes detected by an EMA z-score (ZClip).

  During warmup (the first ``warmup_steps`` nonzero finite norms) the update
  is clipped by ``max_norm`` only, and the last warmup step sets the mean
  :math:`\mu` and standard deviation :math:`\sigma` from the buffer. Then:

  .. math::
    z = \frac{g - \mu}{\sigma + \epsilon}, \qquad
    \tau = \Bigl(\mu + \frac{z_{thresh}\,\sigma}{z / z_{thresh}}\Bigr)
      \cdot \mathrm{clip\_factor}

  A spike (:math:`z > z_{thresh}`) is clipped to :math:`\tau` (to
  :math:`\mu` with ``clip_option="mean"``), every update to ``max_norm``,
  and the EMAs take in :math:`x = \tau` on a spike, else :math:`x = g`:
  :math:`\mu \leftarrow \alpha\mu + (1 - \alpha)x`, then
  :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1 - \alpha)(x - \mu)^2`.
  This follows the authors' reference, quirks included; zero and non-finite
  norms are not fed to the statistics. Details: ``docs/transforms.md#zclip``.

  Args:
    alpha: EMA decay, in (0, 1).
    z_thresh: the z-score above which a norm is a spike, > 0.
    max_norm: a fixed cap on the global norm, >= 0; ``None`` disables it.
    eps: added to the standard deviation before dividing, >= 0.
    warmup_steps: nonzero norms collected before the EMA starts, an int >= 1;
      ``None`` means 25. Static under ``inject_hyperparams``.
    mode: ``"zscore"`` or ``"percentile"``.
    clip_option: ``"adaptive_scaling"`` or ``"mean"`` (``"zscore"`` mode).
    clip_factor: multiplies the adaptive threshold, >= 0.
    skip_update_on_spike: keep the statistics unchanged on spikes.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the update tree
      is split across (see :func:`optaxclip.global_norm`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ZClipState`.

  Raises:
    ValueError: for ``alpha`` outside (0, 1), ``z_thresh <= 0``, negative
      ``max_norm``/``eps``/``clip_factor``, ``warmup_steps < 1``, or an
      unknown ``mode``/``clip_option``; from ``update``, for ``state=None``.
    TypeError: from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.zclip(warmup_steps=3, max_norm=None)
    >>> state = tx.init({"g": jnp.zeros(1)})
    >>> for norm in (1.0, 1.2, 0.8, 1.1):  # warmup, then a normal step
    ...   updates, state = tx.update({"g": jnp.array([norm])}, state)
    >>> bool(state.zclip_spike), updates["g"]
    (False, Array([1.1], dtype=float32))
    >>> updates, state = tx.update({"g": jnp.array([10.0])}, state)  # spike
    >>> bool(state.zclip_spike), float(updates["g"][0]) < 2.0
    (True, True)

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025
  """
  _validate.check_in_range(
    _FN, "alpha", alpha, 0, 1, low_open=True, high_open=True
  )
  _validate.check_in_range(
    _FN, "z_thresh", z_thresh, 0, float("inf"), low_open=True, high_open=False
  )
  if max_norm is not None:
    _validate.check_threshold(_FN, "max_norm", max_norm)
  _validate.check_threshold(_FN, "eps", eps)
  _validate.check_threshold(_FN, "clip_factor", clip_factor)
  mode = _validate.check_choice(_FN, "mode", mode, ("zscore", "percentile"))
  clip_option = _validate.check_choice(
    _FN, "clip_option", clip_option, ("adaptive_scaling", "mean")
  )
  warmup = _validate.check_static_int_or(
    _FN, "warmup_steps", warmup_steps, DEFAULT_WARMUP_STEPS
  )

  def init_fn(params):
    dtype = _norms.tree_accumulation_dtype(params)
    zero = jnp.zeros((), dtype)
    false = jnp.zeros((), jnp.bool_)
    return ZClipState(
      zclip_buffer=jnp.zeros((warmup,), dtype),
      zclip_count=jnp.zeros((), jnp.int32),
      zclip_mean=zero,
      zclip_std=zero,
      zclip_norm=zero,
      zclip_threshold=zero,
      zclip_clipped=false,
      zclip_spike=false,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    state = _tree.history_state(_FN, updates, state)
    f32 = state.zclip_mean.dtype
    norm = _norms.global_norm_from(updates, 2, axis_name).astype(f32)
    g = jax.lax.stop_gradient(norm)
    finite = jnp.isfinite(g)
    # Only finite, nonzero norms are observations (see the docstring).
    observed = finite & (g > 0)
    count = state.zclip_count
    cap_fixed = (
      jnp.full((), jnp.inf, f32)
      if max_norm is None
      else jnp.asarray(max_norm).astype(f32)
    )
    a = jnp.asarray(alpha).astype(f32)
    zt = jnp.asarray(z_thresh).astype(f32)

    # Warmup: record the norm; the step that fills the buffer starts the EMA.
    in_warmup = count < warmup
    slot = jnp.minimum(count, warmup - 1)
    buffer = jnp.where(
      in_warmup & observed,
      state.zclip_buffer.at[slot].set(g),
      state.zclip_buffer,
    )
    fills = in_warmup & observed & (count == warmup - 1)
    # Population mean and std, taken in power-of-two units of the buffer.
    buffer_mean, buffer_std = _moments.window_mean_std(
      buffer, jnp.asarray(warmup, jnp.int32)
    )

    # After warmup: z-score, spike test, adaptive threshold.
    mean, std = state.zclip_mean, state.zclip_std
    denom = std + jnp.asarray(eps).astype(f32)
    positive = denom > 0
    z = jnp.where(
      positive,
      (g - mean) / jnp.where(positive, denom, 1),
      jnp.where(g > mean, jnp.inf, 0.0).astype(f32),
    )
    if mode == "zscore":
      spike = z > zt
      if clip_option == "adaptive_scaling":
        # z / z_thresh > 1 on a spike; elsewhere a dummy 1 keeps it finite.
        eta = jnp.where(spike, z / zt, jnp.ones_like(z))
        # zt / eta first: on a spike zt * std / eta < g - mean, while
        # zt * std alone may pass float32's range.
        tau = (mean + std * (zt / eta)) * jnp.asarray(clip_factor).astype(f32)
      else:
        tau = mean
    else:
      tau = mean + zt * std
      spike = g > tau
    # A zero mean holds no scale to judge a spike against (only reachable
    # from a state saved before zero norms were excluded): no spike.
    spike = spike & finite & ~in_warmup & (mean > 0)
    adaptive = jnp.where(spike, tau, g)
    cap = jnp.where(in_warmup, cap_fixed, jnp.minimum(adaptive, cap_fixed))
    new_mean = a * mean + (1 - a) * adaptive
    new_std = _ema_std(std, adaptive - new_mean, a)
    # Never feed a zero to the statistics: zero is absorbing (docstring).
    update_stats = observed & ~in_warmup & (adaptive > 0)
    if skip_update_on_spike:
      update_stats = update_stats & ~spike
    mean = jnp.where(
      fills, buffer_mean, jnp.where(update_stats, new_mean, mean)
    )
    std = jnp.where(fills, buffer_std, jnp.where(update_stats, new_std, std))

    scale, clipped = _scale.clip_scale(norm, cap)
    updates = jax.tree.map(lambda u: _scale.scale_leaf(u, scale), updates)
    return updates, ZClipState(
      zclip_buffer=buffer,
      zclip_count=jnp.where(observed, optax.safe_int32_increment(count), count),
      zclip_mean=mean,
      zclip_std=std,
      zclip_norm=g,
      zclip_threshold=cap,
      zclip_clipped=clipped,
      zclip_spike=spike,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _ema_std(std: jax.Array, deviation: jax.Array, a: jax.Array) -> jax.Array:
  """The root of the EMA variance, ``sqrt(a std**2 + (1 - a) deviation**2)``.

  Taken in units of a power of two ``u <= max(std, |deviation|) < 2u``: the
  squares stay below 4 (no overflow for norms near 1e20 and beyond), the
  larger one is at least 1 (no underflow for norms near 1e-30), and the
  scaling is exact.
  """
  _, exponent = jnp.frexp(jnp.maximum(std, jnp.abs(deviation)))
  unit, inverse = _moments.power_of_two_pair(exponent - 1, std.dtype)
  s, d = std * inverse, deviation * inverse
  return _norms.std_from_variance(a * (s * s) + (1 - a) * (d * d)) * unit
