"""Mean and standard deviation of a history of norms or losses.

``skip_step`` and ``clip_by_historical_norm`` compare a norm with the
statistics of a window of earlier ones, and ``zclip`` starts its EMAs from
its warmup buffer (Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM
Pre-Training <https://arxiv.org/abs/2504.02507>`_, 2025). The values can be
anywhere in a float's range, so the moments are taken in units of a power of
two near the largest value: the squares then neither overflow nor underflow,
and the scaling rounds nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optaxclip import _norms


def power_of_two_pair(
  exponent: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
  """``(2**k, 2**-k)`` with ``k`` the exponent clamped so both are normal.

  Built from the exponent bits: exact on every platform, and never
  subnormal (XLA:CPU flushes subnormals to zero, which would turn a
  division by a huge unit into a multiplication by 0).
  """
  info = jnp.finfo(dtype)
  int_dtype = jnp.int64 if info.bits == 64 else jnp.int32
  k = jnp.clip(exponent, info.minexp + 1, info.maxexp - 2).astype(int_dtype)
  bias = info.maxexp - 1

  def power(e):
    return jax.lax.bitcast_convert_type(
      jnp.left_shift(e + bias, info.nmant), dtype
    )

  return jax.lax.stop_gradient(power(k)), jax.lax.stop_gradient(power(-k))


def window_mean_std(
  history: jax.Array, count: jax.Array, *, ddof: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Mean and std of the valid entries of a ring buffer.

  The first ``min(count, window)`` entries are valid. ``ddof=0`` gives the
  population std (the norm rules), ``ddof=1`` the sample std with Bessel's
  correction (the loss rule, as MaxText and ``torch.std``); the divisor is
  at least 1, so one valid entry has std 0.
  """
  window = history.shape[0]
  num_valid = jnp.minimum(count, window)
  valid = jnp.arange(window, dtype=num_valid.dtype) < num_valid
  zeros = jnp.zeros_like(history)
  values = jnp.where(valid, history, zeros)
  # In units of 2**(e - 1) for a largest |value| below 2**e, the sum and the
  # squared deviations can neither overflow (losses of 1e30 in float32) nor
  # underflow (values near 1e-30); powers of two scale exactly.
  _, exponent = jnp.frexp(jnp.max(jnp.abs(values)))
  unit, inverse = power_of_two_pair(exponent - 1, history.dtype)
  values = values * inverse
  size = jnp.maximum(num_valid, 1).astype(history.dtype)
  mean = jnp.sum(values) / size
  # Two passes (mean, then squared deviations): no cancellation when the
  # values are large and nearly constant.
  deviations = jnp.where(valid, values - mean, zeros)
  divisor = jnp.maximum(num_valid - ddof, 1).astype(history.dtype)
  std = _norms.std_from_variance(jnp.sum(deviations * deviations) / divisor)
  return mean * unit, std * unit
