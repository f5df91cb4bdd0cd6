r"""Fira's norm-growth limiter: cap how fast the gradient norm may grow.

Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?", arXiv:2410.01623. A sudden rise of the gradient norm is what
precedes a loss spike; instead of an absolute threshold, the limiter caps the
*ratio* of consecutive norms: when :math:`\|g_t\| / \|g_{t-1}\| > \gamma`
the gradient is scaled down to norm :math:`\gamma \|g_{t-1}\|`, where
:math:`\|g_{t-1}\|` is the previous step's norm *after* limiting. The
authors apply it to one tensor at a time inside their optimizer
(``xichen-fy/Fira``, ``optimizer_torch/fira_adamw.py``); here it is an optax
transform on the global norm of the whole update tree.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _scale, _stats, _tree, _validate

_FN = "clip_norm_growth"


@_stats.register_state("clip_norm_growth")
class ClipNormGrowthState(NamedTuple):
  """State of :func:`clip_norm_growth`: the reference norm and the last step.

  Every float field has the accumulation dtype of the tree given to ``init``
  (float64 for float64 params under x64, float32 otherwise).
  """

  # float scalar: the norm the next step is compared against -- the
  # post-limit global norm of the last step whose norm was finite and
  # nonzero; 0 before any such step (no previous norm: the next step passes).
  norm_growth_prev_norm: jax.Array
  # float scalar: the last step's pre-clip global norm.
  norm_growth_norm: jax.Array
  # float scalar: the largest norm the last step was allowed, gamma times the
  # previous norm (+inf when there was no previous norm).
  norm_growth_limit: jax.Array
  # bool scalar: whether the last step was rescaled (norm > limit, or NaN).
  norm_growth_clipped: jax.Array


def _check_gamma(gamma: Any) -> None:
  value = _validate.check_real(_FN, "gamma", gamma)
  if value is not None and not value >= 1.0:
    raise ValueError(
      f"{_FN}: gamma must be in [1, inf] (the largest allowed ratio of"
      f" consecutive global norms; Fira uses 1.01), got {gamma!r}. A gamma"
      " below 1 would force the norm to shrink at every step."
    )


def _norm_growth_rule(
  prev_norm: jax.Array, norm: jax.Array, gamma: Any
) -> tuple[jax.Array, jax.Array]:
  """One step of the limiter on norms: the limit, and the next reference.

  Args:
    prev_norm: the reference norm from the state (0: no previous norm).
    norm: this step's pre-clip global norm.
    gamma: the allowed growth ratio.

  Returns:
    ``(limit, new_prev_norm)``: the largest norm this step may have
    (``gamma * prev_norm``, or ``+inf`` without a previous norm), and the
    reference for the next step: the post-limit norm ``min(norm, limit)``
    when it is finite and positive, else ``prev_norm`` unchanged (zero and
    non-finite norms are not observations).
  """
  gamma = jnp.asarray(gamma).astype(prev_norm.dtype)
  inf = jnp.full((), jnp.inf, prev_norm.dtype)
  limit = jnp.where(prev_norm > 0, gamma * prev_norm, inf)
  limited = jnp.minimum(norm, limit)
  observed = jnp.isfinite(norm) & jnp.isfinite(limited) & (limited > 0)
  return limit, jnp.where(observed, limited, prev_norm)


def clip_norm_growth(
  gamma: Any = 1.01,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Limits the growth of the global norm from one step to the next (Fira).

  With :math:`n_t = \|g_t\|` the pre-clip global norm and :math:`p` the
  previous step's norm *after* limiting:

  .. math::
    g_t \leftarrow g_t \cdot \begin{cases} 1 & n_t \le \gamma p \\
    \gamma p / n_t & \text{otherwise} \end{cases}, \qquad
    p \leftarrow \min(n_t, \gamma p)

  The norm may grow by at most a factor :math:`\gamma` per step and may fall
  freely. The first step passes unchanged; zero and non-finite norms leave
  :math:`p` as it was (a non-finite norm gives NaN updates). Unlike Fira,
  which limits each matrix inside its optimizer, this limits the global norm
  of whatever it receives. Decisions and deviations from the authors' code:
  ``docs/transforms.md#fira``.

  Args:
    gamma: the largest allowed ratio of consecutive global norms, in
      ``[1, inf]`` (default 1.01, Fira's value; ``inf`` disables it). May be
      a schedule under ``optax.inject_hyperparams``.
    ord: 2 (default; ``None`` means 2), 1, or ``jnp.inf``/``"inf"``. Static:
      under ``inject_hyperparams`` pass ``static_args=("ord",)``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis the update tree
      is split across (see :func:`optaxclip.global_norm`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipNormGrowthState`.

  Raises:
    ValueError: for a ``gamma`` below 1, NaN or non-scalar, or an
      unsupported ``ord``; from ``update``, for ``state=None``.
    TypeError: for a non-numeric ``gamma``; from ``update``, for an integer
      or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_norm_growth(gamma=1.1)
    >>> state = tx.init({"g": jnp.zeros(2)})
    >>> updates, state = tx.update({"g": jnp.array([3.0, 4.0])}, state)
    >>> updates["g"]  # the first step passes through
    Array([3., 4.], dtype=float32)
    >>> updates, state = tx.update({"g": jnp.array([30.0, 40.0])}, state)
    >>> updates["g"]  # a spike is held to 1.1 times the previous norm, 5
    Array([3.3, 4.4], dtype=float32)
    >>> float(state.norm_growth_norm), float(state.norm_growth_prev_norm)
    (50.0, 5.5)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """
  _check_gamma(gamma)
  norm_ord = _validate.canonical_ord(_FN, ord)

  def init_fn(params):
    dtype = _norms.tree_accumulation_dtype(params)
    zero = jnp.zeros((), dtype)
    return ClipNormGrowthState(
      norm_growth_prev_norm=zero,
      norm_growth_norm=zero,
      norm_growth_limit=jnp.full((), math.inf, dtype),
      norm_growth_clipped=jnp.zeros((), jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _tree.require_state(_FN, state)
    _tree.check_float_leaves(_FN, updates)
    dtype = state.norm_growth_prev_norm.dtype
    norm = _norms.global_norm_from(updates, norm_ord, axis_name).astype(dtype)
    limit, prev_norm = _norm_growth_rule(
      state.norm_growth_prev_norm, jax.lax.stop_gradient(norm), gamma
    )
    scale, clipped = _scale.clip_scale(norm, jax.lax.stop_gradient(limit))
    updates = jax.tree.map(lambda u: _scale.scale_leaf(u, scale), updates)
    return updates, ClipNormGrowthState(
      norm_growth_prev_norm=prev_norm,
      norm_growth_norm=jax.lax.stop_gradient(norm),
      norm_growth_limit=limit,
      norm_growth_clipped=clipped,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
