"""AdaGC: per-tensor clipping against an EMA of each tensor's clipped norms.

Wang et al., "AdaGC: Improving Training Stability for Large Language Model
Pretraining" (arXiv:2502.11034; later revisions titled "AdaGC: Enhancing LLM
Pretraining Stability via Adaptive Gradient Clipping"). Every tensor ``i``
keeps its own threshold ``gamma_i``, an exponential moving average of its
*clipped* gradient norms. After a warmup of global-norm clipping, a tensor
whose norm exceeds ``lambda_rel * gamma_i`` is scaled back to it, so one
spiking tensor is tamed without shrinking the others.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _grouping, _norms, _scale, _stats, _tree, _validate

_FN = "adagc"

# The warmup length used when ``warmup_steps`` is None (see docs/design.md#rules: a None
# default keeps the argument static under ``optax.inject_hyperparams``).
DEFAULT_WARMUP_STEPS = 100


@_stats.register_state("adagc")
class AdaGCState(NamedTuple):
  """State of :func:`adagc`: the thresholds and what the last step did.

  Per-tensor arrays follow ``jax.tree.leaves`` order of the updates. For a
  tree with no leaves (an empty ``optax.multi_transform`` group) they hold
  one placeholder entry (``gamma = +inf``, norm and threshold 0) instead of
  none, because checkpointers such as orbax refuse zero-size arrays. The
  float dtype is the accumulation dtype of the tree given to ``init``
  (float64 for float64 params under x64, float32 otherwise).
  """

  # int32 scalar: how many steps have been taken (warmup while < warmup_steps);
  # saturates at 2**31 - 1.
  adagc_count: jax.Array
  # PathValues of float[num_slices] (one per tensor, one per layer of a
  # stacked leaf): each tensor's EMA threshold gamma_i, after this step.
  # +inf until the tensor's first step with a finite, nonzero clipped norm.
  adagc_gamma: _tree.PathValues
  # float[num_leaves]: each tensor's pre-clip L2 norm this step.
  adagc_norms: _tree.PathValues
  # float scalar: the pre-clip global L2 norm this step.
  adagc_global_norm: jax.Array
  # float[num_leaves]: the threshold each tensor was held to this step:
  # lambda_abs (applied to the global norm) during warmup, then
  # lambda_rel * max(gamma_i, eps) (+inf for a tensor whose gamma_i is unset).
  adagc_thresholds: _tree.PathValues
  # int32 scalar: how many tensors were rescaled this step (during warmup, all
  # of them when the global norm exceeded lambda_abs).
  adagc_num_clipped: jax.Array


def adagc(
  *,
  beta: Any = 0.98,
  lambda_rel: Any = 1.05,
  lambda_abs: Any = 1.0,
  warmup_steps: int | None = None,
  eps: Any = 1e-8,
  stacked: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGC: clips each tensor against an EMA of its own clipped norms.

  Every tensor (leaf) :math:`i` keeps a threshold :math:`\gamma_i`. During
  warmup (:math:`t \le T`, step 1 included) the update is clipped by its
  global norm at :math:`\lambda_{abs}` and :math:`\gamma_i` is the running
  minimum of the clipped norms. After warmup:

  .. math::
    \hat g_i = \min\!\left(1, \frac{\lambda_{rel}\max(\gamma_{t-1,i},
    \epsilon)}{\|g_i\|}\right) g_i, \qquad
    \gamma_{t,i} = \beta\,\gamma_{t-1,i} + (1-\beta)\,\|\hat g_i\|

  :math:`\gamma_i` takes in only finite, positive clipped norms: a tensor
  with a zero gradient this step (LoRA's ``A`` while ``B = 0``, an unused
  expert) keeps its threshold, and one that has had none yet is not
  clipped. A non-finite norm makes its tensor NaN (every tensor during
  warmup) and is not recorded. Decisions: ``docs/transforms.md#adagc``.

  Args:
    beta: EMA decay of the thresholds, in (0, 1).
    lambda_rel: after warmup, a tensor may grow to ``lambda_rel`` times its
      EMA; non-negative. May be a schedule under ``optax.inject_hyperparams``.
    lambda_abs: the global-norm threshold during warmup; non-negative.
    warmup_steps: :math:`T`, an ``int >= 1``; ``None`` means 100. Static:
      under ``inject_hyperparams`` pass ``static_args=("warmup_steps",)``.
    eps: floor on :math:`\gamma_i` inside the threshold, ``0 <= eps < inf``.
    stacked: leading axes that index layers: an int, a callable
      ``(path, leaf) -> int`` (see :func:`optaxclip.stacked_by_path`) or a
      pytree of ints. Each layer slice then has its own :math:`\gamma_i`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AdaGCState`.

  Raises:
    ValueError: for ``beta`` outside (0, 1), a negative or NaN ``lambda_rel``
      or ``lambda_abs``, a negative, NaN or infinite ``eps``, or
      ``warmup_steps < 1``; from ``update``, for ``state=None`` or a state
      made for another tree.
    TypeError: for non-numeric arguments or a non-static ``warmup_steps``;
      from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.adagc(warmup_steps=1, lambda_abs=10.0, lambda_rel=2.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    >>> _, state = tx.update(grads, tx.init(grads))  # warmup: gamma = 5, 1
    >>> spike = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([1.0])}
    >>> updates, state = tx.update(spike, state)   # "a" held to 2 * 5
    >>> updates["a"], updates["b"]
    (Array([6., 8.], dtype=float32), Array([1.], dtype=float32))

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language Model
    Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025
  """
  _validate.check_decay(
    _FN, "beta", beta, "0.98", "the EMA decay of the per-tensor thresholds"
  )
  _validate.check_threshold(_FN, "lambda_rel", lambda_rel)
  _validate.check_threshold(_FN, "lambda_abs", lambda_abs)
  _validate.check_eps(_FN, eps)
  num_warmup = _validate.check_static_int_or(
    _FN, "warmup_steps", warmup_steps, DEFAULT_WARMUP_STEPS
  )

  slicing = _tree.Slicing(_FN, stacked)

  def init_fn(params):
    layout = slicing.layout(params)
    dtype = _norms.tree_accumulation_dtype(params)
    return AdaGCState(
      adagc_count=jnp.zeros((), jnp.int32),
      adagc_gamma=layout.full(jnp.inf, dtype),
      adagc_norms=layout.full(0.0, dtype),
      adagc_global_norm=jnp.zeros((), dtype),
      adagc_thresholds=layout.full(0.0, dtype),
      adagc_num_clipped=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _tree.require_state(_FN, state)
    _tree.check_float_leaves(_FN, updates)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(x) for x in leaves]
    layout = slicing.layout(updates)
    layout.check(_FN, state.adagc_gamma)
    dtype = state.adagc_gamma.dtype
    if not layout.size:
      # Nothing to clip; the per-tensor placeholders pass through.
      return updates, state._replace(
        adagc_count=optax.safe_int32_increment(state.adagc_count),
        adagc_global_norm=jnp.zeros((), dtype),
        adagc_num_clipped=jnp.zeros((), jnp.int32),
      )
    # One norm per tensor, or per layer slice of a stacked leaf, flattened.
    norms = _norms.flat_slice_norms(leaves, layout.counts, 2).astype(dtype)
    # The global norm is the norm of the per-tensor norms: no second pass.
    global_norm = _norms.global_norm_from(norms, 2).astype(dtype)
    beta_ = jnp.asarray(beta).astype(dtype)
    lambda_rel_ = jnp.asarray(lambda_rel).astype(dtype)
    lambda_abs_ = jnp.asarray(lambda_abs).astype(dtype)
    eps_ = jnp.asarray(eps).astype(dtype)
    gamma = _tree.values_of(state.adagc_gamma)
    in_warmup = state.adagc_count < num_warmup

    # Warmup: one global scale for every tensor; gamma is a running minimum.
    global_scale, global_clipped = _scale.clip_scale(global_norm, lambda_abs_)
    warm_clipped_norms = global_scale * norms
    warm_gamma = jnp.minimum(gamma, warm_clipped_norms)

    # After warmup: each tensor against lambda_rel * its EMA.
    unobserved = jnp.isinf(gamma)
    finite_gamma = jnp.where(unobserved, jnp.zeros_like(gamma), gamma)
    inf = jnp.full_like(gamma, jnp.inf)
    rel_thresholds = jnp.where(
      unobserved | jnp.isinf(lambda_rel_),
      inf,
      lambda_rel_ * jnp.maximum(finite_gamma, eps_),
    )
    leaf_scales, leaf_clipped = _scale.clip_scale(norms, rel_thresholds)
    rel_clipped_norms = leaf_scales * norms
    ema_gamma = jnp.where(
      unobserved,
      rel_clipped_norms,
      beta_ * finite_gamma + (1 - beta_) * rel_clipped_norms,
    )

    scales = jnp.where(in_warmup, global_scale, leaf_scales)
    candidate = jnp.where(in_warmup, warm_gamma, ema_gamma)
    # Only finite, positive clipped norms are observations: a non-finite one
    # must not poison gamma, and a zero one (no gradient reached the tensor)
    # would make gamma = 0 absorbing (see the docstring).
    hat_norms = jnp.where(in_warmup, warm_clipped_norms, rel_clipped_norms)
    observed = jnp.isfinite(hat_norms) & (hat_norms > 0)
    new_gamma = jnp.where(observed, candidate, gamma)
    thresholds = jnp.where(
      in_warmup, jnp.full_like(gamma, lambda_abs_), rel_thresholds
    )
    clipped = jnp.where(in_warmup, global_clipped, leaf_clipped)

    new_leaves = [
      _scale.scale_leaf(x, scale)
      for x, scale in zip(
        leaves,
        layout.broadcast(scales, leaves, _grouping.split_entries),
        strict=True,
      )
    ]
    return jax.tree.unflatten(treedef, new_leaves), AdaGCState(
      adagc_count=optax.safe_int32_increment(state.adagc_count),
      adagc_gamma=layout.wrap(new_gamma),
      adagc_norms=layout.wrap(norms),
      adagc_global_norm=global_norm,
      adagc_thresholds=layout.wrap(thresholds),
      adagc_num_clipped=jnp.sum(clipped, dtype=jnp.int32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
