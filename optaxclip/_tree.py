"""Paths and per-leaf layouts: the one home of "which leaf, which slice".

Every transform that speaks of a tree's leaves by name, or keeps values per
leaf (or per layer slice of a leaf) in its state, goes through this module.
It answers four questions, each in one place:

* **What is this leaf's path?** :func:`path_str`: dict keys, attribute names
  and sequence indices joined by ``"/"`` (``"blocks/fc/kernel"``); Flax
  ``Variable`` wrappers add nothing (no ``value`` component), so a parameter
  has the same path through ``nnx.Optimizer`` and a direct ``tx.update``.
  Two leaves of one tree whose paths print alike (``{"a/b": x, "a": {"b":
  y}}``; a key may contain ``"/"``, as Haiku's ``"mlp/~/linear_0"`` does)
  are a ``ValueError`` naming both leaves, raised wherever a result keyed by
  path would be ambiguous: a per-path state, :func:`optaxclip.tree_norms`,
  and a pytree of per-leaf options matched by path. Paths are not escaped,
  so the common spelling stays readable; a tree with such a clash works
  everywhere nothing is keyed by path (global clipping, callables, which
  see the key path itself).
* **Which slices of a leaf are separate tensors?** :class:`Slicing` holds a
  transform's ``stacked=`` (leading axes that index layers) and ``axis=``
  (the axes one norm reduces, as ``tf.clip_by_norm``), each an entry for
  every leaf, a callable ``(path, leaf) -> entry`` or a pytree of entries.
  It checks them once, when the transform is built (a traced value is an
  error that says to pass ``static_args``), and resolves them against a
  tree when ``update`` is traced.
* **How are per-slice values laid out in the state?** :class:`Layout`: one
  flat vector per field, leaf after leaf in ``jax.tree.leaves`` order, a
  leaf owning one entry per slice. With paths and slice shapes it makes the
  field a :class:`PathValues` (the paths are static pytree metadata, free
  at run time, and what lets ``clip_stats`` key the values by path); it
  zero-fills, wraps and splits such vectors, and checks that a state was
  made for the tree ``update`` receives, with an error naming both layouts.
* **How are they restored and serialised?** :class:`PathValues` is a pytree
  node whose only child is the vector, so jit, scan, orbax, pickle and a
  NumPy round trip see one array. It is registered for ``jax.export``
  serialization and, as soon as flax is imported, for
  ``flax.serialization`` (flax is not a dependency). A tree without leaves
  has no paths to keep: its fields are the plain one-entry placeholder
  array (orbax refuses zero-size arrays). That is also what makes
  ``optax.tree.map_params`` work: it calls ``init`` on an empty
  placeholder tree and matches that state's structure as a prefix of the
  real one, which a leaf is and a node with other paths is not.
"""

from __future__ import annotations

import fnmatch
import importlib.abc
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------
# Paths.

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


def normalize_key_path(key_path: Any) -> tuple[Any, ...]:
  """A key path without the components that only unwrap a container.

  ``nnx.Optimizer`` and a direct ``tx.update`` on ``nnx.state(model)`` see the
  same parameter as ``['fc']['kernel']`` and ``['fc']['kernel'].value``; both
  normalise to ``['fc']['kernel']``, so a callable matching on paths behaves
  the same on both routes.
  """
  return tuple(
    k
    for k in key_path
    if not (
      isinstance(k, jax.tree_util.GetAttrKey) and k.name in _WRAPPER_ATTRS
    )
  )


def _check_distinct(
  fn: str, named: list[tuple[str, Any]], what: str = "leaves", why: str = ""
) -> None:
  """A ``ValueError`` naming two entries whose paths print alike."""
  first: dict[str, Any] = {}
  for name, key_path in named:
    if name in first:
      raise ValueError(
        f"{fn}: the {what} at {jax.tree_util.keystr(first[name])} and"
        f" {jax.tree_util.keystr(key_path)} both have the path {name!r}"
        " (a key containing '/' prints like a nested key), so values keyed"
        f" by path{why} could not tell them apart. Rename one of the keys."
      )
    first[name] = key_path


def leaf_paths(fn: str, tree: Any, why: str = "") -> list[str]:
  """Every leaf's normalised path, in ``jax.tree.leaves`` order.

  Raises:
    ValueError: two leaves whose paths print alike, naming both.
  """
  named = [
    (path_str(key_path), key_path)
    for key_path, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]
  _check_distinct(fn, named, why=why)
  return [name for name, _ in named]


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
    # jnp.issubdtype knows the ml_dtypes floats (bfloat16, float8_*), which
    # numpy's own issubdtype does not count as inexact.
    if not jnp.issubdtype(dtype, jnp.inexact):
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


def diagnostics_state(
  fn: str, updates: Any, state: Any, init_fn: Callable[[Any], Any]
) -> Any:
  """The state of a transform whose state only records diagnostics.

  Checks the updates (:func:`check_float_leaves`) and rebuilds a ``None``
  state from them with ``init_fn``, so ``update(updates, None)`` works as
  it does for optax's own clipping transforms.
  """
  check_float_leaves(fn, updates)
  return init_fn(updates) if state is None else state


def history_state(fn: str, updates: Any, state: Any, inner: str = "") -> Any:
  """The state of a transform that keeps history, checked and on device.

  ``state=None`` is an error (:func:`require_state`) and the updates are
  checked (:func:`check_float_leaves`). A state restored on the host
  (``jax.device_get``, msgpack) holds NumPy arrays, which have no ``.at``:
  every field becomes ``jax.Array``s, except the field named ``inner``
  (a wrapped optimizer's state, which that optimizer handles itself).
  """
  require_state(fn, state)
  check_float_leaves(fn, updates)
  return state._replace(
    **{
      field: jax.tree.map(jnp.asarray, getattr(state, field))
      for field in state._fields
      if field != inner
    }
  )


# --------------------------------------------------------------------------
# Per-leaf options: one entry, a callable, or a pytree matched by path.


def is_wrapped_leaf(x: Any) -> bool:
  """A variable wrapper that jax flattens as a leaf (flax < 0.11).

  Newer flax variables are pytrees (their array is a child), so they never
  reach here as leaves; the class-level ``value`` check avoids touching the
  (deprecated) ``.value`` property of those.
  """
  if x is None or isinstance(
    x, (jax.Array, np.ndarray, np.generic, int, float, complex)
  ):
    return False
  if not hasattr(type(x), "value"):
    return False
  return jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def unwrap(x: Any) -> Any:
  while is_wrapped_leaf(x):
    x = x.value
  return x


def is_pytree_spec(spec: Any) -> bool:
  """Whether ``spec`` is a pytree of per-leaf entries rather than a callable.

  A plain function is a leaf of its own pytree; an ``eqx.Module`` or an
  ``nnx.State`` is callable or dict-like but has children, so it is a pytree.
  """
  if not callable(spec):
    return True
  return not jax.tree_util.treedef_is_leaf(jax.tree.structure(spec))


def check_static(fn: str, arg: str, value: Any) -> None:
  """A traced or array value where a static option is needed: a TypeError.

  ``optax.inject_hyperparams`` turns every numeric argument into an array,
  ``stacked=1`` included; shapes and reduced axes cannot depend on it.
  """
  if isinstance(value, (jax.Array, np.ndarray)):
    raise TypeError(
      f"{fn}: {arg} decides array shapes and which axes are reduced, so it"
      f" must be static (a Python int, a callable or a pytree of those),"
      f" got the array {value!r}. Under optax.inject_hyperparams, pass"
      f" static_args=('{arg}',)."
    )


def per_leaf_entries(
  fn: str,
  arg: str,
  spec: Any,
  tree: Any,
  is_entry: Any,
  allowed: str,
) -> list[Any]:
  """One entry of a per-leaf option for every leaf of ``tree``.

  ``spec`` is one of: a single entry (used for every leaf), a callable
  ``(path, leaf) -> entry`` (``path`` is the normalised key path, see
  :func:`normalize_key_path`; ``path_str(path)`` gives ``"blocks/fc/kernel"``),
  or a pytree with an entry per leaf of ``tree``. The pytree form is matched
  by normalised path, so it may be a plain dict, an ``nnx.State`` (with or
  without ``Variable`` wrappers) or an Equinox module; entries for paths that
  ``tree`` does not have are ignored (a spec built from the whole model serves
  a gradient tree of its trainable parameters).

  Args:
    fn: the public function name, for messages.
    arg: the option's name, for messages.
    spec: the option's value.
    tree: the tree whose leaves need entries.
    is_entry: predicate telling a complete entry (also used to stop
      flattening the spec at entries such as tuples of axes).
    allowed: what an entry may be, for messages.

  Returns:
    A list of entries in ``jax.tree.leaves(tree)`` order.

  Raises:
    TypeError: an entry of the wrong kind, naming the leaf's path; a traced
      spec (see :func:`check_static`).
    ValueError: a pytree spec without an entry for one of the leaves, or
      (for a pytree spec) two leaves or entries whose paths print alike.
  """
  check_static(fn, arg, spec)
  with_path = jax.tree_util.tree_leaves_with_path(tree)
  if is_entry(spec):
    return [spec] * len(with_path)
  if not is_pytree_spec(spec):
    entries = []
    for key_path, leaf in with_path:
      entry = spec(normalize_key_path(key_path), leaf)
      if not is_entry(entry):
        raise TypeError(
          f"{fn}: the {arg} callable returned {entry!r} for the leaf at"
          f" {path_str(key_path)!r}; it must return {allowed}."
        )
      entries.append(entry)
    return entries
  names = leaf_paths(fn, tree, f" (as entries of the {arg} pytree)")
  spec_leaves = jax.tree_util.tree_leaves_with_path(
    spec, is_leaf=lambda x: is_entry(x) or is_wrapped_leaf(x)
  )
  named = [(path_str(key_path), key_path) for key_path, _ in spec_leaves]
  _check_distinct(
    fn, named, f"{arg} entries", f" (as entries of the {arg} pytree)"
  )
  by_path = {
    name: unwrap(entry)
    for (name, _), (_, entry) in zip(named, spec_leaves, strict=True)
  }
  entries = []
  for name in names:
    if name not in by_path:
      known = ", ".join(repr(k) for k in sorted(by_path)[:8])
      raise ValueError(
        f"{fn}: the {arg} pytree has no entry for the leaf at {name!r}; it"
        f" must have the structure of the updates (one entry, {allowed}, per"
        f" leaf). Entries it has: {known}{', ...' if len(by_path) > 8 else ''}."
      )
    entry = by_path[name]
    if not is_entry(entry):
      raise TypeError(
        f"{fn}: the {arg} entry for the leaf at {name!r} is {entry!r}; it"
        f" must be {allowed}."
      )
    entries.append(entry)
  return entries


def is_axes_entry(x: Any) -> bool:
  """An axes entry of ``axis=`` options: None, an int, or a tuple of ints.

  Lists are not entries: in a pytree of entries a list is a container.
  """
  if x is None:
    return True
  if isinstance(x, (bool, np.bool_)):
    return False
  if isinstance(x, (int, np.integer)):
    return True
  return isinstance(x, tuple) and all(
    isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))
    for a in x
  )


def _is_stack_count(x: Any) -> bool:
  return x is None or (
    isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
  )


def check_stacked(fn: str, stacked: Any) -> None:
  """Construction-time check of a ``stacked=`` option (int, callable, pytree)."""
  check_static(fn, "stacked", stacked)
  if isinstance(stacked, (bool, np.bool_)):
    raise TypeError(
      f"{fn}: stacked must be an int >= 0 (leading axes that index layers), a"
      f" callable (path, leaf) -> int, or a pytree of ints; got {stacked!r}."
    )
  if _is_stack_count(stacked) and stacked is not None and stacked < 0:
    raise ValueError(
      f"{fn}: stacked must be >= 0 (the number of leading axes that index"
      f" layers), got {stacked}."
    )
  if isinstance(stacked, (float, str)):
    raise TypeError(
      f"{fn}: stacked must be an int >= 0, a callable (path, leaf) -> int,"
      f" or a pytree of ints; got {stacked!r} of type {type(stacked).__name__}."
    )


def check_axis(fn: str, axis: Any, *, per: str = "leaf") -> None:
  """Construction-time check of an ``axis=`` option.

  An int, a tuple of ints, None or a callable pass; a pytree of entries has
  every entry checked (an ``nnx.State`` with ``Variable`` wrappers
  included). Lists are containers in a pytree, never entries.
  """
  check_static(fn, "axis", axis)
  if is_axes_entry(axis) or not is_pytree_spec(axis):
    return
  bad: Any
  if isinstance(axis, (bool, np.bool_, float, complex, str)):
    bad = axis
  else:
    entries = jax.tree.leaves(
      axis, is_leaf=lambda x: is_axes_entry(x) or is_wrapped_leaf(x)
    )
    bad = next((e for e in map(unwrap, entries) if not is_axes_entry(e)), None)
    if bad is None:
      return
  raise TypeError(
    f"{fn}: axis must be None, an int, a tuple of ints, a callable"
    f" (path, leaf) -> axes, or a pytree of those per {per}; got {bad!r}"
    f"{'' if bad is axis else f' in {axis!r}'}."
  )


def stack_counts(fn: str, stacked: Any, tree: Any) -> list[int]:
  """How many leading axes of each leaf index layers (0 = not stacked).

  Args:
    fn: the public function name, for messages.
    stacked: ``None``/0, an int for every leaf, a callable
      ``(path, leaf) -> int``, or a pytree of ints (see
      :func:`per_leaf_entries`).
    tree: the updates.

  Returns:
    One int per leaf in ``jax.tree.leaves`` order, each in ``[0, leaf.ndim]``.
  """
  entries = per_leaf_entries(
    fn, "stacked", stacked, tree, _is_stack_count, "an int >= 0 (or None)"
  )
  counts = []
  for (key_path, leaf), entry in zip(
    jax.tree_util.tree_leaves_with_path(tree), entries, strict=True
  ):
    count = 0 if entry is None else int(entry)
    ndim = np.ndim(leaf)
    if not 0 <= count <= ndim:
      raise ValueError(
        f"{fn}: stacked={count} for the leaf at {path_str(key_path)!r} of"
        f" shape {np.shape(leaf)}; it must be between 0 and the leaf's rank"
        f" ({ndim})."
      )
    counts.append(count)
  return counts


def stacked_by_path(
  rules: Mapping[str, int], *, default: int = 0
) -> Callable[[Any, Any], int]:
  """Builds a ``stacked=`` callable from path patterns.

  Scanned or vmapped layers (``nnx.scan`` / ``nnx.vmap`` over a block,
  ``flax.linen.scan``, Equinox's ``filter_vmap`` ensembles) store every
  layer's parameters in one leaf with a leading layer axis: a kernel of shape
  ``(num_layers, in, out)``. Passing ``stacked=oc.stacked_by_path({"blocks":
  1})`` to a per-tensor or per-unit transform treats each layer slice of
  every leaf under ``blocks`` as a tensor of its own.

  A pattern matches a leaf's normalised ``"/"``-joined path (``"blocks/mlp/
  kernel"``, see :func:`clip_stats` keys) when it equals the path, names a
  prefix of it (``"blocks"`` matches everything below ``blocks``), or matches
  it as a shell glob (``"*/attn/*"``). The first matching rule, in the order
  given, wins; unmatched leaves get ``default``.

  Args:
    rules: ``{pattern: number of leading stacked axes}``.
    default: the count for leaves that match no pattern.

  Returns:
    A callable ``(path, leaf) -> int`` for any ``stacked=`` option.

  Raises:
    ValueError: a negative count.
    TypeError: a pattern that is not a string or a count that is not an int.

  Examples:
    >>> import jax.numpy as jnp, optaxclip as oc
    >>> grads = {"blocks": {"kernel": jnp.ones((4, 3, 2))}, "head": jnp.ones(3)}
    >>> rule = oc.stacked_by_path({"blocks": 1})
    >>> oc.tree_norms(grads, stacked=rule)["blocks/kernel"].shape
    (4,)

  References:
    Flax NNX, `Scan over layers
    <https://flax.readthedocs.io/en/latest/guides/transforms.html>`_.
  """
  fn = "stacked_by_path"
  checked = []
  for pattern, count in dict(rules).items():
    if not isinstance(pattern, str):
      raise TypeError(
        f"{fn}: every pattern must be a string path such as 'blocks' or"
        f" '*/attn/*', got {pattern!r} of type {type(pattern).__name__}."
      )
    if not _is_stack_count(count) or count is None:
      raise TypeError(
        f"{fn}: the count for pattern {pattern!r} must be an int >= 0, got"
        f" {count!r}."
      )
    if count < 0:
      raise ValueError(
        f"{fn}: the count for pattern {pattern!r} must be >= 0, got {count}."
      )
    checked.append((pattern.strip("/"), int(count)))
  if not _is_stack_count(default) or default is None or default < 0:
    raise ValueError(f"{fn}: default must be an int >= 0, got {default!r}.")

  def rule(path: Any, leaf: Any) -> int:
    del leaf
    name = path if isinstance(path, str) else path_str(path)
    for pattern, count in checked:
      if (
        name == pattern
        or name.startswith(pattern + "/")
        or fnmatch.fnmatchcase(name, pattern)
      ):
        return count
    return int(default)

  return rule


# --------------------------------------------------------------------------
# The per-path state type.


@jax.tree_util.register_pytree_with_keys_class
class PathValues:
  """Per-leaf values in an optimizer state, one flat vector keyed by path.

  Transforms that keep a value per tensor (``clip_by_norm``'s
  ``leaf_norms``, ``adagc``'s thresholds, ``record_norms``) or per group
  (``clip_by_global_norm(groups=...)``) store it as one flat array, so a
  2000-leaf tree costs one state leaf, not 2000. The paths and per-leaf
  shapes are static pytree metadata: free at run time, kept through
  ``jit``, ``lax.scan``, orbax, pickle, ``flax.serialization`` and
  ``jax.export``, and what lets :func:`optaxclip.clip_stats` key the values
  by path. A stacked leaf (``stacked=``) with ``L`` layers owns ``L``
  consecutive entries; its value is a per-layer array.

  A state for a tree without leaves holds the plain placeholder array
  ``[0]`` instead (there are no paths to key).

  Args:
    values: the flat vector, leaf after leaf in ``jax.tree.leaves`` order.
    segments: ``(path, shape)`` per leaf (or group): the static layout.

  It is a pytree node with the one child ``values``; ``items()`` gives
  ``(path, value)`` pairs, and the array attributes (``shape``, ``dtype``,
  ``np.asarray``, indexing) are those of ``values``.

  Examples:
    >>> import jax.numpy as jnp, optaxclip as oc
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.ones((2, 2))}
    >>> _, state = oc.clip_by_norm(1.0).update(grads, None)
    >>> isinstance(state.leaf_norms, oc.PathValues)
    True
    >>> {path: float(v) for path, v in state.leaf_norms.items()}
    {'a': 5.0, 'b': 2.0}
  """

  def __init__(self, values: Any, segments: tuple[tuple[str, tuple], ...]):
    self.values = values
    self.segments = tuple(segments)

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("values"), self.values),), self.segments

  def tree_flatten(self):
    return (self.values,), self.segments

  @classmethod
  def tree_unflatten(cls, segments, children):
    return cls(children[0], segments)

  def items(self) -> list[tuple[str, Any]]:
    """``(path, value)`` pairs: a scalar per leaf, or per-layer values."""
    out, start = [], 0
    for path, shape in self.segments:
      size = int(np.prod(shape, dtype=np.int64))
      chunk = self.values[start : start + size]
      out.append((path, chunk.reshape(shape)))
      start += size
    return out

  def __len__(self) -> int:
    return len(self.segments)

  # Array-like conveniences for the flat vector (np.asarray(state.leaf_norms)).
  @property
  def dtype(self) -> Any:
    return self.values.dtype

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def size(self) -> int:
    return int(self.values.size)

  @property
  def ndim(self) -> int:
    return int(self.values.ndim)

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    del copy
    return np.asarray(self.values, dtype=dtype)

  def __getitem__(self, index: Any) -> Any:
    return self.values[index]

  def __repr__(self) -> str:
    return f"PathValues({self.values!r}, paths={[p for p, _ in self.segments]})"


def values_of(field: Any) -> Any:
  """The flat vector of a per-path field (a PathValues or a plain array)."""
  return field.values if isinstance(field, PathValues) else field


def _serialize_segments(segments: tuple) -> bytes:
  return json.dumps([[path, list(shape)] for path, shape in segments]).encode()


def _deserialize_segments(data: bytes) -> tuple:
  return tuple((path, tuple(shape)) for path, shape in json.loads(data))


def _register_export_serialization() -> None:
  """Lets ``jax.export`` serialize functions whose pytrees hold PathValues."""
  try:
    # A submodule: not an attribute of jax until it is imported.
    from jax import export  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - jax without jax.export
    return
  register = getattr(export, "register_pytree_node_serialization", None)
  if register is None:  # pragma: no cover - jax without the registry
    return
  register(
    PathValues,
    serialized_name="optaxclip.PathValues",
    serialize_auxdata=_serialize_segments,
    deserialize_auxdata=_deserialize_segments,
  )


def _register_flax_serialization(serialization: Any) -> None:
  """``flax.serialization`` support: the state dict is ``{"values": ...}``.

  Restoring takes the paths from the target (``from_bytes(tx.init(params),
  data)``), as flax does for every container's structure.
  """
  if serialization.is_serializable(PathValues):
    return

  def to_state_dict(pv: PathValues) -> dict[str, Any]:
    return {"values": serialization.to_state_dict(pv.values)}

  def from_state_dict(target: PathValues, state: dict[str, Any]) -> Any:
    values = serialization.from_state_dict(
      target.values, state["values"], name="values"
    )
    return PathValues(values, target.segments)

  serialization.register_serialization_state(
    PathValues, to_state_dict, from_state_dict
  )


class _FlaxImportHook(importlib.abc.MetaPathFinder):
  """Registers PathValues with ``flax.serialization`` when flax loads it.

  flax is not a dependency, and importing it costs about 0.3 s, so the
  registration waits for the user's own import. The hook removes itself
  once it has fired.
  """

  def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
    del path, target
    if fullname != "flax.serialization":
      return None
    if self in sys.meta_path:
      sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:  # pragma: no cover
      return spec
    loader = spec.loader
    exec_module = loader.exec_module

    def exec_and_register(module: Any) -> None:
      exec_module(module)
      _register_flax_serialization(module)

    loader.exec_module = exec_and_register  # type: ignore[method-assign]
    return spec


def _register_flax_when_imported() -> None:
  module = sys.modules.get("flax.serialization")
  if module is not None:
    _register_flax_serialization(module)
  elif importlib.util.find_spec("flax") is not None:
    sys.meta_path.insert(0, _FlaxImportHook())


_register_export_serialization()
_register_flax_when_imported()


# --------------------------------------------------------------------------
# Layouts: which slices of which leaves own which entries of a state vector.


def _entries(shape: tuple[int, ...]) -> int:
  return int(np.prod(shape, dtype=np.int64))


class Layout:
  """How one tree's per-slice values sit in a state vector.

  Attributes:
    segments: static ``(path, shape)`` per leaf (or group): the shape of
      the leaf's values, e.g. ``()`` for one value per leaf, ``(L,)`` for a
      leaf of ``L`` stacked layers.
    counts: per leaf, its leading stacked axes (empty for groups).
    reduced: per leaf, the axes one value reduces (empty for groups).
  """

  def __init__(
    self,
    segments: tuple[tuple[str, tuple[int, ...]], ...],
    counts: tuple[int, ...] = (),
    reduced: tuple[tuple[int, ...], ...] = (),
  ):
    self.segments = tuple(segments)
    self.counts = tuple(counts)
    self.reduced = tuple(reduced)

  @property
  def size(self) -> int:
    """Entries of the vector: one per slice (0 for a tree without leaves)."""
    return sum(_entries(shape) for _, shape in self.segments)

  @property
  def paths(self) -> list[str]:
    return [path for path, _ in self.segments]

  def wrap(self, flat: Any) -> Any:
    """The state field for a flat vector: a PathValues, or for a layout
    without entries the vector itself (the placeholder)."""
    if not self.segments:
      return flat
    return PathValues(flat, self.segments)

  def full(self, fill: Any, dtype: Any) -> Any:
    """A field holding ``fill`` everywhere (``init``); one placeholder
    entry for a layout without entries, since orbax refuses size 0."""
    return self.wrap(jnp.full((max(self.size, 1),), fill, dtype))

  def gather(self, values: list[Any], dtype: Any) -> Any:
    """The field for per-leaf values (each of its segment's shape, or
    anything with that many entries), concatenated in leaf order."""
    if not values:
      return self.full(0, dtype)
    return self.wrap(
      jnp.concatenate([jnp.ravel(v).astype(dtype) for v in values])
    )

  def flat(self, flat: Any, dtype: Any) -> Any:
    """The field for a vector already flattened in leaf order (``None``
    for a tree without leaves)."""
    if flat is None or not self.size:
      return self.full(0, dtype)
    return self.wrap(flat.astype(dtype))

  def broadcast(
    self,
    flat: Any,
    leaves: list[Any],
    split: Callable[[Any, list[int]], list[Any]] | None = None,
  ) -> list[Any]:
    """Each leaf's entries of ``flat``, shaped to broadcast against it: the
    reduced axes kept as size 1 (a scalar for one value per leaf).

    ``split(flat, sizes)`` cuts ``flat`` into the leaves' chunks (slices by
    default).
    """
    sizes = [_entries(shape) for _, shape in self.segments]
    if split is None:
      starts = np.cumsum([0, *sizes])[:-1]
      chunks = [flat[a : a + s] for a, s in zip(starts, sizes, strict=True)]
    else:
      chunks = split(flat, sizes)
    out = []
    for (_, shape), axes, x, chunk in zip(
      self.segments, self.reduced, leaves, chunks, strict=True
    ):
      if not shape:
        out.append(chunk.reshape(()))
      else:
        keep = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
        out.append(chunk.reshape(keep))
    return out

  def check(
    self,
    fn: str,
    field: Any,
    *,
    groups: bool = False,
    keyed: tuple[str, str] | None = None,
  ) -> None:
    """A clear error for a state ``init`` made for a different tree.

    A plain array (a placeholder, or a vector restored without its paths)
    passes when its size fits. Without the check the per-slice state would
    silently change shape from step to step, which breaks ``lax.cond`` and
    ``lax.scan`` carries and checkpoints. Segments that are not leaves are
    named in the error by what they are: ``groups`` for ``groups=`` labels
    of the updates, or ``keyed=(what, source)`` (``("attention layers",
    "params")``), each key with its shape when it has one.
    """
    known = getattr(field, "segments", None)
    if known is None:
      shape = tuple(np.shape(field))
      if shape == (max(self.size, 1),):
        return
      have = f"{shape[0] if len(shape) == 1 else shape} tensors"
      where = ""
    else:
      if tuple(known) == self.segments:
        return
      have = f"{sum(_entries(s) for _, s in known)} tensors"
      where = _describe(known)
    if groups:
      keyed = ("groups", "updates")
    if keyed is not None:
      what, source = keyed
      raise ValueError(
        f"{fn}: the state was initialised with the {what}"
        f" {_keys(known or ())}, but the {source} fall into the {what}"
        f" {_keys(self.segments)}. Call init on a tree with the structure of"
        f" the {source} (init(params) with params shaped like the updates)."
      )
    raise ValueError(
      f"{fn}: the state was created by init on a different tree: it holds"
      f" statistics for {have}{where}, but the updates have"
      f" {len(self.segments)} leaves ({self.size} tensors"
      f"{_describe(self.segments)}). Call init on a tree with the structure"
      " of the updates (e.g. the params the updates are gradients of)."
    )


def _keys(segments: Any) -> list[str]:
  return [f"{key}{list(shape) if shape else ''}" for key, shape in segments]


def _describe(segments: Any) -> str:
  items = [
    f"{path or '<root>'}{list(shape) if shape else ''}"
    for path, shape in list(segments)[:4]
  ]
  more = ", ..." if len(segments) > 4 else ""
  return f" at {', '.join(items)}{more}" if items else ""


class Slicing:
  """A transform's ``stacked=`` and ``axis=`` options.

  Built once in the factory, which checks both (``check_stacked``,
  ``check_axis``); :meth:`layout` resolves them against the tree ``update``
  receives. ``axis`` counts within one layer's slice, as
  ``tf.clip_by_norm(t, c, axes)`` does within a tensor; by default a value
  reduces all of a slice's axes.

  Args:
    fn: the public function name, for messages.
    stacked: leading axes that index layers: None/0, an int, a callable
      ``(path, leaf) -> int`` or a pytree of ints.
    axis: None, an int or tuple of ints, a callable or a pytree of those.
  """

  def __init__(self, fn: str, stacked: Any = None, axis: Any = None):
    check_stacked(fn, stacked)
    check_axis(fn, axis)
    self.fn = fn
    self.stacked = stacked
    self.axis = axis

  def counts(self, tree: Any) -> list[int]:
    return stack_counts(self.fn, self.stacked, tree)

  def axis_entries(self, tree: Any, allowed: str) -> list[Any]:
    """The raw ``axis`` entry of every leaf (None where none was given)."""
    if self.axis is None:
      return [None] * len(jax.tree.leaves(tree))
    return per_leaf_entries(
      self.fn, "axis", self.axis, tree, is_axes_entry, allowed
    )

  def layout(self, tree: Any) -> Layout:
    """Per leaf: its path, stacked axes, reduced axes and value shape."""
    fn = self.fn
    paths = leaf_paths(fn, tree)
    leaves = jax.tree.leaves(tree)
    counts = self.counts(tree)
    specs = self.axis_entries(
      tree, "an int, a tuple of ints, or None (every axis of the slice)"
    )
    segments, reduced = [], []
    for path, leaf, count, spec in zip(
      paths, leaves, counts, specs, strict=True
    ):
      shape = tuple(np.shape(leaf))
      ndim = len(shape)
      slice_ndim = ndim - count
      if spec is None:
        axes = tuple(range(count, ndim))
      else:
        spec = (spec,) if isinstance(spec, (int, np.integer)) else tuple(spec)
        for a in spec:
          if not -slice_ndim <= a < slice_ndim:
            raise ValueError(
              f"{fn}: axis {a} is out of range for the leaf at {path!r} of"
              f" shape {shape} (stacked leading axes: {count}); allowed axes"
              f" of one slice are {-slice_ndim}..{slice_ndim - 1}."
            )
        axes = tuple(sorted({count + int(a) % slice_ndim for a in spec}))
      reduced.append(axes)
      kept = tuple(d for a, d in enumerate(shape) if a not in axes)
      segments.append((path, kept))
    return Layout(tuple(segments), tuple(counts), tuple(reduced))


def keyed_layout(keys: list[str]) -> Layout:
  """A layout of one value per key (``groups=`` labels), in the given order."""
  return Layout(tuple((key, ()) for key in keys))
