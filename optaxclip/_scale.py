"""The clip-scale rule shared by every norm-based clipper.

:func:`clip_scale` turns a norm and a threshold into the factor that brings
the norm down to the threshold (``1`` when ``norm <= threshold``, else
``threshold / norm``, NaN for a non-finite norm; see
docs/design.md#numerics), and :func:`scale_leaf` applies it to a leaf so that
unclipped leaves come back bit-identical and low-precision leaves are scaled
in float32.

Layering (imports point one way only): ``_grouping`` ← ``_norms`` ←
``_scale`` ← the transforms; this module needs neither of the first two.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@jax.custom_jvp
def ratio(threshold: jax.Array, norm: jax.Array) -> jax.Array:
  """``threshold / norm`` whose derivative never squares ``norm``.

  The built-in rule for a quotient, ``-threshold * dnorm / norm**2``,
  underflows ``norm**2`` to 0 at ``norm = 2e-30`` (float32) and gives
  ``inf * 0 = NaN``; ``(dthreshold - q * dnorm) / norm`` with ``q <= 1`` does
  not.
  """
  return threshold / norm


@ratio.defjvp
def _ratio_jvp(primals, tangents):
  (threshold, norm), (dthreshold, dnorm) = primals, tangents
  q = threshold / norm
  return q, (dthreshold - q * dnorm) / norm


# Jitted, as the per-leaf helpers of _norms: called once per leaf, a jitted
# function is traced once per shape instead of every time.
@jax.jit
def clip_scale(norm: jax.Array, threshold: Any) -> tuple[jax.Array, jax.Array]:
  """The factor that brings ``norm`` down to ``threshold``, and whether it did.

  The rule of every norm-based clipper (docs/design.md#numerics):

  * ``1`` when ``0 < threshold`` and ``norm <= threshold`` (so the leaves come
    back bit-identical);
  * ``threshold / norm`` otherwise (so the result has norm ``threshold``, not
    ``threshold - eps``);
  * ``0`` when ``threshold == 0``, whatever the (finite) norm: zero updates,
    even for elements too small to register in the norm (a 1e-40 subnormal
    counts as 0 on XLA's CPU backend);
  * NaN when ``norm`` is inf/NaN or the threshold is negative or NaN (a traced
    value that skipped construction-time validation): loud, never silently
    finite or zero.

  ``norm = 0`` never divides, and the derivative is finite everywhere: the
  division only ever sees ``norm > threshold >= 0``, and its derivative is
  taken without squaring ``norm`` (which underflows at tiny norms).

  Args:
    norm: scalar or array of norms.
    threshold: the clipping threshold, broadcastable against ``norm``.

  Returns:
    ``(scale, clipped)``: the scale in ``norm``'s dtype and a boolean array,
    True where ``norm > threshold`` (or the norm is NaN).
  """
  threshold = jnp.asarray(threshold).astype(norm.dtype)
  within = norm <= threshold
  keep = within & (threshold > 0)
  safe_norm = jnp.where(within, jnp.ones_like(norm), norm)
  scale = jnp.where(keep, jnp.ones_like(norm), ratio(threshold, safe_norm))
  valid = jnp.isfinite(norm) & (threshold >= 0)
  scale = jnp.where(valid, scale, jnp.full_like(scale, jnp.nan))
  return scale, jnp.logical_not(within)


@jax.jit
def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x * scale`` in at least float32, returned in ``x``'s dtype and shape.

  Where ``scale`` is exactly 1 the elements of ``x`` are *selected*, not
  multiplied: ``x * 1`` flushes subnormals to zero on backends that do, so an
  unclipped leaf would not come back bit-identical. The select fuses into the
  multiply (no extra pass over ``x``).
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating) or (
    jnp.issubdtype(x.dtype, jnp.floating) and x.dtype not in _LOW_PRECISION
  ):
    scaled = x * scale.astype(x.dtype)
  else:
    # bf16/fp16 (and integers): multiply in float32, round once on the way
    # back.
    scaled = (x.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)
  return jnp.where(scale == 1, x, scaled)
