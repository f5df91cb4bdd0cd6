"""Tree plumbing shared by every transform: paths and leaf checks.

One module answers "what is this leaf called" so that every path the library
prints in an error, passes to a user callable, or returns as a key is spelled
the same way: ``"/"``-joined dict keys, attribute names and sequence indices
(``"blocks/fc/kernel"``), with Flax ``Variable`` wrappers adding nothing (no
``value`` component).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
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
    TypeError: an entry of the wrong kind, naming the leaf's path.
    ValueError: a pytree spec without an entry for one of the leaves.
  """
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
  by_path = {}
  for key_path, entry in jax.tree_util.tree_leaves_with_path(
    spec, is_leaf=lambda x: is_entry(x) or is_wrapped_leaf(x)
  ):
    by_path[path_str(key_path)] = unwrap(entry)
  entries = []
  for key_path, _ in with_path:
    name = path_str(key_path)
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


@jax.tree_util.register_pytree_with_keys_class
class PathValues:
  """Per-leaf diagnostics as one flat vector that knows its leaves' paths.

  States keep per-tensor statistics (``clip_by_norm``'s ``leaf_norms``) as
  one array, so a 2000-leaf tree costs one state leaf, not 2000. The paths
  and per-leaf layer shapes are static pytree metadata: they cost nothing at
  run time, survive ``jit``, and let :func:`clip_stats` return the values by
  path. A stacked leaf with ``L`` layers owns ``L`` consecutive entries.

  Attributes:
    values: the flat vector (one entry per unstacked leaf, ``prod(layer
      shape)`` entries per stacked leaf), in ``jax.tree.leaves`` order.
    segments: static ``(path, layer_shape)`` per leaf.
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
    for path, layer_shape in self.segments:
      size = int(np.prod(layer_shape, dtype=np.int64))
      chunk = self.values[start : start + size]
      out.append((path, chunk.reshape(layer_shape)))
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


_register_export_serialization()
