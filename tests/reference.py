"""Float64 NumPy references, written from the formulas, not from the library.

Each function takes plain NumPy arrays (any dtype; they are converted to
float64 / complex128 first) and returns float64 results. They know nothing of
buckets, safe square roots or dtypes: they are the textbook rules.
"""

from __future__ import annotations

import math

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
