"""Step skipping: drop a whole optimizer step on non-finite or spiking norms.

:func:`skip_step` wraps an optimizer and, instead of rescaling a bad gradient,
discards it: the step's updates are exact zeros and the wrapped optimizer's
state (moments, counters, schedules) does not move. A step is bad when its
global gradient norm is non-finite, above a fixed cap, or a spike relative to
the recent history of accepted norms (mean + k standard deviations over a
rolling window).

This is the loss-spike recipe of large-scale language-model training, where
rare huge gradients (bad batches, numerical blow-ups) do more harm through the
optimizer's moments than the single step they belong to.

References:
  Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
  <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around loss
  spikes).
  Peers: MaxText ``skip_step_on_spikes``, Levanter ``SkipStepConfig``,
  axlearn ``skip_and_clip_by_global_norm``, ``optax.apply_if_finite``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _stats, _tree, _validate

# The rolling window of accepted norms when ``window=None`` (MaxText's
# ``skip_step_interval``).
DEFAULT_WINDOW = 128


@_stats.register_state("skip_step")
class SkipStepState(NamedTuple):
  """State of :func:`skip_step`: the inner state and what the last step did."""

  # The wrapped optimizer's state, unchanged by skipped steps.
  inner_state: Any
  # scalar float32 (float64 for float64 params): the last step's global L2
  # norm of the incoming gradients (before the inner optimizer).
  skip_norm: jax.Array
  # scalar bool: True when the last step was skipped.
  step_skipped: jax.Array
  # scalar int32: how many steps were skipped in total.
  num_skipped: jax.Array
  # scalar int32: how many steps in a row were skipped up to the last one
  # (0 after an accepted step).
  num_consecutive_skipped: jax.Array
  # float[window], same dtype as skip_norm: ring buffer of the last `window`
  # accepted finite norms; entry i holds accepted norm number
  # i + window * k. Only the first min(num_accepted, window) entries are valid.
  accepted_norms: jax.Array
  # scalar int32: how many norms were recorded in accepted_norms (accepted
  # steps with a finite norm).
  num_accepted: jax.Array
  # scalar, same dtype as skip_norm: the threshold the last step's norm was
  # compared with, min(max_norm, mean + spike_sigmas * std); inf when no
  # limit applied (no max_norm, and no spike rule or still in warmup).
  skip_threshold: jax.Array


def _rolling_mean_std(
  accepted_norms: jax.Array, num_accepted: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Population mean and std of the valid entries of the ring buffer."""
  window = accepted_norms.shape[0]
  num_valid = jnp.minimum(num_accepted, window)
  valid = jnp.arange(window) < num_valid
  count = jnp.maximum(num_valid, 1).astype(accepted_norms.dtype)
  zeros = jnp.zeros_like(accepted_norms)
  mean = jnp.sum(jnp.where(valid, accepted_norms, zeros)) / count
  # Two passes (mean, then squared deviations): no cancellation when the
  # norms are large and nearly constant.
  deviations = jnp.where(valid, accepted_norms - mean, zeros)
  std = _norms.std_from_variance(jnp.sum(deviations * deviations) / count)
  return mean, std


def skip_step(
  inner: optax.GradientTransformation,
  *,
  max_norm: Any | None = None,
  spike_sigmas: Any | None = None,
  window: int | None = None,
  warmup_steps: int | None = None,
  skip_nonfinite: bool = True,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer so that bad steps are skipped entirely.

  The global L2 norm :math:`n_t` of the incoming gradients is computed once
  (with :func:`optaxclip.global_norm`'s kernel). Step :math:`t` is skipped
  when

  .. math::
    \neg\,\mathrm{isfinite}(n_t) \;\lor\; n_t > c \;\lor\;
    \big(A_t \ge w_0 \,\land\, n_t > \mu_t + k\,\sigma_t\big)

  where :math:`c` is ``max_norm``, :math:`k` is ``spike_sigmas``,
  :math:`\mu_t, \sigma_t` are the population mean and standard deviation of
  the last ``window`` *accepted* norms, :math:`A_t` is the number of norms
  accepted so far and :math:`w_0` is ``warmup_steps``. Each clause applies
  only when its argument is set.

  On a skipped step the updates are exact zeros (``jnp.zeros_like``, so NaN
  or inf gradients cannot leak through as ``0 * nan``) and ``inner``'s state
  is returned bit-identical; the norm is *not* added to the rolling history,
  so one spike cannot inflate the threshold that should catch the next one.
  On an accepted step ``inner`` runs exactly as it would unwrapped. ``inner``
  is evaluated every step and its result discarded on skipped steps (a
  leaf-wise select rather than ``lax.cond``, so it works under ``vmap`` and
  with any state structure), which costs one elementwise optimizer update --
  small next to the backward pass.

  Compared with ``optax.apply_if_finite(inner, max_consecutive_errors)``:
  that wrapper only reacts to NaN/inf *elements* in the updates (it tests
  ``jnp.isfinite`` of every element, not a norm), also returns zero updates
  (``optax.tree.zeros_like``) and keeps the inner state, but after more than
  ``max_consecutive_errors`` consecutive non-finite steps it gives up and
  passes the non-finite updates to ``inner``, corrupting its state. Its state
  counts ``notfinite_count`` (consecutive), ``total_notfinite`` and
  ``last_finite``. ``skip_step`` never gives up, also skips finite spikes
  (``max_norm``, ``spike_sigmas``) and logs the norm and threshold. Because
  it tests the float32-accumulated norm, a finite gradient whose norm
  overflows float32 (elements around ``1e19`` or larger) also counts as
  non-finite.

  Decisions where the rule leaves room:

  * comparisons are strict (a norm equal to the threshold is accepted), as in
    :func:`optaxclip.clip_by_global_norm`;
  * with ``skip_nonfinite=False``, a non-finite norm is never skipped, by
    any rule: the step goes to ``inner`` and its NaNs surface loudly (the
    library's default for non-finite inputs); such norms are not recorded in
    the rolling history, which they would poison for ``window`` steps;
  * the spike rule is active once ``warmup_steps`` norms have been accepted
    (not after ``warmup_steps`` steps), and its statistics cover the
    ``min(num_accepted, window)`` most recent accepted norms;
  * a finite step is accepted only when ``norm <= threshold`` holds, so an
    invalid *traced* threshold fails safe: a ``max_norm`` schedule (under
    ``optax.inject_hyperparams``) that turns NaN or negative, or a traced
    ``spike_sigmas`` that turns NaN, skips every step (the invalid value is
    visible in ``skip_threshold`` and ``num_consecutive_skipped`` grows)
    rather than accepting steps the cap was meant to stop. Concrete invalid
    values are rejected at construction;
  * integer and bool gradient leaves raise a ``TypeError`` naming the leaf's
    path (the library-wide policy); ``update(updates, None)`` raises a
    ``ValueError`` (the state carries the inner optimizer's state and the
    norm history: call ``init`` first).

  .. warning::
    Because only accepted norms enter the history, a *lasting* upward shift
    of the gradient norm (rather than a spike) can make every later step a
    "spike", and training stalls. Log ``num_consecutive_skipped`` (e.g. via
    :func:`optaxclip.clip_stats`) and alert on long runs of skips.

  Args:
    inner: the optimizer to wrap, any ``optax.GradientTransformation``
      (e.g. ``optax.adamw(3e-4)`` or a whole ``optax.chain``). Extra keyword
      arguments of ``update`` are passed through to it.
    max_norm: skip steps whose norm is above this non-negative scalar; ``None``
      (default) disables the cap. May be a schedule under
      ``optax.inject_hyperparams``.
    spike_sigmas: skip steps whose norm is above the rolling mean plus
      ``spike_sigmas`` rolling standard deviations, a positive scalar (MaxText
      uses 6.0); ``None`` (default) disables the spike rule.
    window: the number of most recent accepted norms in the rolling
      statistics, an int >= 1; ``None`` (default) means 128. Static: it sets
      a buffer shape.
    warmup_steps: how many norms must have been accepted before the spike
      rule applies, an int >= 1; ``None`` (default) means ``window``. Static.
    skip_nonfinite: skip steps whose norm is NaN or inf (default True).
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which the
      gradient tree is *split*; partial norms are combined with ``psum`` so
      every device takes the same decision.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipStepState`.

  Raises:
    TypeError: if ``inner`` is not a ``GradientTransformation`` (for
      ``optax.MultiSteps``, pass ``.gradient_transformation()``), or
      ``window`` / ``warmup_steps`` is not a static int; in ``update``, for
      an integer or bool gradient leaf.
    ValueError: for a negative or NaN ``max_norm``, a non-positive or NaN
      ``spike_sigmas``, or ``window`` / ``warmup_steps`` below 1; in
      ``update``, for ``state=None``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optaxclip as oc
    >>> tx = oc.skip_step(optax.sgd(1.0), max_norm=10.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    >>> updates["w"], bool(state.step_skipped)
    (Array([-3., -4.], dtype=float32), False)
    >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
    >>> updates["w"], bool(state.step_skipped)
    (Array([0., 0.], dtype=float32), True)
    >>> updates, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
    >>> float(state.skip_norm), int(state.num_skipped)
    (50.0, 2)
    >>> stats = oc.clip_stats(state)
    >>> int(stats["skip_step/num_consecutive_skipped"])
    2

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022.
    Peers: MaxText ``skip_step_on_spikes`` (rolling window
    ``skip_step_interval=128``, threshold mean + ``skip_step_scaling_factor``
    (6.0) std), Levanter ``SkipStepConfig``, axlearn
    ``skip_and_clip_by_global_norm``, ``optax.apply_if_finite``.
  """
  fn = "skip_step"
  if not isinstance(inner, optax.GradientTransformation):
    if callable(getattr(inner, "gradient_transformation", None)):
      # optax.MultiSteps (and look-alikes) is an object holding an optimizer;
      # the GradientTransformation is what its method returns.
      raise TypeError(
        f"{fn}: inner must be an optax.GradientTransformation, got an"
        f" instance of {type(inner).__name__}, which is not one but builds"
        " one: pass inner.gradient_transformation(), e.g."
        " skip_step(optax.MultiSteps(opt, k).gradient_transformation())."
      )
    raise TypeError(
      f"{fn}: inner must be an optax.GradientTransformation (an optimizer"
      f" such as optax.adam(1e-3) or an optax.chain), got {inner!r} of type"
      f" {type(inner).__name__}. Pass the optimizer itself, not its factory:"
      " skip_step(optax.adam(1e-3)), not skip_step(optax.adam)."
    )
  if max_norm is not None:
    _validate.check_threshold(fn, "max_norm", max_norm)
  if spike_sigmas is not None:
    sigmas = _validate.check_real(fn, "spike_sigmas", spike_sigmas)
    if sigmas is not None and sigmas <= 0:
      raise ValueError(
        f"{fn}: spike_sigmas must be a positive scalar (0 < spike_sigmas <="
        f" inf) or None to disable the spike rule, got {spike_sigmas!r}."
      )
  window = (
    DEFAULT_WINDOW
    if window is None
    else _validate.check_static_int(fn, "window", window)
  )
  warmup_steps = (
    window
    if warmup_steps is None
    else (_validate.check_static_int(fn, "warmup_steps", warmup_steps))
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
    )

  def update_fn(updates, state, params=None, **extra_args):
    _tree.check_float_leaves(fn, updates)
    _tree.require_state(fn, state)
    dtype = state.skip_norm.dtype
    norm = _norms.global_norm_from(updates, 2, axis_name).astype(dtype)
    finite = jnp.isfinite(norm)

    threshold = jnp.full((), math.inf, dtype)
    if max_norm is not None:
      threshold = jnp.minimum(threshold, jnp.asarray(max_norm).astype(dtype))
    if spike_sigmas is not None:
      mean, std = _rolling_mean_std(state.accepted_norms, state.num_accepted)
      spike = mean + jnp.asarray(spike_sigmas).astype(dtype) * std
      warmed_up = state.num_accepted >= warmup_steps
      threshold = jnp.minimum(
        threshold, jnp.where(warmed_up, spike, jnp.full_like(spike, math.inf))
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

    new_updates, new_inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    # A select, not `updates * 0`: 0 * nan = nan.
    new_updates = jax.tree.map(
      lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates
    )
    new_inner_state = jax.tree.map(
      lambda old, new: jnp.where(skip, old, new),
      state.inner_state,
      new_inner_state,
    )

    record = ~skip & finite
    index = state.num_accepted % window
    accepted_norms = jnp.where(
      record, state.accepted_norms.at[index].set(norm), state.accepted_norms
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
      num_accepted=jnp.where(
        record, optax.safe_increment(state.num_accepted), state.num_accepted
      ),
      skip_threshold=threshold,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
