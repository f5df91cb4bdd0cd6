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

from optaxclip import _norms, _stats, _tree, _validate

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
  # float scalars: EMA of the norm's mean and variance (0 during warmup).
  zclip_mean: jax.Array
  zclip_var: jax.Array
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

  **Warmup** (the first ``warmup_steps`` finite, nonzero norms; see below
  for zeros): each norm is recorded
  and the update is clipped by ``max_norm`` only (not at all with
  ``max_norm=None``). The step that fills the buffer sets the mean to the
  buffer's mean and the variance to its population variance.

  **After warmup**, with :math:`\sigma = \sqrt{\mathrm{var}}` and
  :math:`z = (g - \mu) / (\sigma + \epsilon)`:

  * ``mode="zscore"``: a spike is :math:`z > z_{thresh}`; its threshold is
    :math:`\tau = (\mu + z_{thresh}\sigma / (z / z_{thresh})) \cdot
    \mathrm{clip\_factor}` (``clip_option="adaptive_scaling"``) or
    :math:`\tau = \mu` (``"mean"``);
  * ``mode="percentile"``: a spike is :math:`g > \mu + z_{thresh}\sigma`, and
    :math:`\tau = \mu + z_{thresh}\sigma`;
  * the update is clipped to :math:`\min(\tau \text{ if spike else } g,
    \mathrm{max\_norm})` (without the ``max_norm`` term when it is None);
  * the statistics are updated with :math:`x = \tau` on a spike, else
    :math:`x = g`: :math:`\mu \leftarrow \alpha\mu + (1-\alpha)x`, then
    :math:`\mathrm{var} \leftarrow \alpha\,\mathrm{var} + (1-\alpha)(x -
    \mu_{new})^2` with the *new* mean -- unless ``skip_update_on_spike`` and
    the step was a spike.

  Quirks of the reference kept on purpose: ``clip_factor`` multiplies the
  whole adaptive threshold (not only the ``z_thresh * std`` term its
  docstring mentions) and is ignored by ``clip_option="mean"`` and by
  ``"percentile"`` mode; with the default ``max_norm=1.0`` a fixed cap of 1
  is always active as well, during and after warmup (pass ``max_norm=None``
  for purely adaptive clipping); the statistics are updated with the
  adaptive threshold, not with the ``max_norm``-capped value.

  Deviations, all for robustness: the scale is ``cap / g`` exactly (the
  reference divides by ``g + 1e-6``; the difference is below 1e-6 relative);
  non-finite norms give NaN updates (loud) and are neither recorded nor fed to
  the statistics (the reference would poison its EMA with NaN forever); with
  ``eps = 0`` and :math:`\sigma = 0`, :math:`z` is taken as ``+inf`` above
  the mean and 0 otherwise (the reference divides by zero). The threshold
  is a statistic of past norms and is not differentiated through.

  *Zero norms are not observations.* A global norm of exactly 0 means no
  gradient reached the parameters this step (a frozen or not-yet-used
  ``optax.multi_transform`` group, a fully masked batch, a step zeroed
  upstream); it says nothing about the scale of the gradients to come. The
  reference records it anyway, and that makes zero an absorbing state: a
  warmup of zeros gives :math:`\mu = \sigma = 0`, after which every nonzero
  norm has :math:`z \approx g / \epsilon > z_{thresh}`, its threshold is
  :math:`\tau = 0` (in every mode and clip option) and the EMA takes in
  :math:`x = \tau = 0` again, so every later update is zeroed forever. (A
  long run of zeros after warmup drives :math:`\mu` geometrically to the same
  state.) Here a zero norm passes through unchanged (it is zero; with
  :math:`g = 0` there is no spike), is not recorded in the warmup buffer, does
  not advance the count, and leaves :math:`\mu` and the variance as they
  were; likewise a spike whose threshold is 0 (``clip_factor=0``) is clipped
  to 0 but not fed to the statistics. So warmup ends only after
  ``warmup_steps`` nonzero norms, :math:`\mu > 0` from then on, and the
  adaptive threshold is always positive. Should the statistics still hold
  :math:`\mu = 0` (a state saved by an older version), no spike is flagged
  and the norm is fed to the EMA, which recovers. On sequences without zero
  norms this is exactly the reference. A zero *variance* with :math:`\mu >
  0` (a constant warmup, or ``warmup_steps=1``) is kept as the reference
  has it: norms above :math:`\mu` are spikes clipped to :math:`\mu` until
  a norm at or below it arrives and the variance becomes positive.

  The statistics are kept in the accumulation dtype of the tree given to
  ``init`` (float64 for float64 parameters under x64, so norms beyond the
  float32 range stay exact; float32 otherwise). The count saturates at
  ``2**31 - 1`` instead of wrapping, so warmup is never re-entered.

  Like every optaxclip transform, ``update`` raises a ``TypeError`` naming
  the leaf's path for an integer or bool leaf, and, since the state carries
  the statistics, a ``ValueError`` telling you to call ``init`` when given
  ``state=None``.

  Args:
    alpha: EMA decay, in (0, 1).
    z_thresh: the z-score above which a norm is a spike, > 0.
    max_norm: a fixed cap on the global norm, >= 0; ``None`` disables it.
    eps: added to the standard deviation before dividing, >= 0.
    warmup_steps: number of (nonzero) norms collected before the EMA starts,
      an int >= 1; ``None`` means 25. Static
      (``static_args=("warmup_steps",)`` under ``inject_hyperparams``).
    mode: ``"zscore"`` or ``"percentile"`` (case-insensitive).
    clip_option: ``"adaptive_scaling"`` or ``"mean"``; used in ``"zscore"``
      mode only, but validated always.
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
      unknown ``mode``/``clip_option``.

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
    <https://arxiv.org/abs/2504.02507>`_, 2025. Peer: the authors' PyTorch
    reference ``bluorion-com/ZClip``.
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
  warmup = (
    DEFAULT_WARMUP_STEPS
    if warmup_steps is None
    else (_validate.check_static_int(_FN, "warmup_steps", warmup_steps))
  )

  def init_fn(params):
    dtype = _norms.tree_accumulation_dtype(params)
    zero = jnp.zeros((), dtype)
    false = jnp.zeros((), jnp.bool_)
    return ZClipState(
      zclip_buffer=jnp.zeros((warmup,), dtype),
      zclip_count=jnp.zeros((), jnp.int32),
      zclip_mean=zero,
      zclip_var=zero,
      zclip_norm=zero,
      zclip_threshold=zero,
      zclip_clipped=false,
      zclip_spike=false,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _tree.require_state(_FN, state)
    _tree.check_float_leaves(_FN, updates)
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
    buffer_mean = jnp.mean(buffer)
    buffer_var = jnp.mean(jnp.square(buffer - buffer_mean))

    # After warmup: z-score, spike test, adaptive threshold.
    mean, var = state.zclip_mean, state.zclip_var
    std = _norms.std_from_variance(var)
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
        tau = (mean + zt * std / eta) * jnp.asarray(clip_factor).astype(f32)
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
    new_var = a * var + (1 - a) * jnp.square(adaptive - new_mean)
    # Never feed a zero to the statistics: zero is absorbing (docstring).
    update_stats = observed & ~in_warmup & (adaptive > 0)
    if skip_update_on_spike:
      update_stats = update_stats & ~spike
    mean = jnp.where(
      fills, buffer_mean, jnp.where(update_stats, new_mean, mean)
    )
    var = jnp.where(fills, buffer_var, jnp.where(update_stats, new_var, var))

    scale, clipped = _norms.clip_scale(norm, cap)
    updates = jax.tree.map(lambda u: _norms.scale_leaf(u, scale), updates)
    return updates, ZClipState(
      zclip_buffer=buffer,
      zclip_count=jnp.where(observed, optax.safe_int32_increment(count), count),
      zclip_mean=mean,
      zclip_var=var,
      zclip_norm=g,
      zclip_threshold=cap,
      zclip_clipped=clipped,
      zclip_spike=spike,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
