"""The one norm kernel of optaxclip: norms and their overflow rescue.

Every clipper in the library computes its norms here, so that precision,
differentiability and range are decided once:

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
  0, so ``jax.grad`` through a clipper is finite at all-zero gradients.
* **Orders.** ``ord`` is 2 (Euclidean), 1 (sum of magnitudes) or ``inf``
  (largest magnitude). Partial results combine by sum (1, 2) or max (inf),
  across leaves and, with ``axis_name``, across devices (``psum``/``pmax``).

How leaves are grouped for speed (small leaves bucketed or stacked) is
``_grouping``'s decision; the clip rule built on these norms is in
``_scale``. Layering (imports point one way only): ``_grouping`` ←
``_norms`` ← ``_scale`` ← the transforms.

References:
  Pascanu et al., `On the difficulty of training Recurrent Neural Networks
  <https://arxiv.org/abs/1211.5063>`_, 2013
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _grouping, _tree, _validate


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


def static_sqrt(n: float) -> float:
  """``sqrt(n)`` of a non-negative Python number known at trace time.

  For the constants taken from static shapes and counts: the ``1 / sqrt(d)``
  attention scale, the L2 norm of ``n`` equal per-leaf bounds (``sqrt(n)``
  times the bound), Muon's ``sqrt(fan_out / fan_in)``. Correctly rounded in
  float64, as ``math.sqrt``.
  """
  return math.sqrt(n)


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


# The small per-leaf helpers below and in _scale are jitted: a transform calls
# them once per leaf (hundreds of times on a large model), and a jitted call
# is traced once per shape and then bound as one call, where the plain
# function re-traces a dozen jnp calls every time. On the 144-leaf benchmark
# tree this halved the trace and lowering time of clip_by_block_rms and AGC;
# XLA inlines the calls, so the compiled program is unchanged.
@functools.partial(jax.jit, static_argnums=1)
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

  ``x`` goes through an optimization barrier: when it is a compile-time
  constant (a zero leaf made by ``optax.set_to_zero`` or ``zeros_like``
  inside the jitted step), XLA's algebraic simplifier regroups
  ``(x * inverse) ** 2`` as ``inverse ** 2 * x ** 2``, and ``inverse ** 2``
  is out of range (``inf * 0 = NaN``). The barrier keeps ``x`` opaque, on
  every platform (the simplifier is shared).
  """
  x = _grouping.opaque(x)
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


@jax.jit
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


def _own_copies(scale: jax.Array, n: int) -> list[jax.Array]:
  """``n`` copies of a rescue scale, one per array it multiplies.

  XLA:CPU shares one broadcast of a scalar between the reductions of arrays
  of the same shape and materialises it at the arrays' size: a rare branch
  over four 1 MiB leaves held a 1 MiB temporary. Separate copies behind a
  barrier keep each broadcast fused into its own reduction. CPU program only
  (:func:`_grouping.by_platform`).
  """
  if n < 2 or not _grouping.on_cpu():
    return [scale] * n
  return list(_grouping.barrier([scale] * n))


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
    inverses = _own_copies(inverse, len(arrays))
    sums = [
      _scaled_partial(a, v, ord, axis, keepdims)
      for a, v in zip(arrays, inverses, strict=True)
    ]
    rescued = sums[0] if len(sums) == 1 else sum(sums[1:], sums[0])
    if axis_name is not None:
      rescued = jax.lax.psum(rescued, axis_name)
    return divisor, jnp.where(need, rescued, partial)

  arrays = list(arrays)
  if len(arrays) == 1 and arrays[0].size < _grouping.SMALL_LEAF_SIZE:
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


def _rescued_vectors(
  partials: Sequence[jax.Array],
  arrays: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  axis_name=None,
) -> list[tuple[list[int], jax.Array, jax.Array]]:
  """:func:`_rescued` for the whole-array partials of many large arrays,
  under one ``lax.cond``, as vectors.

  The partials are stacked into one vector per dtype, so the predicate, the
  rescue scale and everything the caller does with the result run once on
  a vector rather than once per array: XLA:CPU launches (and compiles the
  call sites of) every per-array scalar operation separately, and a chain
  of them per leaf was most of the kernels of ``clip_by_block_rms`` on the
  144-leaf benchmark tree. The rare branch reads each array's rescue scale
  back with :func:`_grouping.split_entries` (one shared kernel, no per-leaf
  slice) and recomputes only that array's sum.

  Returns:
    Per dtype: ``(indices, scales, partials)``, the indices into
    ``partials`` in order and two vectors over them.
  """
  groups: dict[Any, list[int]] = {}
  for i, p in enumerate(partials):
    groups.setdefault(jnp.dtype(p.dtype), []).append(i)
  index = list(groups.values())
  vecs = [jnp.stack([partials[i] for i in idx]) for idx in index]
  arrays = list(arrays)

  def fast(vecs, arrays):
    del arrays
    return [jnp.ones_like(v) for v in vecs], list(vecs)

  def rare(vecs, arrays):
    scales, out = [], []
    for v, idx in zip(vecs, index, strict=True):
      need = _needs_rescue(v, ord)
      divisor, inverse = _rescue_scale(v, need)
      inverses = _grouping.split_entries(inverse, [1] * len(idx))
      rescued = jnp.stack(
        [
          _scaled_partial(arrays[i], inv.reshape(()), ord, None, False)
          for i, inv in zip(idx, inverses, strict=True)
        ]
      )
      if axis_name is not None:
        rescued = jax.lax.psum(rescued, axis_name)
      scales.append(divisor)
      out.append(jnp.where(need, rescued, v))
    return scales, out

  if not vecs:
    return []
  need = jnp.any(jnp.stack([jnp.any(_needs_rescue(v, ord)) for v in vecs]))
  if not isinstance(need, jax.core.Tracer):
    scales, out = (rare if bool(need) else fast)(vecs, arrays)
  else:
    scales, out = jax.lax.cond(need, rare, fast, vecs, arrays)
  return list(zip(index, scales, out, strict=True))


def _leaves(tree: Any) -> list[jax.Array]:
  return [jnp.asarray(x) for x in jax.tree.leaves(tree)]


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

  def norm(leaves):
    groups = _grouping.reduction_groups(leaves, accumulation_dtype)
    partial = _combine([_partial(g, ord) for g in groups], ord)
    partial = _cross_device(partial, ord, axis_name)
    return _safe_norm(partial, groups, ord, axis_name=axis_name)

  return _grouping.by_platform(norm, _leaves(tree))


def _measure_parts(
  leaves: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  rms: bool,
  axis_name=None,
) -> tuple[list[jax.Array | None], list[tuple[list[int], jax.Array]]]:
  """Each leaf's norm (or RMS, ``rms=True``, ord 2), in its accumulation
  dtype, in two parts: one scalar per small or empty leaf (``None`` for the
  others), and the large leaves as vectors, ``(indices, vector)`` per dtype
  (:func:`_rescued_vectors`: their rescues under one ``lax.cond``).
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

  def finish(scale, partial, size):
    if rms:
      return scale * safe_sqrt(partial / size)
    return scale * _finalize(partial, ord)

  values: list[jax.Array | None] = [None] * len(leaves)
  large = []
  for i, (x, p) in enumerate(zip(leaves, partials, strict=True)):
    if not x.size:
      # Empty: partial 0, nothing to rescue (and no division by the size).
      values[i] = _finalize(p, ord)
    elif ord == math.inf:
      values[i] = _finalize(p, ord)
    elif x.size < _grouping.SMALL_LEAF_SIZE:
      scale, rescued = _rescued_inline(p, x, ord, axis_name=axis_name)
      values[i] = finish(scale, rescued, x.size)
    else:
      large.append(i)
  groups = []
  for idx, scale, partial in _rescued_vectors(
    [partials[i] for i in large], [leaves[i] for i in large], ord, axis_name
  ):
    index = [large[k] for k in idx]
    sizes = np.asarray([leaves[i].size for i in index], partial.dtype)
    groups.append((index, finish(scale, partial, sizes)))
  return values, groups


def _parts_as_list(
  values: list[jax.Array | None], groups: list[tuple[list[int], jax.Array]]
) -> list[jax.Array]:
  out = list(values)
  for index, vec in groups:
    chunks = _grouping.split_entries(vec, [1] * len(index))
    for i, chunk in zip(index, chunks, strict=True):
      out[i] = chunk.reshape(())
  return out  # type: ignore[return-value]


def _parts_as_vector(
  values: list[jax.Array | None], groups: list[tuple[list[int], jax.Array]]
) -> jax.Array:
  """The parts as one vector in leaf order, in the widest dtype."""
  if len(groups) == 1 and all(v is None for v in values):
    index, vec = groups[0]
    if index == list(range(len(values))):
      return vec
  pieces = [v.reshape(1) for v in values if v is not None]
  owners = [i for i, v in enumerate(values) if v is not None]
  for index, vec in groups:
    pieces.append(vec)
    owners.extend(index)
  dtype = widest_dtype(p.dtype for p in pieces)
  vec = jnp.concatenate([p.astype(dtype) for p in pieces])
  order = np.argsort(np.asarray(owners), kind="stable").astype(np.int32)
  if np.array_equal(order, np.arange(order.size)):
    return vec
  return vec[order]


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
  return _parts_as_list(*_measure_parts(leaves, ord, False, axis_name))


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
  vmapped stack (:func:`_grouping.map_leaves`) and never sliced back out, so a
  2000-leaf tree costs a few reductions to compile and run.
  """

  if not any(counts):
    return flat_leaf_measures(leaves, ord)

  def norms_of(key, x):
    return (slice_norms([x], [key[2]], ord)[0],)

  def rest(index):
    # The leaves not stacked, at once: their rescues share one lax.cond
    # (a cond per leaf compiled 72 of them on the 144-leaf benchmark tree).
    norms = slice_norms(
      [leaves[i] for i in index], [counts[i] for i in index], ord
    )
    return [(n,) for n in norms]

  _, (flat,) = _grouping.map_leaves(
    norms_of,
    [list(leaves)],
    [(x.shape, x.dtype, k) for x, k in zip(leaves, counts, strict=True)],
    num_flat=1,
    rest=rest,
  )
  return flat


def flat_leaf_measures(
  leaves: Sequence[jax.Array],
  ord: float,  # pylint: disable=redefined-builtin
  *,
  rms: bool = False,
) -> jax.Array | None:
  """One norm (or RMS, ``rms=True``) per leaf, as one flat vector in leaf
  order, in the widest accumulation dtype (``None`` for no leaves).

  Small leaves of one shape are measured as one vmapped stack, the large
  ones as one vector whose rescues share one ``lax.cond``
  (:func:`_rescued_vectors`); the vector is never cut into per-leaf
  scalars here.
  """
  leaves = list(leaves)

  def one(key, x):
    del key
    values, groups = _measure_parts([x], ord, rms)
    return (_parts_as_list(values, groups)[0],)

  def rest_flat(index):
    parts = _measure_parts([leaves[i] for i in index], ord, rms)
    return [_parts_as_vector(*parts)], [1] * len(index)

  _, (flat,) = _grouping.map_leaves(
    one,
    [leaves],
    [(x.shape, x.dtype) for x in leaves],
    num_flat=1,
    rest_flat=rest_flat,
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
  # One count over every array's predicate (small unsharded partials are
  # bucketed into one reduction; a sharded one is reduced where it lives,
  # since concatenating it would gather), not a reduction per array.
  need = _grouping.count_true([_needs_rescue(p, ord) for p in partials]) > 0
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


def axes_rms_each(
  xs: Sequence[jax.Array], axes_list: Sequence[tuple[int, ...]]
) -> list[jax.Array]:
  """:func:`axes_rms` of several arrays, rescued under one ``lax.cond``."""
  norms = axes_norms_each(xs, axes_list, 2)
  out = []
  for x, axes, n in zip(xs, axes_list, norms, strict=True):
    size = max(int(np.prod([x.shape[a] for a in axes], dtype=np.int64)), 1)
    out.append(n / np.sqrt(size).astype(n.dtype))
  return out


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
  return _parts_as_list(*_measure_parts(leaves, 2, True))


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
