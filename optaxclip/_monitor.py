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
  the stacked axes. Norms follow the library's numerics (DESIGN §3): bf16 and
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
  _tree.check_stacked(fn, stacked)
  _tree.check_float_leaves(fn, tree, arg="tree")
  with_path = jax.tree_util.tree_leaves_with_path(tree)
  counts = _tree.stack_counts(fn, stacked, tree)
  leaves = [jnp.asarray(x) for _, x in with_path]
  norms = _norms.slice_norms(leaves, counts, norm_ord)
  return {
    _tree.path_str(key_path): norm
    for (key_path, _), norm in zip(with_path, norms, strict=True)
  }


@_stats.register_state("record_norms")
class RecordNormsState(NamedTuple):
  """State of :func:`record_norms`: the last step's per-leaf norms."""

  # path -> float32 scalar (per-layer array for stacked leaves; float64 for
  # float64 leaves): ``tree_norms`` of the updates that flowed through.
  recorded_norms: dict[str, jax.Array]


def record_norms(
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  stacked: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """An identity transform that records per-leaf norms of what flows through.

  Place it anywhere in a chain to log the per-layer norms at that point:

  ``optax.chain(oc.record_norms(), oc.clip_by_global_norm(1.0),
  oc.record_norms(), optax.adamw(3e-4))`` keeps pre-clip norms (keys
  ``"record_norms/<path>"`` in :func:`clip_stats`) and post-clip norms
  (``"record_norms_1/<path>"``) side by side. The updates pass through
  untouched (the same arrays). The state's dict has one entry per leaf with
  the shapes ``init`` saw, so it is fixed-shape for ``jit``, ``lax.scan`` and
  checkpoints; ``update(updates, None)`` works (the state holds no history).

  Args:
    ord: ``2`` (default, ``None`` means 2), ``1`` or ``jnp.inf``.
    stacked: leading layer axes, as in :func:`tree_norms`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, optaxclip as oc
    >>> tx = optax.chain(oc.record_norms(), oc.clip_by_global_norm(1.0),
    ...                  oc.record_norms())
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> stats = oc.clip_stats(state)
    >>> float(stats["record_norms/w"]), float(stats["record_norms_1/w"])
    (5.0, 1.0)

  References:
    Peer: PyTorch's per-parameter gradient-norm logging and TensorBoard
    histograms of gradients (``torch.utils.tensorboard``).
  """
  fn = "record_norms"
  norm_ord = _validate.canonical_ord(fn, 2 if ord is None else ord)
  _tree.check_stacked(fn, stacked)

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    norms = tree_norms(zeros, ord=norm_ord, stacked=stacked)
    return RecordNormsState(recorded_norms=norms)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    norms = tree_norms(updates, ord=norm_ord, stacked=stacked)
    if state is not None:
      want = {k: v.shape for k, v in state.recorded_norms.items()}
      got = {k: v.shape for k, v in norms.items()}
      if want != got:
        raise ValueError(
          f"{fn}: the state was created by init on a different tree (paths"
          f" and layer shapes {want}), but the updates give {got}. Call init"
          " on the tree you update."
        )
      # The dtypes init chose, every step (lax.cond in MultiSteps needs it).
      norms = {
        k: v.astype(state.recorded_norms[k].dtype) for k, v in norms.items()
      }
    return updates, RecordNormsState(recorded_norms=norms)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
