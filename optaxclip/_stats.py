"""``clip_stats``: every clipper's diagnostics from an optimizer state.

Each optaxclip state is a ``NamedTuple`` whose fields record what the last
step did (pre-clip norms, thresholds, whether it clipped). This module keeps a
registry of those state classes and walks any optimizer state -- ``optax.chain``
tuples, ``inject_hyperparams``, ``MultiSteps``, ``masked``,
``multi_transform``, or a Flax ``nnx.Optimizer``'s ``opt_state`` whose arrays
are wrapped in ``OptArray`` variables -- to collect them into one flat dict for
a logger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax

_StateT = TypeVar("_StateT")

# state class -> the factory name used as its key prefix in clip_stats.
_STATE_PREFIXES: dict[type, str] = {}


def register_state(prefix: str) -> Callable[[type[_StateT]], type[_StateT]]:
  """Class decorator: marks a NamedTuple as a clipper state for clip_stats."""

  def register(cls: type[_StateT]) -> type[_StateT]:
    _STATE_PREFIXES[cls] = prefix
    return cls

  return register


def _is_clip_state(node: Any) -> bool:
  return type(node) in _STATE_PREFIXES


def _unwrap(value: Any) -> Any:
  """A field's array, unwrapping containers such as Flax ``OptArray``."""
  leaves = jax.tree.leaves(value)
  if len(leaves) == 1:
    leaf = leaves[0]
    # flax < 0.11 does not register its variables as pytrees, so the wrapper
    # itself is the leaf; its ``value`` is the array.
    while not isinstance(leaf, jax.Array) and hasattr(leaf, "value"):
      leaf = leaf.value
    return leaf
  return value


def clip_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Collects every optaxclip clipper's diagnostics from an optimizer state.

  Walks the whole state in pytree order and returns one entry per field of
  each clipper state found, keyed ``"<factory>/<field>"``, e.g.
  ``"clip_by_global_norm/global_norm"``. When a state holds several clippers
  of the same kind, the second is keyed ``"<factory>_1/<field>"``, the third
  ``"<factory>_2/<field>"``, and so on, in pytree-flattening order (for
  ``optax.chain``, the order of the chain). Values are plain ``jax.Array``s:
  Flax ``nnx.Optimizer`` variable wrappers (``OptArray``) are unwrapped. The
  function only reads the state, so it costs nothing inside a jitted step and
  can be called on the host after it.

  Args:
    opt_state: any optimizer state (or ``nnx.Optimizer.opt_state``).

  Returns:
    A flat ``dict[str, jax.Array]``; empty if the state holds no optaxclip
    clipper.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optaxclip as oc
    >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> stats = oc.clip_stats(state)
    >>> float(stats["clip_by_global_norm/global_norm"])
    5.0
    >>> bool(stats["clip_by_global_norm/global_norm_clipped"])
    True

  References:
    Peer: PyTorch's ``clip_grad_norm_`` returns the pre-clip total norm for
    logging; this gathers the same information from a whole optax state.
  """
  stats: dict[str, jax.Array] = {}
  _collect(opt_state, stats, {})
  return stats


def _collect(tree: Any, stats: dict[str, jax.Array], seen: dict[str, int]):
  """Adds the fields of every clipper state in ``tree`` to ``stats``.

  A field holding a whole state (``skip_step``'s wrapped optimizer) is
  searched in turn, after the fields of the state that holds it.
  """
  nested = []
  for node in jax.tree.leaves(tree, is_leaf=_is_clip_state):
    if not _is_clip_state(node):
      continue
    prefix = _STATE_PREFIXES[type(node)]
    index = seen.get(prefix, 0)
    seen[prefix] = index + 1
    key_prefix = prefix if index == 0 else f"{prefix}_{index}"
    for field, value in zip(node._fields, node):
      inner = jax.tree.leaves(value, is_leaf=_is_clip_state)
      if isinstance(value, (tuple, list, dict)):
        nested.append(value)  # a wrapped optimizer's state, not a statistic
      elif len(inner) == 1 and not _is_clip_state(inner[0]):
        stats[f"{key_prefix}/{field}"] = _unwrap(value)
      elif inner:
        nested.append(value)
  for value in nested:
    _collect(value, stats, seen)
