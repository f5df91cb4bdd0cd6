"""SPAM: spike-aware clipping and momentum reset, as composable transforms.

Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
Training", ICLR 2025 (arXiv:2501.06842). The SPAM optimizer is Adam with two
additions, which this module splits into two transforms that compose with any
optimizer:

* :func:`spam_clip`: element-wise *spike-aware clipping*. An element whose
  square exceeds ``threshold`` times an EMA of its past squares is a spike; it
  keeps its sign and is scaled down to ``sqrt(threshold * v)``.
* :func:`momentum_reset`: every ``interval`` steps, the wrapped optimizer's
  moment estimates are reset to zero and its updates are scaled down by a
  cosine warmup for ``warmup_steps`` steps.

``optax.chain(spam_clip(), momentum_reset(optax.adam(lr)))`` is SPAM; the
docstrings say exactly where it differs from the authors' fused optimizer
(``TianjinYellow/SPAM-Optimizer``, ``galore_torch/SPAM.py``) and how to
remove the difference.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _grouping, _norms, _scale, _stats, _tree, _validate

# The paper's (and the authors' code's) defaults.
DEFAULT_THRESHOLD = 5000.0
DEFAULT_B2 = 0.999
DEFAULT_CLIP_WARMUP_STEPS = 20  # the authors' ``grad_accu_steps``
DEFAULT_INTERVAL = 500  # the paper's Delta T
DEFAULT_RESET_WARMUP_STEPS = 150  # the paper's N
# The authors' warmup after a reset scales the first step by 1 - 0.99.
_WARMUP_DEPTH = 0.99


@_stats.register_state("spam_clip", history=("spam_clip_v",))
class SpamClipState(NamedTuple):
  """State of :func:`spam_clip`."""

  # Pytree with the structure of the updates: per element, the EMA of the
  # squared (clipped) updates. float32 per leaf (float64 for float64 and
  # complex128 leaves). A history field: clip_stats leaves it out unless
  # include_history=True.
  spam_clip_v: Any
  # int32 scalar: steps taken; saturates at 2**31 - 1.
  spam_clip_count: jax.Array
  # int32 scalar: how many elements the last step clipped.
  spam_clip_num_clipped: jax.Array
  # bool scalar: whether the last step clipped any element.
  spam_clip_clipped: jax.Array


def _clip_leaf(
  g: jax.Array,
  v: jax.Array,
  threshold: jax.Array,
  b2: jax.Array,
  one_minus_b2: jax.Array,
  eps: jax.Array,
  active: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The spike rule for one leaf: (clipped leaf, new v, spike mask).

  ``v`` is the EMA before this step (already zeroed on a reset step); the
  scalars are in ``v``'s dtype.
  """
  x = jnp.asarray(g)
  acc = v.dtype
  complex_leaf = jnp.issubdtype(x.dtype, jnp.complexfloating)

  def squares(y):
    # Element-wise |y|^2 in the accumulation dtype (not a reduction).
    if complex_leaf:
      re, im = jnp.real(y).astype(acc), jnp.imag(y).astype(acc)
      return re * re + im * im
    ya = y.astype(acc)
    return ya * ya

  finite = jnp.isfinite(x)
  square = squares(x)
  # v is a statistic of past steps: it is not differentiated through.
  v = jax.lax.stop_gradient(v)
  cap_square = threshold * (v + eps)
  # v == 0: no nonzero value was seen yet (or since v was reset); that is
  # no scale to call anything a spike against (see the docstring).
  spike = active & finite & (v > 0) & (square > cap_square)
  # Two-sided where: the square root and the division only see spikes.
  cap = _norms.safe_sqrt(jnp.where(spike, cap_square, jnp.zeros_like(v)))
  if complex_leaf:
    magnitude = _norms.safe_sqrt(jnp.where(spike, square, jnp.ones_like(v)))
    clipped = x * (cap / magnitude).astype(x.dtype)
  else:
    clipped = (jnp.sign(x.astype(acc)) * cap).astype(x.dtype)
  out = jnp.where(spike, clipped, x)
  out = jnp.where(finite, out, jnp.full_like(out, jnp.nan))
  # v tracks what flows downstream (the clipped values, in the leaf's dtype).
  out_square = squares(out)
  ema = b2 * v + one_minus_b2 * out_square
  # Non-finite values (and squares beyond the dtype's range) never enter v.
  fold = finite & jnp.isfinite(out_square)
  return out, jnp.where(fold, ema, v), spike


def spam_clip(
  threshold: Any = DEFAULT_THRESHOLD,
  *,
  b2: Any = DEFAULT_B2,
  eps: Any = 0.0,
  warmup_steps: int | None = None,
  reset_interval: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Spike-aware clipping (SPAM): element-wise clipping against an EMA of g².

  Every element keeps :math:`v`, an EMA of its squared (clipped) values. At
  step :math:`t`, with :math:`\theta` = ``threshold``:

  .. math::
    \tilde g_t = \begin{cases}
      \operatorname{sign}(g_t)\sqrt{\theta\,(v_{t-1} + \epsilon)}
        & \text{if } g_t^2 > \theta\,(v_{t-1} + \epsilon) \text{ and }
          v_{t-1} > 0 \\
      g_t & \text{otherwise}
    \end{cases}
    \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\,\tilde g_t^2

  The rule is active from step ``warmup_steps`` on, as in the authors'
  code. The clipper keeps its own :math:`v` (the authors use Adam's), so it
  works in front of any optimizer; place it before :func:`momentum_reset`.
  Non-finite elements come out NaN and are not folded into :math:`v`.
  Decisions: ``docs/transforms.md#spam``.

  Args:
    threshold: :math:`\theta`, >= 0 (``inf`` disables it); the paper's 5000.
      May be a schedule under ``optax.inject_hyperparams``.
    b2: EMA decay of :math:`v`, in (0, 1): Adam's :math:`\beta_2` (0.999).
    eps: added to :math:`v` in the test and the clipped value, ``>= 0``.
    warmup_steps: :math:`T_w`, the first step on which the rule is active,
      an int ``>= 0``; ``None`` means 20 (the authors' ``grad_accu_steps``).
      Static under ``inject_hyperparams``.
    reset_interval: zero :math:`v` every this many steps and re-enter the
      warmup; an int ``>= 1``, or ``None`` (default) to never reset. Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpamClipState`.

  Raises:
    ValueError: for a negative or NaN ``threshold`` or ``eps``, ``b2``
      outside (0, 1), ``warmup_steps < 0`` or ``reset_interval < 1``; from
      ``update``, for ``state=None`` or a state made for another tree.
    TypeError: for non-numeric or traced static arguments; from ``update``,
      for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.spam_clip(threshold=5000.0, warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)  # v = 1e-3
    >>> updates, state = tx.update({"w": jnp.array([1.0, 10.0])}, state)
    >>> updates["w"]  # 10**2 > 5000 * 1e-3: clipped to sqrt(5)
    Array([1.      , 2.236068], dtype=float32)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025
  """
  fn = "spam_clip"
  _validate.check_threshold(fn, "threshold", threshold)
  _validate.check_in_range(fn, "b2", b2, 0, 1, low_open=True, high_open=True)
  _validate.check_threshold(fn, "eps", eps)
  num_warmup = _validate.check_static_int_or(
    fn, "warmup_steps", warmup_steps, DEFAULT_CLIP_WARMUP_STEPS, minimum=0
  )
  interval = _validate.check_static_int_or(
    fn, "reset_interval", reset_interval, None
  )

  def init_fn(params):
    return SpamClipState(
      # zeros_like keeps each leaf's sharding: under explicit mesh axes the
      # EMA must be laid out as the gradient it is compared with.
      spam_clip_v=jax.tree.map(
        lambda p: jnp.zeros_like(
          p, _norms.accumulation_dtype(jnp.asarray(p).dtype)
        ),
        params,
      ),
      spam_clip_count=jnp.zeros((), jnp.int32),
      spam_clip_num_clipped=jnp.zeros((), jnp.int32),
      spam_clip_clipped=jnp.zeros((), jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _tree.require_state(fn, state)
    _tree.check_float_leaves(fn, updates)
    leaves, treedef = jax.tree.flatten(updates)
    v_leaves = jax.tree.leaves(state.spam_clip_v)
    if len(v_leaves) != len(leaves) or any(
      jnp.shape(v) != jnp.shape(g) for v, g in zip(v_leaves, leaves)
    ):
      raise ValueError(
        f"{fn}: the state's v has {len(v_leaves)} leaves of shapes"
        f" {[jnp.shape(v) for v in v_leaves]}, but the updates have"
        f" {len(leaves)} of shapes {[jnp.shape(g) for g in leaves]}. The"
        " state must come from tx.init on a tree with the structure of the"
        " updates (e.g. the params they are gradients of)."
      )
    step = optax.safe_int32_increment(state.spam_clip_count)
    if interval is None:
      active = step >= num_warmup
      reset = jnp.zeros((), jnp.bool_)
    else:
      phase = step % interval
      active = phase >= num_warmup
      reset = phase == 0

    outs, new_v, spikes = [], [], []
    for g, v in zip(leaves, v_leaves):
      acc = v.dtype
      out, v_next, spike = _clip_leaf(
        g,
        jnp.where(reset, jnp.zeros_like(v), v),
        jnp.asarray(threshold).astype(acc),
        jnp.asarray(b2).astype(acc),
        # 1 - b2 before the cast (in float64 for a Python b2), as optax and
        # PyTorch's Adam do: f32(1 - 0.999) is 1e-3 to 1e-8, while
        # 1 - f32(0.999) is off by 1.3e-5.
        jnp.asarray(1 - b2).astype(acc),
        jnp.asarray(eps).astype(acc),
        active,
      )
      outs.append(out)
      new_v.append(v_next)
      spikes.append(spike)
    num_clipped = _grouping.count_true(spikes)
    return jax.tree.unflatten(treedef, outs), SpamClipState(
      spam_clip_v=jax.tree.unflatten(
        jax.tree.structure(state.spam_clip_v), new_v
      ),
      spam_clip_count=step,
      spam_clip_num_clipped=num_clipped,
      spam_clip_clipped=num_clipped > 0,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@_stats.register_state("momentum_reset")
class MomentumResetState(NamedTuple):
  """State of :func:`momentum_reset`."""

  # The wrapped optimizer's state (its moments zeroed on reset steps).
  momentum_reset_inner_state: Any
  # int32 scalar: steps since the last reset, in [0, interval): 0 on the step
  # that reset; before the first reset, steps since init.
  momentum_reset_steps: jax.Array
  # int32 scalar: how many resets happened; saturates at 2**31 - 1.
  momentum_reset_num_resets: jax.Array
  # float32 scalar: the warmup scale the last step's updates were multiplied
  # by (1 outside the warmup).
  momentum_reset_scale: jax.Array


def _warmup_scale(steps: jax.Array, num_warmup: int) -> jax.Array:
  """The authors' scale ``steps`` steps after a reset (0 = the reset step).

  ``1 - 0.99 * (1 + cos(pi * steps / (N + 1))) / 2`` for ``steps < N``,
  else 1: the complement of their ``CosineDecay(0.99, N)``, a PyTorch
  ``CosineAnnealingLR`` over ``N + 1`` steps cut off at ``N``.
  """
  if num_warmup == 0:
    return jnp.ones((), jnp.float32)
  half_angle = jnp.float32(math.pi / (2 * (num_warmup + 1))) * steps.astype(
    jnp.float32
  )
  # The same value as 1 - 0.99 (1 + cos 2a) / 2, without its cancellation
  # in float32 for small steps.
  scale = (1 - _WARMUP_DEPTH) + _WARMUP_DEPTH * jnp.square(jnp.sin(half_angle))
  return jnp.where(steps < num_warmup, scale, jnp.ones((), jnp.float32))


def _map_params() -> Any:
  """``optax.tree.map_params`` (newer optax) or ``tree_map_params``."""
  tree_module = getattr(optax, "tree", None)
  found = getattr(tree_module, "map_params", None)
  return found if found is not None else optax.tree_utils.tree_map_params


def momentum_reset(
  inner: optax.GradientTransformation,
  *,
  interval: int | None = None,
  warmup_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Resets ``inner``'s moments every ``interval`` steps (SPAM), with warmup.

  On every step :math:`t` with :math:`t \bmod \Delta T = 0`, before
  ``inner`` sees the gradient, every leaf of ``inner``'s state that mirrors
  the parameters (Adam's ``mu`` and ``nu``, a momentum trace: what
  ``optax.tree.map_params`` finds) is set to zero; step counters are kept.
  For the :math:`N` steps starting with each reset, ``inner``'s updates are
  scaled by the authors' cosine warmup

  .. math::
    s_k = 1 - 0.99 \cdot \frac{1 + \cos\!\big(\pi k / (N + 1)\big)}{2},
    \qquad k = t \bmod \Delta T < N,

  and by 1 otherwise. With :func:`spam_clip` in front it reproduces the
  authors' SPAM optimizer (details: ``docs/transforms.md#spam``). Do not
  wrap optimizers that keep a copy of the parameters in their state.

  Args:
    inner: the optimizer to wrap, any ``optax.GradientTransformation``.
    interval: :math:`\Delta T`, steps between resets, an int ``>= 1``;
      ``None`` means the paper's 500. Static.
    warmup_steps: :math:`N`, steps of warmup after each reset, an int
      ``>= 0``; ``None`` means the paper's 150. Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`MomentumResetState`; extra arguments are passed on to ``inner``.

  Raises:
    TypeError: if ``inner`` is not a ``GradientTransformation``, or for a
      traced ``interval``/``warmup_steps`` (pass ``static_args``); from
      ``update``, for an integer or bool leaf.
    ValueError: for ``interval < 1`` or ``warmup_steps < 0``; from
      ``update``, for ``state=None``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> tx = oc.momentum_reset(
    ...     optax.sgd(1.0, momentum=0.9), interval=3, warmup_steps=2)
    >>> params = {"w": jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> for step in range(1, 7):
    ...   updates, state = tx.update({"w": jnp.ones(1)}, state, params)
    ...   print(step, round(float(state.momentum_reset_scale), 4),
    ...         round(float(updates["w"][0]), 4))
    1 1.0 -1.0
    2 1.0 -1.9
    3 0.01 -0.01
    4 0.2575 -0.4892
    5 1.0 -2.71
    6 0.01 -0.01

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025
  """
  fn = "momentum_reset"
  _validate.check_inner(fn, inner)
  every = _validate.check_static_int_or(
    fn, "interval", interval, DEFAULT_INTERVAL
  )
  num_warmup = _validate.check_static_int_or(
    fn, "warmup_steps", warmup_steps, DEFAULT_RESET_WARMUP_STEPS, minimum=0
  )
  inner = optax.with_extra_args_support(inner)
  map_params = _map_params()

  def zero_moments(inner_state):
    return map_params(inner, jnp.zeros_like, inner_state)

  def init_fn(params):
    return MomentumResetState(
      momentum_reset_inner_state=inner.init(params),
      momentum_reset_steps=jnp.zeros((), jnp.int32),
      momentum_reset_num_resets=jnp.zeros((), jnp.int32),
      momentum_reset_scale=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _tree.require_state(fn, state)
    _tree.check_float_leaves(fn, updates)
    # In [0, interval): no overflow however long the run.
    steps = (state.momentum_reset_steps + 1) % every
    reset = steps == 0
    num_resets = jnp.where(
      reset,
      optax.safe_int32_increment(state.momentum_reset_num_resets),
      state.momentum_reset_num_resets,
    )
    # A conditional, not a select: steps without a reset do not rewrite the
    # moments.
    inner_state = jax.lax.cond(
      reset, zero_moments, lambda s: s, state.momentum_reset_inner_state
    )
    new_updates, inner_state = inner.update(
      updates, inner_state, params, **extra_args
    )
    scale = jnp.where(
      num_resets > 0,
      _warmup_scale(steps, num_warmup),
      jnp.ones((), jnp.float32),
    )
    new_updates = jax.tree.map(
      lambda u: _scale.scale_leaf(u, scale), new_updates
    )
    return new_updates, MomentumResetState(
      momentum_reset_inner_state=inner_state,
      momentum_reset_steps=steps,
      momentum_reset_num_resets=num_resets,
      momentum_reset_scale=scale,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
