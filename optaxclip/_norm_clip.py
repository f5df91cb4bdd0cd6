"""Norm clipping: per tensor, global, and per-block RMS.

* :func:`clip_by_global_norm` rescales the whole update by one factor so its
  global norm is at most ``max_norm`` (Pascanu et al. 2013; PyTorch's
  ``clip_grad_norm_``, optax's ``clip_by_global_norm``).
* :func:`clip_by_norm` rescales each tensor by its own norm (TF's
  ``clip_by_norm``, Keras' ``clipnorm``).
* :func:`clip_by_block_rms` rescales each tensor so its RMS is at most a
  threshold (optax's ``clip_by_block_rms``).

All three share the norm kernel (``_norms``) and its scale rule, and
record their pre-clip norms in their state at no extra pass: the norms are the
reductions the clip needs anyway.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _grouping, _norms, _scale, _stats, _tree, _validate


@_stats.register_state("clip_by_global_norm")
class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`: what the last step did."""

  # scalar float32 (float64 for float64 params): the pre-clip global norm.
  global_norm: jax.Array
  # scalar bool: True when the step rescaled the updates (norm > max_norm).
  global_norm_clipped: jax.Array


@_stats.register_state("clip_by_global_norm")
class ClipByGlobalNormGroupsState(NamedTuple):
  """State of ``clip_by_global_norm(..., groups=...)``: one norm per group.

  Both fields are :class:`~optaxclip.PathValues` with one scalar entry
  per group, keyed by ``str(label)``, in the order in which the groups first
  appear among the leaves (``jax.tree.leaves`` order); ``clip_stats``
  returns them as ``"clip_by_global_norm/group_norms/<label>"`` and
  ``"clip_by_global_norm/group_clipped/<label>"``. The labels are static
  metadata (they come from the tree's structure at trace time). When no leaf
  belongs to a group (every label None, or no leaves) each field holds the
  placeholder ``[0]`` with no labels, because checkpointers (orbax) refuse
  zero-size arrays.
  """

  # PathValues of float32[max(num_groups, 1)] (float64 for float64 params):
  # every group's pre-clip global norm.
  group_norms: _tree.PathValues
  # PathValues of bool[max(num_groups, 1)]: whether each group was rescaled.
  group_clipped: _tree.PathValues


@_stats.register_state("clip_by_norm")
class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm`: what the last step did, per tensor.

  ``leaf_norms`` is a :class:`~optaxclip.PathValues`: one flat float
  vector (a pytree leaf, so it checkpoints like any array) whose entries are
  the pre-clip norms of every slice, leaf after leaf in ``jax.tree.leaves``
  order, with the leaves' paths as static metadata. An unstacked leaf has one
  entry; a stacked leaf (``stacked=``) or a leaf clipped along ``axis=`` has
  one entry per slice. ``clip_stats`` returns them per path
  (``"clip_by_norm/leaf_norms/blocks/fc/kernel"``). For a tree without
  leaves (an empty ``optax.multi_transform`` group) the vector is the
  placeholder ``[0.]``, because checkpointers (orbax) refuse zero-size
  arrays.
  """

  # PathValues of float32[max(num_slices, 1)] (float64 for float64 params):
  # every slice's pre-clip norm.
  leaf_norms: _tree.PathValues
  # int32 scalar: how many tensors (slices, for stacked leaves) were rescaled.
  num_clipped_leaves: jax.Array


@_stats.register_state("clip_by_block_rms")
class ClipByBlockRmsState(NamedTuple):
  """State of :func:`clip_by_block_rms`: what the last step did, per tensor.

  ``block_rms`` is laid out as :class:`ClipByNormState`'s ``leaf_norms``:
  one entry per block (per layer for stacked leaves), paths as static
  metadata, ``[0.]`` for a tree without leaves.
  """

  # PathValues of float32[max(num_blocks, 1)]: every block's pre-clip RMS.
  block_rms: _tree.PathValues
  # int32 scalar: how many blocks were rescaled.
  num_clipped_blocks: jax.Array


def _state_dtype(params: Any) -> jnp.dtype:
  # Fixed at init so the state has the same dtype every step (lax.cond in
  # MultiSteps and apply_if_finite requires it), whatever dtype the updates
  # arrive in.
  return _norms.tree_accumulation_dtype(params)


def _count_clipped(norms: list[jax.Array], threshold: Any) -> jax.Array:
  """How many entries of ``norms`` :func:`_scale.clip_scale` clips.

  Counted on one concatenated vector rather than summed leaf by leaf: a
  per-leaf count adds a small reduction per leaf that feeds one stack, and on
  a 2000-leaf tree that alone took 40 s of XLA:CPU compile time.
  """
  if not norms:
    return jnp.zeros((), jnp.int32)
  dtype = _norms.widest_dtype(n.dtype for n in norms)
  flat = jnp.concatenate([n.astype(dtype).reshape(-1) for n in norms])
  within = flat <= jnp.asarray(threshold).astype(dtype)
  return jnp.sum(jnp.logical_not(within), dtype=jnp.int32)


def _clip_each(
  leaves: list[jax.Array],
  reduced: list[tuple[int, ...]],
  whole: Any,
  over_axes: Any,
  threshold: Any,
  each: Any = None,
  whole_flat: Any = None,
) -> tuple[list[jax.Array], jax.Array | None]:
  """Clips each leaf (or slice) by its own measure.

  ``whole(x)`` measures a whole leaf (a scalar), ``over_axes(x, axes)``
  the slices along ``axes`` (kept as size 1).
  ``each(xs, axes_list)``, if given, measures all large leaves at once
  (their overflow rescues under one ``lax.cond``: a cond per leaf made these
  transforms several times slower to compile than optax's on the 144-leaf
  benchmark tree). Returns the clipped leaves and the measures flattened in
  leaf order (``None`` for no leaves).

  When every leaf is measured whole (no ``stacked=``, no ``axis=``), the
  measures are taken as one vector (``whole_flat(xs)``, in leaf order), the
  clip rule runs once on that vector, and each leaf reads its scale back
  with :func:`_grouping.split_entries`: every leaf of one shape then shares
  one update kernel. Otherwise small leaves of one kind are clipped as a
  vmapped stack (:func:`_grouping.map_leaves`).
  """
  if (
    whole_flat is not None
    and leaves
    and all(axes == tuple(range(x.ndim)) for x, axes in zip(leaves, reduced))
  ):
    flat = whole_flat(leaves)
    assert flat is not None  # there are leaves
    scales = _grouping.split_entries(
      _scale.clip_scale(flat, threshold)[0], [1] * len(leaves)
    )
    return [
      _scale.scale_leaf(x, s.reshape((1,) * x.ndim))
      for x, s in zip(leaves, scales, strict=True)
    ], flat

  def clip_one(key, x):
    axes = key[2]
    if axes == tuple(range(x.ndim)):
      m = whole(x).reshape((1,) * x.ndim)
    else:
      m = over_axes(x, axes)
    return _scale.scale_leaf(x, _scale.clip_scale(m, threshold)[0]), m

  def clip_rest(indices):
    measures = each([leaves[i] for i in indices], [reduced[i] for i in indices])
    return [
      (_scale.scale_leaf(leaves[i], _scale.clip_scale(m, threshold)[0]), m)
      for i, m in zip(indices, measures, strict=True)
    ]

  results, (flat,) = _grouping.map_leaves(
    clip_one,
    [leaves],
    [(x.shape, x.dtype, axes) for x, axes in zip(leaves, reduced)],
    num_flat=1,
    rest=None if each is None else clip_rest,
  )
  return [r[0] for r in results], flat


_GROUP_LABEL = "a string or int label, or None to exclude the leaf"


def _is_group_label(x: Any) -> bool:
  """A ``groups=`` entry: None (excluded), a string or an int (not a bool).

  Containers (tuples, lists) are not labels: in a pytree of labels they are
  part of the structure.
  """
  if x is None or isinstance(x, str):
    return True
  return isinstance(x, (int, np.integer)) and not isinstance(
    x, (bool, np.bool_)
  )


def _check_groups_arg(fn: str, groups: Any) -> None:
  """Construction-time check: a callable or a pytree of labels."""
  if groups is None:
    return
  if _is_group_label(groups) or isinstance(
    groups, (bool, np.bool_, float, complex, np.ndarray, jax.Array)
  ):
    raise TypeError(
      f"{fn}: groups must be a callable (path, leaf) -> label or a pytree of"
      f" labels with the structure of the updates (each {_GROUP_LABEL});"
      f" got {groups!r}. To clip the whole tree by one global norm, leave"
      " groups=None."
    )


def _group_layout(
  fn: str, groups: Any, tree: Any
) -> tuple[list[str | None], _tree.Layout]:
  """Per leaf: its group's key (``str(label)``, None if excluded); and the
  layout of one value per group, in order of first appearance.
  """
  labels = _tree.per_leaf_entries(
    fn, "groups", groups, tree, _is_group_label, _GROUP_LABEL
  )
  first: dict[str, Any] = {}
  keys: list[str | None] = []
  for label in labels:
    if label is None:
      keys.append(None)
      continue
    key = str(label)
    if key in first and first[key] != label:
      raise ValueError(
        f"{fn}: the group labels {first[key]!r} and {label!r} are different"
        f" but both print as {key!r}, the key clip_stats and the state use"
        " for a group; give the groups distinct labels."
      )
    first.setdefault(key, label)
    keys.append(key)
  return keys, _tree.keyed_layout(list(first))


def clip_by_global_norm(
  max_norm: Any,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  axis_name: Any | None = None,
  groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales the whole update so its global norm is at most ``max_norm``.

  .. math::
    u \leftarrow u \cdot \begin{cases} 1 & \|u\| \le c \\
    c / \|u\| & \text{otherwise} \end{cases}

  The norm is :func:`optaxclip.global_norm`'s (float32 for bf16/fp16, the
  true norm even when the sum of squares overflows). A clipped update has
  norm exactly ``max_norm``, an unclipped one comes back bit-identical, and
  a non-finite norm makes every element NaN. The pre-clip norm is kept in
  the state; ``update(..., global_norm=n)`` reuses a precomputed norm. With
  ``groups=`` each group of leaves is clipped by its own norm and ``None``
  leaves pass untouched. Details: ``docs/transforms.md#global-norm``.

  Args:
    max_norm: the largest allowed global norm, a non-negative scalar (``inf``
      disables clipping). May be a schedule under ``optax.inject_hyperparams``.
    ord: 2 (default; ``None`` means 2), 1, or ``jnp.inf``/``"inf"``. Static:
      under ``inject_hyperparams`` pass ``static_args=("ord",)``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which the
      update tree is *split*; partial norms are combined with ``psum``/``pmax``.
    groups: ``None`` (one norm for the whole tree), a callable
      ``(path, leaf) -> label`` or a pytree of labels (str, int or None).
      Static under ``inject_hyperparams``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByGlobalNormState`, or with ``groups`` a
    :class:`ClipByGlobalNormGroupsState`.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``max_norm`` or an
      unsupported ``ord``; from ``update`` with ``groups``, for a leaf
      without a label, labels that print alike, a state made for other
      groups, or ``global_norm=``.
    TypeError: for a malformed ``groups``; from ``update``, for an integer or
      bool leaf (naming its path) or a label of another type.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optaxclip as oc
    >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0))
    >>> params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    >>> grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["a"], updates["b"]
    (Array([-0.6], dtype=float32), Array([-0.8], dtype=float32))
    >>> optax.tree.get(state, "global_norm")
    Array(5., dtype=float32)

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  fn = "clip_by_global_norm"
  _validate.check_threshold(fn, "max_norm", max_norm)
  norm_ord = _validate.canonical_ord(fn, ord)
  _check_groups_arg(fn, groups)
  if groups is not None:
    return _clip_by_group_norms(fn, max_norm, norm_ord, axis_name, groups)

  def init_fn(params):
    dtype = _state_dtype(params)
    return ClipByGlobalNormState(
      global_norm=jnp.zeros((), dtype),
      global_norm_clipped=jnp.zeros((), jnp.bool_),
    )

  def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    state = _tree.diagnostics_state(fn, updates, state, init_fn)
    if global_norm is None:
      norm = _norms.global_norm_from(updates, norm_ord, axis_name)
    else:
      norm = jnp.asarray(global_norm)
    norm = norm.astype(state.global_norm.dtype)
    scale, clipped = _scale.clip_scale(norm, max_norm)
    updates = jax.tree.map(lambda u: _scale.scale_leaf(u, scale), updates)
    return updates, ClipByGlobalNormState(
      global_norm=norm, global_norm_clipped=clipped
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _clip_by_group_norms(
  fn: str, max_norm: Any, norm_ord: float, axis_name: Any, groups: Any
) -> optax.GradientTransformationExtraArgs:
  """``clip_by_global_norm(..., groups=groups)``: one global norm per group."""

  def init_fn(params):
    _, layout = _group_layout(fn, groups, params)
    dtype = _state_dtype(params)
    return ClipByGlobalNormGroupsState(
      group_norms=layout.full(0, dtype),
      group_clipped=layout.full(False, jnp.bool_),
    )

  def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    if global_norm is not None:
      raise ValueError(
        f"{fn}: the global_norm= extra argument (one precomputed norm) cannot"
        " be used with groups=, which needs one norm per group; drop it and"
        " let the transform compute the group norms."
      )
    state = _tree.diagnostics_state(fn, updates, state, init_fn)
    keys, layout = _group_layout(fn, groups, updates)
    layout.check(fn, state.group_norms, groups=True)
    dtype = state.group_norms.dtype
    leaves, treedef = jax.tree.flatten(updates)
    new_leaves = list(leaves)  # excluded (None-labelled) leaves stay as given
    norms, clipped = [], []
    for key in layout.paths:
      members = [i for i, k in enumerate(keys) if k == key]
      norm = _norms.global_norm_from(
        [leaves[i] for i in members], norm_ord, axis_name
      ).astype(dtype)
      scale, was_clipped = _scale.clip_scale(norm, max_norm)
      for i in members:
        new_leaves[i] = _scale.scale_leaf(leaves[i], scale)
      norms.append(norm)
      clipped.append(was_clipped)
    return jax.tree.unflatten(treedef, new_leaves), ClipByGlobalNormGroupsState(
      group_norms=layout.gather(norms, dtype),
      group_clipped=layout.gather(clipped, jnp.bool_),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_norm(
  max_norm: Any,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  axis_name: Any | None = None,
  stacked: Any = None,
  axis: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each tensor (leaf) separately so its norm is at most ``max_norm``.

  .. math::
    u_\ell \leftarrow u_\ell \cdot \min\!\left(1, c / \|u_\ell\|\right)
    \quad \text{for every leaf (slice) } \ell

  Each leaf keeps its own direction, but the direction of the whole update
  can change (unlike :func:`clip_by_global_norm`, whose other guarantees
  hold leaf by leaf). A leaf with a non-finite norm comes out all NaN; the
  others are unaffected. With ``stacked=`` each layer slice of a scanned
  leaf is clipped as a tensor of its own; with ``axis=`` each norm is taken
  over those axes only, as ``tf.clip_by_norm(t, c, axes)``, and the other
  axes index separate slices. ``update(updates, None)`` works. Details:
  ``docs/transforms.md#per-tensor``.

  Args:
    max_norm: the largest allowed norm of each leaf (slice), a non-negative
      scalar.
    ord: 2 (default; ``None`` means 2), 1, or ``jnp.inf``/``"inf"``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which each
      tensor is split; per-leaf partial norms are combined across it.
    stacked: leading axes that index layers: an int, a callable
      ``(path, leaf) -> int`` (see :func:`optaxclip.stacked_by_path`) or a
      pytree of ints; ``None`` means 0.
    axis: axes each norm is taken over, in the same forms (counted within a
      layer slice); ``None`` means all of a slice's axes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByNormState` (per-slice pre-clip norms, by path).

  Raises:
    ValueError: for a negative, NaN or non-scalar ``max_norm`` or an
      unsupported ``ord``; from ``update``, for a state made for another tree.
    TypeError: from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_by_norm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["a"], updates["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
    >>> stack = {"blocks": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> updates, _ = oc.clip_by_norm(1.0, stacked=1).update(stack, None)
    >>> updates["blocks"]
    Array([[0.6, 0.8],
           [0.3, 0.4]], dtype=float32)

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  fn = "clip_by_norm"
  _validate.check_threshold(fn, "max_norm", max_norm)
  norm_ord = _validate.canonical_ord(fn, ord)
  slicing = _tree.Slicing(fn, stacked, axis)

  def init_fn(params):
    return ClipByNormState(
      leaf_norms=slicing.layout(params).full(0, _state_dtype(params)),
      num_clipped_leaves=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    state = _tree.diagnostics_state(fn, updates, state, init_fn)
    layout = slicing.layout(updates)
    layout.check(fn, state.leaf_norms)
    reduced, dtype = list(layout.reduced), state.leaf_norms.dtype
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(x) for x in leaves]
    if axis_name is None:
      new_leaves, flat = _clip_each(
        leaves,
        reduced,
        lambda x: _norms.leaf_norms([x], norm_ord)[0],
        lambda x, axes: _norms.axes_norms(x, axes, norm_ord),
        max_norm,
        lambda xs, axes: _norms.axes_norms_each(xs, axes, norm_ord),
        lambda xs: _norms.flat_leaf_measures(xs, norm_ord),
      )
      return jax.tree.unflatten(treedef, new_leaves), ClipByNormState(
        leaf_norms=layout.flat(flat, dtype),
        num_clipped_leaves=_count_clipped(
          [] if flat is None else [flat], max_norm
        ),
      )
    if all(axes == tuple(range(x.ndim)) for x, axes in zip(leaves, reduced)):
      # Whole-leaf norms: one collective for all leaves under axis_name.
      norms = _norms.leaf_norms(leaves, norm_ord, axis_name)
      norms = [
        jnp.reshape(n, (1,) * x.ndim)
        for n, x in zip(norms, leaves, strict=True)
      ]
    else:
      norms = [
        _norms.axes_norms(x, axes, norm_ord, axis_name)
        for x, axes in zip(leaves, reduced, strict=True)
      ]
    new_leaves = [
      _scale.scale_leaf(x, _scale.clip_scale(n, max_norm)[0])
      for x, n in zip(leaves, norms, strict=True)
    ]
    return jax.tree.unflatten(treedef, new_leaves), ClipByNormState(
      leaf_norms=layout.gather(norms, dtype),
      num_clipped_leaves=_count_clipped(norms, max_norm),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_block_rms(
  threshold: Any, *, stacked: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each tensor (block) so its root-mean-square is at most ``threshold``.

  .. math::
    u_\ell \leftarrow u_\ell \cdot \min\!\left(1, \tau / \mathrm{rms}(u_\ell)
    \right), \quad \mathrm{rms}(u_\ell) = \sqrt{\textstyle\frac{1}{n_\ell}
    \sum_i |u_{\ell,i}|^2}

  Matches ``optax.clip_by_block_rms`` on finite inputs to rounding, with
  :func:`clip_by_global_norm`'s guarantees per block: float32 accumulation
  for bf16/fp16, bit-identical unclipped blocks, no NaN at zero, NaN for a
  block with a non-finite RMS. An empty leaf has RMS 0. With ``stacked=``
  every layer slice is a block of its own. ``update(updates, None)`` works.

  Args:
    threshold: the largest allowed RMS of each leaf, a non-negative scalar.
    stacked: leading axes that index layers: an int, a callable
      ``(path, leaf) -> int`` or a pytree of ints; ``None`` means 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByBlockRmsState`.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``threshold``; from
      ``update``, for a state made for another tree.
    TypeError: from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_by_block_rms(1.0)
    >>> grads = {"w": jnp.array([2.0, -2.0]), "b": jnp.array([0.5])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["w"], updates["b"]
    (Array([ 1., -1.], dtype=float32), Array([0.5], dtype=float32))
    >>> int(state.num_clipped_blocks)
    1
  """
  fn = "clip_by_block_rms"
  _validate.check_threshold(fn, "threshold", threshold)
  slicing = _tree.Slicing(fn, stacked)

  def init_fn(params):
    return ClipByBlockRmsState(
      block_rms=slicing.layout(params).full(0, _state_dtype(params)),
      num_clipped_blocks=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    state = _tree.diagnostics_state(fn, updates, state, init_fn)
    layout = slicing.layout(updates)
    layout.check(fn, state.block_rms)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(x) for x in leaves]
    new_leaves, flat = _clip_each(
      leaves,
      list(layout.reduced),
      lambda x: _norms.leaf_rms([x])[0],
      _norms.axes_rms,
      threshold,
      _norms.axes_rms_each,
      lambda xs: _norms.flat_leaf_measures(xs, 2, rms=True),
    )
    rms = [] if flat is None else [flat]
    return jax.tree.unflatten(treedef, new_leaves), ClipByBlockRmsState(
      block_rms=layout.flat(flat, state.block_rms.dtype),
      num_clipped_blocks=_count_clipped(rms, threshold),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
