"""Stable-SPAM's AdaClip and AdaGN: adaptive element clipping and norm scaling.

Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
Adam" (arXiv:2502.17055), with the authors' PyTorch optimizer
(``TianjinYellow/StableSPAM``, ``galore_torch/stablespam.py``). Stable-SPAM
cleans every tensor's gradient in two stages before Adam sees it:

* **AdaClip** (:func:`adaclip`) tracks a bias-corrected EMA of each tensor's
  largest gradient magnitude; the elements above it are scaled down, the
  largest one exactly onto it.
* **AdaGN** (:func:`adagn`) then rescales each tensor to unit norm times the
  ratio of bias-corrected EMAs of its norm and squared norm, so a burst of
  large norms is damped relative to the recent history.

Each stage is a transform of its own; in the paper's order they compose as
``optax.chain(oc.adaclip(), oc.adagn(), optax.adam(...))``. The third part of
Stable-SPAM, the periodic momentum reset, is ``optaxclip.momentum_reset``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _grouping, _norms, _scale, _stats, _tree, _validate


@_stats.register_state("adaclip")
class AdaClipState(NamedTuple):
  """State of :func:`adaclip`.

  With ``per_tensor=True`` the per-tensor fields are
  :class:`~optaxclip.PathValues` holding one entry per leaf in
  ``jax.tree.leaves`` order (``clip_stats`` returns them by path); a tree
  with no leaves gets one placeholder entry, because checkpointers such as
  orbax refuse zero-size arrays. With ``per_tensor=False`` they are scalars.
  The float dtype is the accumulation dtype of the tree given to ``init``
  (float64 for float64 params under x64, float32 otherwise).
  """

  # int32 per tensor: how many steps were folded into the EMA (finite,
  # nonzero maxima); the bias correction uses it. Saturates at 2**31 - 1.
  adaclip_count: Any
  # float per tensor: the EMA of max|g| (before bias correction).
  adaclip_max_ema: Any
  # float per tensor: this step's max|g| before clipping.
  adaclip_max: Any
  # float per tensor: the bias-corrected threshold this step was held to
  # (+inf while the tensor has no observation yet).
  adaclip_threshold: Any
  # int32 scalar: how many elements were scaled down this step.
  adaclip_num_clipped: jax.Array


@_stats.register_state("adagn")
class AdaGNState(NamedTuple):
  """State of :func:`adagn`.

  Per-tensor fields are laid out as in :class:`AdaClipState`:
  :class:`~optaxclip.PathValues` with ``per_tensor=True`` (one entry
  per leaf, one placeholder for an empty tree), scalars with
  ``per_tensor=False``, in the accumulation dtype of the tree given to
  ``init``.
  """

  # int32 per tensor: how many steps were folded into the EMAs (finite,
  # nonzero norms); the bias corrections use it. Saturates at 2**31 - 1.
  adagn_count: Any
  # float per tensor: EMA of the norm (first moment, before correction).
  adagn_norm_mean: Any
  # float per tensor: EMA of the squared norm (second moment).
  adagn_norm_sq_mean: Any
  # float per tensor: this step's L2 norm of the incoming update.
  adagn_norm: Any
  # float per tensor: the factor the update was multiplied by this step
  # (1 for a zero tensor or one with no observation yet, NaN for a
  # non-finite norm).
  adagn_scale: Any


# --------------------------------------------------------------------------
# Shared plumbing: one statistic per leaf, or one for the whole tree.


def _check_per_tensor(fn: str, per_tensor: Any) -> None:
  if not isinstance(per_tensor, (bool, np.bool_)):
    raise TypeError(
      f"{fn}: per_tensor must be a bool (True: one statistic per tensor, as"
      f" in the paper; False: one for the whole tree), got {per_tensor!r}."
    )


class _Layout(NamedTuple):
  """A tree's per-tensor layout, or one statistic for the whole tree."""

  per_tensor: bool
  tensors: _tree.Layout

  def wrap(self, values: jax.Array) -> Any:
    if self.per_tensor:
      return self.tensors.wrap(values)
    return values.reshape(())

  def fill(self, value: Any, dtype: Any) -> Any:
    if self.per_tensor:
      return self.tensors.full(value, dtype)
    return jnp.full((), value, dtype)


def _layout(fn: str, tree: Any, per_tensor: bool) -> _Layout:
  return _Layout(per_tensor, _tree.Slicing(fn).layout(tree))


def _begin_update(
  fn: str, updates: Any, state: Any, statistic: str, per_tensor: bool
) -> tuple[list[jax.Array], Any, _Layout]:
  """The checks every update starts with, and the flattened updates.

  ``statistic`` names a per-tensor field of ``state``, whose size is checked
  against the updates' structure.
  """
  _tree.require_state(fn, state)
  _tree.check_float_leaves(fn, updates)
  leaves, treedef = jax.tree.flatten(updates)
  layout = _layout(fn, updates, per_tensor)
  if per_tensor:
    layout.tensors.check(fn, getattr(state, statistic))
  return [jnp.asarray(x) for x in leaves], treedef, layout


def _statistics(
  leaves: list[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  per_tensor: bool,
  axis_name: Any,
  dtype: Any,
) -> jax.Array:
  """Per-leaf norms as a vector, or the global norm as a 1-vector."""
  if per_tensor:
    norms = _norms.leaf_norms(leaves, ord, axis_name)
    if not norms:
      return jnp.zeros((1,), dtype)
    return jnp.stack([n.astype(dtype) for n in norms])
  norm = _norms.global_norm_from(leaves, ord, axis_name)
  return norm.astype(dtype).reshape(1)


def _per_leaf(values: jax.Array, num_leaves: int, per_tensor: bool) -> list:
  """The entry of a statistics vector that governs each leaf."""
  if per_tensor:
    return [values[i] for i in range(num_leaves)]
  return [values[0]] * num_leaves


def _complement(decay: Any, dtype: Any) -> jax.Array:
  """``1 - decay`` in ``dtype``, rounded once for a concrete ``decay``.

  The EMAs and bias corrections below are written in terms of ``1 - decay``
  only. In float32, ``1 - float32(0.999)`` is off by 1.3e-5 relative (and
  ``1 - float32(0.99999)``, the authors' BF16 ``gamma2``, by 0.14%); the
  difference taken in float64 first is exact to float32 rounding. A traced
  decay (under ``inject_hyperparams``) is already rounded: its complement is
  taken in ``dtype`` (exactly, by Sterbenz's lemma, for decays >= 0.5).
  """
  if _validate.is_traced(decay):
    return 1 - jnp.asarray(decay).astype(dtype)
  return jnp.asarray(1.0 - float(np.asarray(decay)), dtype)


def _ema(average: jax.Array, value: jax.Array, rate: jax.Array) -> jax.Array:
  """``decay * average + (1 - decay) * value`` with ``rate = 1 - decay``."""
  return average + rate * (value - average)


def _bias_correction(rate: jax.Array, count: jax.Array) -> jax.Array:
  """``1 - (1 - rate)**count``, with 1 where ``count == 0`` (no 0/0).

  Computed as ``-expm1(count * log1p(-rate))``: accurate where ``rate`` is
  small and ``count`` is too, exactly where ``1 - decay**count`` cancels.
  The first observation's correction is ``rate`` itself, exactly.
  """
  correction = -jnp.expm1(count.astype(rate.dtype) * jnp.log1p(-rate))
  correction = jnp.where(count == 1, rate, correction)
  return jnp.where(count > 0, correction, jnp.ones_like(correction))


def _increment(count: jax.Array, observed: jax.Array) -> jax.Array:
  bumped = optax.safe_int32_increment(count)
  return jnp.where(observed, bumped, count)


# --------------------------------------------------------------------------
# AdaClip.


def _adaclip_rule(
  max_abs: jax.Array,
  max_ema: jax.Array,
  count: jax.Array,
  rate: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One AdaClip step on vectors of statistics (one entry per tensor).

  Args:
    max_abs: this step's ``max|g|`` per tensor.
    max_ema: the EMA of past maxima.
    count: how many maxima the EMA holds.
    rate: ``1 - theta``, one minus the EMA decay, in ``max_abs``'s dtype.

  Returns:
    ``(max_ema, count, threshold, scale)`` after this step: the threshold
    is the bias-corrected EMA (inf without any observation), the scale the
    factor for the elements above it (``threshold / max_abs``; NaN for a
    non-finite maximum).
  """
  # Only finite, nonzero maxima are observations (see the docstring).
  observed = jnp.isfinite(max_abs) & (max_abs > 0)
  safe_max = jnp.where(observed, max_abs, jnp.zeros_like(max_abs))
  new_ema = jnp.where(observed, _ema(max_ema, safe_max, rate), max_ema)
  new_count = _increment(count, observed)
  threshold = jnp.where(
    new_count > 0,
    new_ema / _bias_correction(rate, new_count),
    jnp.full_like(new_ema, jnp.inf),
  )
  # After one observation the corrected EMA is that observation, exactly
  # (``rate * x / rate`` may round below ``x`` and clip the largest element).
  threshold = jnp.where(observed & (new_count == 1), safe_max, threshold)
  scale, _ = _scale.clip_scale(max_abs, threshold)
  return new_ema, new_count, threshold, scale


def _magnitudes(x: jax.Array, dtype: Any) -> jax.Array:
  """``|x|`` element-wise in ``dtype``, as the max in ``_norms`` takes it."""
  if jnp.iscomplexobj(x):
    return jnp.abs(x).astype(dtype)
  return jnp.abs(x.astype(dtype))


def adaclip(
  *,
  theta: Any = 0.999,
  per_tensor: bool = True,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Stable-SPAM's AdaClip: clips spiking elements to a running maximum.

  Every tensor (leaf) keeps an EMA :math:`m` of its largest gradient
  magnitude. The EMA first takes in this step's maximum; the elements above
  its bias-corrected value :math:`T_t` are then scaled by
  :math:`T_t / \max|g|`:

  .. math::
    m_t = \theta\, m_{t-1} + (1-\theta) \max_j |g_j|, \qquad
    T_t = \frac{m_t}{1 - \theta^t}, \qquad
    \tilde g_j = \begin{cases}
      g_j \, T_t / \max_k |g_k| & |g_j| > T_t \\
      g_j & \text{otherwise.}
    \end{cases}

  The largest element lands exactly on :math:`\pm T_t` (the authors' rule,
  not a clamp); the first step never clips. Zero tensors and non-finite
  maxima are not fed to the EMA (a non-finite tensor comes out NaN), and
  :math:`t` counts observations. Stable-SPAM's order is
  ``optax.chain(oc.adaclip(), oc.adagn(), optax.adam(lr))``. Decisions:
  ``docs/transforms.md#stable-spam``.

  Args:
    theta: EMA decay of the maxima, in (0, 1); the paper's 0.999. May be a
      schedule under ``optax.inject_hyperparams``.
    per_tensor: one running maximum per tensor (default, as in the paper),
      or one for the whole tree.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which
      the tensors are *split*: maxima are combined with ``pmax``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AdaClipState`.

  Raises:
    ValueError: for ``theta`` outside (0, 1); from ``update``, for
      ``state=None`` or a state made for another tree.
    TypeError: for a non-numeric ``theta`` or a non-bool ``per_tensor``;
      from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.adaclip(theta=0.5)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> _, state = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, state)
    >>> spike = {"w": jnp.array([1.0, -11.0, 8.8])}
    >>> updates, state = tx.update(spike, state)  # T = (0.25*2 + 0.5*11) / 0.75
    >>> updates["w"]                              # -11 and 8.8 scaled by 8 / 11
    Array([ 1. , -8. ,  6.4], dtype=float32)

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than
    16-Bit Adam <https://arxiv.org/abs/2502.17055>`_, 2025
  """
  fn = "adaclip"
  _validate.check_decay(fn, "theta", theta, "0.999")
  _check_per_tensor(fn, per_tensor)
  per_tensor = bool(per_tensor)

  def init_fn(params):
    layout = _layout(fn, params, per_tensor)
    dtype = _norms.tree_accumulation_dtype(params)
    return AdaClipState(
      adaclip_count=layout.fill(0, jnp.int32),
      adaclip_max_ema=layout.fill(0.0, dtype),
      adaclip_max=layout.fill(0.0, dtype),
      adaclip_threshold=layout.fill(jnp.inf, dtype),
      adaclip_num_clipped=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef, layout = _begin_update(
      fn, updates, state, "adaclip_max_ema", per_tensor
    )
    dtype = _tree.values_of(state.adaclip_max_ema).dtype

    # An empty tree's placeholder entry gets max 0: never an observation.
    max_abs = _statistics(leaves, math.inf, per_tensor, axis_name, dtype)
    ema, count = (
      _tree.values_of(state.adaclip_max_ema),
      _tree.values_of(state.adaclip_count),
    )
    new_ema, new_count, threshold, scale = _adaclip_rule(
      max_abs.reshape(ema.shape), ema, count, _complement(theta, dtype)
    )

    flat = lambda v: v.reshape(-1)
    thresholds = _per_leaf(flat(threshold), len(leaves), per_tensor)
    scales = _per_leaf(flat(scale), len(leaves), per_tensor)
    new_leaves, masks = [], []
    for x, leaf_threshold, leaf_scale in zip(
      leaves, thresholds, scales, strict=True
    ):
      above = _magnitudes(x, dtype) > leaf_threshold
      # A non-finite maximum makes the scale NaN: the whole tensor is NaN.
      nonfinite = jnp.isnan(leaf_scale)
      factor = jnp.where(above | nonfinite, leaf_scale, jnp.ones_like(x, dtype))
      new_leaves.append(_scale.scale_leaf(x, factor))
      # Elements of a NaN'd tensor are not counted as clipped.
      masks.append(above & ~nonfinite)
    num_clipped = _grouping.count_true(masks)
    if axis_name is not None:
      num_clipped = jax.lax.psum(num_clipped, axis_name)
    wrap = lambda v: layout.wrap(v.reshape(ema.shape))
    return jax.tree.unflatten(treedef, new_leaves), AdaClipState(
      adaclip_count=wrap(new_count),
      adaclip_max_ema=wrap(new_ema),
      adaclip_max=wrap(max_abs),
      adaclip_threshold=wrap(threshold),
      adaclip_num_clipped=num_clipped,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# AdaGN.


def _adagn_rule(
  norm: jax.Array,
  mean: jax.Array,
  sq_mean: jax.Array,
  count: jax.Array,
  rate1: jax.Array,
  rate2: jax.Array,
  eps: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One AdaGN step on vectors of statistics (one entry per tensor).

  Args:
    norm: this step's L2 norm per tensor.
    mean: EMA of past norms.
    sq_mean: EMA of past squared norms.
    count: how many norms the EMAs hold.
    rate1: ``1 - gamma1``, one minus the decay of ``mean``, in ``norm``'s
      dtype.
    rate2: ``1 - gamma2``, for ``sq_mean``.
    eps: added to the root of the corrected second moment.

  Returns:
    ``(mean, sq_mean, count, scale)`` after this step; the update is
    multiplied by ``scale`` (NaN for a non-finite norm, 1 for a zero norm
    or before any observation).
  """
  square = norm * norm
  # A norm whose square is not a positive finite number (zero, inf/NaN, or a
  # square that over- or underflows the state's dtype) is not an
  # observation: the EMAs keep their values.
  observed = jnp.isfinite(square) & (square > 0)
  safe_norm = jnp.where(observed, norm, jnp.zeros_like(norm))
  new_mean = jnp.where(observed, _ema(mean, safe_norm, rate1), mean)
  new_sq_mean = jnp.where(
    observed, _ema(sq_mean, safe_norm * safe_norm, rate2), sq_mean
  )
  new_count = _increment(count, observed)
  mean_hat = new_mean / _bias_correction(rate1, new_count)
  sq_mean_hat = new_sq_mean / _bias_correction(rate2, new_count)
  first = observed & (new_count == 1)  # the corrected EMAs are n and n**2
  mean_hat = jnp.where(first, safe_norm, mean_hat)
  sq_mean_hat = jnp.where(first, safe_norm * safe_norm, sq_mean_hat)
  target = mean_hat / (_norms.safe_sqrt(sq_mean_hat) + eps)
  positive = jnp.isfinite(norm) & (norm > 0) & (new_count > 0)
  divisor = jnp.where(positive, norm, jnp.ones_like(norm))
  # _ratio's derivative never squares the (possibly tiny) norm.
  ratio = _scale.ratio(target, divisor)
  scale = jnp.where(positive, ratio, jnp.ones_like(ratio))
  nan = jnp.full_like(scale, jnp.nan)
  return (
    new_mean,
    new_sq_mean,
    new_count,
    jnp.where(jnp.isfinite(norm), scale, nan),
  )


def adagn(
  *,
  gamma1: Any = 0.7,
  gamma2: Any = 0.9,
  eps: Any = 1e-8,
  per_tensor: bool = True,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Stable-SPAM's AdaGN: rescales each tensor by its norm's history.

  Every tensor (leaf) keeps EMAs of its gradient's L2 norm :math:`n_t` and
  of its square, bias-corrected as in Adam; the update is divided by its
  norm and multiplied by their ratio:

  .. math::
    \mu_t = \gamma_1 \mu_{t-1} + (1-\gamma_1)\, n_t, \qquad
    \nu_t = \gamma_2 \nu_{t-1} + (1-\gamma_2)\, n_t^2,

    \hat g = \frac{g}{n_t} \cdot
    \frac{\mu_t / (1-\gamma_1^t)}{\sqrt{\nu_t / (1-\gamma_2^t)} + \epsilon}.

  With steady norms the ratio is about 1, so AdaGN *normalises*: it belongs
  in front of a scale-invariant optimizer such as Adam, after
  :func:`adaclip`. Zero tensors pass unchanged and, like non-finite norms
  (whose tensors come out NaN), are not fed to the EMAs. Decisions:
  ``docs/transforms.md#stable-spam``.

  Args:
    gamma1: decay of the norm's EMA, in (0, 1); default 0.7, as in the
      authors' code. May be a schedule under ``optax.inject_hyperparams``.
    gamma2: decay of the squared norm's EMA, in (0, 1); default 0.9.
    eps: added to the root of the second moment, ``0 <= eps < inf``.
    per_tensor: one set of statistics per tensor (default, as in the
      paper), or one for the global norm of the tree.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which
      the tensors are *split*: squared norms are combined with ``psum``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AdaGNState`.

  Raises:
    ValueError: for ``gamma1`` or ``gamma2`` outside (0, 1), or a negative,
      NaN or infinite ``eps``; from ``update``, for ``state=None`` or a
      state made for another tree.
    TypeError: for non-numeric arguments or a non-bool ``per_tensor``; from
      ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.adagn(eps=0.0)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    >>> updates["w"]                       # first step: unit norm
    Array([0.6, 0.8], dtype=float32)
    >>> updates, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
    >>> round(float(oc.global_norm(updates)), 4)   # a burst: damped
    0.8637

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than
    16-Bit Adam <https://arxiv.org/abs/2502.17055>`_, 2025
  """
  fn = "adagn"
  _validate.check_decay(fn, "gamma1", gamma1, "0.7")
  _validate.check_decay(fn, "gamma2", gamma2, "0.9")
  _validate.check_eps(fn, eps)
  _check_per_tensor(fn, per_tensor)
  per_tensor = bool(per_tensor)

  def init_fn(params):
    layout = _layout(fn, params, per_tensor)
    dtype = _norms.tree_accumulation_dtype(params)
    return AdaGNState(
      adagn_count=layout.fill(0, jnp.int32),
      adagn_norm_mean=layout.fill(0.0, dtype),
      adagn_norm_sq_mean=layout.fill(0.0, dtype),
      adagn_norm=layout.fill(0.0, dtype),
      adagn_scale=layout.fill(1.0, dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef, layout = _begin_update(
      fn, updates, state, "adagn_norm_mean", per_tensor
    )
    mean = _tree.values_of(state.adagn_norm_mean)
    dtype = mean.dtype

    norms = _statistics(leaves, 2, per_tensor, axis_name, dtype)
    new_mean, new_sq_mean, new_count, scale = _adagn_rule(
      norms.reshape(mean.shape),
      mean,
      _tree.values_of(state.adagn_norm_sq_mean),
      _tree.values_of(state.adagn_count),
      _complement(gamma1, dtype),
      _complement(gamma2, dtype),
      jnp.asarray(eps).astype(dtype),
    )
    scales = _per_leaf(scale.reshape(-1), len(leaves), per_tensor)
    new_leaves = [
      _scale.scale_leaf(x, leaf_scale)
      for x, leaf_scale in zip(leaves, scales, strict=True)
    ]
    wrap = lambda v: layout.wrap(v.reshape(mean.shape))
    return jax.tree.unflatten(treedef, new_leaves), AdaGNState(
      adagn_count=wrap(new_count),
      adagn_norm_mean=wrap(new_mean),
      adagn_norm_sq_mean=wrap(new_sq_mean),
      adagn_norm=wrap(norms),
      adagn_scale=wrap(scale),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
