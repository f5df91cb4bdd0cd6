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

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from optaxclip import _tree

_StateT = TypeVar("_StateT")

# state class -> the factory name used as its key prefix in clip_stats.
_STATE_PREFIXES: dict[type, str] = {}


def register_state(
  prefix: str, *, history: tuple[str, ...] = ()
) -> Callable[[type[_StateT]], type[_StateT]]:
  """Class decorator: marks a NamedTuple as a clipper state for clip_stats.

  ``history`` names fields that hold histories (ring buffers, per-element
  moment estimates) or randomness rather than a number worth logging; they
  are left out of ``clip_stats`` unless ``include_history=True``.
  """

  def register(cls: type[_StateT]) -> type[_StateT]:
    _STATE_PREFIXES[cls] = prefix
    HISTORY_FIELDS.update(history)
    return cls

  return register


# (state class, name) -> the subclass keyed ``name`` in clip_stats.
_NAMED_STATES: dict[tuple[type, str], type] = {}


def named_state(cls: type[_StateT], fn: str, name: Any) -> type[_StateT]:
  """The state class ``cls``, keyed ``"<name>/..."`` in clip_stats.

  A transform with a user-given ``name`` returns its state in a subclass
  of ``cls`` (same fields, ``isinstance`` holds) registered under that
  name, so the name is static pytree metadata (the state's type) rather
  than a state leaf. ``None`` gives ``cls`` itself.
  """
  if name is None:
    return cls
  if not isinstance(name, str):
    raise TypeError(
      f"{fn}: name must be a string or None, got {name!r} of type"
      f" {type(name).__name__}."
    )
  named = _NAMED_STATES.get((cls, name))
  if named is not None:
    return named
  if not name or "/" in name:
    raise ValueError(
      f"{fn}: name must be a non-empty string without '/' (clip_stats keys"
      f" its values '<name>/<path>'), got {name!r}."
    )
  if name in set(_STATE_PREFIXES.values()):
    raise ValueError(
      f"{fn}: name={name!r} is the clip_stats prefix of an optaxclip clipper;"
      " choose a name of your own, e.g. name='pre_clip'."
    )

  def reduce(self: Any) -> tuple:
    # Pickled by reference to the base class and the name: the subclass
    # itself is not importable by name.
    return _restore_named, (cls, name, tuple(self))

  namespace = {
    "__slots__": (),
    "__module__": cls.__module__,
    "__reduce__": reduce,
  }
  named = type(cls.__name__, (cls,), namespace)
  _NAMED_STATES[(cls, name)] = named
  _STATE_PREFIXES[named] = name
  return named


def _restore_named(cls: Any, name: str, fields: tuple) -> Any:
  return named_state(cls, "unpickle", name)(*fields)


def _is_clip_state(node: Any) -> bool:
  return type(node) in _STATE_PREFIXES


# Fields that hold histories or randomness rather than a number worth logging:
# ring buffers of past norms and PRNG keys. Field names are unique across the
# library (docs/design.md#rules), so one table serves every state. Modules registering
# a state add their own with ``register_state(..., history=...)``.
# ``clip_stats(..., include_history=True)`` returns them too.
HISTORY_FIELDS: set[str] = set(
  {
    "autoclip_history",  # autoclip: ring buffer of past global norms
    "zclip_buffer",  # zclip: warmup buffer of norms
    "accepted_norms",  # skip_step: window of accepted norms
    "loss_history",  # skip_step: window of accepted losses
    "per_example_rng",  # clip_per_example: the noise PRNG key
  }
)


def _is_hyperparams_state(node: Any) -> bool:
  """An ``optax.inject_hyperparams`` state (stateless or stateful variant)."""
  fields = getattr(type(node), "_fields", ())
  return "hyperparams" in fields and "inner_state" in fields


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


def clip_stats(
  opt_state: Any,
  *,
  include_history: bool = False,
  include: str | Sequence[str] | None = None,
  summary: bool = False,
) -> dict[str, jax.Array]:
  """Collects every optaxclip clipper's diagnostics from an optimizer state.

  Walks the whole state in pytree order and returns one entry per field of
  each clipper state found, keyed ``"<factory>/<field>"``, e.g.
  ``"clip_by_global_norm/global_norm"``. When a state holds several clippers
  of the same kind, the second is keyed ``"<factory>_1/<field>"``, the third
  ``"<factory>_2/<field>"``, and so on, in chain order: depth-first, a
  wrapper's (``skip_step``'s) inner clippers right after the wrapper.

  What is returned is what a logger wants:

  * Per-leaf diagnostics that know their leaves' paths (``record_norms``,
    and the per-tensor vectors of ``clip_by_norm``, ``clip_by_block_rms``
    and ``adagc``) are returned per path: ``"record_norms/blocks/fc/kernel"``,
    ``"clip_by_norm/leaf_norms/blocks/fc/kernel"`` (a vector of per-layer
    values for a stacked leaf).
  * Hyperparameters injected with ``optax.inject_hyperparams`` around a
    clipper appear under that clipper's prefix, e.g.
    ``"clip_by_global_norm/max_norm"``, so a scheduled threshold is logged
    beside the norm it was compared with.
  * Histories and randomness (ring buffers of past norms, PRNG keys) are left
    out unless ``include_history=True``.
  * Fewer keys: ``include`` keeps the keys matching any of its glob
    patterns (``fnmatch``; ``*`` also matches ``/``), e.g.
    ``include=("*/global_norm", "skip_step/*")``; ``summary=True`` turns
    each per-path field into one scalar, its maximum over paths and layers
    (the worst leaf), keyed ``"<factory>/<field>"``
    (``"record_norms/recorded_norms"``).

  Values are plain ``jax.Array``s (Flax ``OptArray`` wrappers unwrapped);
  it only reads the state, inside a jitted step or on the host after it.

  Args:
    opt_state: any optimizer state (or ``nnx.Optimizer.opt_state``).
    include_history: also return history buffers and PRNG keys.
    include: a glob pattern or a sequence of them; ``None`` (default) keeps
      every key.
    summary: one scalar per field (per-path fields reduced by ``max``).

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
  patterns = _include_patterns(include)
  stats: dict[str, jax.Array] = {}
  _collect(opt_state, stats, {}, include_history, summary)
  if patterns is None:
    return stats
  return {
    key: value
    for key, value in stats.items()
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)
  }


def _include_patterns(include: Any) -> tuple[str, ...] | None:
  """``include`` as a tuple of glob patterns (``None``: keep every key)."""
  if include is None:
    return None
  patterns = (include,) if isinstance(include, str) else include
  try:
    patterns = tuple(patterns)
  except TypeError:
    patterns = (include,)
  if not all(isinstance(pattern, str) for pattern in patterns):
    raise TypeError(
      "clip_stats: include must be a glob pattern (a string such as"
      " '*/global_norm') or a sequence of them, or None for every key; got"
      f" {include!r}."
    )
  return patterns


def _worst(values: Any) -> jax.Array:
  """A per-path field's summary: the maximum over paths and layers."""
  return jnp.max(jnp.asarray(values))


def _key_prefix(node: Any, seen: dict[str, int]) -> str:
  prefix = _STATE_PREFIXES[type(node)]
  index = seen.get(prefix, 0)
  seen[prefix] = index + 1
  return prefix if index == 0 else f"{prefix}_{index}"


def _is_prng_key(value: Any) -> bool:
  dtype = getattr(value, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _collect_history(key: str, value: Any, stats: dict[str, jax.Array]) -> None:
  """A history field: one entry, or one per leaf keyed by its path when the
  field mirrors a tree (e.g. per-element moment estimates). Two leaves whose
  paths print alike would share a key, so they are an error naming both."""
  if isinstance(value, _tree.PathValues):
    for path, entry in value.items():
      stats[f"{key}/{path}"] = entry
    return
  paths = _tree.leaf_paths("clip_stats", value, f" (as {key!r} entries)")
  for path, leaf in zip(paths, jax.tree.leaves(value), strict=True):
    stats[f"{key}/{path}" if path else key] = _unwrap(leaf)


def _collect(
  tree: Any,
  stats: dict[str, jax.Array],
  seen: dict[str, int],
  include_history: bool,
  summary: bool = False,
) -> None:
  """Adds the fields of every clipper state in ``tree`` to ``stats``.

  Depth-first, in pytree order: a field holding a whole state
  (``skip_step``'s wrapped optimizer) is searched right after the fields of
  the state that holds it, before that state's next sibling, so same-kind
  clippers are numbered in chain order wherever they sit.
  """
  is_node = lambda n: _is_clip_state(n) or _is_hyperparams_state(n)
  for node in jax.tree.leaves(tree, is_leaf=is_node):
    if _is_hyperparams_state(node):
      inner = node.inner_state
      if _is_clip_state(inner):
        # The injected values belong to the clipper they were injected into;
        # its prefix is the one the next _key_prefix call hands out.
        prefix = _STATE_PREFIXES[type(inner)]
        index = seen.get(prefix, 0)
        key_prefix = prefix if index == 0 else f"{prefix}_{index}"
        for name, value in node.hyperparams.items():
          stats[f"{key_prefix}/{name}"] = _unwrap(value)
      # In place, not deferred: the inner clipper takes its prefix now, in
      # pytree order, before any clipper that follows it.
      _collect(inner, stats, seen, include_history, summary)
      continue
    if not _is_clip_state(node):
      continue
    key_prefix = _key_prefix(node, seen)
    nested = []
    for field, value in zip(node._fields, node, strict=True):
      if field in HISTORY_FIELDS:
        if include_history:
          _collect_history(f"{key_prefix}/{field}", value, stats)
        continue
      inner_leaves = jax.tree.leaves(value, is_leaf=is_node)
      if any(is_node(x) for x in inner_leaves):
        nested.append(value)  # a wrapped optimizer's state, not a statistic
      elif summary and isinstance(value, (_tree.PathValues, Mapping)):
        entries = [_unwrap(entry) for _, entry in value.items()]
        if entries:
          stats[f"{key_prefix}/{field}"] = jnp.max(
            jnp.stack([_worst(entry) for entry in entries])
          )
      elif isinstance(value, _tree.PathValues):
        # A state whose only field is per-path values (record_norms) is
        # keyed by path alone: "record_norms/<path>".
        head = key_prefix if len(node._fields) == 1 else f"{key_prefix}/{field}"
        for path, entry in value.items():
          stats[f"{head}/{path}"] = entry
      elif isinstance(value, Mapping):
        for path, entry in value.items():
          stats[f"{key_prefix}/{path}"] = _unwrap(entry)
      elif isinstance(value, (tuple, list)):
        nested.append(value)
      elif len(inner_leaves) == 1:
        leaf = _unwrap(value)
        if _is_prng_key(leaf) and not include_history:
          continue
        stats[f"{key_prefix}/{field}"] = leaf
    for value in nested:
      _collect(value, stats, seen, include_history, summary)
