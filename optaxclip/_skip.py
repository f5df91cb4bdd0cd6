"""Step skipping: drop a whole optimizer step on non-finite or spiking signals.

:func:`skip_step` wraps an optimizer and, instead of rescaling a bad gradient,
discards it: the step's updates are exact zeros and the wrapped optimizer's
state (moments, counters, schedules) does not move. A step is bad when its
global gradient norm is non-finite, above a fixed cap, or a spike relative to
the recent history of accepted norms (mean + k standard deviations over a
rolling window) -- and, when the training loop passes the step's loss as an
extra argument (``update(..., loss=loss)``), when that loss is non-finite or
a spike relative to the recent accepted losses (MaxText's and OLMo-core's
loss rule).

This is the loss-spike recipe of large-scale language-model training, where
rare huge gradients (bad batches, numerical blow-ups) do more harm through the
optimizer's moments than the single step they belong to.

:func:`skip_and_clip_by_global_norm` is axlearn's rule of the same family,
step for step: thresholds from bias-corrected EMAs of the norm of valid
steps, and a global-norm clip of the steps it keeps.

References:
  Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
  <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around loss
  spikes).
  Peers: MaxText ``skip_step_on_spikes``, OLMo-core ``SkipStepOptimizer``,
  Levanter ``SkipStepConfig``, axlearn ``skip_and_clip_by_global_norm``,
  ``optax.apply_if_finite``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _moments, _norms, _scale, _stats, _tree, _validate

# The rolling window of accepted norms when ``window=None`` (MaxText's
# ``skip_step_interval``).
DEFAULT_WINDOW = 128
# The loss rule's sigma factor (MaxText's ``skip_step_scaling_factor``,
# OLMo-core's ``sigma_factor``).
DEFAULT_LOSS_SPIKE_SIGMAS = 6.0


@_stats.register_state("skip_step", history=("accepted_norms", "loss_history"))
class SkipStepState(NamedTuple):
  """State of :func:`skip_step`: the inner state and what the last step did."""

  # The wrapped optimizer's state, unchanged by skipped steps.
  inner_state: Any
  # scalar float32 (float64 for float64 params): the last step's global L2
  # norm of the incoming gradients (before the inner optimizer).
  skip_norm: jax.Array
  # scalar bool: True when the last step was skipped (by any rule).
  step_skipped: jax.Array
  # scalar int32: how many steps were skipped in total.
  num_skipped: jax.Array
  # scalar int32: how many steps in a row were skipped up to the last one
  # (0 after an accepted step).
  num_consecutive_skipped: jax.Array
  # float[window], same dtype as skip_norm: ring buffer of the last `window`
  # recorded norms (finite norms of accepted steps; of every step with
  # record_skipped=True); entry i holds recorded norm number i + window * k.
  # Only the first min(num_accepted, window) entries are valid.
  accepted_norms: jax.Array
  # scalar int32: how many norms were recorded in accepted_norms.
  num_accepted: jax.Array
  # scalar, same dtype as skip_norm: the threshold the last step's norm was
  # compared with, min(max_norm, mean + spike_sigmas * std); inf when no
  # limit applied (no max_norm, and no spike rule or still in warmup).
  skip_threshold: jax.Array
  # scalar, same dtype as skip_norm: the loss passed to the last update that
  # had one (cast to this dtype); 0 before the first.
  skip_loss: jax.Array
  # scalar bool: True when the last step was skipped by the loss rule (a
  # non-finite loss, or a loss spike); False for steps without a loss.
  loss_skipped: jax.Array
  # float[loss_window], same dtype as skip_norm: ring buffer of the last
  # `loss_window` recorded losses (finite losses of accepted steps; of every
  # step with record_skipped=True), laid out like accepted_norms.
  loss_history: jax.Array
  # scalar int32: how many losses were recorded in loss_history.
  num_losses: jax.Array
  # scalar, same dtype as skip_norm: mean + loss_spike_sigmas * std of the
  # recorded losses at the last step that had a loss; inf while the loss
  # rule was inactive (warmup, or loss_spike_sigmas=None).
  loss_threshold: jax.Array


def _spread(sigmas: Any, std: jax.Array) -> jax.Array:
  """``sigmas * std``, with ``inf * 0 = inf`` (an infinite factor never
  flags a spike, even over a constant history)."""
  sigmas = jnp.asarray(sigmas).astype(std.dtype)
  return jnp.where(
    sigmas == math.inf, jnp.full_like(std, math.inf), sigmas * std
  )


def _record(history: jax.Array, count: jax.Array, value, record):
  """Writes ``value`` at the ring position of entry number ``count``."""
  index = count % history.shape[0]
  history = jnp.where(record, history.at[index].set(value), history)
  count = jnp.where(record, optax.safe_increment(count), count)
  return history, count


def _as_loss(fn: str, loss: Any, dtype: Any) -> jax.Array:
  """Checks the ``loss`` extra argument and casts it to the history dtype."""
  if isinstance(loss, (bool, np.bool_, str)):
    raise TypeError(
      f"{fn}: the loss extra argument (update(..., loss=...)) must be a real"
      f" scalar, got {loss!r} of type {type(loss).__name__}."
    )
  loss = jnp.asarray(loss)
  if not _validate.is_real_dtype(loss.dtype):
    raise TypeError(
      f"{fn}: the loss extra argument (update(..., loss=...)) must be a real"
      f" scalar, got an array of dtype {loss.dtype}."
    )
  if loss.ndim != 0:
    raise ValueError(
      f"{fn}: the loss extra argument (update(..., loss=...)) must be a"
      f" scalar, got an array of shape {loss.shape}. Pass the step's mean"
      " loss, e.g. loss=jnp.mean(per_example_losses)."
    )
  return loss.astype(dtype)


def _discard_if(skip, new_updates, old_inner_state, new_inner_state):
  """Zeros for the updates and the old inner state where ``skip`` holds."""
  # A select, not `updates * 0`: 0 * nan = nan.
  updates = jax.tree.map(
    lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates
  )
  inner_state = jax.tree.map(
    lambda old, new: jnp.where(skip, old, new), old_inner_state, new_inner_state
  )
  return updates, inner_state


def skip_step(
  inner: optax.GradientTransformation,
  *,
  max_norm: Any | None = None,
  spike_sigmas: Any | None = None,
  window: int | None = None,
  warmup_steps: int | None = None,
  skip_nonfinite: bool = True,
  loss_spike_sigmas: Any | None = DEFAULT_LOSS_SPIKE_SIGMAS,
  loss_window: int | None = None,
  loss_warmup_steps: int | None = None,
  record_skipped: bool = False,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer so that bad steps are skipped entirely.

  Step :math:`t` is skipped when a clause whose argument is set holds, with
  :math:`n_t` the global L2 norm, :math:`\mu_t, \sigma_t` the mean and
  population std of the last ``window`` accepted norms (:math:`A_t` so far),
  and for ``update(..., loss=loss)`` :math:`m_t, s_t` the mean and sample std
  of the last ``loss_window`` recorded losses (:math:`L_t` so far):

  .. math::
    \neg\mathrm{isfinite}(n_t) \lor n_t > c \lor
    (A_t \ge w_0 \land n_t > \mu_t + k\sigma_t) \lor
    \neg\mathrm{isfinite}(\ell_t) \lor
    (L_t \ge v_0 \land \ell_t - m_t > k_\ell s_t)

  A skipped step returns exact zeros and leaves ``inner``'s state
  bit-identical; only accepted, finite values enter the histories unless
  ``record_skipped=True``. Peers, decisions: ``docs/transforms.md#skip-step``.

  Args:
    inner: the optimizer to wrap; extra arguments (``loss`` too) reach it.
    max_norm: :math:`c`; ``None`` (default) disables the cap.
    spike_sigmas: :math:`k > 0`; ``None`` (default) disables the norm rule.
    window: accepted norms in the statistics; ``None`` means 128. Static.
    warmup_steps: :math:`w_0`; ``None`` means ``window``. Static.
    skip_nonfinite: skip steps whose norm or loss is NaN or inf (default).
    loss_spike_sigmas: :math:`k_\ell > 0`, default 6.0 (MaxText); ``None``
      keeps only the loss's finiteness check.
    loss_window: losses in the statistics; ``None`` means ``window``. Static.
    loss_warmup_steps: :math:`v_0`; ``None`` means
      ``max(1, loss_window // 2 - 1)``, as MaxText. Static.
    record_skipped: also record skipped steps' finite values (MaxText's
      rule): a lasting shift becomes the baseline, but repeated spikes
      widen the statistics and then pass (see the docs).
    axis_name: the mapped axis the gradients are split across (``psum``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipStepState`.

  Raises:
    TypeError: for a non-transformation ``inner`` or a non-static size; from
      ``update``, for an integer or bool leaf or a non-real ``loss``.
    ValueError: for a negative or NaN ``max_norm``, non-positive or NaN
      sigmas, or sizes below 1; from ``update``, for ``state=None`` or a
      non-scalar ``loss``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optaxclip as oc
    >>> tx = oc.skip_step(optax.sgd(1.0), max_norm=10.0)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
    >>> updates["w"], bool(state.step_skipped), float(state.skip_norm)
    (Array([0., 0.], dtype=float32), True, 50.0)

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022
  """
  fn = "skip_step"
  _validate.check_inner(fn, inner)
  if max_norm is not None:
    _validate.check_threshold(fn, "max_norm", max_norm)
  for name, sigmas in (
    ("spike_sigmas", spike_sigmas),
    ("loss_spike_sigmas", loss_spike_sigmas),
  ):
    if sigmas is None:
      continue
    value = _validate.check_real(fn, name, sigmas)
    if value is not None and value <= 0:
      rule = (
        "the spike rule" if name == "spike_sigmas" else "the loss spike rule"
      )
      raise ValueError(
        f"{fn}: {name} must be a positive scalar (0 < {name} <= inf) or None"
        f" to disable {rule}, got {sigmas!r}."
      )
  window = _validate.check_static_int_or(fn, "window", window, DEFAULT_WINDOW)
  warmup_steps = _validate.check_static_int_or(
    fn, "warmup_steps", warmup_steps, window
  )
  loss_window = _validate.check_static_int_or(
    fn, "loss_window", loss_window, window
  )
  loss_warmup_steps = _validate.check_static_int_or(
    fn, "loss_warmup_steps", loss_warmup_steps, max(1, loss_window // 2 - 1)
  )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    dtype = _norms.tree_accumulation_dtype(params)
    zero = jnp.zeros((), jnp.int32)
    return SkipStepState(
      inner_state=inner.init(params),
      skip_norm=jnp.zeros((), dtype),
      step_skipped=jnp.zeros((), jnp.bool_),
      num_skipped=zero,
      num_consecutive_skipped=zero,
      accepted_norms=jnp.zeros((window,), dtype),
      num_accepted=zero,
      skip_threshold=jnp.full((), math.inf, dtype),
      skip_loss=jnp.zeros((), dtype),
      loss_skipped=jnp.zeros((), jnp.bool_),
      loss_history=jnp.zeros((loss_window,), dtype),
      num_losses=zero,
      loss_threshold=jnp.full((), math.inf, dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    state = _tree.history_state(fn, updates, state, inner="inner_state")
    dtype = state.skip_norm.dtype
    inf = jnp.full((), math.inf, dtype)
    norm = _norms.global_norm_from(updates, 2, axis_name).astype(dtype)
    finite = jnp.isfinite(norm)

    threshold = inf
    if max_norm is not None:
      threshold = jnp.minimum(threshold, jnp.asarray(max_norm).astype(dtype))
    if spike_sigmas is not None:
      mean, std = _moments.window_mean_std(
        state.accepted_norms, state.num_accepted
      )
      warmed_up = state.num_accepted >= warmup_steps
      threshold = jnp.minimum(
        threshold, jnp.where(warmed_up, mean + _spread(spike_sigmas, std), inf)
      )

    # Only finite norms are compared: a non-finite one is skipped iff
    # skip_nonfinite (inf must not slip in via max_norm when the user asked
    # for non-finite steps to go through). A finite step is accepted only if
    # `norm <= threshold` *holds*: a NaN threshold (a traced max_norm or
    # spike_sigmas gone NaN) compares False and skips, where `norm >
    # threshold` would have accepted everything. A negative threshold skips
    # every step too (norms are >= 0).
    skip = finite & jnp.logical_not(norm <= threshold)
    if skip_nonfinite:
      skip = skip | ~finite

    loss = extra_args.get("loss")
    if loss is not None:
      loss = _as_loss(fn, loss, dtype)
      if axis_name is not None:
        # One decision on every device: per-device losses would let the
        # replicas' states drift apart.
        loss = jax.lax.pmean(loss, axis_name)
      loss_finite = jnp.isfinite(loss)
      loss_threshold = inf
      loss_skip = jnp.zeros((), jnp.bool_)
      if loss_spike_sigmas is not None:
        loss_mean, loss_std = _moments.window_mean_std(
          state.loss_history, state.num_losses, ddof=1
        )
        spread = _spread(loss_spike_sigmas, loss_std)
        active = state.num_losses >= loss_warmup_steps
        loss_threshold = jnp.where(active, loss_mean + spread, inf)
        # MaxText's form, `loss - mean <= k * std`, must *hold* to accept
        # (a traced NaN factor skips, as for the norm rule).
        loss_skip = (
          active & loss_finite & jnp.logical_not(loss - loss_mean <= spread)
        )
      if skip_nonfinite:
        loss_skip = loss_skip | ~loss_finite
      skip = skip | loss_skip

    new_updates, new_inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    new_updates, new_inner_state = _discard_if(
      skip, new_updates, state.inner_state, new_inner_state
    )

    keep = jnp.ones((), jnp.bool_) if record_skipped else ~skip
    accepted_norms, num_accepted = _record(
      state.accepted_norms, state.num_accepted, norm, keep & finite
    )
    if loss is None:
      skip_loss, loss_skipped = state.skip_loss, jnp.zeros((), jnp.bool_)
      loss_history, num_losses = state.loss_history, state.num_losses
      loss_threshold = state.loss_threshold
    else:
      skip_loss, loss_skipped = loss, loss_skip
      loss_history, num_losses = _record(
        state.loss_history, state.num_losses, loss, keep & loss_finite
      )
    zero = jnp.zeros((), jnp.int32)
    return new_updates, SkipStepState(
      inner_state=new_inner_state,
      skip_norm=norm,
      step_skipped=skip,
      num_skipped=jnp.where(
        skip, optax.safe_increment(state.num_skipped), state.num_skipped
      ),
      num_consecutive_skipped=jnp.where(
        skip, optax.safe_increment(state.num_consecutive_skipped), zero
      ),
      accepted_norms=accepted_norms,
      num_accepted=num_accepted,
      skip_threshold=threshold,
      skip_loss=skip_loss,
      loss_skipped=loss_skipped,
      loss_history=loss_history,
      num_losses=num_losses,
      loss_threshold=loss_threshold,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# axlearn's skip_and_clip_by_global_norm -------------------------------------

# axlearn's default multipliers of both drop-norm rules.
_DROP_MULTIPLIERS = (20, 40, 100)
# drop_norm_by_grad_norm_stddev: the statistics needed before it drops, and
# the threshold it uses until then (a finite 1e10, not inf: axlearn drops
# norms of 1e10 and more even while it collects statistics).
_DROP_MIN_COUNT = 500
_DROP_WARMUP_THRESHOLD = 1e10
_DROP_RULES = ("mean", "stddev")


@_stats.register_state("skip_and_clip_by_global_norm")
class SkipAndClipByGlobalNormState(NamedTuple):
  """State of :func:`skip_and_clip_by_global_norm` (axlearn's SkipClipState).

  Float fields have the accumulation dtype of the tree given to ``init``.
  """

  # The wrapped optimizer's state, unchanged by dropped steps.
  drop_inner_state: Any
  # float scalar: the last step's global L2 norm, before clipping.
  drop_grad_norm: jax.Array
  # bool scalar: whether the last step was dropped (axlearn's not is_valid).
  drop_skipped: jax.Array
  # int32 scalar: dropped steps so far (axlearn's nonvalid_count).
  drop_num_nonvalid: jax.Array
  # int32 scalar: valid steps folded into the EMAs (axlearn's count).
  drop_count: jax.Array
  # float scalar: bias-corrected EMA of valid steps' norms; 1 before any.
  drop_norm_ema: jax.Array
  # float scalar: the same EMA of the squared norms; 1 before any.
  drop_norm_square_ema: jax.Array
  # float scalar: drop_norm_square_ema - drop_norm_ema**2, kept by its own
  # recursion (never negative, no cancellation); 0 before any valid step.
  drop_norm_variance: jax.Array
  # dict[str, float scalar]: the thresholds the last step's norm was
  # compared with, by axlearn's names ("20x_mean", "20x_stddev", ...).
  drop_thresholds: dict
  # dict[str, int32 scalar]: per threshold, how many steps had a norm at or
  # above it ("count_exceeds_20x_mean", ...: axlearn's drop_stats).
  drop_exceed_counts: dict
  # float scalar: the last step's clip factor min(1, max_norm / norm); 1
  # without max_norm.
  drop_clip_scale: jax.Array


def _mean_rule(multipliers):
  """axlearn's ``drop_norm_by_grad_norm_ema``: multiples of the EMA."""

  def thresholds(*, count, mean, stddev):
    del count, stddev
    return {f"{v}x_mean": mean * v for v in multipliers}

  return thresholds


def _stddev_rule(multipliers, min_count):
  """axlearn's ``drop_norm_by_grad_norm_stddev``: mean + k std, after
  ``min_count`` valid steps (1e10 before)."""

  def thresholds(*, count, mean, stddev):
    early = jnp.full_like(mean, _DROP_WARMUP_THRESHOLD)
    return {
      f"{v}x_stddev": jnp.where(count < min_count, early, mean + stddev * v)
      for v in multipliers
    }

  return thresholds


def _norm_moments(norm, ema, square_ema, variance, count, decay):
  """One bias-corrected EMA step (Shazeer and Stern 2018, Sec. 7.1).

  The effective decay is ``decay * (1 - decay**c) / (1 - decay**(c + 1))``
  for ``c`` earlier valid steps: 0 on the first, so the initial EMA of 1 is
  forgotten at once, and ``decay`` in the limit. The variance of the
  weighted norms, ``square_ema - ema**2`` in exact arithmetic, follows
  ``d * (variance + (1 - d) * (norm - ema)**2)``: the difference itself
  loses every digit when the norms are nearly constant.
  """
  dtype = ema.dtype
  decay = jnp.asarray(decay).astype(dtype)
  c = count.astype(dtype)
  d = decay * (1 - decay**c) / (1 - decay ** (c + 1))
  deviation = norm - ema
  return (
    d * ema + (1 - d) * norm,
    d * square_ema + (1 - d) * norm * norm,
    d * (variance + (1 - d) * deviation * deviation),
  )


def _check_multipliers(fn: str, multipliers: Any) -> tuple:
  if isinstance(multipliers, (int, float)) or not multipliers:
    raise ValueError(
      f"{fn}: drop_multipliers must be a non-empty tuple of positive numbers,"
      f" got {multipliers!r}."
    )
  for v in multipliers:
    value = _validate.check_real(fn, "drop_multipliers", v)
    if value is None or not value > 0:
      raise ValueError(
        f"{fn}: drop_multipliers must hold positive static numbers, got"
        f" {multipliers!r}."
      )
  return tuple(multipliers)


def skip_and_clip_by_global_norm(
  inner: optax.GradientTransformation,
  *,
  drop_norm: Any = None,
  max_norm: Any | None = None,
  grad_norm_ema_decay: Any | None = None,
  drop_multipliers: tuple | None = None,
  drop_min_count: int | None = None,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""axlearn's ``skip_and_clip_by_global_norm``: drop, else clip, then step.

  With :math:`n_t` the global norm and :math:`\mu_t, \nu_t` bias-corrected
  EMAs of the norms and squared norms of earlier *valid* steps
  (:math:`s_t = \sqrt{\nu_t - \mu_t^2}`), step :math:`t` is dropped (zero
  updates, ``inner``'s state untouched) when :math:`n_t` is non-finite or
  :math:`n_t \ge \tau` for any threshold :math:`\tau`:

  .. math::
    \tau = \text{drop\_norm}, \quad \tau_k = k\,\mu_t \;(\texttt{"mean"}),
    \quad \tau_k = \mu_t + k\,s_t \;(\texttt{"stddev"}; 10^{10}
    \text{ before } \texttt{drop\_min\_count} \text{ valid steps})

  Otherwise the gradients are clipped to ``max_norm`` and passed to
  ``inner``; only valid steps advance the EMAs, and every threshold keeps
  its own exceed counter. Switching from axlearn and the two deviations
  (an exact clip without ``eps``; the variance kept without cancellation) are
  in docs/llm_stability.md ("Peer rules").

  Args:
    inner: the optimizer to wrap (extra arguments reach it).
    drop_norm: a fixed threshold; ``"mean"`` (axlearn's
      ``drop_norm_by_grad_norm_ema``) or ``"stddev"``
      (``drop_norm_by_grad_norm_stddev``); a callable ``(*, count, mean,
      stddev) -> dict[str, threshold]`` as in axlearn; ``None``: only
      non-finite norms drop.
    max_norm: the clip threshold for valid steps; ``None``: no clipping.
    grad_norm_ema_decay: the EMA decay in [0, 1); required by the rules.
    drop_multipliers: the rules' :math:`k`; ``None`` means (20, 40, 100).
    drop_min_count: ``"stddev"``'s warm-up; ``None`` means 500. Static.
    axis_name: the mapped axis the gradients are split across (``psum``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipAndClipByGlobalNormState`.

  Raises:
    TypeError: for a non-transformation ``inner`` or a traced
      ``drop_min_count``; from ``update``, for an integer or bool leaf.
    ValueError: for an invalid threshold, decay or multiplier, an unknown
      rule, or a rule without ``grad_norm_ema_decay``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optaxclip as oc
    >>> tx = oc.skip_and_clip_by_global_norm(
    ...   optax.sgd(1.0), drop_norm="mean", grad_norm_ema_decay=0.9,
    ...   drop_multipliers=(10,), max_norm=4.0)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> u, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    >>> u["w"], float(state.drop_norm_ema)  # clipped to 4; EMA = 5
    (Array([-2.4, -3.2], dtype=float32), 5.0)
    >>> u, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
    >>> u["w"], bool(state.drop_skipped)  # 50 >= 10 x 5: dropped
    (Array([0., 0.], dtype=float32), True)

  References:
    axlearn, ``skip_and_clip_by_global_norm``
    (``axlearn/common/optimizers.py``).
  """
  fn = "skip_and_clip_by_global_norm"
  _validate.check_inner(fn, inner)
  if max_norm is not None:
    _validate.check_threshold(fn, "max_norm", max_norm)
  if grad_norm_ema_decay is not None:
    _validate.check_in_range(
      fn,
      "grad_norm_ema_decay",
      grad_norm_ema_decay,
      0.0,
      1.0,
      low_open=False,
      high_open=True,
    )
  multipliers = (
    _DROP_MULTIPLIERS
    if drop_multipliers is None
    else _check_multipliers(fn, drop_multipliers)
  )
  min_count = _validate.check_static_int_or(
    fn, "drop_min_count", drop_min_count, _DROP_MIN_COUNT, minimum=0
  )
  if isinstance(drop_norm, str):
    rule = _validate.check_choice(fn, "drop_norm", drop_norm, _DROP_RULES)
    thresholds_fn = (
      _mean_rule(multipliers)
      if rule == "mean"
      else _stddev_rule(multipliers, min_count)
    )
  elif callable(drop_norm):
    thresholds_fn = drop_norm
  else:
    thresholds_fn = None
    if drop_norm is not None:
      _validate.check_threshold(fn, "drop_norm", drop_norm)
  if thresholds_fn is not None and grad_norm_ema_decay is None:
    raise ValueError(
      f"{fn}: drop_norm={drop_norm!r} sets its thresholds from EMAs of the"
      " gradient norm and needs grad_norm_ema_decay (in [0, 1), e.g. 0.99),"
      " as in axlearn."
    )
  inner = optax.with_extra_args_support(inner)

  def thresholds(count, mean, stddev):
    if thresholds_fn is not None:
      found = thresholds_fn(count=count, mean=mean, stddev=stddev)
      return {k: jnp.asarray(v).astype(mean.dtype) for k, v in found.items()}
    if drop_norm is None:
      return {}
    return {"drop_norm": jnp.asarray(drop_norm).astype(mean.dtype)}

  def init_fn(params):
    dtype = _norms.tree_accumulation_dtype(params)
    one = jnp.ones((), dtype)
    zero = jnp.zeros((), jnp.int32)
    names = thresholds(zero, one, one)
    return SkipAndClipByGlobalNormState(
      drop_inner_state=inner.init(params),
      drop_grad_norm=jnp.zeros((), dtype),
      drop_skipped=jnp.zeros((), jnp.bool_),
      drop_num_nonvalid=zero,
      drop_count=zero,
      # axlearn starts both EMAs at 1 so no threshold is 0 on the first step.
      drop_norm_ema=one,
      drop_norm_square_ema=one,
      drop_norm_variance=jnp.zeros((), dtype),
      drop_thresholds={k: jnp.full((), math.inf, dtype) for k in names},
      drop_exceed_counts={f"count_exceeds_{k}": zero for k in names},
      drop_clip_scale=one,
    )

  def update_fn(updates, state, params=None, **extra_args):
    state = _tree.history_state(fn, updates, state, inner="drop_inner_state")
    ema, square_ema = state.drop_norm_ema, state.drop_norm_square_ema
    norm = _norms.global_norm_from(updates, 2, axis_name).astype(ema.dtype)
    observed = jax.lax.stop_gradient(norm)
    # A finite tree has a finite norm here (the kernel rescues overflowing
    # sums), so the norm alone tells whether every element is finite.
    valid = jnp.isfinite(observed)
    # axlearn takes sqrt(square_ema - ema**2): all rounding error for
    # near-constant norms, and NaN when it rounds negative (after which the
    # stddev rule drops every step). The variance has its own recursion.
    variance = state.drop_norm_variance
    stddev = _norms.std_from_variance(variance)
    limits = thresholds(state.drop_count, ema, stddev)
    exceed_counts = {}
    for name, limit in limits.items():
      # `<` must hold to pass: a NaN threshold or norm drops (as axlearn).
      below = observed < limit
      valid = valid & below
      key = f"count_exceeds_{name}"
      count = state.drop_exceed_counts[key]
      exceed_counts[key] = jnp.where(
        below, count, optax.safe_int32_increment(count)
      )
    drop = jnp.logical_not(valid)

    scale = jnp.ones_like(norm)
    if max_norm is not None:
      scale, _ = _scale.clip_scale(norm, max_norm)
      updates = jax.tree.map(lambda u: _scale.scale_leaf(u, scale), updates)
    new_updates, new_inner_state = inner.update(
      updates, state.drop_inner_state, params, **extra_args
    )
    new_updates, new_inner_state = _discard_if(
      drop, new_updates, state.drop_inner_state, new_inner_state
    )

    if grad_norm_ema_decay is not None:
      moments = _norm_moments(
        observed,
        ema,
        square_ema,
        variance,
        state.drop_count,
        grad_norm_ema_decay,
      )
      ema, square_ema, variance = (
        jnp.where(valid, new, old)
        for new, old in zip(moments, (ema, square_ema, variance))
      )
    return new_updates, SkipAndClipByGlobalNormState(
      drop_inner_state=new_inner_state,
      drop_grad_norm=observed,
      drop_skipped=drop,
      drop_num_nonvalid=jnp.where(
        valid,
        state.drop_num_nonvalid,
        optax.safe_int32_increment(state.drop_num_nonvalid),
      ),
      drop_count=jnp.where(
        valid,
        optax.safe_int32_increment(state.drop_count),
        state.drop_count,
      ),
      drop_norm_ema=ema,
      drop_norm_square_ema=square_ema,
      drop_norm_variance=variance,
      drop_thresholds=limits,
      drop_exceed_counts=exceed_counts,
      drop_clip_scale=jax.lax.stop_gradient(scale),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
