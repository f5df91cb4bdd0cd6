"""Float64 NumPy references, written from the formulas, not from the library.

Each function takes plain NumPy arrays (any dtype; they are converted to
float64 / complex128 first) and returns float64 results. They know nothing of
buckets, safe square roots or dtypes: they are the textbook rules.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

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
