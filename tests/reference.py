"""Float64 NumPy references, written from the formulas, not from the library.

Each function takes plain NumPy arrays (any dtype; they are converted to
float64 / complex128 first) and returns float64 results. They know nothing of
buckets, safe square roots or dtypes: they are the textbook rules.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional

import numpy as np


def _f64(x) -> np.ndarray:
  x = np.asarray(x)
  if np.iscomplexobj(x):
    return x.astype(np.complex128)
  return x.astype(np.float64)


def norm(leaves, ord=2) -> float:  # pylint: disable=redefined-builtin
  """The global p-norm of a list of arrays: (sum |x|^p)^(1/p), or max |x|."""
  mags = [np.abs(_f64(x)).ravel() for x in leaves]
  flat = np.concatenate(mags) if mags else np.zeros(0)
  if ord == math.inf or ord == "inf":
    return float(flat.max()) if flat.size else 0.0
  if ord == 1:
    return float(flat.sum())
  return float(math.sqrt(float((flat * flat).sum())))


def clip_scale(n: float, c: float) -> float:
  """Pascanu et al. 2013, Alg. 1: if ||g|| > c then g <- c g / ||g||."""
  return 1.0 if n <= c else c / n


def clip_by_global_norm(leaves, c, ord=2):  # pylint: disable=redefined-builtin
  n = norm(leaves, ord)
  s = clip_scale(n, c)
  return [_f64(x) * s for x in leaves], n


def clip_by_norm(leaves, c, ord=2):  # pylint: disable=redefined-builtin
  """TF's clip_by_norm applied to every tensor on its own."""
  out, norms = [], []
  for x in leaves:
    n = norm([x], ord)
    norms.append(n)
    out.append(_f64(x) * clip_scale(n, c))
  return out, norms


def clip_by_block_rms(leaves, tau):
  """Each tensor scaled so that sqrt(mean |x|^2) <= tau."""
  out, rms = [], []
  for x in leaves:
    x = _f64(x)
    r = math.sqrt(float(np.mean(np.abs(x) ** 2))) if x.size else 0.0
    rms.append(r)
    out.append(x * clip_scale(r, tau))
  return out, rms


def clip_by_value(leaves, lo, hi):
  """Element-wise clamp, and the number of elements outside [lo, hi]."""
  out, count = [], 0
  for x in leaves:
    x = _f64(x)
    count += int(np.sum((x < lo) | (x > hi)))
    out.append(np.minimum(np.maximum(x, lo), hi))
  return out, count


def value_range(leaves):
  """(max, min) over all elements of all leaves; (0, 0) for no elements."""
  flat = np.concatenate([_f64(x).ravel() for x in leaves] + [np.zeros(0)])
  if not flat.size:
    return 0.0, 0.0
  return float(flat.max()), float(flat.min())


def adaptive_grad_clip(grads, params, clipping, eps, axes_list):
  """Brock et al. 2021, Sec. 4.1, written unit by unit.

  For every leaf, the units are the slices indexed by the axes *not* in
  ``axes``; each unit's gradient G_i is scaled by min(1, clipping *
  max(||W_i||, eps) / ||G_i||) (no scaling when ||G_i|| is within bounds).
  Returns the clipped float64 leaves and the number of clipped units.
  """
  out, clipped = [], 0
  for g, w, axes in zip(grads, params, axes_list):
    g, w = _f64(g), _f64(w)
    keep = [a for a in range(g.ndim) if a not in axes]
    result = np.array(g, copy=True)
    for index in np.ndindex(*[g.shape[a] for a in keep]):
      sl = [slice(None)] * g.ndim
      for a, i in zip(keep, index):
        sl[a] = i
      sl = tuple(sl)
      g_norm = math.sqrt(float(np.sum(np.abs(g[sl]) ** 2)))
      w_norm = math.sqrt(float(np.sum(np.abs(w[sl]) ** 2)))
      limit = clipping * max(w_norm, eps)
      if g_norm > limit:
        result[sl] = g[sl] * (limit / g_norm)
        clipped += 1
    out.append(result)
  return out, clipped


def autoclip(norms, percentile, history_size):
  """Seetharaman et al. 2020, Algorithm 1, with a bounded history.

  For each step: append the norm to the history (keeping the last
  ``history_size``), take the percentile (np.percentile, linear), and return
  per step (threshold, scale) with scale = 1 if norm <= threshold else
  threshold / norm. Non-finite norms are not appended (optaxclip's policy).
  """
  history, out = [], []
  for g in norms:
    if math.isfinite(g):
      history.append(g)
      history = history[-history_size:]
    c = float(np.percentile(np.asarray(history, np.float64), percentile)
              ) if history else math.inf
    out.append((c, clip_scale(g, c)))
  return out


def zclip(norms, *, alpha=0.97, z_thresh=2.5, max_norm=1.0, eps=1e-6,
          warmup_steps=25, mode="zscore", clip_option="adaptive_scaling",
          clip_factor=1.0, skip_update_on_spike=False):
  """ZClip (Kumar et al. 2025) as the authors' reference class behaves.

  Returns per step (cap, spike, mean, var): the global norm each step is
  clipped to (inf for none), whether it was a spike, and the statistics after
  the step. Non-finite norms are skipped, and zero norms are no
  observations: they pass unclipped and are neither recorded nor fed to the
  statistics; nor is a spike threshold of 0 (optaxclip's policies).
  """
  buffer, mean, var, initialized, out = [], None, None, False, []
  for g in norms:
    if not math.isfinite(g):
      out.append((math.inf, False, mean, var))
      continue
    if g == 0:
      cap = math.inf if max_norm is None else max_norm
      out.append((cap if not initialized else min(0.0, cap), False, mean,
                  var))
      continue
    if not initialized:
      buffer.append(g)
      if len(buffer) >= warmup_steps:
        mean = sum(buffer) / len(buffer)
        var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
        initialized = True
      cap = math.inf if max_norm is None else max_norm
      out.append((cap, False, mean, var))
      continue
    std = var ** 0.5
    spike_value = None
    if mode == "percentile":
      if g > mean + z_thresh * std:
        spike_value = mean + z_thresh * std
    else:
      with np.errstate(divide="ignore", invalid="ignore"):
        z = np.float64(g - mean) / np.float64(std + eps)  # /0: inf or nan
      if z > z_thresh:
        if clip_option == "adaptive_scaling":
          spike_value = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
        else:
          spike_value = mean
    adaptive = g if spike_value is None else spike_value
    cap = adaptive if max_norm is None else min(adaptive, max_norm)
    if not (spike_value is not None and skip_update_on_spike) and adaptive > 0:
      mean = alpha * mean + (1 - alpha) * adaptive
      var = alpha * var + (1 - alpha) * (adaptive - mean) ** 2
    out.append((cap, spike_value is not None, mean, var))
  return out


# AdaGC (Wang et al., arXiv:2502.11034), one tensor at a time.
def _adagc_norm(x: np.ndarray) -> float:
  flat = np.asarray(x, np.float64).ravel()
  return math.sqrt(float(np.sum(flat * flat)))


def _scale(norm: float, threshold: float) -> float:
  """1 within the threshold, threshold / norm beyond it, NaN if not finite."""
  if not math.isfinite(norm):
    return math.nan
  return 1.0 if norm <= threshold else threshold / norm


def adagc_reference(grad_seq, beta, lambda_rel, lambda_abs, warmup_steps, eps):
  """Runs AdaGC over a sequence of gradients, in float64.

  Args:
    grad_seq: a list of steps, each a list of arrays (the tensors, in
      ``jax.tree.leaves`` order).
    beta: EMA decay.
    lambda_rel: relative threshold, a float or a callable of the 0-based step
      (as ``optax.inject_hyperparams`` evaluates a schedule).
    lambda_abs: warmup global-norm threshold.
    warmup_steps: number of warmup steps.
    eps: floor on gamma inside the threshold.

  Returns:
    A dict of per-step lists: ``outputs`` (lists of float64 arrays),
    ``gamma``, ``norms``, ``thresholds`` (float64 arrays of one entry per
    tensor), ``global_norm`` (floats) and ``num_clipped`` (ints).
  """
  num_leaves = len(grad_seq[0])
  gamma = [None] * num_leaves  # None: no finite, nonzero observation yet
  history = {k: [] for k in ("outputs", "gamma", "norms", "thresholds",
                             "global_norm", "num_clipped")}
  for step, grads in enumerate(grad_seq, start=1):
    grads = [np.asarray(g, np.float64) for g in grads]
    norms = [_adagc_norm(g) for g in grads]
    global_norm = math.sqrt(sum(n * n for n in norms))
    lam_rel = lambda_rel(step - 1) if callable(lambda_rel) else lambda_rel
    outputs, thresholds, num_clipped = [], [], 0
    if step <= warmup_steps:
      h = _scale(global_norm, lambda_abs)
      clipped = not global_norm <= lambda_abs
      for i, g in enumerate(grads):
        g_hat = h * g
        outputs.append(g_hat)
        thresholds.append(lambda_abs)
        num_clipped += int(clipped)
        hat_norm = _adagc_norm(g_hat)
        if math.isfinite(hat_norm) and hat_norm > 0:  # zero: no observation
          gamma[i] = hat_norm if gamma[i] is None else min(gamma[i], hat_norm)
    else:
      for i, g in enumerate(grads):
        if gamma[i] is None or lam_rel == math.inf:
          threshold = math.inf
        else:
          threshold = lam_rel * max(gamma[i], eps)
        h = _scale(norms[i], threshold)
        g_hat = h * g
        outputs.append(g_hat)
        thresholds.append(threshold)
        num_clipped += int(not norms[i] <= threshold)
        hat_norm = _adagc_norm(g_hat)
        if math.isfinite(hat_norm) and hat_norm > 0:  # zero: no observation
          if gamma[i] is None:
            gamma[i] = hat_norm
          else:
            gamma[i] = beta * gamma[i] + (1.0 - beta) * hat_norm
    history["outputs"].append(outputs)
    history["gamma"].append(np.array(
        [math.inf if x is None else x for x in gamma], np.float64))
    history["norms"].append(np.array(norms, np.float64))
    history["thresholds"].append(np.array(thresholds, np.float64))
    history["global_norm"].append(global_norm)
    history["num_clipped"].append(num_clipped)
  return history


# skip_step: a list of accepted norms, statistics.pstdev.
def skip_step_reference(
    norms,
    max_norm: Optional[float] = None,
    spike_sigmas: Optional[float] = None,
    window: int = 128,
    warmup_steps: Optional[int] = None,
    skip_nonfinite: bool = True,
) -> list[tuple[bool, float]]:
  """Per step: (skipped, threshold the norm was compared with).

  A step is skipped when its norm is non-finite (if ``skip_nonfinite``), or
  when it is finite and above ``min(max_norm, mean + spike_sigmas * std)``,
  where mean and population std are over the last ``window`` accepted finite
  norms and the spike term applies once ``warmup_steps`` (default ``window``)
  norms have been accepted. A non-finite norm is never skipped by the
  thresholds; accepted non-finite norms are not recorded in the history.
  """
  if warmup_steps is None:
    warmup_steps = window
  history: list[float] = []
  out = []
  for norm in norms:
    norm = float(norm)
    threshold = math.inf
    if max_norm is not None:
      threshold = min(threshold, float(max_norm))
    if spike_sigmas is not None and len(history) >= warmup_steps:
      recent = history[-window:]
      mean = statistics.fmean(recent)
      std = statistics.pstdev(recent, mu=mean)
      threshold = min(threshold, mean + float(spike_sigmas) * std)
    finite = math.isfinite(norm)
    if finite:
      skipped = norm > threshold
    else:
      skipped = skip_nonfinite
    if finite and not skipped:
      history.append(norm)
    out.append((skipped, threshold))
  return out


def accepted_norms(norms, decisions) -> list[float]:
  """The norms the rule records: accepted steps with a finite norm."""
  return [float(n) for n, (skipped, _) in zip(norms, decisions)
          if not skipped and math.isfinite(float(n))]


# ---------------------------------------------------------------------------
# SPAM: spam_clip and momentum_reset
#
# Float64 NumPy references for SPAM's transforms (arXiv:2501.06842).
#
# Plain loops written from the paper's Algorithm 1 and the authors' code
# (``TianjinYellow/SPAM-Optimizer``, ``galore_torch/SPAM.py``), with the
# decisions documented in ``optaxclip/_spam.py`` (v = 0 is not a scale;
# non-finite values come out NaN and are not folded into v). Self-contained:
# no JAX, no optaxclip.


def spam_clip(
  steps,
  threshold=5000.0,
  b2=0.999,
  eps=0.0,
  warmup_steps=20,
  reset_interval=None,
):
  """Spike-aware clipping of a sequence of gradient trees.

  Args:
    steps: a list over steps of lists of leaves (array-likes).
    threshold, b2, eps, warmup_steps, reset_interval: as in ``spam_clip``;
      ``threshold`` may be a list with one value per step.

  Returns:
    (outputs, vs, num_clipped): per step, the list of clipped leaves, the list
    of v after the step, and the number of clipped elements.
  """
  v = None
  outputs, vs, counts = [], [], []
  for number, leaves in enumerate(steps, start=1):
    leaves = [np.asarray(x, np.float64) for x in leaves]
    if v is None:
      v = [np.zeros_like(x) for x in leaves]
    theta = threshold[number - 1] if isinstance(threshold, list) else threshold
    if reset_interval is None:
      active = number >= warmup_steps
    else:
      active = number % reset_interval >= warmup_steps
      if number % reset_interval == 0:
        v = [np.zeros_like(x) for x in leaves]
    out_leaves, new_v, count = [], [], 0
    for g, prev in zip(leaves, v):
      out = g.copy()
      new = prev.copy()
      for i in np.ndindex(g.shape):
        x = g[i]
        if not math.isfinite(x):
          out[i] = math.nan
          continue  # not folded into v
        cap_square = theta * (prev[i] + eps)
        if active and prev[i] > 0 and x * x > cap_square:
          out[i] = math.copysign(math.sqrt(cap_square), x)
          count += 1
        new[i] = b2 * prev[i] + (1 - b2) * out[i] ** 2
      out_leaves.append(out)
      new_v.append(new)
    v = new_v
    outputs.append(out_leaves)
    vs.append([x.copy() for x in v])
    counts.append(count)
  return outputs, vs, counts


def warmup_scale(k, warmup_steps, depth=0.99):
  """The warmup scale ``k`` steps after a reset (k = 0 on the reset step)."""
  if k >= warmup_steps:
    return 1.0
  return 1.0 - depth * (1.0 + math.cos(math.pi * k / (warmup_steps + 1))) / 2


def momentum_reset_adam(
  steps, lr, b1=0.9, b2=0.999, eps=1e-8, interval=500, warmup_steps=150
):
  """Adam (optax's convention: eps added to sqrt(v_hat)) with SPAM's reset.

  Moments are zeroed on steps t with t % interval == 0, before the step;
  the bias-correction count is the global step; updates are scaled by
  ``warmup_scale(t % interval)`` once a reset has happened.

  Args:
    steps: a list over steps of lists of leaves.
    lr, b1, b2, eps: Adam's hyperparameters.
    interval, warmup_steps: the reset interval and the warmup length.

  Returns:
    (updates, scales): per step, the list of update leaves and the scale.
  """
  m = v = None
  updates, scales = [], []
  resets = 0
  for number, leaves in enumerate(steps, start=1):
    leaves = [np.asarray(x, np.float64) for x in leaves]
    if m is None or number % interval == 0:
      if m is not None:
        resets += 1
      m = [np.zeros_like(x) for x in leaves]
      v = [np.zeros_like(x) for x in leaves]
    scale = warmup_scale(number % interval, warmup_steps) if resets else 1.0
    m = [b1 * a + (1 - b1) * g for a, g in zip(m, leaves)]
    v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, leaves)]
    m_hat = [a / (1 - b1**number) for a in m]
    v_hat = [a / (1 - b2**number) for a in v]
    updates.append(
      [-lr * scale * a / (np.sqrt(b) + eps) for a, b in zip(m_hat, v_hat)]
    )
    scales.append(scale)
  return updates, scales


def spam_trajectory(
  grads,
  params0,
  lr,
  b1,
  b2,
  eps,
  threshold,
  interval,
  warmup_steps,
  clip_warmup_steps,
  clip_reset_interval=None,
):
  """Parameters after each step of spam_clip followed by momentum_reset(adam).

  Args:
    grads: float array (steps, n): one flat gradient per step.
    params0: float array (n,): the initial parameters.
    lr, b1, b2, eps: Adam's hyperparameters (``b2`` is also spam_clip's).
    threshold: spam_clip's threshold.
    interval, warmup_steps: momentum_reset's.
    clip_warmup_steps, clip_reset_interval: spam_clip's warmup_steps and
      reset_interval.

  Returns:
    float64 array (steps, n).
  """
  clipped, _, _ = spam_clip(
    [[g] for g in np.asarray(grads, np.float64)],
    threshold,
    b2,
    0.0,
    clip_warmup_steps,
    clip_reset_interval,
  )
  updates, _ = momentum_reset_adam(
    clipped, lr, b1, b2, eps, interval, warmup_steps
  )
  params = np.asarray(params0, np.float64).copy()
  out = []
  for (update,) in updates:
    params = params + update
    out.append(params.copy())
  return np.stack(out)


# ---------------------------------------------------------------------------
# Stable-SPAM: AdaClip and AdaGN
#
# Float64 NumPy references for Stable-SPAM's AdaClip and AdaGN.
#
# Written from the paper's formulas (Huang et al., arXiv:2502.17055) and the
# authors' ``galore_torch/stablespam.py``, as plain loops over steps and
# tensors, independently of ``optaxclip/_stable_spam.py``. The library's
# documented decisions are spelled out here too: a zero or non-finite
# statistic is not an observation (EMA and count unchanged), a non-finite
# statistic makes its tensor(s) NaN, and the bias corrections count
# observations.
#
# Self-contained (NumPy and math only), to be merged into tests/reference.py.


def _value(hyper, step):
  """A hyperparameter at a 0-based step: a float or a schedule callable."""
  return float(hyper(step)) if callable(hyper) else float(hyper)


def _max_abs(g):
  g = np.asarray(g)
  if g.size == 0:
    return 0.0
  if np.isnan(g).any():
    return math.nan
  return float(np.max(np.abs(g)))


def _l2(g):
  g = np.asarray(g, np.complex128 if np.iscomplexobj(g) else np.float64)
  total = 0.0
  for v in g.reshape(-1):
    total += abs(v) ** 2
  return math.sqrt(total)


def adaclip_reference(grad_seq, theta=0.999, per_tensor=True):
  """Runs AdaClip over a sequence of gradients, in float64.

  Args:
    grad_seq: a list of steps, each a list of arrays (the tensors, in
      ``jax.tree.leaves`` order).
    theta: EMA decay of the maxima, a float or a callable of the 0-based
      step (as ``optax.inject_hyperparams`` evaluates a schedule).
    per_tensor: one statistic per tensor, or one for all of them.

  Returns:
    A dict of per-step lists: ``outputs`` (lists of float64 arrays),
    ``max``, ``ema``, ``threshold`` (float64 arrays, one entry per
    statistic), ``count`` (int arrays) and ``num_clipped`` (ints).
  """
  num_stats = len(grad_seq[0]) if per_tensor else 1
  ema = [0.0] * num_stats
  count = [0] * num_stats
  history = {
    k: []
    for k in ("outputs", "max", "ema", "threshold", "count", "num_clipped")
  }
  for step, grads in enumerate(grad_seq):
    grads = [np.asarray(g, np.float64) for g in grads]
    th = _value(theta, step)
    if per_tensor:
      groups = [[i] for i in range(len(grads))]
      maxima = [_max_abs(g) for g in grads]
    else:
      groups = [list(range(len(grads)))]
      per_leaf = [_max_abs(g) for g in grads]
      maxima = [max(per_leaf, default=0.0)]
      if any(math.isnan(m) for m in per_leaf):
        maxima = [math.nan]
    outputs = [None] * len(grads)
    thresholds, num_clipped = [], 0
    for k, members in enumerate(groups):
      m = maxima[k]
      if math.isfinite(m) and m > 0:  # zero / inf / NaN: no observation
        ema[k] = th * ema[k] + (1 - th) * m
        count[k] += 1
      threshold = ema[k] / (1 - th ** count[k]) if count[k] else math.inf
      thresholds.append(threshold)
      for i in members:
        g = grads[i]
        if not math.isfinite(m):
          outputs[i] = np.full_like(g, math.nan)
          continue
        out = g.copy()
        flat, flat_out = g.reshape(-1), out.reshape(-1)
        for j, v in enumerate(flat):
          if abs(v) > threshold:
            flat_out[j] = v / m * threshold
            num_clipped += 1
        outputs[i] = out
    history["outputs"].append(outputs)
    history["max"].append(np.array(maxima, np.float64))
    history["ema"].append(np.array(ema, np.float64))
    history["threshold"].append(np.array(thresholds, np.float64))
    history["count"].append(np.array(count))
    history["num_clipped"].append(num_clipped)
  return history


def adagn_reference(
  grad_seq, gamma1=0.7, gamma2=0.9, eps=1e-8, per_tensor=True
):
  """Runs AdaGN over a sequence of gradients, in float64.

  Args:
    grad_seq: a list of steps, each a list of arrays.
    gamma1: decay of the norm's EMA, a float or a callable of the 0-based
      step.
    gamma2: decay of the squared norm's EMA (float or callable).
    eps: added to the root of the corrected second moment.
    per_tensor: one set of statistics per tensor, or one for the global
      norm.

  Returns:
    A dict of per-step lists: ``outputs`` (lists of float64 arrays),
    ``norm``, ``mean``, ``sq_mean``, ``scale`` (float64 arrays, one entry
    per statistic) and ``count`` (int arrays).
  """
  num_stats = len(grad_seq[0]) if per_tensor else 1
  mean = [0.0] * num_stats
  sq_mean = [0.0] * num_stats
  count = [0] * num_stats
  history = {
    k: [] for k in ("outputs", "norm", "mean", "sq_mean", "scale", "count")
  }
  for step, grads in enumerate(grad_seq):
    grads = [np.asarray(g, np.float64) for g in grads]
    g1, g2 = _value(gamma1, step), _value(gamma2, step)
    if per_tensor:
      groups = [[i] for i in range(len(grads))]
      norms = [_l2(g) for g in grads]
    else:
      groups = [list(range(len(grads)))]
      norms = [math.sqrt(sum(_l2(g) ** 2 for g in grads))]
    outputs = [None] * len(grads)
    scales = []
    for k, members in enumerate(groups):
      n = norms[k]
      if math.isfinite(n) and n > 0:
        mean[k] = g1 * mean[k] + (1 - g1) * n
        sq_mean[k] = g2 * sq_mean[k] + (1 - g2) * n * n
        count[k] += 1
      if not math.isfinite(n):
        scale = math.nan
      elif n > 0 and count[k]:
        mean_hat = mean[k] / (1 - g1 ** count[k])
        sq_mean_hat = sq_mean[k] / (1 - g2 ** count[k])
        scale = mean_hat / (math.sqrt(sq_mean_hat) + eps) / n
      else:
        scale = 1.0
      scales.append(scale)
      for i in members:
        outputs[i] = grads[i] * scale
    history["outputs"].append(outputs)
    history["norm"].append(np.array(norms, np.float64))
    history["mean"].append(np.array(mean, np.float64))
    history["sq_mean"].append(np.array(sq_mean, np.float64))
    history["scale"].append(np.array(scales, np.float64))
    history["count"].append(np.array(count))
  return history


# ---------------------------------------------------------------------------
# Fira's norm-growth limiter and grouped global norms
#
# float64 NumPy references for clip_norm_growth and grouped global norms.
#
# Self-contained loop transcriptions of the formulas, written from the papers
# and the documented conventions (not from the implementation), to be merged
# into tests/reference.py:
#
# * :func:`norm_growth_reference`: Fira's norm-growth limiter (Chen et al.,
#   arXiv:2410.01623, Sec. "Norm-Growth Limiter"): if
#   ||g_t|| / ||g_{t-1}|| > gamma then g_t <- g_t * gamma ||g_{t-1}|| / ||g_t||,
#   where ||g_{t-1}|| is the previous step's norm after limiting; plus the
#   library conventions (first step passes; zero and non-finite norms are not
#   recorded; non-finite norms give NaN updates).
# * :func:`grouped_global_norm_reference`: Pascanu et al.'s global-norm
#   clipping, applied to each group of leaves separately; leaves labelled
#   None are left alone.


def global_norm_reference(leaves: Sequence[Any], ord: Any = 2) -> float:  # pylint: disable=redefined-builtin
  """The norm of all leaves taken together, in float64 (0 for no leaves)."""
  flat = np.concatenate(
    [np.ravel(np.asarray(x)).astype(np.complex128) for x in leaves]
    + [np.zeros(0, np.complex128)]
  )
  mags = np.abs(flat)
  if ord == 2:
    if not np.all(np.isfinite(mags)):
      return float(np.nan if np.any(np.isnan(mags)) else np.inf)
    scale = float(np.max(mags)) if mags.size else 0.0
    if scale == 0.0:
      return 0.0
    # Scaled, so that 1e20 or 1e-200 elements neither overflow nor vanish.
    return scale * math.sqrt(float(np.sum((mags / scale) ** 2)))
  if ord == 1:
    return float(np.sum(mags))
  if ord in (math.inf, "inf"):
    return float(np.max(mags)) if mags.size else 0.0
  raise ValueError(ord)


def norm_growth_reference(
  seq: Sequence[Sequence[Any]],
  gamma: float | Callable[[int], float] = 1.01,
  ord: Any = 2,  # pylint: disable=redefined-builtin
) -> dict[str, Any]:
  """Fira's norm-growth limiter on the global norm, step by step.

  Args:
    seq: per step, a list of the update's leaves.
    gamma: the growth ratio, or a function of the step count (0-based) for
      an ``inject_hyperparams`` schedule.
    ord: the norm order (2, 1 or inf).

  Returns:
    A dict of per-step lists: ``outputs`` (float64 leaves), ``norm`` (pre-clip
    global norm), ``limit`` (gamma times the previous norm, inf without
    one), ``prev_norm`` (the reference after the step: 0 until the first
    finite nonzero norm), ``clipped`` (the norm exceeded the limit, or is
    NaN).
  """
  prev = None  # the previous step's norm after limiting
  out: dict[str, list] = {
    "outputs": [],
    "norm": [],
    "limit": [],
    "prev_norm": [],
    "clipped": [],
  }
  for t, leaves in enumerate(seq):
    g = [np.asarray(x, np.float64) for x in leaves]
    norm = global_norm_reference(g, ord)
    rate = gamma(t) if callable(gamma) else gamma
    limit = math.inf if prev is None else rate * prev
    if math.isnan(norm) or math.isinf(norm):
      new = [np.full(x.shape, np.nan) for x in g]
      limited = None
      clipped = not norm <= limit
    elif prev is not None and norm / prev > rate:
      # The paper's rule: the norm grew by more than gamma; bring it back.
      new = [x * (rate * prev / norm) for x in g]
      limited = rate * prev
      clipped = True
    else:
      new = g
      limited = norm
      clipped = False
    # Zero and non-finite norms say nothing about the scale: not recorded.
    if limited is not None and limited > 0:
      prev = limited
    out["outputs"].append(new)
    out["norm"].append(norm)
    out["limit"].append(limit)
    out["prev_norm"].append(0.0 if prev is None else prev)
    out["clipped"].append(clipped)
  return out


def grouped_global_norm_reference(
  leaves: Sequence[Any],
  labels: Sequence[Hashable | None],
  max_norm: float,
  ord: Any = 2,  # pylint: disable=redefined-builtin
) -> tuple[list[np.ndarray], dict[str, float], dict[str, bool]]:
  """Global-norm clipping of each labelled group on its own.

  Args:
    leaves: the update's leaves.
    labels: one label per leaf; None excludes the leaf (returned as given).
    max_norm: the threshold every group's global norm is held to.
    ord: the norm order.

  Returns:
    ``(outputs, norms, clipped)``: float64 leaves (excluded leaves as
    given), and per ``str(label)`` the group's pre-clip norm and whether it
    was rescaled.
  """
  groups: dict[Hashable, list[int]] = {}
  for i, label in enumerate(labels):
    if label is not None:
      groups.setdefault(label, []).append(i)
  outputs: list[Any] = [np.asarray(x) for x in leaves]
  norms, clipped = {}, {}
  for label, members in groups.items():
    norm = global_norm_reference([leaves[i] for i in members], ord)
    if not math.isfinite(norm):
      scale = math.nan
    elif norm <= max_norm and max_norm > 0:
      scale = 1.0
    else:
      scale = max_norm / norm if norm > 0 else 0.0
    for i in members:
      outputs[i] = np.asarray(leaves[i], np.float64) * scale
    norms[str(label)] = norm
    clipped[str(label)] = not norm <= max_norm
  return outputs, norms, clipped


# ---------------------------------------------------------------------------
# Loss-aware skip_step (MaxText / OLMo-core rule)
#
# Float64 NumPy loop reference of ``skip_step`` with the loss rule.
#
# Self-contained (the lead merges it into ``reference.py``). It transcribes the
# rule as MaxText's ``skip_step_on_spikes`` (``src/maxtext/optimizers/
# optimizers.py``) and OLMo-core's ``SkipStepOptimizer.get_step_factor``
# (``src/olmo_core/optim/skip_step_optimizer.py``) state it, plus optaxclip's
# gradient-norm clauses and its history policy:
#
# * loss clause: with ``m``, ``s`` the mean and sample std (divisor
#   ``max(1, N - 1)``) of the last ``loss_window`` recorded losses, a finite
#   loss is a spike when at least ``loss_warmup_steps`` losses are recorded and
#   ``loss - m <= k * s`` does not hold (``k = inf`` never flags);
# * norm clauses: ``max_norm`` and ``mean + spike_sigmas * std`` (population
#   std) over the last ``window`` recorded norms once ``warmup_steps`` are
#   recorded;
# * non-finite norms or losses are skipped when ``skip_nonfinite``; they are
#   never compared and never recorded;
# * recorded: the finite norm and loss of accepted steps, or of every step
#   with ``record_skipped``. A step without a loss (``None``) leaves the loss
#   history alone.
#
# Written as plain Python loops over lists, independent of the JAX code.


def _mean_std(values: list[float], ddof: int) -> tuple[float, float]:
  n = len(values)
  mean = math.fsum(values) / n
  variance = math.fsum((v - mean) ** 2 for v in values) / max(1, n - ddof)
  return mean, math.sqrt(variance)


def _spread(sigmas: float, std: float) -> float:
  return math.inf if sigmas == math.inf else sigmas * std


def skip_step_loss_reference(
    norms: Sequence[float],
    losses: Sequence[float | None],
    *,
    max_norm: float | None = None,
    spike_sigmas: float | None = None,
    window: int = 128,
    warmup_steps: int | None = None,
    skip_nonfinite: bool = True,
    loss_spike_sigmas: float | None = 6.0,
    loss_window: int | None = None,
    loss_warmup_steps: int | None = None,
    record_skipped: bool = False,
) -> dict[str, np.ndarray]:
  """Per-step decisions of ``skip_step`` with ``update(..., loss=...)``.

  Args:
    norms: the global gradient norm of each step.
    losses: each step's loss, ``None`` for a step called without ``loss=``.
    max_norm, spike_sigmas, window, warmup_steps, skip_nonfinite,
      loss_spike_sigmas, loss_window, loss_warmup_steps, record_skipped: as
      in ``skip_step`` (``None`` windows/warmups mean its defaults).

  Returns:
    A dict of arrays over steps: ``skipped`` and ``loss_skipped`` (bool),
    ``threshold`` (the norm threshold) and ``loss_threshold`` (``m + k s``;
    inf while the loss clause is inactive; carried over on steps without a
    loss, inf before the first), plus the final recorded histories
    ``norm_history`` and ``loss_history`` (all recorded values, oldest
    first).
  """
  if warmup_steps is None:
    warmup_steps = window
  if loss_window is None:
    loss_window = window
  if loss_warmup_steps is None:
    loss_warmup_steps = max(1, loss_window // 2 - 1)
  norm_history: list[float] = []
  loss_history: list[float] = []
  out: dict[str, list] = {
      "skipped": [], "loss_skipped": [], "threshold": [], "loss_threshold": []}
  last_loss_threshold = math.inf
  for norm, loss in zip(norms, losses, strict=True):
    norm = float(norm)
    threshold = math.inf
    if max_norm is not None:
      threshold = min(threshold, float(max_norm))
    if spike_sigmas is not None and len(norm_history) >= warmup_steps:
      mean, std = _mean_std(norm_history[-window:], ddof=0)
      threshold = min(threshold, mean + _spread(float(spike_sigmas), std))
    norm_finite = math.isfinite(norm)
    # A non-finite norm is never compared: skipped iff skip_nonfinite.
    skipped = (not norm <= threshold) if norm_finite else skip_nonfinite

    loss_skipped = False
    if loss is not None:
      loss = float(loss)
      loss_finite = math.isfinite(loss)
      last_loss_threshold = math.inf
      if (loss_spike_sigmas is not None
          and len(loss_history) >= loss_warmup_steps):
        mean, std = _mean_std(loss_history[-loss_window:], ddof=1)
        spread = _spread(float(loss_spike_sigmas), std)
        last_loss_threshold = mean + spread
        if loss_finite and not loss - mean <= spread:
          loss_skipped = True
      if not loss_finite and skip_nonfinite:
        loss_skipped = True
    skipped = skipped or loss_skipped

    keep = record_skipped or not skipped
    if keep and norm_finite:
      norm_history.append(norm)
    if loss is not None and keep and math.isfinite(loss):
      loss_history.append(loss)
    out["skipped"].append(skipped)
    out["loss_skipped"].append(loss_skipped)
    out["threshold"].append(threshold)
    out["loss_threshold"].append(last_loss_threshold)
  result = {k: np.array(v) for k, v in out.items()}
  result["norm_history"] = np.array(norm_history)
  result["loss_history"] = np.array(loss_history)
  return result


def loss_margins(
    losses: Sequence[float | None],
    skipped: Sequence[bool],
    *,
    loss_spike_sigmas: float,
    loss_window: int,
    loss_warmup_steps: int,
    record_skipped: bool,
) -> np.ndarray:
  """|loss - m - k s| per step where the loss clause was evaluated (else inf).

  The distance of each decision from its boundary, for checking that a
  float32 implementation cannot decide differently from this reference.
  ``skipped`` are the reference's decisions (they fix the history).
  """
  history: list[float] = []
  margins = []
  for loss, skip in zip(losses, skipped, strict=True):
    margin = math.inf
    if loss is not None and math.isfinite(loss):
      if len(history) >= loss_warmup_steps:
        mean, std = _mean_std(history[-loss_window:], ddof=1)
        spread = _spread(loss_spike_sigmas, std)
        if math.isfinite(spread):
          margin = abs(loss - mean - spread)
      if record_skipped or not skip:
        history.append(float(loss))
    margins.append(margin)
  return np.array(margins)


# ---------------------------------------------------------------------------
# Peer rules: Levanter, Opacus, axlearn.


def historical_norm_reference(grad_seq, window: int = 128,
                              sigmas: float = 3.0) -> dict[str, np.ndarray]:
  """Levanter's ``clip_update_by_historical_norm`` on a sequence of trees.

  Written from the rule in ``src/levanter/optim/clip_update_norm.py``: the
  threshold of step t is mean + sigmas * max(std, 1e-6) (population std) of
  the unclipped global norms of the last ``window`` earlier steps, applied
  only once at least max(2, window // 2) norms are held; the update is scaled
  by threshold / norm when its norm exceeds it. One deliberate difference
  from Levanter, optaxclip's policy: a non-finite norm makes the whole step
  NaN and is not recorded.

  Args:
    grad_seq: per step, a list of leaves.
    window: the rolling window length.
    sigmas: the number of standard deviations.

  Returns:
    ``outputs`` (per step, the list of float64 leaves), ``norm``,
    ``threshold`` (inf while inactive) and ``clipped`` arrays.
  """
  history: list[float] = []
  out: dict[str, list] = {"outputs": [], "norm": [], "threshold": [],
                          "clipped": []}
  for leaves in grad_seq:
    n = norm(leaves)
    if len(history) >= max(2, window // 2):
      held = np.array(history[-window:])
      threshold = float(held.mean() + sigmas * max(held.std(), 1e-6))
    else:
      threshold = math.inf
    if not math.isfinite(n):
      scale = math.nan
    else:
      scale = clip_scale(n, threshold)
      history.append(n)
    out["outputs"].append([_f64(x) * scale for x in leaves])
    out["norm"].append(n)
    out["threshold"].append(threshold)
    out["clipped"].append(not n <= threshold)
  return {k: (v if k == "outputs" else np.array(v)) for k, v in out.items()}


def automatic_clip_reference(examples, max_norm: float, *,
                             stability: float = 0.01, per_layer: bool = False,
                             reduce: str = "mean") -> list[np.ndarray]:
  """AUTO-S (Bu et al. 2022, arXiv 2206.07136), as Opacus runs it.

  Each example's gradient g_i is scaled by C / (||g_i|| + gamma), never
  clamped to 1; with ``per_layer`` every leaf of g_i is scaled by
  C / (||g_i^l|| + gamma) of its own norm (Opacus'
  ``DPPerLayerAutomaticClippingOptimizer``). The scaled examples are summed
  and, for ``reduce="mean"``, divided by the batch size. An example with a
  non-finite norm (any leaf, with ``per_layer``) contributes zero, as in
  every optaxclip per-example rule.

  Args:
    examples: a list of leaves, each of shape (batch, ...).
    max_norm: C.
    stability: gamma.
    per_layer: scale leaf by leaf.
    reduce: "mean" or "sum".

  Returns:
    The aggregated float64 leaves, without the batch axis.
  """
  leaves = [_f64(x) for x in examples]
  batch = leaves[0].shape[0]
  totals = [np.zeros(x.shape[1:]) for x in leaves]
  for b in range(batch):
    parts = [x[b] for x in leaves]
    if not math.isfinite(norm(parts)):
      continue
    for i, part in enumerate(parts):
      n = norm([part]) if per_layer else norm(parts)
      totals[i] = totals[i] + part * (max_norm / (n + stability))
  if reduce == "mean":
    totals = [t / batch for t in totals]
  return totals


def skip_and_clip_reference(grad_seq, *, drop_norm=None, multipliers=(),
                            min_count=500, decay=None, max_norm=None):
  """axlearn's ``skip_and_clip_by_global_norm`` with an identity optimizer.

  Written from ``axlearn/common/optimizers.py``: the thresholds of step t
  come from bias-corrected EMAs of the norms and squared norms of earlier
  *valid* steps (both start at 1; the effective decay after c valid steps is
  decay (1 - decay^c) / (1 - decay^(c+1))): ``"mean"`` gives k * mean,
  ``"stddev"`` gives mean + k * std (1e10 while fewer than ``min_count``
  valid steps), a number is a fixed threshold. The step is valid when its
  norm is finite and below every threshold; each threshold counts the steps
  at or above it; a valid step's gradient is clipped to ``max_norm``
  (exactly, without axlearn's eps) and returned, an invalid one gives zeros.
  The std is sqrt(square_ema - ema**2), accurate in float64 (a negative
  rounding error counts as 0).

  Returns:
    A dict of per-step lists/arrays: ``outputs`` (float64 leaves),
    ``valid``, ``count``, ``nonvalid``, ``ema``, ``square_ema``,
    ``thresholds`` (dicts) and ``exceeds`` (dicts of counters).
  """
  ema = square_ema = 1.0
  count = nonvalid = 0
  exceeds: dict[str, int] = {}
  out: dict[str, list] = {k: [] for k in (
    "outputs", "valid", "count", "nonvalid", "ema", "square_ema",
    "thresholds", "exceeds")}
  for leaves in grad_seq:
    n = norm(leaves)
    std = math.sqrt(max(square_ema - ema * ema, 0.0))
    if drop_norm == "mean":
      limits = {f"{v}x_mean": ema * v for v in multipliers}
    elif drop_norm == "stddev":
      limits = {f"{v}x_stddev": 1e10 if count < min_count else ema + std * v
                for v in multipliers}
    elif drop_norm is None:
      limits = {}
    else:
      limits = {"drop_norm": float(drop_norm)}
    valid = math.isfinite(n)
    for key, limit in limits.items():
      below = n < limit
      valid = valid and below
      exceeds[key] = exceeds.get(key, 0) + (not below)
    scale = 1.0 if max_norm is None else clip_scale(n, max_norm)
    if valid:
      out["outputs"].append([_f64(x) * scale for x in leaves])
      if decay is not None:
        d = decay * (1 - decay**count) / (1 - decay ** (count + 1))
        ema = d * ema + (1 - d) * n
        square_ema = d * square_ema + (1 - d) * n * n
      count += 1
    else:
      out["outputs"].append([np.zeros(np.shape(x)) for x in leaves])
      nonvalid += 1
    for key, value in (("valid", valid), ("count", count),
                       ("nonvalid", nonvalid), ("ema", ema),
                       ("square_ema", square_ema), ("thresholds", limits),
                       ("exceeds", dict(exceeds))):
      out[key].append(value)
  return out


# ---------------------------------------------------------------------------
# QK-Clip (Kimi K2's MuonClip, arXiv:2507.20534, Section 2.1 / Algorithm 1).
#
# Per-head loops written from the paper's rule, MaxText's MLA variant
# (``qk_clip_utils.py``: non-rotary q/k parts by sqrt(gamma), the rotary
# query part by gamma, values untouched) and Megatron-LM's grouped rule, with
# optaxclip's documented decisions: a head clips only when its maximum is a
# finite number above tau (negative, -inf, NaN and +inf maxima leave it
# alone); a key head shared by a group of query heads takes the group's
# largest maximum. Weights are in canonical per-head form: heads on axis -2
# (``(..., heads, width)``).


def qk_gamma(max_logits, tau: float) -> np.ndarray:
  """gamma_h = tau / S_h for finite S_h > tau, else 1 (float64, per head)."""
  s = np.asarray(max_logits, np.float64)
  out = np.ones_like(s)
  for idx in np.ndindex(s.shape):
    v = float(s[idx])
    if math.isfinite(v) and v > tau:
      out[idx] = tau / v
  return out


def qk_clip_heads(wq, wk, max_logits, tau: float, *,
                  group_queries: bool = False):
  """New query and key weights (float64) after QK-Clip of one layer.

  Args:
    wq: ``(..., heads, width)``: every query weight of the layer (kernel or
      bias), heads on axis -2.
    wk: ``(..., kv_heads, width)``.
    max_logits: ``(heads,)``.
    tau: the threshold.
    group_queries: query heads take their group's gamma (Megatron-LM).
  """
  wq = np.array(wq, np.float64)
  wk = np.array(wk, np.float64)
  gamma = qk_gamma(max_logits, tau)
  heads, kv_heads = wq.shape[-2], wk.shape[-2]
  group = heads // kv_heads
  for g in range(kv_heads):
    members = range(g * group, (g + 1) * group)
    s_group = [float(max_logits[h]) for h in members]
    finite = [v for v in s_group if math.isfinite(v)]
    group_gamma = tau / max(finite) if finite and max(finite) > tau else 1.0
    wk[..., g, :] *= math.sqrt(group_gamma)
    for h in members:
      own = group_gamma if group_queries else float(gamma[h])
      wq[..., h, :] *= math.sqrt(own)
  return wq, wk


def qk_clip_mla(wq, wkv, max_logits, tau: float, nope: int):
  """MaxText's MLA rule on ``wq_b`` (..., heads, nope + rope) and ``wkv_b``
  (..., heads, nope + v): q/k content by sqrt(gamma), rotary query by gamma,
  values untouched."""
  wq = np.array(wq, np.float64)
  wkv = np.array(wkv, np.float64)
  gamma = qk_gamma(max_logits, tau)
  for h in range(wq.shape[-2]):
    wq[..., h, :nope] *= math.sqrt(gamma[h])
    wq[..., h, nope:] *= gamma[h]
    wkv[..., h, :nope] *= math.sqrt(gamma[h])
  return wq, wkv


def attention_max_logits(q, k, *, causal: bool = False, mask=None,
                         scale: Optional[float] = None) -> np.ndarray:
  """S_h = max over batch b and positions i, j (kept by the mask) of
  scale * q[b, i, h] . k[b, j, h // (heads / kv_heads)], by plain loops.

  ``q``: (B, T, heads, d), ``k``: (B, S, kv_heads, d), ``mask``: (B, heads,
  T, S) bool or None.
  """
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  batch, length, heads, depth = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  scale = 1.0 / math.sqrt(depth) if scale is None else scale
  out = np.full(heads, -np.inf)
  for b in range(batch):
    for h in range(heads):
      for i in range(length):
        for j in range(kv_len):
          if causal and j > i:
            continue
          if mask is not None and not mask[b, h, i, j]:
            continue
          v = scale * float(np.dot(q[b, i, h], k[b, j, h // group]))
          out[h] = max(out[h], v)
  return out


# ---------------------------------------------------------------------------
# SPECTRA's soft spectral clipping (Jiang et al., arXiv 2603.14315).


def spectra_gram_bound(u) -> float:
  """The authors' bound on sigma_max(u)^2: the smaller of the largest
  absolute row sum and the Frobenius norm of the Gram matrix of u's wide
  orientation (the smaller Gram matrix)."""
  u = _f64(u)
  w = u if u.shape[0] <= u.shape[1] else u.T
  gram = w @ w.conj().T
  return float(min(np.abs(gram).sum(axis=1).max(), np.linalg.norm(gram)))


def spectra_clip_exact(u, c: float) -> np.ndarray:
  """H_c(u) from an SVD: every singular value s becomes s / sqrt(1 + s^2/c^2)."""
  u = _f64(u)
  left, sigma, right = np.linalg.svd(u, full_matrices=False)
  return (left * (sigma / np.sqrt(1 + (sigma / c) ** 2))) @ right


def spectra_ns_gain(lam, ns_steps: int) -> np.ndarray:
  """The coupled Newton-Schulz iteration Y0 = A, Z0 = I, T = (3I - ZY)/2,
  Y <- YT, Z <- TZ on an eigenvalue lam of A (every iterate is a polynomial
  in A, so the matrices share A's eigenvectors and each eigenvalue follows
  this scalar recursion); returns Z_K, which tends to lam^(-1/2)."""
  lam = np.asarray(lam, np.float64)
  y, z = lam.copy(), np.ones_like(lam)
  for _ in range(ns_steps):
    t = (3 - z * y) / 2
    y, z = y * t, t * z
  return z


def spectra_clip_ns(u, c: float, ns_steps: int = 10) -> np.ndarray:
  """What the authors' iteration computes in exact arithmetic: A = I +
  u u^T / c^2 is divided by alpha = 1 + bound / c^2, each eigenvalue of
  A / alpha goes through ``spectra_ns_gain``, and the result is rescaled by
  alpha^(-1/2). On the SVD u = L diag(s) R: s -> s * Z_K(lam) / sqrt(alpha)
  with lam = (1 + s^2/c^2) / alpha."""
  u = _f64(u)
  alpha = 1 + spectra_gram_bound(u) / c**2
  left, sigma, right = np.linalg.svd(u, full_matrices=False)
  lam = (1 + (sigma / c) ** 2) / alpha
  gain = spectra_ns_gain(lam, ns_steps) / np.sqrt(alpha)
  return (left * (sigma * gain)) @ right


def spectra_vector(v, c: float) -> np.ndarray:
  """The authors' vector rule: v while |v| <= c, else v / sqrt(1 + |v|^2/c^2)."""
  v = _f64(v)
  n = float(np.linalg.norm(v))
  return v if n <= c else v / math.sqrt(1 + (n / c) ** 2)


def spectra_rectangular_factor(rows: int, cols: int) -> float:
  """The factor SPECTRA's step multiplies a clipped (out, in) PyTorch weight
  by: sqrt(max(1, out / in)), as Muon does."""
  return math.sqrt(max(1.0, rows / cols))


def norm_ema_ratios(norms, decay: float):
  """``record_norms(ema=decay)`` by plain loops, in float64.

  ``norms``: (steps, entries). Per step and entry, the ratio of this step's
  norm to the bias-corrected EMA of the earlier finite, positive norms (1
  while there are none), then the EMA takes in this norm if it is finite
  and positive. Returns ``(ratios, ema, count)``: ratios per step, and the
  raw EMA and observation count after the last step.
  """
  norms = np.asarray(norms, np.float64)
  ema = np.zeros(norms.shape[1])
  count = np.zeros(norms.shape[1], np.int64)
  ratios = np.ones_like(norms)
  for t, step in enumerate(norms):
    for i, n in enumerate(step):
      if count[i]:
        ratios[t, i] = n / (ema[i] / (1.0 - decay ** count[i]))
      if math.isfinite(n) and n > 0:
        ema[i] = decay * ema[i] + (1.0 - decay) * n
        count[i] += 1
  return ratios, ema, count
