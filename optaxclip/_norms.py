"""The one norm kernel of optaxclip, and the clip-scale rule built on it.

Every clipper in the library computes its norms here, so that precision,
differentiability and speed are decided once:

* **Precision.** Low-precision leaves (bfloat16, float16, integers) are cast
  to float32 *before* squaring, so float16 squares cannot overflow and bf16
  sums do not lose mass; float32 accumulates in float32 and float64 in float64.
  Complex leaves use ``|x|^2 = re^2 + im^2`` in their real precision.
* **Differentiability.** :func:`safe_sqrt` has a finite (zero) derivative at
  0, so ``jax.grad`` through a clipper is finite at all-zero gradients.
* **Orders.** ``ord`` is 2 (Euclidean), 1 (sum of magnitudes) or ``inf``
  (largest magnitude). Partial results combine by sum (1, 2) or max (inf),
  across leaves and, with ``axis_name``, across devices (``psum``/``pmax``).
* **Speed.** One reduction per leaf is slow to compile and slow to run when a
  tree has thousands of small leaves (optax's ``clip_by_global_norm`` takes
  ~20 s to compile on 2000 leaves of 64x32 and 32). Leaves smaller than
  :data:`SMALL_LEAF_SIZE` elements are therefore concatenated into one bucket
  reduced in a single pass (a copy of the small leaves only); large leaves keep
  their own one-pass reduction, because copying them would cost a full extra
  read and write of the gradients.

The clip rule shared by every norm-based clipper is :func:`clip_scale`: scale
``1`` when ``norm <= threshold``, else ``threshold / norm``, with NaN when the
norm is not finite (see DESIGN §3).

References:
  Pascanu et al., `On the difficulty of training Recurrent Neural Networks
  <https://arxiv.org/abs/1211.5063>`_, 2013
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _validate

# Leaves with fewer elements than this are reduced together in one bucket.
# 2**15 float32 elements is 128 KiB: well above per-op overhead territory for
# the leaves it catches (biases, norms, small kernels), well below the sizes
# where an extra copy would show in run time or temporary memory.
SMALL_LEAF_SIZE = 2**15

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The real dtype a leaf of ``dtype`` accumulates its norm in.

  float64 and complex128 accumulate in float64; every other dtype (bf16, fp16,
  float32, complex64, integers) in float32.

  Args:
    dtype: a leaf's dtype.

  Returns:
    ``float64`` or ``float32``.
  """
  dtype = jnp.dtype(dtype)
  if dtype in (jnp.dtype(np.float64), jnp.dtype(np.complex128)):
    return jnp.dtype(np.float64)
  return jnp.dtype(np.float32)


def widest_dtype(dtypes) -> jnp.dtype:
  """float64 if any of the accumulation ``dtypes`` is float64, else float32."""
  f64 = jnp.dtype(np.float64)
  return (
    f64 if any(jnp.dtype(d) == f64 for d in dtypes) else jnp.dtype(np.float32)
  )


def tree_accumulation_dtype(tree: Any) -> jnp.dtype:
  """The widest accumulation dtype over a tree's leaves (float32 if empty)."""
  return widest_dtype(
    accumulation_dtype(jnp.asarray(x).dtype) for x in jax.tree.leaves(tree)
  )


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 instead of inf.

  The forward pass is a plain ``sqrt`` (one HLO op: a two-sided ``where``
  here doubled AGC's compile time on trees of thousands of leaves); only the
  derivative is guarded. NaN and inf pass through (``sqrt(nan) = nan``), so
  a non-finite sum of squares stays visible.

  Args:
    x: a non-negative array.

  Returns:
    ``sqrt(x)``, elementwise.
  """
  return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  root = jnp.sqrt(x)
  positive = x > 0
  # Two-sided where: the division never sees 0, so no 0/0 or inf * 0.
  slope = jnp.where(positive, 0.5 / jnp.where(positive, root, 1), 0)
  return root, slope * dx


def std_from_variance(variance: jax.Array) -> jax.Array:
  """A standard deviation from a (population or EMA) variance.

  The adaptive clippers (ZClip's EMA, ``skip_step``'s window of accepted
  norms) take it here so every square root in the library goes through
  :func:`safe_sqrt`: zero-variance histories (a constant norm) keep a finite
  derivative.

  Args:
    variance: a non-negative array.

  Returns:
    ``sqrt(variance)``.
  """
  return safe_sqrt(variance)


def _squares(x: jax.Array) -> jax.Array:
  """``|x|^2`` element-wise in the accumulation dtype, taken after the cast."""
  acc = accumulation_dtype(x.dtype)
  if jnp.iscomplexobj(x):
    return jnp.square(jnp.real(x).astype(acc)) + jnp.square(
      jnp.imag(x).astype(acc)
    )
  return jnp.square(x.astype(acc))


def _magnitudes(x: jax.Array) -> jax.Array:
  """``|x|`` element-wise in the accumulation dtype."""
  if jnp.iscomplexobj(x):
    return safe_sqrt(_squares(x))
  return jnp.abs(x.astype(accumulation_dtype(x.dtype)))


def _partial(x: jax.Array, ord: float, axis=None) -> jax.Array:  # pylint: disable=redefined-builtin
  """The un-finalized reduction of ``x``: sum |x|^2, sum |x|, or max |x|.

  Each branch is one plain sum or max over an element-wise producer, the form
  XLA's CPU backend vectorises; a ``where`` inside a reduction, or two
  reductions sharing one element-wise producer, run 5-10x slower there.
  """
  if ord == 2:
    return jnp.sum(_squares(x), axis=axis)
  if ord == 1:
    return jnp.sum(_magnitudes(x), axis=axis)
  # initial=0 makes empty inputs valid; magnitudes are >= 0 so it is exact.
  largest = jnp.max(_magnitudes(x), axis=axis, initial=0)
  # The vectorised CPU max reduction drops NaN, which must stay visible. The
  # sum of squares is NaN exactly when an element is NaN (squares are >= 0
  # and inf stays inf), and as a reduction of its own producer it runs in a
  # separate fast pass.
  has_nan = jnp.isnan(jnp.sum(_squares(x), axis=axis))
  return jnp.where(has_nan, jnp.full_like(largest, jnp.nan), largest)


def _combine(partials: Sequence[jax.Array], ord: float) -> jax.Array:  # pylint: disable=redefined-builtin
  """Combines scalar partials (sum or max) in the widest of their dtypes."""
  if not partials:
    return jnp.zeros((), jnp.float32)
  dtype = widest_dtype(p.dtype for p in partials)
  stacked = jnp.stack([p.astype(dtype) for p in partials])
  # Partials are non-negative (or NaN) magnitudes: sum or max them.
  return _partial(stacked, 1 if ord == 2 else ord)


def _cross_device(partial: jax.Array, ord: float, axis_name) -> jax.Array:  # pylint: disable=redefined-builtin
  if axis_name is None:
    return partial
  if ord == math.inf:
    return jax.lax.pmax(partial, axis_name)
  return jax.lax.psum(partial, axis_name)


def _finalize(partial: jax.Array, ord: float) -> jax.Array:  # pylint: disable=redefined-builtin
  return safe_sqrt(partial) if ord == 2 else partial


def _leaves(tree: Any) -> list[jax.Array]:
  return [jnp.asarray(x) for x in jax.tree.leaves(tree)]


def _may_bucket(x: jax.Array) -> bool:
  """Whether flattening ``x`` into the shared bucket is free of communication.

  Concatenating a *sharded* leaf into a flat bucket makes XLA all-gather it
  (and explicit-sharding mode rejects the reshape outright), while a per-leaf
  reduction of a sharded leaf costs one scalar all-reduce. So a leaf is
  bucketed only when it cannot be sharded: the process sees a single device,
  or the leaf's type says it is unsharded (explicit axes with an all-None
  spec, or inside ``shard_map`` where arrays are device-local). Under
  auto-sharded ``jit`` on several devices the layout is unknown at trace time
  and leaves are reduced one by one: correct and communication-optimal, only
  slower to compile.
  """
  if jax.device_count() == 1:
    return True
  try:
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
  except (AttributeError, TypeError):  # pragma: no cover - older jax
    return False
  if mesh.empty:
    return False  # no mesh in the type: layout unknown, do not risk a gather
  axis_types = tuple(mesh.axis_types)
  if any(t == jax.sharding.AxisType.Auto for t in axis_types):
    return False  # auto axes: the compiler decides the layout later
  # Only manual (device-local inside shard_map) and explicit axes remain; the
  # type's spec is then exact, and an all-None spec means replicated.
  return all(p is None for p in sharding.spec)


def reduction_groups(leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """The arrays a whole-tree reduction runs over: large leaves and buckets.

  Small leaves (fewer than :data:`SMALL_LEAF_SIZE` elements, and unsharded,
  see :func:`_may_bucket`) are flattened and concatenated into one bucket per
  dtype; large leaves are returned as they are. Real leaves come back cast to
  their accumulation dtype (the cast fuses into the reduction or the
  concatenation), complex leaves keep their dtype. Empty leaves are dropped.

  Args:
    leaves: the arrays.

  Returns:
    A list of arrays whose elements, taken together, are the tree's elements.
  """
  groups: list[jax.Array] = []
  buckets: dict[Any, list[jax.Array]] = {}
  for x in leaves:
    if x.size == 0:
      continue
    dtype = x.dtype if jnp.iscomplexobj(x) else accumulation_dtype(x.dtype)
    if x.size < SMALL_LEAF_SIZE and _may_bucket(x):
      buckets.setdefault(jnp.dtype(dtype), []).append(
        x.reshape(-1).astype(dtype)
      )
    else:
      groups.append(x.astype(dtype))
  for bucket in buckets.values():
    flat = bucket[0] if len(bucket) == 1 else jnp.concatenate(bucket)
    # Without the barrier XLA fuses the element-wise work of thousands of
    # leaves and the concatenation into one reduction whose compile time grows
    # with the number of leaves (~16 s for 2000 leaves, as slow as optax);
    # with it the bucket is one copy and one cheap reduction (~3 s).
    groups.append(_barrier(flat))
  return groups


@jax.custom_jvp
def _barrier(x: jax.Array) -> jax.Array:
  """``lax.optimization_barrier`` with an identity derivative.

  jax < 0.6 has no differentiation rule for the barrier; the barrier only
  orders compilation, so its tangent is the input's tangent.
  """
  return jax.lax.optimization_barrier(x)


@_barrier.defjvp
def _barrier_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return _barrier(x), x_dot


def global_norm_partial(leaves: Sequence[jax.Array], ord: float) -> jax.Array:  # pylint: disable=redefined-builtin
  """The un-finalized global reduction (sum of squares, sum, or max).

  Args:
    leaves: the arrays.
    ord: 1, 2 or ``math.inf`` (already validated).

  Returns:
    A scalar in the widest accumulation dtype.
  """
  return _combine([_partial(g, ord) for g in reduction_groups(leaves)], ord)


def value_range(leaves: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The largest and smallest element over all real leaves, NaN-propagating.

  Uses the same bucketing as the norms (one pass per large leaf, one per
  bucket); an empty tree gives ``(0, 0)``.

  Args:
    leaves: real arrays.

  Returns:
    ``(max, min)`` scalars in the widest accumulation dtype.
  """
  groups = reduction_groups(leaves)
  if not groups:
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  dtype = widest_dtype(g.dtype for g in groups)
  largest = jnp.stack([jnp.max(g).astype(dtype) for g in groups])
  smallest = jnp.stack([jnp.min(g).astype(dtype) for g in groups])
  # XLA's vectorised CPU max/min reductions drop NaN; as in _partial, a NaN
  # sum of squares detects it (an isnan mask reduction is 5-10x slower).
  has_nan = jnp.isnan(_combine([_partial(g, 2) for g in groups], 2))
  nan = jnp.full((), jnp.nan, dtype)
  return (
    jnp.where(has_nan, nan, jnp.max(largest)),
    jnp.where(has_nan, nan, jnp.min(smallest)),
  )


def global_norm(
  tree: Any,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  axis_name: Any | None = None,
) -> jax.Array:
  r"""The norm of all of a pytree's leaves taken together.

  This is the norm every optaxclip clipper uses. bf16/fp16 leaves are cast to
  float32 before squaring (so fp16 squares cannot overflow); float64 leaves
  accumulate in float64. The result is float32 unless the tree has float64
  leaves. Its gradient is finite everywhere, including at an all-zero tree.

  .. math::
    \|g\|_2 = \sqrt{\textstyle\sum_i |g_i|^2}, \quad
    \|g\|_1 = \textstyle\sum_i |g_i|, \quad
    \|g\|_\infty = \max_i |g_i|

  Args:
    tree: a pytree of arrays; ``None`` leaves are empty subtrees and an empty
      tree has norm 0.
    ord: 2 (default; ``None`` means 2), 1, or ``jnp.inf`` / ``"inf"``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis (or axes) across
      which the tree is *split*; partial sums are combined with ``psum`` (ord
      1, 2) or ``pmax`` (inf) so every device gets the norm of the full tree.

  Returns:
    A scalar ``jax.Array``: float32, or float64 if the tree has float64 leaves.

  Raises:
    ValueError: for an unsupported ``ord``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tree = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    >>> oc.global_norm(tree)
    Array(5., dtype=float32)
    >>> oc.global_norm(tree, ord=1), oc.global_norm(tree, ord="inf")
    (Array(7., dtype=float32), Array(4., dtype=float32))

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  ord = _validate.canonical_ord("global_norm", ord)
  return global_norm_from(tree, ord, axis_name)


def global_norm_from(tree: Any, ord: float, axis_name=None) -> jax.Array:  # pylint: disable=redefined-builtin
  """:func:`global_norm` for an already validated ``ord`` (internal)."""
  partial = global_norm_partial(_leaves(tree), ord)
  return _finalize(_cross_device(partial, ord, axis_name), ord)


def leaf_norms(
  leaves: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  axis_name=None,
) -> list[jax.Array]:
  """One norm per leaf, each in that leaf's accumulation dtype.

  Args:
    leaves: the arrays.
    ord: 1, 2 or ``math.inf`` (already validated).
    axis_name: combine each leaf's partial across this mapped axis (for a
      tensor split across devices).

  Returns:
    A list of scalars, one per leaf.
  """
  partials = [
    _partial(x, ord) if x.size else jnp.zeros((), accumulation_dtype(x.dtype))
    for x in leaves
  ]
  if axis_name is not None and partials:
    # One collective for all leaves instead of one per leaf.
    dtype = widest_dtype(p.dtype for p in partials)
    stacked = _cross_device(
      jnp.stack([p.astype(dtype) for p in partials]), ord, axis_name
    )
    partials = [stacked[i].astype(p.dtype) for i, p in enumerate(partials)]
  return [_finalize(p, ord) for p in partials]


def leaf_rms(leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """Root-mean-square of each leaf, ``sqrt(sum |x|^2 / size)``; 0 if empty."""
  return [
    safe_sqrt(_partial(x, 2) / max(x.size, 1))
    if x.size
    else jnp.zeros((), accumulation_dtype(x.dtype))
    for x in leaves
  ]


def unit_norms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """L2 norm of every unit of ``x``: reduced over ``axes``, kept as size 1.

  The result broadcasts against ``x`` without an explicit ``broadcast_to``,
  so under explicit sharding it keeps the unit axes' sharding and needs no
  reshard.

  Args:
    x: an array.
    axes: the axes one unit spans (the others index the units).

  Returns:
    The unit norms in ``x``'s accumulation dtype, with ``axes`` kept as 1.
  """
  return safe_sqrt(jnp.sum(_squares(x), axis=axes, keepdims=True))


def count_true(masks: Sequence[jax.Array]) -> jax.Array:
  """How many elements of the boolean ``masks`` are True, as int32.

  Uses the same bucketing as the norms, so thousands of small masks cost one
  reduction (and sharded ones are never gathered).
  """
  groups = reduction_groups([m.astype(jnp.float32) for m in masks])
  if not groups:
    return jnp.zeros((), jnp.int32)
  return jnp.sum(jnp.stack([jnp.sum(g) for g in groups])).astype(jnp.int32)


def clip_scale(norm: jax.Array, threshold: Any) -> tuple[jax.Array, jax.Array]:
  """The factor that brings ``norm`` down to ``threshold``, and whether it did.

  The rule of every norm-based clipper (DESIGN §3):

  * ``1`` when ``norm <= threshold`` (so the leaves come back bit-identical);
  * ``threshold / norm`` otherwise (so the result has norm ``threshold``, not
    ``threshold - eps``);
  * NaN when ``norm`` is inf/NaN or the threshold is negative or NaN (a traced
    value that skipped construction-time validation): loud, never silently
    finite or zero.

  ``norm = 0`` and ``threshold = 0`` give 1 (zeros stay zeros), and the
  derivative is finite everywhere: the division only ever sees
  ``norm > threshold >= 0``.

  Args:
    norm: scalar or array of norms.
    threshold: the clipping threshold, broadcastable against ``norm``.

  Returns:
    ``(scale, clipped)``: the scale in ``norm``'s dtype and a boolean array,
    True where ``norm > threshold`` (or the norm is NaN).
  """
  threshold = jnp.asarray(threshold).astype(norm.dtype)
  within = norm <= threshold
  safe_norm = jnp.where(within, jnp.ones_like(norm), norm)
  scale = jnp.where(within, jnp.ones_like(norm), threshold / safe_norm)
  valid = jnp.isfinite(norm) & (threshold >= 0)
  scale = jnp.where(valid, scale, jnp.full_like(scale, jnp.nan))
  return scale, jnp.logical_not(within)


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x * scale`` in at least float32, returned in ``x``'s dtype and shape."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating) or (
    jnp.issubdtype(x.dtype, jnp.floating) and x.dtype not in _LOW_PRECISION
  ):
    return x * scale.astype(x.dtype)
  # bf16/fp16 (and integers): multiply in float32, round once on the way back.
  return (x.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)
