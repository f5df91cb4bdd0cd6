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

from optaxclip import _norms, _stats, _tree, _validate

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


def _rolling_mean_std(
  history: jax.Array, count: jax.Array, *, ddof: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Mean and std of the valid entries of a ring buffer.

  ``ddof=0`` gives the population std (the norm rule), ``ddof=1`` the sample
  std with Bessel's correction (the loss rule, as MaxText and ``torch.std``);
  the divisor is at least 1, so one valid entry has std 0.
  """
  window = history.shape[0]
  num_valid = jnp.minimum(count, window)
  valid = jnp.arange(window, dtype=num_valid.dtype) < num_valid
  zeros = jnp.zeros_like(history)
  size = jnp.maximum(num_valid, 1).astype(history.dtype)
  mean = jnp.sum(jnp.where(valid, history, zeros)) / size
  # Two passes (mean, then squared deviations): no cancellation when the
  # values are large and nearly constant.
  deviations = jnp.where(valid, history - mean, zeros)
  divisor = jnp.maximum(num_valid - ddof, 1).astype(history.dtype)
  std = _norms.std_from_variance(jnp.sum(deviations * deviations) / divisor)
  return mean, std


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

  The global L2 norm :math:`n_t` of the incoming gradients is computed once
  (with :func:`optaxclip.global_norm`'s kernel). Step :math:`t` is skipped
  when

  .. math::
    \neg\,\mathrm{isfinite}(n_t) \;\lor\; n_t > c \;\lor\;
    \big(A_t \ge w_0 \,\land\, n_t > \mu_t + k\,\sigma_t\big)
    \;\lor\; \mathrm{loss\ rule}

  where :math:`c` is ``max_norm``, :math:`k` is ``spike_sigmas``,
  :math:`\mu_t, \sigma_t` are the population mean and standard deviation of
  the last ``window`` *accepted* norms, :math:`A_t` is the number of norms
  accepted so far and :math:`w_0` is ``warmup_steps``. Each clause applies
  only when its argument is set.

  **Loss rule.** When ``update`` is called with the step's loss as an extra
  argument, ``update(grads, state, params, loss=loss)`` (as MaxText and
  Levanter pass it; ``nnx.Optimizer.update(model, grads, loss=loss)``
  forwards it), the step is also skipped when

  .. math::
    \neg\,\mathrm{isfinite}(\ell_t) \;\lor\;
    \big(L_t \ge v_0 \,\land\, \ell_t - m_t > k_\ell\, s_t\big)

  where :math:`\ell_t` is the loss, :math:`m_t, s_t` are the mean and
  *sample* standard deviation (Bessel's correction, divisor
  :math:`\max(1, N-1)`) of the last ``loss_window`` recorded losses
  (excluding :math:`\ell_t`), :math:`L_t` is the number of losses recorded
  so far, :math:`v_0` is ``loss_warmup_steps`` and :math:`k_\ell` is
  ``loss_spike_sigmas``. The defaults are MaxText's: window 128,
  :math:`k_\ell = 6`, and the rule applies once
  :math:`\max(1, \lfloor W/2 \rfloor - 1)` losses are recorded (63 for
  :math:`W = 128`; MaxText's and OLMo-core's "at least half the window,
  counting the current loss"). A loss is recorded when its step is accepted
  and it is finite, so a step accepted by both rules records both its norm
  and its loss. **Without** ``loss=`` (or with ``loss=None``) nothing
  changes: the loss rule does not run for that step, its history and
  ``skip_loss`` / ``loss_threshold`` keep their values and ``loss_skipped``
  is False. The state has the same shapes either way; a jitted step
  compiles once for each of the two call signatures and is then reused.

  On a skipped step the updates are exact zeros (``jnp.zeros_like``, so NaN
  or inf gradients cannot leak through as ``0 * nan``) and ``inner``'s state
  is returned bit-identical; the norm and loss are *not* added to the
  rolling histories (unless ``record_skipped=True``), so one spike cannot
  inflate the threshold that should catch the next one. On an accepted step
  ``inner`` runs exactly as it would unwrapped. ``inner`` is evaluated every
  step and its result discarded on skipped steps (a leaf-wise select rather
  than ``lax.cond``, so it works under ``vmap`` and with any state
  structure), which costs one elementwise optimizer update -- small next to
  the backward pass.

  Compared with ``optax.apply_if_finite(inner, max_consecutive_errors)``:
  that wrapper only reacts to NaN/inf *elements* in the updates (it tests
  ``jnp.isfinite`` of every element, not a norm), also returns zero updates
  (``optax.tree.zeros_like``) and keeps the inner state, but after more than
  ``max_consecutive_errors`` consecutive non-finite steps it gives up and
  passes the non-finite updates to ``inner``, corrupting its state. Its state
  counts ``notfinite_count`` (consecutive), ``total_notfinite`` and
  ``last_finite``. ``skip_step`` never gives up, also skips finite spikes
  (``max_norm``, ``spike_sigmas``, the loss rule) and logs the norm, loss
  and thresholds. Because it tests the float32-accumulated norm, a finite
  gradient whose norm overflows float32 (elements around ``1e19`` or
  larger) also counts as non-finite.

  Differences from MaxText ``skip_step_on_spikes`` and OLMo-core
  ``SkipStepOptimizer`` (which MaxText ports; Levanter's ``SkipStepConfig``
  is similar):

  * they record *every* step's loss and norm, skipped or not ("so spikes can
    become the new baseline"); here only accepted steps are recorded by
    default, so a spike cannot raise the bar for the next one, and
    ``record_skipped=True`` restores their rule (their skip decisions are
    reproduced exactly on finite losses, see the tests);
  * they record non-finite losses too, which makes the statistics NaN and
    skips every step until the NaN leaves the window (and both accept a
    NaN loss during warmup); here a non-finite loss is skipped (with
    ``skip_nonfinite``) and never recorded;
  * their gradient-norm rule is the loss rule applied to a ``grad_norm=``
    extra argument (sample std, the same window and warmup); here the norm
    is computed by the wrapper and judged by ``max_norm`` / ``spike_sigmas``
    with their own semantics (population std, warmup of ``warmup_steps``
    accepted norms, no rule by default). ``spike_sigmas=6.0,
    warmup_steps=63`` comes close. A ``grad_norm=`` extra argument is not
    read (it is passed on to ``inner`` like every extra argument);
  * MaxText ignores a missing loss by bypassing every check; here the norm
    rules still apply;
  * with a single recorded loss (the default warmup allows it for
    ``loss_window <= 5``) the std is 0, as in MaxText; ``torch.std``
    (OLMo-core) gives NaN there and skips every step. Levanter uses the population std floored at ``1e-6`` and a
    ``W + 1`` window, and requires ``loss``.

  Decisions where the references leave room:

  * comparisons are strict (a norm equal to the threshold is accepted, and a
    loss with :math:`\ell_t - m_t = k_\ell s_t`), as in
    :func:`optaxclip.clip_by_global_norm` and MaxText. ``loss_threshold``
    logs :math:`m_t + k_\ell s_t`; the decision uses MaxText's form
    :math:`\ell_t - m_t \le k_\ell s_t`;
  * the loss is cast to the norm's accumulation dtype (float32, float64 for
    float64 params) and must be a real scalar;
  * ``loss`` is still passed on to ``inner`` (like every extra argument:
    plain ``GradientTransformation`` inners ignore it; optax's
    ``GradientTransformationExtraArgs`` accept it);
  * with ``skip_nonfinite=False``, a non-finite norm or loss is never
    skipped, by any rule: the step goes to ``inner`` and its NaNs surface
    loudly (the library's default for non-finite inputs); such values are
    not recorded in the rolling histories, which they would poison for a
    whole window;
  * the norm spike rule is active once ``warmup_steps`` norms have been
    accepted (not after ``warmup_steps`` steps), and its statistics cover
    the ``min(num_accepted, window)`` most recent accepted norms; the loss
    rule counts recorded losses the same way;
  * an infinite ``spike_sigmas`` / ``loss_spike_sigmas`` never flags a spike
    (:math:`\infty \cdot 0` is taken as :math:`\infty`);
  * a finite step is accepted only when ``norm <= threshold`` (and
    :math:`\ell_t - m_t \le k_\ell s_t`) holds, so an invalid *traced*
    threshold fails safe: a ``max_norm`` schedule (under
    ``optax.inject_hyperparams``) that turns NaN or negative, or a traced
    ``spike_sigmas`` / ``loss_spike_sigmas`` that turns NaN, skips every
    step once its rule is active (the invalid value is visible in
    ``skip_threshold`` / ``loss_threshold`` and ``num_consecutive_skipped``
    grows) rather than accepting steps the rule was meant to stop. Concrete
    invalid values are rejected at construction;
  * integer and bool gradient leaves raise a ``TypeError`` naming the leaf's
    path (the library-wide policy); ``update(updates, None)`` raises a
    ``ValueError`` (the state carries the inner optimizer's state and the
    histories: call ``init`` first).

  Under ``optax.MultiSteps``: ``skip_step(optax.MultiSteps(opt,
  k).gradient_transformation())`` judges every micro-batch (pass its loss);
  a skipped micro-batch is left out of the accumulation, which then waits
  for one more. ``optax.MultiSteps(skip_step(opt), k)`` judges the
  accumulated gradient once per ``k`` micro-batches, with the ``loss`` of
  the last micro-batch unless the loop passes the accumulated one.

  .. warning::
    Because only accepted values enter the histories, a *lasting* upward
    shift of the gradient norm or of the loss (rather than a spike) can
    make every later step a "spike", and training stalls. Log
    ``num_consecutive_skipped`` (e.g. via :func:`optaxclip.clip_stats`) and
    alert on long runs of skips, or pass ``record_skipped=True``.

  Args:
    inner: the optimizer to wrap, any ``optax.GradientTransformation``
      (e.g. ``optax.adamw(3e-4)`` or a whole ``optax.chain``). Extra keyword
      arguments of ``update`` (``loss`` included) are passed through to it.
    max_norm: skip steps whose norm is above this non-negative scalar; ``None``
      (default) disables the cap. May be a schedule under
      ``optax.inject_hyperparams``.
    spike_sigmas: skip steps whose norm is above the rolling mean plus
      ``spike_sigmas`` rolling standard deviations, a positive scalar (MaxText
      uses 6.0); ``None`` (default) disables the norm spike rule.
    window: the number of most recent accepted norms in the rolling
      statistics, an int >= 1; ``None`` (default) means 128. Static: it sets
      a buffer shape.
    warmup_steps: how many norms must have been accepted before the spike
      rule applies, an int >= 1; ``None`` (default) means ``window``. Static.
    skip_nonfinite: skip steps whose norm or loss is NaN or inf (default
      True).
    loss_spike_sigmas: the loss rule's factor :math:`k_\ell`, a positive
      scalar (``inf`` allowed); default 6.0 (MaxText, OLMo-core). ``None``
      disables the loss spike clause (a passed loss is then only checked
      for being finite, and recorded). Used only for steps called with
      ``loss=``. May be traced (``optax.inject_hyperparams``).
    loss_window: the number of most recent recorded losses in the loss
      rule's statistics, an int >= 1; ``None`` (default) means ``window``
      (so 128 unless ``window`` is set: MaxText uses one interval for both).
      Static.
    loss_warmup_steps: how many losses must have been recorded before the
      loss spike clause applies, an int >= 1; ``None`` (default) means
      ``max(1, loss_window // 2 - 1)`` (MaxText, OLMo-core). Static.
    record_skipped: also record the finite norms and losses of *skipped*
      steps in the rolling histories (MaxText's and OLMo-core's rule: a
      lasting shift becomes the new baseline instead of stalling training).
      Default False: accepted steps only. Non-finite values are never
      recorded.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which the
      gradient tree is *split*; partial norms are combined with ``psum`` so
      every device takes the same decision. The loss is averaged over it
      (``pmean``) for the same reason: pass per-device losses of equal-sized
      shards, or the global loss (unchanged up to rounding).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipStepState`; its ``update`` accepts an optional ``loss=``
    extra argument.

  Raises:
    TypeError: if ``inner`` is not a ``GradientTransformation`` (for
      ``optax.MultiSteps``, pass ``.gradient_transformation()``), or
      ``window`` / ``warmup_steps`` / ``loss_window`` /
      ``loss_warmup_steps`` is not a static int; in ``update``, for an
      integer or bool gradient leaf, or a ``loss`` that is not a real
      number.
    ValueError: for a negative or NaN ``max_norm``, a non-positive or NaN
      ``spike_sigmas`` / ``loss_spike_sigmas``, or a window or warmup below
      1; in ``update``, for ``state=None`` or a non-scalar ``loss``.

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

    The loss rule, with a short window (the rule starts after 3 losses):

    >>> tx = oc.skip_step(optax.sgd(1.0), loss_window=8)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([0.3, 0.4])}
    >>> for loss in [2.0, 2.1, 1.9, 2.0]:
    ...   _, state = tx.update(grads, state, loss=loss)
    >>> updates, state = tx.update(grads, state, loss=9.0)
    >>> updates["w"], bool(state.loss_skipped), int(state.num_losses)
    (Array([0., 0.], dtype=float32), True, 4)
    >>> round(float(state.loss_threshold), 4)  # 2 + 6 * sample std
    2.4899

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022.
    Peers: MaxText ``skip_step_on_spikes``
    (``src/maxtext/optimizers/optimizers.py``; rolling window
    ``skip_step_interval=128``, ``skip_step_scaling_factor=6.0``),
    OLMo-core ``SkipStepOptimizer``
    (``src/olmo_core/optim/skip_step_optimizer.py``, commit ``c757b7c``),
    Levanter ``SkipStepConfig``, axlearn ``skip_and_clip_by_global_norm``,
    ``optax.apply_if_finite``.
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
  window = (
    DEFAULT_WINDOW
    if window is None
    else _validate.check_static_int(fn, "window", window)
  )
  warmup_steps = (
    window
    if warmup_steps is None
    else _validate.check_static_int(fn, "warmup_steps", warmup_steps)
  )
  loss_window = (
    window
    if loss_window is None
    else _validate.check_static_int(fn, "loss_window", loss_window)
  )
  loss_warmup_steps = (
    max(1, loss_window // 2 - 1)
    if loss_warmup_steps is None
    else _validate.check_static_int(fn, "loss_warmup_steps", loss_warmup_steps)
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
    _tree.check_float_leaves(fn, updates)
    _tree.require_state(fn, state)
    dtype = state.skip_norm.dtype
    inf = jnp.full((), math.inf, dtype)
    norm = _norms.global_norm_from(updates, 2, axis_name).astype(dtype)
    finite = jnp.isfinite(norm)

    threshold = inf
    if max_norm is not None:
      threshold = jnp.minimum(threshold, jnp.asarray(max_norm).astype(dtype))
    if spike_sigmas is not None:
      mean, std = _rolling_mean_std(state.accepted_norms, state.num_accepted)
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
        loss_mean, loss_std = _rolling_mean_std(
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
    # A select, not `updates * 0`: 0 * nan = nan.
    new_updates = jax.tree.map(
      lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates
    )
    new_inner_state = jax.tree.map(
      lambda old, new: jnp.where(skip, old, new),
      state.inner_state,
      new_inner_state,
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
