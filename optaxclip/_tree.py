"""Tree plumbing shared by every transform: paths and leaf checks.

One module answers "what is this leaf called" so that every path the library
prints in an error, passes to a user callable, or returns as a key is spelled
the same way: ``"/"``-joined dict keys, attribute names and sequence indices
(``"blocks/fc/kernel"``), with Flax ``Variable`` wrappers adding nothing (no
``value`` component).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

# Attribute names that only unwrap a container (Flax ``Variable.value``,
# ``nnx.VariableState.value``) and never name a parameter of their own.
_WRAPPER_ATTRS = ("value", "raw_value")


def _key_name(key: Any) -> str | None:
  """One path component as text, or None when it only unwraps a container."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name in _WRAPPER_ATTRS else key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)  # pragma: no cover - a custom key type


def path_str(key_path: Any) -> str:
  """The normalised ``"/"``-joined name of a key path (``""`` for the root)."""
  names = (_key_name(k) for k in key_path)
  return "/".join(n for n in names if n is not None)


def check_float_leaves(fn: str, tree: Any, arg: str = "updates") -> None:
  """The library-wide policy for integer and bool leaves: a ``TypeError``.

  Gradients are real or complex floating point. An integer or bool leaf is
  almost always a mistake (a step counter or a mask left in the tree), and
  every answer for it would be silently wrong: its norm is meaningless and a
  clipped value cannot be written back without truncation. The check reads
  only dtypes, so it costs nothing at run time and works under ``jit``.

  Args:
    fn: the public name of the transform, for the message.
    tree: the pytree to check.
    arg: the argument's name, for the message.

  Raises:
    TypeError: naming the first offending leaf's path and dtype.
  """
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.result_type(leaf)
    if not np.issubdtype(dtype, np.inexact):
      where = path_str(key_path) or "<root>"
      raise TypeError(
        f"{fn}: every leaf of {arg} must be a floating-point (or complex)"
        f" array, but the leaf at {where!r} has dtype {np.dtype(dtype)}."
        " Integer and bool leaves cannot be clipped without truncation;"
        " remove them from the tree, or exclude them with"
        " optax.masked(..., mask) / optax.multi_transform."
      )


def require_state(fn: str, state: Any) -> None:
  """A clear error for ``update(updates, None)`` on a transform with history.

  Transforms whose state only records diagnostics rebuild it from the
  updates instead (optax's own clipping tests call ``update(g, None)``);
  transforms that carry history between steps cannot, and say so.
  """
  if state is None:
    raise ValueError(
      f"{fn}: update() got state=None, but this transform keeps history"
      " between steps. Create the state first: state = tx.init(params),"
      " then call tx.update(updates, state, params)."
    )
