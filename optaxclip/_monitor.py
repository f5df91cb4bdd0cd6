"""Per-layer gradient-norm monitoring: ``tree_norms`` and ``record_norms``.

"Logging is king": a per-layer norm that creeps up for a few hundred steps is
the earliest warning of an explosion, long before the loss moves. PyTorch
users log ``p.grad.norm()`` for every parameter each step; these are the JAX
equivalents, computed in one bucketed pass by the norm kernel and keyed by
readable paths (``"blocks/fc/kernel"``).

* :func:`tree_norms` is a function: the norm of every leaf (per layer for
  stacked leaves) of any pytree.
* :func:`record_norms` is an identity transform that keeps ``tree_norms`` of
  whatever flows through it in its state, so one chain logs pre-clip and
  post-clip norms side by side through :func:`optaxclip.clip_stats`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _stats, _tree, _validate


def tree_norms(
  tree: Any,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  stacked: Any = None,
) -> dict[str, jax.Array]:
  """The norm of every leaf of a pytree, keyed by its path.

  Keys are the leaves' normalised paths, ``"/"``-joined
  (``{"blocks": {"fc": {"kernel": x}}}`` gives ``"blocks/fc/kernel"``; Flax
  ``Variable`` wrappers add nothing). Each value is a scalar, or for a
  stacked leaf (``stacked=``) an array of per-layer norms with the shape of
  the stacked axes. Norms follow the library's numerics (docs/design.md#numerics): bf16 and
  fp16 leaves accumulate in float32, complex leaves use ``|x|^2``, a leaf with
  an inf/NaN element has an inf/NaN norm, an empty leaf has norm 0. Small
  leaves are reduced together in the kernel's bucket, so thousands of leaves
  compile and run as a few reductions.

  Integer and bool leaves raise ``TypeError`` (the library-wide policy).

  Args:
    tree: any pytree of arrays (gradients, parameters, updates).
    ord: ``2`` (default, ``None`` means 2), ``1`` or ``jnp.inf``.
    stacked: leading axes of a leaf that index layers: ``None``/0, an int for
      every leaf, a callable ``(path, leaf) -> int`` (see
      :func:`stacked_by_path`), or a pytree of ints.

  Returns:
    ``dict[str, jax.Array]`` in ``jax.tree.leaves`` order.

  Examples:
    >>> import jax.numpy as jnp, optaxclip as oc
    >>> grads = {"fc": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(3)}}
    >>> {k: round(float(v), 3) for k, v in oc.tree_norms(grads).items()}
    {'fc/bias': 1.732, 'fc/kernel': 4.0}
    >>> stack = {"blocks": jnp.stack([jnp.ones(4), 2 * jnp.ones(4)])}
    >>> oc.tree_norms(stack, stacked=1)["blocks"]
    Array([2., 4.], dtype=float32)

  References:
    Peer: the per-parameter ``p.grad.norm()`` logging loop of PyTorch
    training scripts; Pascanu et al., `On the difficulty of training
    recurrent neural networks <https://arxiv.org/abs/1211.5063>`_, 2013
    (monitoring the gradient norm to detect explosions).
  """
  fn = "tree_norms"
  norm_ord = _validate.canonical_ord(fn, 2 if ord is None else ord)
  slicing = _tree.Slicing(fn, stacked)
  _tree.check_float_leaves(fn, tree, arg="tree")
  layout, flat, dtypes = _flat_norms(slicing, tree, norm_ord)
  if flat is None:
    return {}
  return {
    path: value.astype(dtype)
    for (path, value), dtype in zip(
      layout.wrap(flat).items(), dtypes, strict=True
    )
  }


def _flat_norms(
  slicing: _tree.Slicing, tree: Any, norm_ord: float
) -> tuple[_tree.Layout, jax.Array | None, list]:
  """Every leaf's (per-layer) norms as one flat vector in leaf order.

  Returns ``(layout, flat, dtypes)``: the tree's layout, the vector in the
  widest accumulation dtype (``None`` for a tree without leaves), and each
  leaf's own accumulation dtype. Small leaves of one shape are reduced as
  one vmapped stack (:func:`_grouping.map_leaves`) and never sliced back out,
  so a 2000-leaf tree costs a few reductions.
  """
  layout = slicing.layout(tree)
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  dtypes = [_norms.accumulation_dtype(x.dtype) for x in leaves]
  flat = _norms.flat_slice_norms(leaves, layout.counts, norm_ord)
  return layout, flat, dtypes


@_stats.register_state("record_norms")
class RecordNormsState(NamedTuple):
  """State of :func:`record_norms`: the last step's per-leaf norms."""

  # ``tree_norms`` of the updates that flowed through, as one flat vector
  # with its paths (float32; float64 if the tree has float64 leaves):
  # ``dict(recorded_norms.items())`` is path -> scalar, or per-layer array
  # for a stacked leaf. One state leaf, however many leaves the tree has.
  recorded_norms: _tree.PathValues


def record_norms(
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  stacked: Any = None,
  name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """An identity transform that records per-leaf norms of what flows through.

  Place it anywhere in a chain to log the per-layer norms at that point:

  ``optax.chain(oc.record_norms(), oc.clip_by_global_norm(1.0),
  oc.record_norms(), optax.adamw(3e-4))`` keeps pre-clip norms (keys
  ``"record_norms/<path>"`` in :func:`clip_stats`) and post-clip norms
  (``"record_norms_1/<path>"``) side by side. The updates pass through
  untouched (the same arrays). The state keeps the norms as one flat
  :class:`~optaxclip.PathValues` vector with the paths and layer shapes
  ``init`` saw
  (``dict(state.recorded_norms.items())`` is path -> norm), so it is
  fixed-shape for ``jit``, ``lax.scan`` and checkpoints, and a 2000-leaf tree
  costs one state leaf; ``update(updates, None)`` works (the state holds no
  history).

  Decision: a vector rather than a dict of scalars, because small leaves'
  norms come out of a vmapped stack as one vector, and slicing 2000 scalars
  back out costs XLA:CPU one compiled kernel each (the 2000-leaf benchmark
  tree compiled in 44 s with the dict, 3.3 s with the vector).

  Args:
    ord: ``2`` (default, ``None`` means 2), ``1`` or ``jnp.inf``.
    stacked: leading layer axes, as in :func:`tree_norms`.
    name: the :func:`clip_stats` key prefix instead of ``"record_norms"``:
      ``name="pre_clip"`` gives keys ``"pre_clip/<path>"`` (a second one of
      the same name ``"pre_clip_1/<path>"``). A non-empty string without
      ``"/"`` that is not a clipper's prefix; ``None`` (default) keeps
      ``"record_norms"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optaxclip as oc
    >>> tx = optax.chain(oc.record_norms(name="pre_clip"),
    ...                  oc.clip_by_global_norm(1.0), oc.record_norms())
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> stats = oc.clip_stats(state)
    >>> float(stats["pre_clip/w"]), float(stats["record_norms/w"])
    (5.0, 1.0)

  References:
    Peer: PyTorch's per-parameter gradient-norm logging and TensorBoard
    histograms of gradients (``torch.utils.tensorboard``).
  """
  fn = "record_norms"
  norm_ord = _validate.canonical_ord(fn, 2 if ord is None else ord)
  slicing = _tree.Slicing(fn, stacked)
  state_cls = _stats.named_state(RecordNormsState, fn, name)

  def recorded(tree, dtype=None):
    _tree.check_float_leaves(fn, tree)
    layout, flat, dtypes = _flat_norms(slicing, tree, norm_ord)
    if dtype is None:
      dtype = _norms.widest_dtype(dtypes) if dtypes else jnp.float32
    return layout, layout.flat(flat, dtype)

  def init_fn(params):
    _tree.check_float_leaves(fn, params, "params")
    layout = slicing.layout(params)
    dtype = _norms.tree_accumulation_dtype(params)
    return state_cls(recorded_norms=layout.full(0, dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if state is None:
      return updates, state_cls(recorded_norms=recorded(updates)[1])
    # The dtype init chose, every step (lax.cond in MultiSteps needs it).
    layout, values = recorded(updates, state.recorded_norms.dtype)
    layout.check(fn, state.recorded_norms)
    return updates, state_cls(recorded_norms=values)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
