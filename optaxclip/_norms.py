"""The one norm kernel of optaxclip, and the clip-scale rule built on it.

Every clipper in the library computes its norms here, so that precision,
differentiability and speed are decided once:

* **Precision.** Low-precision leaves (bfloat16, float16, integers) are cast
  to float32 *before* squaring, so float16 squares cannot overflow and bf16
  sums do not lose mass; float32 accumulates in float32 and float64 in float64.
  Complex leaves use ``|x|^2 = re^2 + im^2`` in their real precision.
* **Range.** A finite input whose sum of squares (or of magnitudes)
  overflows to inf, or whose squares underflow, still gets its true norm: a
  ``lax.cond`` on the accumulated scalar sends only those rare inputs to a
  recomputation scaled by an exact power of two (see :func:`_rescued`); the
  common case runs the same single reduction as before.
* **Differentiability.** :func:`safe_sqrt` has a finite (zero) derivative at
  0, so ``jax.grad`` through a clipper is finite at all-zero gradients, and
  :func:`clip_scale` differentiates ``threshold / norm`` without squaring a
  tiny norm.
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
norm is not finite (see docs/design.md#numerics).

References:
  Pascanu et al., `On the difficulty of training Recurrent Neural Networks
  <https://arxiv.org/abs/1211.5063>`_, 2013
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _tree, _validate

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
  """``|x|`` element-wise in the accumulation dtype.

  For complex leaves this is XLA's ``abs`` (a scaled hypot: no overflow of
  ``re^2`` at 1e20, no underflow at 1e-30, and a finite derivative at 0).
  """
  if jnp.iscomplexobj(x):
    return jnp.abs(x).astype(accumulation_dtype(x.dtype))
  return jnp.abs(x.astype(accumulation_dtype(x.dtype)))


def _element_norms(x: jax.Array) -> jax.Array:
  """Norms over zero axes: every element is its own slice, of every order.

  The norm of one element is its magnitude, taken directly: squaring it
  first (a sum of squares over a size-1 axis) overflows at 1e20 and flushes
  1e-25 to zero in float32, which the rescue would then have to undo.
  """
  return _magnitudes(x)


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


# --------------------------------------------------------------------------
# The rare path: sums that overflow or underflow their accumulation dtype.
#
# A float32 gradient of four elements of 1e20 has the finite norm 2e20, but its
# sum of squares (4e40) overflows to inf; four elements of 1e-20 have the norm
# 2e-20, but their squares (1e-40) flush to zero. Recomputing the sum from
# ``x / 2**k`` (overflow) or ``x * 2**k`` (underflow), with a fixed power of two
# per dtype (see :func:`_rescue_scale`), brings every term back into range, and
# ``norm = 2**k * ||x / 2**k||`` is exact to the sum's rounding: scaling by a
# power of two rounds nothing. That costs a second sum pass (no max pass is
# needed to choose the scale), so it runs only under a ``lax.cond`` on a scalar
# predicate that the common case never meets: the fast path is the single
# reduction it always was, plus one scalar compare. (An earlier version scaled
# by the largest magnitude: one more reduction per leaf in the rare branch,
# which made per-leaf transforms on 2000-leaf trees several times slower to
# compile.)
#
# The predicate is read from the *accumulated* sum (after ``psum`` across
# devices), so every device takes the same branch and the collectives inside
# the rare branch match. It holds when:
#
# * the sum is ``+inf`` (ord 1, 2): either a square overflowed (rescue) or an
#   element is inf (the scaled sum is inf again, so the norm stays inf and the
#   loud-NaN policy is unchanged). A NaN element makes the sum NaN, which
#   fails both comparisons: NaN stays on the fast path and stays NaN.
# * the sum of squares is below ``tiny / eps`` (ord 2): squares below
#   ``tiny`` may have been flushed to zero, and above this bound the flushed
#   mass (at most ``n * tiny``) is within the summation's own ``n * eps``
#   rounding bound. An exactly zero sum lands here too, and the scaled sum is
#   0 again. (An all-zero leaf therefore pays the rare branch; all-zero whole
#   gradients are not the common case.)
#
# ord inf (a max) cannot overflow or underflow and has no rare path. XLA's CPU
# backend treats subnormal inputs as zero (DAZ), so elements below ``tiny``
# (1e-40 in float32) count as zero there on every path.


def _rescue_limit(dtype: Any) -> float:
  """Sums of squares below this may have lost flushed-to-zero squares."""
  info = jnp.finfo(dtype)
  return float(info.tiny) / float(info.eps)


def _needs_rescue(partial: jax.Array, ord: float) -> jax.Array:  # pylint: disable=redefined-builtin
  """Element-wise: whether a fast partial may be wrong (see above)."""
  rare = partial == jnp.inf
  if ord == 2:
    rare = rare | (partial < _rescue_limit(partial.dtype))
  return rare


def _scaled_partial(
  x: jax.Array,
  inverse: jax.Array,
  ord: float,  # pylint: disable=redefined-builtin
  axis,
  keepdims: bool,
) -> jax.Array:
  """The partial of ``x * inverse``, in ``inverse``'s dtype.

  ``inverse`` is a power of two (:func:`_rescue_scale`), so the scaling is
  exact and only the sum rounds.
  """
  dtype = inverse.dtype
  if jnp.iscomplexobj(x):
    re = jnp.real(x).astype(dtype) * inverse
    im = jnp.imag(x).astype(dtype) * inverse
    squares = re * re + im * im
    terms = squares if ord == 2 else safe_sqrt(squares)
  else:
    y = x.astype(dtype) * inverse
    terms = y * y if ord == 2 else jnp.abs(y)
  return jnp.sum(terms, axis=axis, keepdims=keepdims)


def _rescue_scale(
  partial: jax.Array, need: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(divisor, 1 / divisor)``: exact powers of two that bring a rare
  partial back into range; ``(1, 1)`` where ``need`` is False.

  An overflowing partial (``inf``) is recomputed from ``x / 2**k`` and an
  underflowing one (below :func:`_rescue_limit`) from ``x * 2**k``, with
  ``k = maxexp // 2 + 16`` (80 in float32, 528 in float64). Then the largest
  finite element (``2**maxexp``) squares to ``2**(maxexp - 32)`` at most,
  leaving room for ``2**32`` such terms, and every element of a partial below
  the limit (each under ``2**((minexp - mantissa bits) / 2)``) squares to a
  normal number far below the maximum. A power of two scales exactly, its
  reciprocal is normal (no flush to zero on XLA:CPU), and it needs no pass
  over the data to find.
  """
  info = jnp.finfo(partial.dtype)
  big = jnp.asarray(2.0 ** (info.maxexp // 2 + 16), partial.dtype)
  small = jnp.asarray(2.0 ** -(info.maxexp // 2 + 16), partial.dtype)
  one = jnp.ones_like(partial)
  over = partial == jnp.inf
  divisor = jnp.where(need, jnp.where(over, big, small), one)
  inverse = jnp.where(need, jnp.where(over, small, big), one)
  return jax.lax.stop_gradient(divisor), jax.lax.stop_gradient(inverse)


def _rescued(
  partial: jax.Array,
  arrays: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  *,
  axis=None,
  axis_name=None,
) -> tuple[jax.Array, jax.Array]:
  """``(scale, partial)`` with ``norm = scale * _finalize(partial)``.

  On the fast path ``scale`` is 1 and ``partial`` the given one, unchanged.
  Where :func:`_needs_rescue` holds, both are recomputed from ``arrays``
  scaled by a power of two (:func:`_rescue_scale`).

  Args:
    partial: the fast partial(s), already combined across ``axis_name``.
    arrays: the arrays ``partial`` was reduced from: several (reduced whole,
      ``axis=None``) or one (reduced over ``axis`` with ``keepdims``).
    ord: 1 or 2 (ord inf never needs this).
    axis: the reduced axes of a single array, or None.
    axis_name: the mapped axis ``partial`` was ``psum``-ed across.

  Returns:
    ``(scale, partial)``, both shaped and typed like ``partial``.
  """
  keepdims = axis is not None

  def fast(partial, arrays):
    return jnp.ones_like(partial), partial

  def rare(partial, arrays):
    need = _needs_rescue(partial, ord)
    divisor, inverse = _rescue_scale(partial, need)
    sums = [_scaled_partial(a, inverse, ord, axis, keepdims) for a in arrays]
    rescued = sums[0] if len(sums) == 1 else sum(sums[1:], sums[0])
    if axis_name is not None:
      rescued = jax.lax.psum(rescued, axis_name)
    return divisor, jnp.where(need, rescued, partial)

  arrays = list(arrays)
  if len(arrays) == 1 and arrays[0].size < SMALL_LEAF_SIZE:
    return _rescued_inline(
      partial, arrays[0], ord, axis=axis, axis_name=axis_name
    )
  need = jnp.any(_needs_rescue(partial, ord))
  if not isinstance(need, jax.core.Tracer):
    # Eager (un-jitted) call: the predicate is known, so run one branch.
    # A lax.cond here would re-trace and re-compile these local closures on
    # every call (hundreds of times slower in an eager training loop).
    return rare(partial, arrays) if bool(need) else fast(partial, arrays)
  return jax.lax.cond(need, rare, fast, partial, arrays)


def _rescued_inline(
  partial: jax.Array,
  x: jax.Array,
  ord: float,  # pylint: disable=redefined-builtin
  *,
  axis=None,
  axis_name=None,
) -> tuple[jax.Array, jax.Array]:
  """:func:`_rescued` without control flow, for a small array ``x``.

  The scaled sum is always computed (with scale 1 where no rescue is
  needed) and selected where :func:`_needs_rescue` holds, so the fast result
  is returned bit for bit. On a small array that second pass reads data
  that is still in cache and costs a few microseconds, while a ``lax.cond``
  costs compile time: XLA's CPU backend compiles one kernel per distinct
  fused computation and runs its passes over every conditional, so 2000
  small leaves under one cond with 2000 outputs took 29 s to compile against
  13 s this way (and 5 s with no rescue at all), measured on the
  benchmark's tiny tree. Every leaf of one shape gets the same kernels,
  which XLA compiles once.
  """
  keepdims = axis is not None
  need = _needs_rescue(partial, ord)
  divisor, inverse = _rescue_scale(partial, need)
  rescued = _scaled_partial(x, inverse, ord, axis, keepdims)
  if axis_name is not None:
    rescued = jax.lax.psum(rescued, axis_name)
  return divisor, jnp.where(need, rescued, partial)


def _safe_norm(
  partial: jax.Array,
  arrays: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  *,
  axis=None,
  axis_name=None,
) -> jax.Array:
  """The finalized norm of ``partial``, rescued on the rare path."""
  if ord == math.inf or not arrays:
    return _finalize(partial, ord)
  scale, partial = _rescued(
    partial, arrays, ord, axis=axis, axis_name=axis_name
  )
  return scale * _finalize(partial, ord)


def _rescued_each(
  partials: Sequence[jax.Array],
  arrays: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  axis_name=None,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """:func:`_rescued` for many independent partials, under one ``lax.cond``.

  ``partials[i]`` is the whole-array partial of ``arrays[i]`` (already
  combined across ``axis_name``). One cond for the whole list, whose rare
  branch recomputes only the partials that need it (one scaled sum each),
  compiles several times faster than a cond per partial on trees of
  thousands of leaves; the branches return tuples of scalars, never a
  vector to slice (slicing thousands of scalars out of a computed vector is
  itself slow to compile on XLA:CPU).

  Returns:
    ``(scales, partials)``, lists shaped like ``partials``.
  """
  partials, arrays = list(partials), list(arrays)
  if not partials:
    return [], []
  small = [i for i, x in enumerate(arrays) if x.size < SMALL_LEAF_SIZE]
  if small:
    # Small arrays are rescued inline (see _rescued_inline); the cond below
    # then only carries the large ones, which are few.
    scales: list[Any] = [None] * len(partials)
    out: list[Any] = [None] * len(partials)
    for i in small:
      scales[i], out[i] = _rescued_inline(
        partials[i], arrays[i], ord, axis_name=axis_name
      )
    large = [i for i in range(len(partials)) if scales[i] is None]
    large_scales, large_out = _rescued_each(
      [partials[i] for i in large],
      [arrays[i] for i in large],
      ord,
      axis_name,
    )
    for i, scale, partial in zip(large, large_scales, large_out, strict=True):
      scales[i], out[i] = scale, partial
    return scales, out

  def fast(partials, arrays):
    del arrays
    return [jnp.ones_like(p) for p in partials], list(partials)

  def rare(partials, arrays):
    scales, out = [], []
    for p, x in zip(partials, arrays, strict=True):
      need = _needs_rescue(p, ord)
      divisor, inverse = _rescue_scale(p, need)
      rescued = _scaled_partial(x, inverse, ord, None, False)
      if axis_name is not None:
        rescued = jax.lax.psum(rescued, axis_name)
      scales.append(divisor)
      out.append(jnp.where(need, rescued, p))
    return scales, out

  need = jnp.any(jnp.stack([_needs_rescue(p, ord) for p in partials]))
  if not isinstance(need, jax.core.Tracer):
    return rare(partials, arrays) if bool(need) else fast(partials, arrays)
  return jax.lax.cond(need, rare, fast, partials, arrays)


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


def map_leaves(
  fn: Callable[..., tuple[jax.Array, ...]],
  arrays: Sequence[Sequence[jax.Array]],
  keys: Sequence[Hashable],
  *,
  num_flat: int = 0,
  rest: Callable[[list[int]], list[tuple[jax.Array, ...]]] | None = None,
) -> tuple[list[tuple[jax.Array, ...]], list[jax.Array | None]]:
  """``[fn(keys[i], *(a[i] for a in arrays)) for i in range(n)]``, with
  small leaves of one kind computed together.

  Leaves ``i`` with the same ``keys[i]`` (which must capture everything
  ``fn`` specialises on: shapes, dtypes, axes), fewer than
  :data:`SMALL_LEAF_SIZE` elements and an unsharded layout
  (:func:`_may_bucket`) are stacked and run as one ``jax.vmap(fn)``. Other
  leaves run ``fn`` one by one. ``fn`` must be a per-leaf function whose
  result does not depend on being batched, so both routes give the same
  values (to float32 rounding: a batched reduction may sum in another
  order).

  Why: XLA's CPU backend compiles and launches every per-leaf operation
  separately, so a per-leaf transform on thousands of small leaves is slow
  to compile and to run, while a stack of 1000 such leaves is one operation.
  Slicing per-leaf results back out of a stack costs one small kernel per
  leaf (XLA:CPU compiles a kernel per distinct slice offset), so results
  that are only wanted as one flat vector (per-leaf diagnostics) are never
  sliced: the last ``num_flat`` results of ``fn`` come back as one vector
  each, flattened in leaf order, built from the stacks with one gather.

  Args:
    fn: maps one leaf's static key and arrays to a tuple of arrays.
    arrays: lists of equal length, the per-leaf arguments of ``fn``.
    keys: hashable per-leaf grouping keys, also passed to ``fn``.
    num_flat: how many trailing results of ``fn`` to return flat.
    rest: computes the results of every leaf that is not stacked (large,
      sharded, empty, or alone of its kind) at once, given their indices,
      in the format of ``fn``; by default ``fn`` runs on each. Lets a caller
      put all large leaves' overflow rescues under one ``lax.cond``.

  Returns:
    ``(per_leaf, flat)``: per leaf, the tuple of ``fn``'s leading results;
    and for each trailing result, the concatenation over leaves of that
    result raveled (``None`` when there are no leaves).
  """
  n = len(keys)
  per_leaf: list[Any] = [None] * n
  # Per trailing result: raveled pieces, and for each piece the leaves it
  # holds (in order) with their sizes.
  pieces: list[list[jax.Array]] = [[] for _ in range(num_flat)]
  owners: list[tuple[int, int]] = []  # (leaf, size) in piece order
  groups: dict[Hashable, list[int]] = {}

  def record(i: int, res: tuple) -> None:
    cut = len(res) - num_flat
    per_leaf[i] = res[:cut]
    for k in range(num_flat):
      pieces[k].append(res[cut + k].reshape(-1))
    owners.append((i, int(np.prod(res[cut].shape)) if num_flat else 0))

  singles = []
  for i in range(n):
    xs = [a[i] for a in arrays]
    if all(0 < x.size < SMALL_LEAF_SIZE and _may_bucket(x) for x in xs):
      groups.setdefault(keys[i], []).append(i)
    else:
      singles.append(i)
  singles += [idx[0] for idx in groups.values() if len(idx) == 1]
  if rest is not None and singles:
    for i, res in zip(singles, rest(singles), strict=True):
      record(i, tuple(res))
  else:
    for i in singles:
      record(i, tuple(fn(keys[i], *(a[i] for a in arrays))))
  for key, idx in groups.items():
    if len(idx) == 1:
      continue
    stacks = [jnp.stack([a[i] for i in idx]) for a in arrays]
    res = jax.vmap(lambda *xs, key=key: tuple(fn(key, *xs)))(*stacks)
    cut = len(res) - num_flat
    for j, i in enumerate(idx):
      per_leaf[i] = tuple(r[j] for r in res[:cut])
    for k in range(num_flat):
      pieces[k].append(res[cut + k].reshape(-1))
    if num_flat:
      size = int(np.prod(res[cut].shape[1:]))
      owners.extend((i, size) for i in idx)
  if not num_flat:
    return per_leaf, []
  if not owners:
    return per_leaf, [None] * num_flat
  # Where each leaf's entries sit in the concatenated pieces.
  starts, offset = {}, 0
  for i, size in owners:
    starts[i] = (offset, size)
    offset += size
  order = np.concatenate(
    [np.arange(starts[i][0], starts[i][0] + starts[i][1]) for i in range(n)]
  ).astype(np.int32)
  identity = bool(np.array_equal(order, np.arange(order.size)))
  flat: list[jax.Array | None] = []
  for k in range(num_flat):
    dtype = widest_dtype(p.dtype for p in pieces[k])
    vec = jnp.concatenate([p.astype(dtype) for p in pieces[k]])
    flat.append(vec if identity else vec[order])
  return per_leaf, flat


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
  A finite tree whose sum of squares overflows (float32 elements of 1e20) or
  underflows (elements of 1e-20) still gets its true norm: only then is the
  sum recomputed with every element scaled by a fixed power of two. An inf or
  NaN element gives an inf or NaN norm.

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
    TypeError: for an integer or bool leaf (naming its path): gradients are
      floating point, and such a leaf is almost always a mistake.

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
  _tree.check_float_leaves("global_norm", tree, "tree")
  return global_norm_from(tree, ord, axis_name)


def global_norm_from(tree: Any, ord: float, axis_name=None) -> jax.Array:  # pylint: disable=redefined-builtin
  """:func:`global_norm` for an already validated ``ord`` (internal)."""
  groups = reduction_groups(_leaves(tree))
  partial = _combine([_partial(g, ord) for g in groups], ord)
  partial = _cross_device(partial, ord, axis_name)
  return _safe_norm(partial, groups, ord, axis_name=axis_name)


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
  if ord == math.inf:
    return [_finalize(p, ord) for p in partials]
  # Empty leaves have partial 0 and nothing to rescue.
  full = [i for i, x in enumerate(leaves) if x.size]
  scales, rescued = _rescued_each(
    [partials[i] for i in full], [leaves[i] for i in full], ord, axis_name
  )
  for i, scale, partial in zip(full, scales, rescued, strict=True):
    partials[i] = scale * _finalize(partial, ord)
  return [
    p if x.size else _finalize(p, ord)
    for p, x in zip(partials, leaves, strict=True)
  ]


def slice_norms(
  leaves: Sequence[jax.Array],
  counts: Sequence[int],
  ord: float,  # pylint: disable=redefined-builtin
) -> list[jax.Array]:
  """Per-layer norms: each leaf reduced over all but its leading ``count`` axes.

  ``counts[i] == 0`` gives the leaf's norm (a scalar, as
  :func:`leaf_norms`); ``counts[i] == k`` gives an array of shape
  ``leaf.shape[:k]`` whose entry ``j`` is the norm of the slice ``leaf[j]``:
  exactly what :func:`leaf_norms` returns for that slice on its own,
  overflow/underflow rescue included (the rescue reduces over the same axes,
  so a rescued layer does not change its neighbours).

  Args:
    leaves: the arrays.
    counts: leading stacked axes per leaf (validated by the caller).
    ord: 1, 2 or ``math.inf`` (already validated).

  Returns:
    One array per leaf, shaped ``leaf.shape[:count]``, in the leaf's
    accumulation dtype.
  """
  unstacked = [i for i, k in enumerate(counts) if k == 0]
  out: list[jax.Array | None] = [None] * len(leaves)
  for i, norm in zip(
    unstacked, leaf_norms([leaves[i] for i in unstacked], ord), strict=True
  ):
    out[i] = norm
  for i, (x, k) in enumerate(zip(leaves, counts, strict=True)):
    if k == 0:
      continue
    axes = tuple(range(k, x.ndim))
    dtype = accumulation_dtype(x.dtype)
    if x.size == 0:
      out[i] = jnp.zeros(x.shape[:k], dtype)
    elif not axes:  # every axis indexes layers: each element is a slice
      out[i] = _element_norms(x)
    elif ord == math.inf:
      out[i] = _partial(x, ord, axis=axes)
    else:
      partial = _partial(x, ord, axis=axes)[(...,) + (None,) * len(axes)]
      out[i] = _safe_norm(partial, [x], ord, axis=axes).reshape(x.shape[:k])
  return [n for n in out if n is not None]


def flat_slice_norms(
  leaves: Sequence[jax.Array],
  counts: Sequence[int],
  ord: float,  # pylint: disable=redefined-builtin
) -> jax.Array | None:
  """:func:`slice_norms` as one flat vector in leaf order.

  Entry order is ``jax.tree.leaves`` order, each leaf's per-layer norms
  raveled (one entry for an unstacked leaf), in the widest accumulation
  dtype; ``None`` for no leaves. Small leaves of one shape are reduced as one
  vmapped stack (:func:`map_leaves`) and never sliced back out, so a
  2000-leaf tree costs a few reductions to compile and run.
  """

  def norms_of(key, x):
    return (slice_norms([x], [key[2]], ord)[0],)

  _, (flat,) = map_leaves(
    norms_of,
    [list(leaves)],
    [(x.shape, x.dtype, k) for x, k in zip(leaves, counts, strict=True)],
    num_flat=1,
  )
  return flat


def axes_norms(
  x: jax.Array,
  axes: tuple[int, ...],
  ord: float,  # pylint: disable=redefined-builtin
  axis_name=None,
) -> jax.Array:
  """Norms of ``x`` over ``axes``, kept as size-1 axes (broadcast-ready).

  Every slice of ``x`` that the other axes index gets its own norm, with the
  library's numerics (accumulation dtype, overflow/underflow rescue, NaN for
  a non-finite slice). ``axes=()`` makes every element its own slice (its
  magnitude); an empty ``x`` has zero norms.

  Args:
    x: an array.
    axes: the reduced axes (non-negative, sorted).
    ord: 1, 2 or ``math.inf`` (already validated).
    axis_name: combine partials across this mapped axis (a tensor split
      across devices).

  Returns:
    The norms in ``x``'s accumulation dtype, shaped like ``x`` with ``axes``
    set to 1.
  """
  dtype = accumulation_dtype(x.dtype)
  kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  if x.size == 0:
    return jnp.zeros(kept, dtype)
  if not axes:
    return _element_norms(x)
  partial = jnp.expand_dims(_partial(x, ord, axis=axes), axes)
  partial = _cross_device(partial, ord, axis_name)
  if ord == math.inf:
    return partial
  return _safe_norm(partial, [x], ord, axis=axes, axis_name=axis_name)


def axes_norms_each(
  xs: Sequence[jax.Array],
  axes_list: Sequence[tuple[int, ...]],
  ord: float,  # pylint: disable=redefined-builtin
) -> list[jax.Array]:
  """:func:`axes_norms` of several arrays, with one ``lax.cond`` for all of
  their overflow/underflow rescues (instead of one per array: on the 144-leaf
  benchmark tree a cond per leaf made ``adaptive_grad_clip`` 1.2x slower
  than optax's at run time).

  Returns:
    One array per input, shaped and typed as :func:`axes_norms` returns.
  """
  out: list[Any] = [None] * len(xs)
  full = []
  for i, (x, axes) in enumerate(zip(xs, axes_list, strict=True)):
    if not axes:
      out[i] = _element_norms(x)
    elif x.size == 0 or ord == math.inf:
      out[i] = axes_norms(x, axes, ord)
    else:
      full.append(i)
  if not full:
    return out
  partials = [
    jnp.expand_dims(_partial(xs[i], ord, axis=axes_list[i]), axes_list[i])
    for i in full
  ]

  def fast(partials, arrays):
    del arrays
    return [jnp.ones_like(p) for p in partials], list(partials)

  def rare(partials, arrays):
    scales, sums = [], []
    for p, x, i in zip(partials, arrays, full, strict=True):
      need = _needs_rescue(p, ord)
      divisor, inverse = _rescue_scale(p, need)
      rescued = _scaled_partial(x, inverse, ord, axes_list[i], True)
      scales.append(divisor)
      sums.append(jnp.where(need, rescued, p))
    return scales, sums

  arrays = [xs[i] for i in full]
  # One scalar per array (a sharded array's partial is reduced where it
  # lives: concatenating them would gather).
  need = jnp.any(jnp.stack([jnp.any(_needs_rescue(p, ord)) for p in partials]))
  if not isinstance(need, jax.core.Tracer):
    scales, partials = (rare if bool(need) else fast)(partials, arrays)
  else:
    scales, partials = jax.lax.cond(need, rare, fast, partials, arrays)
  for i, scale, partial in zip(full, scales, partials, strict=True):
    out[i] = scale * _finalize(partial, ord)
  return out


def axes_rms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Root-mean-square of ``x`` over ``axes`` (kept as size 1), rescued."""
  size = max(int(np.prod([x.shape[a] for a in axes], dtype=np.int64)), 1)
  norms = axes_norms(x, axes, 2)
  return norms / np.sqrt(size).astype(norms.dtype)


def batch_norms(
  leaves: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  axis_name=None,
) -> jax.Array:
  """Per-example global norms of leaves that share a leading batch axis.

  Entry ``b`` is the global norm of ``[x[b] for x in leaves]``, with the
  library's numerics: per-leaf reductions over the non-batch axes (never a
  reshape, so explicitly sharded leaves stay where they are), partials
  combined across ``axis_name``, and the overflow/underflow rescue of
  :func:`global_norm` per example, under one ``lax.cond`` for the whole
  batch (a ``vmap`` of :func:`global_norm` would turn that cond into a
  select of both branches).

  Args:
    leaves: arrays of shape ``(batch, ...)``, all with the same batch size.
    ord: 1, 2 or ``math.inf`` (already validated).
    axis_name: combine partials across this mapped axis.

  Returns:
    A ``(batch,)`` array in the widest accumulation dtype of the leaves.
  """
  dtype = widest_dtype(accumulation_dtype(x.dtype) for x in leaves)

  def reduce(x: jax.Array, fn) -> jax.Array:
    y = x[:, None] if x.ndim == 1 else x
    return fn(y, tuple(range(1, y.ndim))).astype(dtype)

  partials = [
    reduce(x, lambda y, ax: _partial(y, ord, axis=ax)) for x in leaves
  ]
  if ord == math.inf:
    partial = jnp.max(jnp.stack(partials), axis=0)
  else:
    partial = sum(partials[1:], partials[0])
  partial = _cross_device(partial, ord, axis_name)
  if ord == math.inf:
    return partial

  def expand(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (x.ndim - 1))

  def rare(partial, arrays):
    need = _needs_rescue(partial, ord)
    divisor, inverse = _rescue_scale(partial, need)
    sums = []
    for x in arrays:
      y = x[:, None] if x.ndim == 1 else x
      sums.append(
        _scaled_partial(
          y, expand(inverse, y), ord, tuple(range(1, y.ndim)), False
        ).astype(dtype)
      )
    rescued = sum(sums[1:], sums[0])
    if axis_name is not None:
      rescued = jax.lax.psum(rescued, axis_name)
    return divisor, jnp.where(need, rescued, partial)

  def fast(partial, arrays):
    del arrays
    return jnp.ones_like(partial), partial

  arrays = list(leaves)
  need = jnp.any(_needs_rescue(partial, ord))
  if not isinstance(need, jax.core.Tracer):
    scale, partial = (rare if bool(need) else fast)(partial, arrays)
  else:
    scale, partial = jax.lax.cond(need, rare, fast, partial, arrays)
  return scale * _finalize(partial, ord)


def leaf_rms(leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """Root-mean-square of each leaf, ``sqrt(sum |x|^2 / size)``; 0 if empty.

  Overflowing or underflowing sums of squares are rescued as in
  :func:`global_norm` (``rms = 2**k * sqrt(sum |x / 2**k|^2 / size)``).
  """
  full = [x for x in leaves if x.size]
  scales, partials = _rescued_each([_partial(x, 2) for x in full], full, 2)
  rms = iter(
    scale * safe_sqrt(partial / x.size)
    for scale, partial, x in zip(scales, partials, full, strict=True)
  )
  return [
    next(rms) if x.size else jnp.zeros((), accumulation_dtype(x.dtype))
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
  partial = jnp.sum(_squares(x), axis=axes, keepdims=True)
  if not x.size:
    return safe_sqrt(partial)
  return _safe_norm(partial, [x], 2, axis=axes)


def count_true(masks: Sequence[jax.Array]) -> jax.Array:
  """How many elements of the boolean ``masks`` are True, as int32.

  Uses the same bucketing as the norms, so thousands of small masks cost one
  reduction (and sharded ones are never gathered).
  """
  groups = reduction_groups([m.astype(jnp.float32) for m in masks])
  if not groups:
    return jnp.zeros((), jnp.int32)
  return jnp.sum(jnp.stack([jnp.sum(g) for g in groups])).astype(jnp.int32)


@jax.custom_jvp
def _ratio(threshold: jax.Array, norm: jax.Array) -> jax.Array:
  """``threshold / norm`` whose derivative never squares ``norm``.

  The built-in rule for a quotient, ``-threshold * dnorm / norm**2``,
  underflows ``norm**2`` to 0 at ``norm = 2e-30`` (float32) and gives
  ``inf * 0 = NaN``; ``(dthreshold - q * dnorm) / norm`` with ``q <= 1`` does
  not.
  """
  return threshold / norm


@_ratio.defjvp
def _ratio_jvp(primals, tangents):
  (threshold, norm), (dthreshold, dnorm) = primals, tangents
  q = threshold / norm
  return q, (dthreshold - q * dnorm) / norm


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
  scale = jnp.where(keep, jnp.ones_like(norm), _ratio(threshold, safe_norm))
  valid = jnp.isfinite(norm) & (threshold >= 0)
  scale = jnp.where(valid, scale, jnp.full_like(scale, jnp.nan))
  return scale, jnp.logical_not(within)


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
