"""Norm clipping: per tensor, global, and per-block RMS.

* :func:`clip_by_global_norm` rescales the whole update by one factor so its
  global norm is at most ``max_norm`` (Pascanu et al. 2013; PyTorch's
  ``clip_grad_norm_``, optax's ``clip_by_global_norm``).
* :func:`clip_by_norm` rescales each tensor by its own norm (TF's
  ``clip_by_norm``, Keras' ``clipnorm``).
* :func:`clip_by_block_rms` rescales each tensor so its RMS is at most a
  threshold (optax's ``clip_by_block_rms``).

All three share the kernel in :mod:`optaxclip._norms` and its scale rule, and
record their pre-clip norms in their state at no extra pass: the norms are the
reductions the clip needs anyway.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _stats, _tree, _validate


@_stats.register_state("clip_by_global_norm")
class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`: what the last step did."""

  # scalar float32 (float64 for float64 params): the pre-clip global norm.
  global_norm: jax.Array
  # scalar bool: True when the step rescaled the updates (norm > max_norm).
  global_norm_clipped: jax.Array


@_stats.register_state("clip_by_norm")
class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm`: what the last step did, per tensor.

  For a tree without leaves (e.g. an empty ``optax.multi_transform`` group)
  ``leaf_norms`` is the placeholder ``[0.]`` of shape ``(1,)`` -- the norm of
  the empty tree -- because checkpointers (orbax) refuse zero-size arrays.
  """

  # float32[max(num_leaves, 1)], in jax.tree.leaves order: each tensor's
  # pre-clip norm ([0.] placeholder for a tree without leaves).
  leaf_norms: jax.Array
  # int32 scalar: how many tensors were rescaled.
  num_clipped_leaves: jax.Array


@_stats.register_state("clip_by_block_rms")
class ClipByBlockRmsState(NamedTuple):
  """State of :func:`clip_by_block_rms`: what the last step did, per tensor.

  For a tree without leaves ``block_rms`` is the placeholder ``[0.]`` of shape
  ``(1,)``, because checkpointers (orbax) refuse zero-size arrays.
  """

  # float32[max(num_leaves, 1)], in jax.tree.leaves order: each tensor's
  # pre-clip RMS ([0.] placeholder for a tree without leaves).
  block_rms: jax.Array
  # int32 scalar: how many tensors were rescaled.
  num_clipped_blocks: jax.Array


def _state_dtype(params: Any) -> jnp.dtype:
  # Fixed at init so the state has the same dtype every step (lax.cond in
  # MultiSteps and apply_if_finite requires it), whatever dtype the updates
  # arrive in.
  return _norms.tree_accumulation_dtype(params)


def _count(clipped: list[jax.Array]) -> jax.Array:
  if not clipped:
    return jnp.zeros((), jnp.int32)
  return jnp.sum(jnp.stack(clipped), dtype=jnp.int32)


def _stack(values: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
  if not values:
    # The placeholder of an empty tree: orbax cannot save zero-size arrays.
    return jnp.zeros((1,), dtype)
  return jnp.stack([v.astype(dtype) for v in values])


def _per_leaf_size(num_leaves: int) -> int:
  """The length of a per-leaf state array (1 for the empty tree's placeholder)."""
  return max(num_leaves, 1)


def _check_num_leaves(fn: str, field: jax.Array, num_leaves: int) -> None:
  """A clear error when the state was initialised on a different tree.

  Without it the per-leaf state would silently change shape from step to
  step, which breaks ``lax.cond``/``lax.scan`` carries and checkpoints. A
  one-leaf tree and the empty tree share the state shape ``(1,)``, so that
  one mismatch is accepted (the state keeps its shape either way).
  """
  expected = int(field.shape[0]) if field.ndim == 1 else None
  if expected != _per_leaf_size(num_leaves):
    counted = "1 leaf (or 0: the empty tree's placeholder)"
    raise ValueError(
      f"{fn}: the state was initialised on a tree with"
      f" {counted if expected == 1 else f'{expected} leaves'}"
      f" (state shape {tuple(field.shape)}), but the updates have {num_leaves}"
      " leaves. Call init on the same tree the updates have (init(params)"
      " with params shaped like the updates)."
    )


def clip_by_global_norm(
  max_norm: Any,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales the whole update so its global norm is at most ``max_norm``.

  .. math::
    u \leftarrow u \cdot \begin{cases} 1 & \|u\| \le c \\
    c / \|u\| & \text{otherwise} \end{cases}

  The norm comes from :func:`optaxclip.global_norm`: bf16/fp16 trees
  accumulate in float32 (squares after the cast), and trees with thousands of
  small leaves are reduced in one bucketed pass. Guarantees beyond
  ``optax.clip_by_global_norm``:

  * a clipped update has norm exactly ``max_norm``; an unclipped one comes
    back bit-identical;
  * ``max_norm = 0`` gives zero updates and zero gradients give zero updates
    (never ``0/0``); ``jax.grad`` through ``update`` is finite everywhere,
    also at tiny (1e-30) gradients and for ord 1 and inf;
  * a finite gradient whose sum of squares overflows (elements of 1e20 in
    float32, 1e30 in bf16) or underflows (elements of 1e-20) still gets its
    true norm: a rare path rescales by the largest element, and costs nothing
    when the sum is in range;
  * if the norm is inf or NaN, every element comes out NaN (loud), and the
    state shows the non-finite norm -- wrap the optimizer in
    ``optaxclip.skip_step`` to skip such steps instead;
  * a negative or NaN ``max_norm`` is a ``ValueError`` (optax silently flips
    the sign of the updates); a *traced* negative threshold, which cannot be
    checked, gives NaN updates.

  The pre-clip norm is recorded in the state as ``global_norm``, so
  ``optax.tree.get(opt_state, "global_norm")`` logs it without a second pass.
  ``update`` also accepts a precomputed norm as the extra argument
  ``global_norm=`` (e.g. ``tx.update(g, s, p, global_norm=n)`` on a chain);
  it then skips its own reduction and trusts the given value (it must be the
  same ``ord``, and already combined across devices).

  Every leaf of ``updates`` must be floating point (or complex): an integer
  or bool leaf is a ``TypeError`` naming its path (checked at trace time, free
  at run time). The state only records diagnostics, so ``update(updates,
  None)`` works and equals ``update(updates, init(updates))``.

  Args:
    max_norm: the largest allowed global norm, a non-negative scalar (``inf``
      disables clipping). May be a schedule under ``optax.inject_hyperparams``.
    ord: 2 (default; ``None`` means 2), 1, or ``jnp.inf``/``"inf"``. Static:
      under ``inject_hyperparams`` pass ``static_args=("ord",)`` to set it.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which the
      update tree is *split* (each device holds different slices); partial
      norms are combined with ``psum``/``pmax``. Not needed for data-parallel
      replicas that already hold identical, reduced gradients.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByGlobalNormState`.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``max_norm`` or an
      unsupported ``ord``.
    TypeError: (from ``update``) for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optaxclip as oc
    >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0))
    >>> params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["a"], updates["b"]
    (Array([-0.6], dtype=float32), Array([-0.8], dtype=float32))
    >>> optax.tree.get(state, "global_norm")
    Array(5., dtype=float32)

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.
    Peers: ``optax.clip_by_global_norm``, PyTorch
    ``torch.nn.utils.clip_grad_norm_`` (``norm_type`` 1, 2, inf).
  """
  fn = "clip_by_global_norm"
  _validate.check_threshold(fn, "max_norm", max_norm)
  norm_ord = _validate.canonical_ord(fn, ord)

  def init_fn(params):
    dtype = _state_dtype(params)
    return ClipByGlobalNormState(
      global_norm=jnp.zeros((), dtype),
      global_norm_clipped=jnp.zeros((), jnp.bool_),
    )

  def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    _tree.check_float_leaves(fn, updates)
    if state is None:  # the state only records diagnostics: rebuild it
      state = init_fn(updates)
    if global_norm is None:
      norm = _norms.global_norm_from(updates, norm_ord, axis_name)
    else:
      norm = jnp.asarray(global_norm)
    norm = norm.astype(state.global_norm.dtype)
    scale, clipped = _norms.clip_scale(norm, max_norm)
    updates = jax.tree.map(lambda u: _norms.scale_leaf(u, scale), updates)
    return updates, ClipByGlobalNormState(
      global_norm=norm, global_norm_clipped=clipped
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_norm(
  max_norm: Any,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each tensor (leaf) separately so its norm is at most ``max_norm``.

  .. math::
    u_\ell \leftarrow u_\ell \cdot \min\!\left(1, c / \|u_\ell\|\right)
    \quad \text{for every leaf } \ell

  Each leaf keeps its own direction, but the direction of the whole update can
  change (unlike :func:`clip_by_global_norm`). A leaf with a non-finite norm
  comes out all NaN; the other leaves are unaffected. The other guarantees
  are those of :func:`clip_by_global_norm`, leaf by leaf.

  Every leaf of ``updates`` must be floating point (or complex): an integer
  or bool leaf is a ``TypeError`` naming its path (checked at trace time, free
  at run time). The state only records diagnostics, so ``update(updates,
  None)`` works and equals ``update(updates, init(updates))``.
  A state initialised on a tree with a different number of leaves is a
  ``ValueError``.

  Args:
    max_norm: the largest allowed norm of each leaf, a non-negative scalar.
    ord: 2 (default; ``None`` means 2), 1, or ``jnp.inf``/``"inf"``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which each
      tensor is split; per-leaf partial norms are combined across it in one
      collective.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByNormState` (per-leaf pre-clip norms in ``jax.tree.leaves``
    order, and the number of clipped leaves). A state initialised on a tree
    with a different number of leaves makes ``update`` raise ``ValueError``.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``max_norm`` or an
      unsupported ``ord``.
    TypeError: (from ``update``) for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_by_norm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["a"], updates["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
    >>> state.leaf_norms, int(state.num_clipped_leaves)
    (Array([5. , 0.5], dtype=float32), 1)

  References:
    Peers: TensorFlow ``tf.clip_by_norm``, Keras optimizers' ``clipnorm``.
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.
  """
  fn = "clip_by_norm"
  _validate.check_threshold(fn, "max_norm", max_norm)
  norm_ord = _validate.canonical_ord(fn, ord)

  def init_fn(params):
    num_leaves = len(jax.tree.leaves(params))
    return ClipByNormState(
      leaf_norms=jnp.zeros((_per_leaf_size(num_leaves),), _state_dtype(params)),
      num_clipped_leaves=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _tree.check_float_leaves(fn, updates)
    if state is None:  # the state only records diagnostics: rebuild it
      state = init_fn(updates)
    leaves, treedef = jax.tree.flatten(updates)
    _check_num_leaves(fn, state.leaf_norms, len(leaves))
    leaves = [jnp.asarray(x) for x in leaves]
    norms = _norms.leaf_norms(leaves, norm_ord, axis_name)
    scales, clipped = (
      zip(*[_norms.clip_scale(n, max_norm) for n in norms])
      if norms
      else ((), ())
    )
    new_leaves = [_norms.scale_leaf(x, s) for x, s in zip(leaves, scales)]
    return jax.tree.unflatten(treedef, new_leaves), ClipByNormState(
      leaf_norms=_stack(list(norms), state.leaf_norms.dtype),
      num_clipped_leaves=_count(list(clipped)),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_block_rms(threshold: Any) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each tensor (block) so its root-mean-square is at most ``threshold``.

  .. math::
    u_\ell \leftarrow u_\ell \cdot \min\!\left(1, \tau / \mathrm{rms}(u_\ell)
    \right), \quad \mathrm{rms}(u_\ell) = \sqrt{\textstyle\frac{1}{n_\ell}
    \sum_i |u_{\ell,i}|^2}

  Matches ``optax.clip_by_block_rms`` on finite inputs (it divides by
  ``max(1, rms / threshold)``; this multiplies by the equivalent scale, so
  results agree to rounding), with the :func:`clip_by_global_norm` guarantees
  per block: float32 accumulation for bf16/fp16, bit-identical unclipped
  blocks, no NaN at zero, NaN for a block with a non-finite RMS, and a
  ``ValueError`` for a negative threshold. An empty leaf has RMS 0.

  Every leaf of ``updates`` must be floating point (or complex): an integer
  or bool leaf is a ``TypeError`` naming its path (checked at trace time, free
  at run time). The state only records diagnostics, so ``update(updates,
  None)`` works and equals ``update(updates, init(updates))``.
  A state initialised on a tree with a different number of leaves is a
  ``ValueError``.

  Args:
    threshold: the largest allowed RMS of each leaf, a non-negative scalar.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipByBlockRmsState`.

  Raises:
    ValueError: for a negative, NaN or non-scalar ``threshold``; from
      ``update``, for a state initialised on a different number of leaves.
    TypeError: (from ``update``) for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_by_block_rms(1.0)
    >>> grads = {"w": jnp.array([2.0, -2.0]), "b": jnp.array([0.5])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["w"], updates["b"]
    (Array([ 1., -1.], dtype=float32), Array([0.5], dtype=float32))
    >>> state.block_rms
    Array([0.5, 2. ], dtype=float32)

  References:
    Peer: ``optax.clip_by_block_rms``.
  """
  fn = "clip_by_block_rms"
  _validate.check_threshold(fn, "threshold", threshold)

  def init_fn(params):
    num_leaves = len(jax.tree.leaves(params))
    return ClipByBlockRmsState(
      block_rms=jnp.zeros((_per_leaf_size(num_leaves),), _state_dtype(params)),
      num_clipped_blocks=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _tree.check_float_leaves(fn, updates)
    if state is None:  # the state only records diagnostics: rebuild it
      state = init_fn(updates)
    leaves, treedef = jax.tree.flatten(updates)
    _check_num_leaves(fn, state.block_rms, len(leaves))
    leaves = [jnp.asarray(x) for x in leaves]
    rms = _norms.leaf_rms(leaves)
    scales, clipped = (
      zip(*[_norms.clip_scale(r, threshold) for r in rms]) if rms else ((), ())
    )
    new_leaves = [_norms.scale_leaf(x, s) for x, s in zip(leaves, scales)]
    return jax.tree.unflatten(treedef, new_leaves), ClipByBlockRmsState(
      block_rms=_stack(list(rms), state.block_rms.dtype),
      num_clipped_blocks=_count(list(clipped)),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
