"""Adaptive gradient clipping (AGC), unit-wise.

Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021 (arXiv:2102.06171), Section 4.1: each *unit*
of a layer -- one output neuron of a dense kernel, one output channel of a
convolution -- has its gradient rescaled so that

    ||G_i|| <= clipping * max(||W_i||, eps),

where ``||.||`` is the Frobenius norm over the unit and ``eps`` keeps zero-
initialised parameters from freezing. Which axes form a unit is decided per
leaf: by optax's rank rules by default, or by the user (one axis spec for all
leaves, a callable of the leaf's path, or a pytree of specs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _grouping, _norms, _scale, _stats, _tree, _validate

_FN = "adaptive_grad_clip"

AxisSpec = None | int | tuple[int, ...]


@_stats.register_state("adaptive_grad_clip")
class AdaptiveGradClipState(NamedTuple):
  """State of :func:`adaptive_grad_clip`: what the last step did."""

  # int32 scalar: how many units (output neurons / channels) were rescaled.
  num_clipped_units: jax.Array
  # float32 scalar: num_clipped_units / the total number of units.
  clipped_unit_fraction: jax.Array


def _is_array_leaf(x: Any) -> bool:
  """Whether ``x`` is one leaf, not a subtree (with leaves of its own)."""
  return jax.tree_util.treedef_is_leaf(jax.tree.structure(x)) and x is not None


LAYOUTS = ("flax", "torch")


def default_unit_axes(
  shape: tuple[int, ...], layout: str = "flax"
) -> tuple[int, ...] | None:
  """The axes one AGC unit spans by default, or None if no rule applies.

  A unit is one output neuron (one output channel for a conv): the reduction
  axes span its incoming weights, the remaining axes index the units. A
  scalar or a vector is one unit in both layouts. ``layout="flax"`` (the
  default, exactly ``optax.adaptive_grad_clip``'s rule) is for kernels whose
  *last* axis is the output: rank 2 ``(in, out)`` and 3 ``(in, heads, dim)``
  reduce axis 0, rank 4 ``HWIO`` reduces ``(0, 1, 2)`` and rank 5
  ``(0, 1, 2, 3)``; like optax, an array that squeezes to a vector is one
  unit, so a scalar-input ``Dense`` kernel ``(1, n)`` is one unit (pass
  ``axis=0`` for ``n``). ``layout="torch"`` is for weights whose *first*
  axis is the output (PyTorch, Equinox ``(out, in, *kernel)``): from rank 2
  on, every axis but 0 is reduced whatever the sizes (timm's rule), so
  ``(n, 1)`` and ``(n, 1, 1, 1)`` are ``n`` rows.
  For stacked leaves, pass ``stacked=`` to :func:`adaptive_grad_clip` and
  the rule applies to one layer's slice.

  Args:
    shape: the leaf's shape (one layer's slice for stacked leaves).
    layout: ``"flax"`` or ``"torch"``.

  Returns:
    The reduction axes, or ``None`` when no rule applies (``"flax"`` with
    rank >= 6).

  Raises:
    ValueError: for an unknown ``layout``.

  Examples:
    >>> import optaxclip as oc
    >>> oc.default_unit_axes((784, 128))  # Flax Dense (in, out): columns
    (0,)
    >>> oc.default_unit_axes((128, 784), layout="torch")  # (out, in): rows
    (1,)
    >>> oc.default_unit_axes((5, 1), layout="torch")  # Linear(1, 5): 5 rows
    (1,)
    >>> oc.default_unit_axes((3, 3, 16, 32)), oc.default_unit_axes((128,))
    ((0, 1, 2), (0,))

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
  """
  layout = _validate.check_choice(
    "default_unit_axes", "layout", layout, LAYOUTS
  )
  ndim = len(shape)
  if layout == "torch":
    # Rows, even of one element: an (n, 1) weight is Linear(1, n), n units.
    return tuple(range(1 if ndim > 1 else 0, ndim))
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(ndim))
  return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}.get(ndim)


def _normalize_axes(
  path: str,
  shape: tuple[int, ...],
  axes: AxisSpec,
  count: int,
  layout: str,
) -> tuple[int, ...]:
  """The reduced axes of a whole leaf, from a spec about one layer's slice."""
  slice_shape = shape[count:]
  if axes is None:
    rule = default_unit_axes(slice_shape, layout)
    if rule is None:
      raise ValueError(
        f"{_FN}: the leaf at {path!r} has shape {shape} (rank {len(shape)}"
        f"{f', {count} stacked' if count else ''}); there is no default unit"
        " rule for rank >= 6. Say which axes one unit spans, for example"
        " axis=lambda path, leaf: tuple(range(leaf.ndim - 1)) if leaf.ndim"
        f" >= 6 else None, or a pytree with {tuple(range(len(shape) - 1))}"
        " at that leaf."
      )
    return tuple(count + a for a in rule)
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  ndim = len(slice_shape)
  normalized = []
  for a in axes:
    if ndim == 0:
      raise ValueError(
        f"{_FN}: axis {a} is out of range for the leaf at {path!r} of shape"
        f" {shape} (a scalar{' layer slice' if count else ''} has no axes;"
        " it is always one unit). Give that leaf None (the default rule) or"
        " () with a pytree or callable axis, e.g. axis=lambda path, leaf:"
        f" None if leaf.ndim == 0 else {axes if len(axes) > 1 else axes[0]!r}."
      )
    if not -ndim <= a < ndim:
      raise ValueError(
        f"{_FN}: axis {a} is out of range for the leaf at {path!r} of shape"
        f" {shape}{f' ({count} stacked leading axes)' if count else ''};"
        f" allowed axes are -{ndim}..{ndim - 1}."
      )
    normalized.append(count + int(a) % ndim)
  return tuple(sorted(set(normalized)))


def _resolve_axes(
  slicing: _tree.Slicing, params: Any, layout: str
) -> list[tuple[int, ...]]:
  """One normalized axes tuple per param leaf, in jax.tree.leaves order.

  The callable and pytree forms of ``axis`` go through
  :func:`_tree.per_leaf_entries`: matched by normalised path, so an
  ``nnx.State`` (``Variable``-wrapped or not) or an Equinox module works.
  """
  with_path = jax.tree_util.tree_leaves_with_path(params)
  paths = [_tree.path_str(p) or "<root>" for p, _ in with_path]
  counts = slicing.counts(params)
  allowed = "an int, a tuple of ints, or None (the default rule)"
  try:
    specs = slicing.axis_entries(params, allowed)
  except ValueError as exc:
    raise ValueError(
      f"{_FN}: the axis pytree must have the structure of the params, one"
      f" entry ({allowed}) per parameter. {exc}"
    ) from exc
  return [
    _normalize_axes(path, tuple(np.shape(leaf)), spec, count, layout)
    for path, (_, leaf), spec, count in zip(
      paths, with_path, specs, counts, strict=True
    )
  ]


def adaptive_grad_clip(
  clipping: Any,
  *,
  eps: Any = 1e-3,
  axis: Any = None,
  layout: str = "flax",
  stacked: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips each unit's gradient relative to its parameter norm (AGC).

  .. math::
    G_i \leftarrow G_i \cdot \begin{cases} 1 & \|G_i\| \le \lambda
    \max(\|W_i\|, \epsilon) \\ \lambda \max(\|W_i\|, \epsilon) / \|G_i\| &
    \text{otherwise} \end{cases}

  A unit is one slice of a leaf: the reduction axes span the unit, the
  remaining axes index the units; the default axes follow
  ``optax.adaptive_grad_clip`` (:func:`default_unit_axes`). Unclipped units
  come back bit-identical. Notes and recipes: ``docs/transforms.md#agc``.

  Args:
    clipping: :math:`\lambda`, the largest allowed ratio
      :math:`\|G_i\| / \max(\|W_i\|, \epsilon)`; a non-negative scalar, may be
      scheduled with ``optax.inject_hyperparams``.
    eps: the floor on parameter norms (default ``1e-3``, as in the paper).
    axis: the axes one unit spans: ``None`` (default rules), an int or tuple
      for every leaf, a callable ``(path, leaf) -> axes or None``, or a pytree
      of the params' structure (``None`` entries mean the default rule). With
      ``stacked``, axes count within one layer's slice.
    layout: the default unit rule: ``"flax"`` for ``(..., in, out)`` kernels,
      ``"torch"`` for ``(out, in, ...)`` weights (PyTorch, Equinox).
    stacked: leading axes of a leaf that index layers: an int, a callable
      ``(path, leaf) -> int`` (see :func:`optaxclip.stacked_by_path`) or a
      pytree of ints. Each layer's slice then gets its own units.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AdaptiveGradClipState`. ``update`` requires ``params`` with the
    gradients' structure and shapes; ``update(grads, None, params)`` works.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``clipping`` or ``eps``, a
      malformed ``axis``; from ``update``, for a rank >= 6 leaf without axes,
      an out-of-range axis, a missing ``params``, or ``params`` whose
      structure or shapes differ from the gradients'.
    TypeError: from ``update``, for an integer or bool leaf of the gradients
      or the params, naming its path.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> params = {"w": jnp.array([[3.0, 1.0], [4.0, 0.0]])}  # unit norms 5, 1
    >>> grads = {"w": jnp.array([[0.3, 1.0], [0.4, 0.0]])}   # unit norms .5, 1
    >>> tx = oc.adaptive_grad_clip(0.2)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"]  # unit 0: 0.5 <= 0.2 * 5 kept; unit 1: 1 -> 0.2 * 1
    Array([[0.3, 0.2],
           [0.4, 0. ]], dtype=float32)
    >>> int(state.num_clipped_units), float(state.clipped_unit_fraction)
    (1, 0.5)

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
  """
  _validate.check_threshold(_FN, "clipping", clipping)
  _validate.check_threshold(_FN, "eps", eps)
  layout = _validate.check_choice(_FN, "layout", layout, LAYOUTS)
  slicing = _tree.Slicing(_FN, stacked, axis)

  def init_fn(params):
    del params
    return AdaptiveGradClipState(
      num_clipped_units=jnp.zeros((), jnp.int32),
      clipped_unit_fraction=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    # The state only records what this step did: state=None is fine.
    del state, extra_args
    _tree.check_float_leaves(_FN, updates)
    if params is None:
      raise ValueError(
        f"{_FN}: update needs params (the unit norms of the parameters set"
        " each unit's threshold); call tx.update(grads, state, params)."
      )
    _tree.check_float_leaves(_FN, params, "params")
    grads, treedef = jax.tree.flatten(updates)
    try:
      param_leaves = treedef.flatten_up_to(params)
      if not all(map(_is_array_leaf, param_leaves)):
        raise ValueError("params are deeper than the gradients")
    except (ValueError, TypeError) as exc:
      raise ValueError(
        f"{_FN}: params must have the structure of the gradients (one"
        " parameter per gradient leaf, the same containers and keys);"
        f" gradients are {treedef}, params are {jax.tree.structure(params)}."
      ) from exc
    axes_list = _resolve_axes(slicing, params, layout)
    paths = [
      _tree.path_str(key_path) or "<root>"
      for key_path, _ in jax.tree_util.tree_leaves_with_path(updates)
    ]
    for path, g, p in zip(paths, grads, param_leaves):
      if np.shape(g) != np.shape(p):
        raise ValueError(
          f"{_FN}: the gradient at {path!r} has shape {np.shape(g)} but its"
          f" parameter has shape {np.shape(p)}; they must be equal (each"
          " unit is clipped against its own weights, never a broadcast)."
        )

    def rule(grad_norm, param_norm):
      """``(scale, clipped)`` per unit, from the unit norms."""
      param_norm = param_norm.astype(grad_norm.dtype)
      limit = jnp.asarray(clipping).astype(grad_norm.dtype) * jnp.maximum(
        param_norm, jnp.asarray(eps).astype(grad_norm.dtype)
      )
      return _scale.clip_scale(grad_norm, limit)

    def clip_with(g, grad_norm, param_norm):
      scale, clipped = rule(grad_norm, param_norm)
      if not _grouping.may_bucket(clipped):
        # A sharded leaf counts its own clipped units: it communicates one
        # number, never its unit norms.
        clipped = jnp.sum(clipped, dtype=jnp.int32)
      # Otherwise every leaf's mask of clipped units comes out in one flat
      # vector and is counted by one reduction (a count per leaf cost three
      # kernels per leaf on XLA:CPU).
      return _scale.scale_leaf(g, scale), clipped

    def clip_one(key, g, p):
      axes = key[3]
      return clip_with(
        g, _norms.unit_norms(g, axes), _norms.unit_norms(p, axes)
      )

    def clip_rest(indices):
      # Large leaves: all unit-norm rescues under one lax.cond.
      axes = [axes_list[i] for i in indices]
      both = _norms.axes_norms_each(
        [grads[i] for i in indices] + [param_leaves[i] for i in indices],
        axes + axes,
        2,
      )
      k = len(indices)
      return [
        clip_with(grads[i], both[j], both[k + j]) for j, i in enumerate(indices)
      ]

    grads = [jnp.asarray(g) for g in grads]
    param_leaves = [jnp.asarray(p) for p in param_leaves]
    new_grads: list[Any] = [None] * len(grads)
    num_clipped = jnp.zeros((), jnp.int32)
    # Leaves that are one unit each (vectors: biases, gains) are measured
    # as one vector of norms, clipped once, and read back per leaf (as
    # clip_by_norm does), so no leaf is sliced out of a stack.
    whole = [
      i
      for i, (g, axes) in enumerate(zip(grads, axes_list, strict=True))
      if g.size and axes == tuple(range(g.ndim))
    ]
    if len(whole) > 1:
      grad_norms = _norms.flat_leaf_measures([grads[i] for i in whole], 2)
      param_norms = _norms.flat_leaf_measures(
        [param_leaves[i] for i in whole], 2
      )
      assert grad_norms is not None and param_norms is not None
      scales, clipped = rule(grad_norms, param_norms)
      num_clipped = jnp.sum(clipped, dtype=jnp.int32)
      for i, scale in zip(
        whole,
        _grouping.split_entries(scales, [1] * len(whole)),
        strict=True,
      ):
        new_grads[i] = _scale.scale_leaf(
          grads[i], scale.reshape((1,) * grads[i].ndim)
        )
    # The others per leaf, with small leaves of one shape stacked and
    # vmapped.
    others = [i for i in range(len(grads)) if new_grads[i] is None]
    results, (counts,) = _grouping.map_leaves(
      clip_one,
      [[grads[i] for i in others], [param_leaves[i] for i in others]],
      [
        (grads[i].shape, grads[i].dtype, param_leaves[i].dtype, axes_list[i])
        for i in others
      ],
      num_flat=1,
      rest=lambda index: clip_rest([others[j] for j in index]),
    )
    for i, r in zip(others, results, strict=True):
      new_grads[i] = r[0]
    num_units = sum(
      int(np.prod([d for a, d in enumerate(g.shape) if a not in axes]))
      for g, axes in zip(grads, axes_list, strict=True)
    )
    if counts is not None:
      num_clipped = num_clipped + jnp.sum(counts, dtype=jnp.int32)
    fraction = num_clipped.astype(jnp.float32) / np.float32(max(num_units, 1))
    return jax.tree.unflatten(treedef, new_grads), AdaptiveGradClipState(
      num_clipped_units=num_clipped, clipped_unit_fraction=fraction
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
