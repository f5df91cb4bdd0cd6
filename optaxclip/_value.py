"""Element-wise value clipping: ``clip_by_value`` and the optax alias ``clip``.

The oldest clipping rule: every coordinate of the update is clamped to an
interval, independently of the others (Mikolov 2012; PyTorch's
``clip_grad_value_``, Keras' ``clipvalue``). It changes the update's direction,
unlike the norm-based clippers.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms
from optaxclip import _stats
from optaxclip import _validate


@_stats.register_state("clip_by_value")
class ClipByValueState(NamedTuple):
  """State of :func:`clip_by_value` and :func:`clip`."""

  # int32 scalar: how many elements of the last update lay outside
  # [min_value, max_value] (NaN elements are not counted; they stay NaN).
  num_clipped_values: jax.Array


def _value_clipper(fn: str, max_value: Any, min_value: Any
                   ) -> optax.GradientTransformationExtraArgs:
  def init_fn(params):
    del params
    return ClipByValueState(num_clipped_values=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del state, params, extra_args
    upper = jnp.asarray(max_value)
    lower = -upper if min_value is None else jnp.asarray(min_value)
    leaves, treedef = jax.tree.flatten(updates)
    clipped_leaves, counts = [], []
    for leaf in leaves:
      leaf = jnp.asarray(leaf)
      if jnp.iscomplexobj(leaf):
        raise TypeError(
            f"{fn}: complex leaves have no order to clamp (got a leaf of dtype"
            f" {leaf.dtype}); clip their magnitude with clip_by_norm or"
            " clip_by_global_norm instead.")
      # Compare and clamp in float32 (float64 for float64 leaves), so a bf16
      # bound cannot round past the requested value before the comparison.
      compute = _norms.accumulation_dtype(leaf.dtype)
      wide = leaf.astype(compute)
      hi, lo = upper.astype(compute), lower.astype(compute)
      outside = (wide > hi) | (wide < lo)
      counts.append(jnp.sum(outside, dtype=jnp.int32))
      clipped_leaves.append(jnp.clip(wide, lo, hi).astype(leaf.dtype))
    total = (jnp.sum(jnp.stack(counts)) if counts
             else jnp.zeros((), jnp.int32))
    return (jax.tree.unflatten(treedef, clipped_leaves),
            ClipByValueState(num_clipped_values=total))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_value(
    max_value: Any, *, min_value: Optional[Any] = None
) -> optax.GradientTransformationExtraArgs:
  r"""Clamps every element of the updates to ``[min_value, max_value]``.

  .. math::
    u_i \leftarrow \min(\max(u_i, \text{min\_value}), \text{max\_value})

  NaN elements stay NaN; ``+-inf`` elements are clamped to the bounds (as in
  PyTorch's ``clip_grad_value_``). The comparison and clamp are done in
  float32 for bf16/fp16 leaves and the result is cast back, so dtypes and
  shapes are kept. The state counts the clamped elements; the count is a
  reduction fused into the same pass as the clamp.

  Args:
    max_value: the upper bound. With ``min_value=None`` it must be ``>= 0``
      and the interval is ``[-max_value, max_value]``.
    min_value: the lower bound; ``None`` (default) means ``-max_value``. When
      given, ``min_value <= max_value`` is required.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByValueState`.

  Raises:
    ValueError: for a NaN or non-scalar bound, a negative ``max_value`` without
      ``min_value``, or ``min_value > max_value``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_by_value(1.0)
    >>> updates, state = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))
    >>> updates
    Array([-1. ,  0.5,  1. ], dtype=float32)
    >>> int(state.num_clipped_values)
    2

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012.
    Peer: PyTorch ``torch.nn.utils.clip_grad_value_``.
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
  return _value_clipper(fn, max_value, min_value)


def clip(max_delta: Any) -> optax.GradientTransformationExtraArgs:
  """Clamps every element of the updates to ``[-max_delta, max_delta]``.

  A drop-in for ``optax.clip``: the same as ``clip_by_value(max_delta)``, with
  its validation and its :class:`ClipByValueState` diagnostics.

  Args:
    max_delta: the largest absolute value an element may keep; ``>= 0``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``max_delta``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip(0.5)
    >>> tx.update(jnp.array([-3.0, 0.25]), tx.init(None))[0]
    Array([-0.5 ,  0.25], dtype=float32)

  References:
    Peer: ``optax.clip``.
  """
  _validate.check_threshold("clip", "max_delta", max_delta)
  return _value_clipper("clip", max_delta, None)
