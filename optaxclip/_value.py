"""Element-wise value clipping: ``clip_by_value`` and the optax alias ``clip``.

The oldest clipping rule: every coordinate of the update is clamped to an
interval, independently of the others (Mikolov 2012; PyTorch's
``clip_grad_value_``, Keras' ``clipvalue``). It changes the update's direction,
unlike the norm-based clippers.

Cost model (CPU, measured in ``benchmarks/``): the clamp is one read and one
write of every gradient byte, exactly ``optax.clip``. Any diagnostic needs an
extra read, because XLA's CPU backend does not fuse a reduction with an
element-wise output of the same input (no multi-output fusion). Diagnostics are
therefore a keyword-only option, and when on they take a single pass: one
NaN-propagating ``(max, min)`` reduction per large leaf, plus one for the
bucket of small leaves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _grouping, _norms, _stats, _tree, _validate


@_stats.register_state("clip_by_value")
class ClipByValueState(NamedTuple):
  """State of :func:`clip_by_value` and :func:`clip` with ``diagnostics=True``.

  Records what the last step did. Without diagnostics (the default) they
  record nothing and keep an ``optax.EmptyState``.
  """

  # float32 scalar (float64 for float64 trees): the largest element of the
  # update before clamping (NaN if any element was NaN; 0 for an empty tree).
  value_max: jax.Array
  # float32 scalar: the smallest element of the update before clamping.
  value_min: jax.Array
  # bool scalar: True when some element lay outside [min_value, max_value]
  # (or was NaN), or when the bounds were invalid (the output is then NaN).
  value_clipped: jax.Array


def _extremes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(max(x), min(x))`` in one pass over ``x``, NaN-propagating.

  A variadic reduction: one read of ``x`` for both extremes, where ``jnp.max``
  and ``jnp.min`` are two passes. XLA's vectorised CPU max/min reductions also
  drop NaN on large inputs (jax >= 0.6); this reduction's ``maximum`` and
  ``minimum`` keep it, so no extra pass is needed to detect NaN.
  """
  # Reduced over all axes in place: a reshape to 1-D would be a bitcast on
  # one device, but explicit sharding rejects it for a sharded leaf.
  lowest = jnp.array(-jnp.inf, x.dtype)
  highest = jnp.array(jnp.inf, x.dtype)

  def combine(a, b):
    return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])

  largest, smallest = jax.lax.reduce(
    (x, x), (lowest, highest), combine, tuple(range(x.ndim))
  )
  return largest, smallest


def _tree_extremes(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The largest and smallest element of real leaves, one pass, NaN-loud.

  Large leaves are reduced where they are (no copy); small ones go through
  the library's bucket (:func:`_grouping.reduction_groups`), one copy of
  the small leaves and one reduction instead of one per leaf.
  """
  groups = _grouping.reduction_groups(leaves, _norms.accumulation_dtype)
  if not groups:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  dtype = _norms.widest_dtype(g.dtype for g in groups)
  pairs = [_extremes(g) for g in groups]
  largest = jnp.stack([hi.astype(dtype) for hi, _ in pairs])
  smallest = jnp.stack([lo.astype(dtype) for _, lo in pairs])
  lowest = jnp.array(-jnp.inf, dtype)
  highest = jnp.array(jnp.inf, dtype)
  return jax.lax.reduce(
    (largest, smallest),
    (lowest, highest),
    lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
    (0,),
  )


def _bounds(
  upper: jax.Array, lower: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
  """The bounds in ``dtype``, both NaN when they are invalid.

  Invalid means ``min_value > max_value`` (with ``min_value=None``, a negative
  ``max_value``) or a NaN bound; construction rejects concrete invalid bounds,
  so this only ever fires for traced ones (``inject_hyperparams``). A NaN
  bound makes the clamp output NaN everywhere: loud, where clamping to the
  swapped interval would silently flip the update's sign. Two scalar
  ``where``s, fused into the clamp; no extra pass.
  """
  hi, lo = upper.astype(dtype), lower.astype(dtype)
  valid = lo <= hi  # False when either bound is NaN
  nan = jnp.array(jnp.nan, dtype)
  return jnp.where(valid, lo, nan), jnp.where(valid, hi, nan)


def _value_clipper(
  fn: str, max_value: Any, min_value: Any, diagnostics: bool
) -> optax.GradientTransformationExtraArgs:
  def init_fn(params):
    if not diagnostics:
      return optax.EmptyState()
    dtype = _norms.tree_accumulation_dtype(params)
    zero = jnp.zeros((), dtype)
    return ClipByValueState(
      value_max=zero, value_min=zero, value_clipped=jnp.zeros((), jnp.bool_)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    state = _tree.diagnostics_state(fn, updates, state, init_fn)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    for leaf in leaves:
      if jnp.iscomplexobj(leaf):
        raise TypeError(
          f"{fn}: complex leaves have no order to clamp (got a leaf of dtype"
          f" {leaf.dtype}); clip their magnitude with clip_by_norm or"
          " clip_by_global_norm instead."
        )
    upper = jnp.asarray(max_value)
    lower = -upper if min_value is None else jnp.asarray(min_value)
    # Clamp in float32 (float64 for float64 leaves), so a bf16 bound cannot
    # round past the requested value before the comparison.
    computes = {jnp.dtype(_norms.accumulation_dtype(x.dtype)) for x in leaves}
    bounds = {dt: _bounds(upper, lower, dt) for dt in computes}

    new_state = state
    if diagnostics:
      # The diagnostics see the values, never their derivatives (and the
      # variadic reduction has no differentiation rule).
      value_max, value_min = _grouping.by_platform(
        _tree_extremes, [jax.lax.stop_gradient(x) for x in leaves]
      )
      dtype = state.value_max.dtype
      value_max, value_min = value_max.astype(dtype), value_min.astype(dtype)
      lo, hi = _bounds(upper, lower, dtype)
      # Written as "not within" so NaN extremes (and NaN bounds) count.
      clipped = jnp.logical_not((value_max <= hi) & (value_min >= lo))
      new_state = ClipByValueState(
        value_max=value_max, value_min=value_min, value_clipped=clipped
      )
      # When nothing lies outside the bounds the clamp is the identity, so it
      # may as well clamp to (-inf, inf). Written this way, the clamp depends
      # on the reductions: XLA must read each gradient for the extremes before
      # it overwrites it, and a donated gradient is clamped in place. Without
      # the dependency XLA copies every gradient (temp = the tree's size).
      inf = np.inf
      bounds = {
        dt: (jnp.where(clipped, lo_, -inf), jnp.where(clipped, hi_, inf))
        for dt, (lo_, hi_) in bounds.items()
      }

    clipped_leaves = []
    for leaf in leaves:
      lo_, hi_ = bounds[jnp.dtype(_norms.accumulation_dtype(leaf.dtype))]
      compute = lo_.dtype
      clipped_leaves.append(
        jnp.clip(leaf.astype(compute), lo_, hi_).astype(leaf.dtype)
      )
    return jax.tree.unflatten(treedef, clipped_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_diagnostics(fn: str, diagnostics: Any) -> None:
  if not isinstance(diagnostics, (bool, np.bool_)):
    raise TypeError(
      f"{fn}: diagnostics must be True or False, got {diagnostics!r}."
    )


def clip_by_value(
  max_value: Any,
  *,
  min_value: Any | None = None,
  diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Clamps every element of the updates to ``[min_value, max_value]``.

  .. math::
    u_i \leftarrow \min(\max(u_i, \text{min\_value}), \text{max\_value})

  NaN elements stay NaN and ``+-inf`` elements are clamped to the bounds.
  bf16/fp16 leaves are clamped in float32 and cast back. A traced invalid
  bound (under ``optax.inject_hyperparams``) makes every element NaN rather
  than clamping to a swapped interval. ``diagnostics=True`` records the
  pre-clip extremes in the state, at the cost of one extra read of the
  updates (and, in a fused train step, a materialised copy of the gradient);
  the default, ``False``, is exactly ``optax.clip``'s program.
  ``update(updates, None)`` works. The costs are discussed in
  ``docs/transforms.md#value-clipping``.

  Args:
    max_value: the upper bound. With ``min_value=None`` it must be ``>= 0``
      and the interval is ``[-max_value, max_value]``.
    min_value: the lower bound; ``None`` (default) means ``-max_value``.
    diagnostics: whether the state records the pre-clip extremes (a
      :class:`ClipByValueState`) or nothing (an ``optax.EmptyState``, the
      default).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for a NaN or non-scalar bound, a negative ``max_value``
      without ``min_value``, or ``min_value > max_value``.
    TypeError: for a non-bool ``diagnostics``; in ``update``, for complex,
      integer or bool leaves (naming the leaf's path).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_by_value(1.0, diagnostics=True)
    >>> updates, state = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))
    >>> updates
    Array([-1. ,  0.5,  1. ], dtype=float32)
    >>> float(state.value_max), float(state.value_min), bool(state.value_clipped)
    (2.0, -3.0, True)

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012
  """
  fn = "clip_by_value"
  if min_value is None:
    _validate.check_threshold(fn, "max_value", max_value)
  else:
    hi = _validate.check_real(fn, "max_value", max_value)
    lo = _validate.check_real(fn, "min_value", min_value)
    if hi is not None and lo is not None and lo > hi:
      raise ValueError(
        f"{fn}: min_value must be <= max_value, got min_value={min_value!r}"
        f" and max_value={max_value!r}."
      )
  _check_diagnostics(fn, diagnostics)
  return _value_clipper(fn, max_value, min_value, bool(diagnostics))


def clip(
  max_delta: Any, *, diagnostics: bool = False
) -> optax.GradientTransformationExtraArgs:
  r"""Clamps every element of the updates to ``[-max_delta, max_delta]``.

  A drop-in for ``optax.clip`` and an alias of ``clip_by_value(max_delta)``:
  by default it records nothing and compiles to the same program as optax's,
  while adding the library's validation, the integer/bool-leaf ``TypeError``
  and NaN output for a traced invalid ``max_delta``. ``diagnostics=True``
  records the pre-clip extremes.

  .. math::
    u_i \leftarrow \min(\max(u_i, -\delta), \delta)

  Args:
    max_delta: the largest absolute value an element may keep; ``>= 0``.
    diagnostics: ``False`` (default) records nothing, ``True`` records the
      pre-clip extremes as :func:`clip_by_value` does.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``max_delta``.
    TypeError: for a non-bool ``diagnostics``; in ``update``, for complex,
      integer or bool leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip(0.5)
    >>> tx.update(jnp.array([-3.0, 0.25]), tx.init(None))[0]
    Array([-0.5 ,  0.25], dtype=float32)

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012
  """
  _validate.check_threshold("clip", "max_delta", max_delta)
  _check_diagnostics("clip", diagnostics)
  return _value_clipper("clip", max_delta, None, bool(diagnostics))
