"""Construction-time argument checks shared by every optaxclip factory.

Each check runs only on concrete values (Python numbers, NumPy values and
concrete ``jax.Array``s). Values traced by ``jax.jit`` -- for example
hyperparameters injected by ``optax.inject_hyperparams`` and read back from
the optimizer state inside a jitted step -- cannot be inspected and are passed
through unchecked; the transforms turn a traced invalid threshold into NaN
updates (loud) rather than into a silently wrong step.

Every message names the function, the argument, the value given and what is
allowed, e.g. ``clip_by_global_norm: max_norm must be a non-negative scalar
(0 <= max_norm <= inf), got -1.0``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The norm orders every clipper understands, in their canonical spelling.


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a tracer whose value cannot be read at trace time."""
  return isinstance(value, jax.core.Tracer)


def is_real_dtype(dtype: Any) -> bool:
  """Whether ``dtype`` is a real integer or floating-point dtype.

  Uses ``jnp.issubdtype``, which knows the ``ml_dtypes`` extension types
  (``bfloat16``, the float8 family, int4) that ``np.issubdtype`` files under
  neither integer nor floating. Booleans and complex dtypes are not real
  numbers here.
  """
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return False
  return bool(
    jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
  )


def _as_real_scalar(
  fn: str, arg: str, value: Any, allowed: str
) -> float | None:
  """Reads a concrete real scalar, or returns None for traced values."""
  if is_traced(value):
    return None
  if isinstance(value, (bool, np.bool_, str)):
    raise TypeError(
      f"{fn}: {arg} must be a real number ({allowed}), got {value!r} of"
      f" type {type(value).__name__}."
    )
  try:
    array = np.asarray(value)
  except Exception as exc:  # pragma: no cover - exotic objects
    raise TypeError(
      f"{fn}: {arg} must be a real number ({allowed}), got {value!r}."
    ) from exc
  if not is_real_dtype(array.dtype):
    raise TypeError(
      f"{fn}: {arg} must be a real number ({allowed}), got {value!r} of"
      f" dtype {array.dtype}."
    )
  if array.ndim != 0:
    raise ValueError(
      f"{fn}: {arg} must be a scalar ({allowed}), got an array of shape"
      f" {array.shape}."
    )
  as_float = float(array)
  if math.isnan(as_float):
    raise ValueError(f"{fn}: {arg} must be {allowed}, got nan.")
  return as_float


def check_threshold(fn: str, arg: str, value: Any) -> None:
  """Checks a clipping threshold: a non-negative real scalar, ``inf`` allowed.

  Args:
    fn: the public factory's name, used in the message.
    arg: the argument's name, used in the message.
    value: the value given.

  Raises:
    TypeError: for non-numeric values (strings, booleans, ``None``, complex).
    ValueError: for non-scalar, NaN or negative values.
  """
  allowed = f"a non-negative scalar, 0 <= {arg} <= inf"
  if value is None:
    raise TypeError(f"{fn}: {arg} must be a real number ({allowed}), got None.")
  as_float = _as_real_scalar(fn, arg, value, allowed)
  if as_float is not None and as_float < 0:
    raise ValueError(
      f"{fn}: {arg} must be {allowed}, got {value!r}. A negative threshold"
      " would flip the sign of the updates."
    )


def check_real(fn: str, arg: str, value: Any) -> float | None:
  """Checks a real, non-NaN scalar of either sign; returns it when concrete."""
  return _as_real_scalar(fn, arg, value, "a real scalar that is not NaN")


def check_decay(
  fn: str,
  arg: str,
  value: Any,
  example: str,
  meaning: str = "an EMA decay",
) -> None:
  """Checks an EMA decay lies in the open interval (0, 1)."""
  as_float = check_real(fn, arg, value)
  if as_float is not None and not 0.0 < as_float < 1.0:
    raise ValueError(
      f"{fn}: {arg} must be in the open interval (0, 1), got {value!r}. It"
      f" is {meaning}, e.g. {arg}={example}."
    )


def check_eps(fn: str, eps: Any) -> None:
  """Checks a finite, non-negative ``eps`` (a denominator's floor)."""
  as_float = check_real(fn, "eps", eps)
  if as_float is not None and not 0.0 <= as_float < math.inf:
    raise ValueError(
      f"{fn}: eps must be finite and non-negative (0 <= eps < inf), got"
      f" {eps!r}."
    )


def canonical_ord(fn: str, ord: Any) -> float:  # pylint: disable=redefined-builtin
  """Validates a norm order and returns it as ``1``, ``2`` or ``math.inf``.

  ``None`` means the default, 2. Accepted spellings: ``1``, ``2``, ``1.0``,
  ``2.0``, ``jnp.inf``/``math.inf``/``float("inf")`` and the string ``"inf"``.

  Args:
    fn: the public factory's name, used in the message.
    ord: the order given.

  Returns:
    ``1``, ``2`` or ``math.inf``.

  Raises:
    TypeError: if ``ord`` is a traced value (under ``inject_hyperparams``).
    ValueError: for any other order.
  """
  if ord is None:
    return 2
  if isinstance(ord, jax.Array):
    raise TypeError(
      f"{fn}: ord must be a static Python value (1, 2 or inf), got a JAX"
      f" array {ord!r}. Under optax.inject_hyperparams, pass"
      f" static_args=('ord',), e.g. optax.inject_hyperparams({fn},"
      " static_args=('ord',))(..., ord=1)."
    )
  if isinstance(ord, str):
    if ord.strip().lower() == "inf":
      return math.inf
  elif not isinstance(ord, (bool, np.bool_)):
    try:
      as_float = float(ord)
    except (TypeError, ValueError):
      as_float = None
    if as_float in (1.0, 2.0):
      return int(as_float)
    if as_float == math.inf:
      return math.inf
  raise ValueError(
    f"{fn}: ord must be one of 1, 2, jnp.inf or 'inf' (None means 2), got"
    f" {ord!r}."
  )


def check_static_int(fn: str, arg: str, value: Any, *, minimum: int = 1) -> int:
  """Checks a static integer argument such as a buffer size or step count.

  Args:
    fn: the public factory's name, used in the message.
    arg: the argument's name, used in the message.
    value: the value given.
    minimum: the smallest allowed value.

  Returns:
    ``value`` as a Python ``int``.

  Raises:
    TypeError: if the value is traced (under ``inject_hyperparams``) or not an
      integer.
    ValueError: if it is below ``minimum``.
  """
  if isinstance(value, jax.Array):
    raise TypeError(
      f"{fn}: {arg} sets an array shape or a loop length and must be a"
      f" static Python int, got a JAX array {value!r}. Under"
      f" optax.inject_hyperparams, pass static_args=('{arg}',)."
    )
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, (int, np.integer)
  ):
    raise TypeError(
      f"{fn}: {arg} must be an int >= {minimum}, got {value!r} of type"
      f" {type(value).__name__}."
    )
  if value < minimum:
    raise ValueError(f"{fn}: {arg} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def check_static_int_or(
  fn: str, arg: str, value: Any, default: Any, *, minimum: int = 1
) -> Any:
  """:func:`check_static_int`, or ``default`` when ``value`` is None."""
  if value is None:
    return default
  return check_static_int(fn, arg, value, minimum=minimum)


def check_in_range(
  fn: str,
  arg: str,
  value: Any,
  low: float,
  high: float,
  *,
  low_open: bool,
  high_open: bool,
) -> None:
  """Checks a real scalar lies in an interval, e.g. (0, 1) or [0, 100].

  Args:
    fn: the public factory's name, used in the message.
    arg: the argument's name, used in the message.
    value: the value given (traced values are not checked).
    low: the lower end.
    high: the upper end.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.

  Raises:
    TypeError: for non-numeric values.
    ValueError: for non-scalar, NaN or out-of-range values.
  """
  interval = (
    ("(" if low_open else "[")
    + f"{low:g}, {high:g}"
    + (")" if high_open else "]")
  )
  allowed = f"in {interval}"
  if value is None:
    raise TypeError(f"{fn}: {arg} must be a real number {allowed}, got None.")
  as_float = _as_real_scalar(fn, arg, value, allowed)
  if as_float is None:
    return
  below = as_float <= low if low_open else as_float < low
  above = as_float >= high if high_open else as_float > high
  if below or above:
    raise ValueError(f"{fn}: {arg} must be {allowed}, got {value!r}.")


def check_choice(
  fn: str, arg: str, value: Any, choices: tuple[str, ...]
) -> str:
  """Checks a string option (case-insensitive) and returns it lower-cased."""
  if not isinstance(value, str) or value.lower() not in choices:
    raise ValueError(
      f"{fn}: {arg} must be one of {', '.join(repr(c) for c in choices)},"
      f" got {value!r}."
    )
  return value.lower()


def check_inner(fn: str, inner: Any) -> None:
  """Checks a wrapper's ``inner`` is an optimizer, not its factory or holder.

  Raises:
    TypeError: for anything but an ``optax.GradientTransformation``, with
      the fix for the two common slips (``optax.adam`` for
      ``optax.adam(1e-3)``, and an ``optax.MultiSteps`` object).
  """
  if isinstance(inner, optax.GradientTransformation):
    return
  if callable(getattr(inner, "gradient_transformation", None)):
    # optax.MultiSteps (and look-alikes) is an object holding an optimizer;
    # the GradientTransformation is what its method returns.
    raise TypeError(
      f"{fn}: inner must be an optax.GradientTransformation, got an"
      f" instance of {type(inner).__name__}, which is not one but builds"
      " one: pass inner.gradient_transformation(), e.g."
      f" {fn}(optax.MultiSteps(opt, k).gradient_transformation())."
    )
  raise TypeError(
    f"{fn}: inner must be an optax.GradientTransformation (an optimizer"
    f" such as optax.adam(1e-3) or an optax.chain), got {inner!r} of type"
    f" {type(inner).__name__}. Pass the optimizer itself, not its factory:"
    f" {fn}(optax.adam(1e-3)), not {fn}(optax.adam)."
  )
