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

from optaxclip import _norms, _stats, _tree, _validate

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
  step :math:`t` (counted from 1), with :math:`\theta` = ``threshold``:

  .. math::
    \tilde g_t = \begin{cases}
      \operatorname{sign}(g_t)\sqrt{\theta\,(v_{t-1} + \epsilon)}
        & \text{if } g_t^2 > \theta\,(v_{t-1} + \epsilon)
          \text{ and } v_{t-1} > 0 \text{ and the rule is active} \\
      g_t & \text{otherwise}
    \end{cases}
    \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\,\tilde g_t^2

  The rule is active from step ``warmup_steps`` on: on step :math:`t` iff
  :math:`t \ge T_w`, or, with ``reset_interval`` :math:`\Delta T`, iff
  :math:`t \bmod \Delta T \ge T_w`; then :math:`v` is also zeroed on every
  step with :math:`t \bmod \Delta T = 0`, before the test. These are the
  authors' rules (``step >= grad_accu_steps``, ``step % DeltaT >=
  grad_accu_steps``, default 20), so steps :math:`1 \dots T_w - 1` and, after
  each reset, the reset step and the :math:`T_w - 1` steps after it only feed
  :math:`v`.

  **Its own v, not Adam's.** In the authors' optimizer the spike test uses
  Adam's second moment (the raw, not bias-corrected ``exp_avg_sq`` before this
  step's gradient), which the clipped gradients then update. Here the clipper
  keeps its own :math:`v` with the same update rule, so it composes with any
  optimizer and costs one float32 buffer the size of the gradients. With the
  same :math:`\beta_2` as Adam and the clipper first in the chain, the two
  are identical: Adam receives :math:`\tilde g` and forms the same EMA. They
  part only when the optimizer's moments are reset
  (:func:`momentum_reset`): the authors' spike test then restarts from
  :math:`v = 0` with :math:`T_w` unprotected steps, while this one keeps its
  history, so spikes right after a reset are still caught. Pass
  ``reset_interval`` equal to the reset interval to get the authors'
  behaviour exactly.

  Decisions where the paper is silent:

  * *v is the raw EMA* (no bias correction), as in the authors' code. Early
    on (and after a reset of :math:`v`) the effective threshold is therefore
    :math:`\theta(1 - \beta_2^k)` times the mean square over the :math:`k`
    steps seen: with the defaults, at step 20 an element is a spike above
    about 10 times its RMS, and at steady state above :math:`\sqrt{5000}
    \approx 71` times.
  * *v = 0 is not a scale.* An element whose :math:`v` is exactly 0 has had
    no nonzero value yet (an embedding row or MoE expert not used during the
    warmup, a LoRA ``A`` while ``B = 0``, or :math:`v` was just reset). The
    authors' code flags every nonzero value of it as a spike and clips it to
    :math:`\sqrt{\theta \cdot 0} = 0`, which keeps :math:`v = 0`, so the
    element never trains again (until the next reset of :math:`v`). Here such
    an element is never clipped: its first nonzero value passes and starts
    :math:`v`. On sequences without that case this is exactly the authors'
    rule.
  * ``eps`` (default 0, the authors' rule) floors the scale the test compares
    against, :math:`v + \epsilon`, for elements whose :math:`v` decayed to
    almost nothing over a long run of zeros.
  * *Non-finite values* (inf, NaN) come out NaN (loud; an inf is not clipped
    to a finite value) and are not folded into :math:`v`; neither is a value
    whose square overflows the accumulation dtype (:math:`|g| > 1.8 \cdot
    10^{19}` in float32). Use ``optaxclip.skip_step`` to skip such steps.
  * Elements that are not clipped come back bit-identical. For bf16/fp16
    leaves the test and the clipped value are computed in float32 and cast
    back; :math:`v` takes in the cast values (what the optimizer receives).
    Complex elements are scaled along :math:`g / |g|`.
  * :math:`v` is a statistic of past steps and is not differentiated
    through; ``jax.grad`` through ``update`` is finite everywhere, including
    at all-zero gradients.

  Place ``spam_clip`` *before* :func:`momentum_reset`, not inside the
  optimizer it wraps: the reset zeroes every state leaf that mirrors the
  parameters, which would include this :math:`v`.

  Like every optaxclip transform, ``update`` raises a ``TypeError`` naming
  the leaf's path for an integer or bool leaf, and, since the state carries
  :math:`v`, a ``ValueError`` telling you to call ``init`` when given
  ``state=None``.

  Args:
    threshold: :math:`\theta`, a non-negative scalar (``inf`` disables the
      clipping); the paper's default is 5000. May be a schedule under
      ``optax.inject_hyperparams``.
    b2: EMA decay of :math:`v`, in (0, 1): Adam's :math:`\beta_2` (0.999).
    eps: added to :math:`v` in the test and the clipped value, ``>= 0``.
    warmup_steps: :math:`T_w`, the first step on which the rule is active
      (see above), an int ``>= 0``; ``None`` means 20, the authors'
      ``grad_accu_steps``. Static (``static_args=("warmup_steps",)`` under
      ``inject_hyperparams``).
    reset_interval: zero :math:`v` every this many steps, and re-enter the
      warmup, as the authors' optimizer does when it resets its moments; an
      int ``>= 1``, or ``None`` (default) to never reset :math:`v`. Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpamClipState`.

  Raises:
    ValueError: for a negative or NaN ``threshold`` or ``eps``, ``b2``
      outside (0, 1), ``warmup_steps < 0`` or ``reset_interval < 1``; from
      ``update``, for ``state=None`` or a state from ``init`` on a different
      tree.
    TypeError: for non-numeric arguments, non-static ``warmup_steps`` or
      ``reset_interval``; from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.spam_clip(threshold=5000.0, warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)  # v = 1e-3
    >>> updates, state = tx.update({"w": jnp.array([1.0, 10.0])}, state)
    >>> updates["w"]  # 10**2 > 5000 * 1e-3: clipped to sqrt(5)
    Array([1.      , 2.236068], dtype=float32)
    >>> int(state.spam_clip_num_clipped), bool(state.spam_clip_clipped)
    (1, True)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025. Authors' code:
    ``TianjinYellow/SPAM-Optimizer``, ``galore_torch/SPAM.py``.
  """
  fn = "spam_clip"
  _validate.check_threshold(fn, "threshold", threshold)
  _validate.check_in_range(fn, "b2", b2, 0, 1, low_open=True, high_open=True)
  _validate.check_threshold(fn, "eps", eps)
  num_warmup = (
    DEFAULT_CLIP_WARMUP_STEPS
    if warmup_steps is None
    else _validate.check_static_int(fn, "warmup_steps", warmup_steps, minimum=0)
  )
  interval = (
    None
    if reset_interval is None
    else _validate.check_static_int(fn, "reset_interval", reset_interval)
  )

  def init_fn(params):
    return SpamClipState(
      spam_clip_v=jax.tree.map(
        lambda p: jnp.zeros(
          jnp.shape(p), _norms.accumulation_dtype(jnp.asarray(p).dtype)
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
    num_clipped = _norms.count_true(spikes)
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


def _check_inner(fn: str, inner: Any) -> None:
  if isinstance(inner, optax.GradientTransformation):
    return
  if callable(getattr(inner, "gradient_transformation", None)):
    raise TypeError(
      f"{fn}: inner must be an optax.GradientTransformation, got an instance"
      f" of {type(inner).__name__}, which builds one: pass"
      " inner.gradient_transformation()."
    )
  raise TypeError(
    f"{fn}: inner must be an optax.GradientTransformation (an optimizer such"
    f" as optax.adam(1e-3) or an optax.chain), got {inner!r} of type"
    f" {type(inner).__name__}. Pass the optimizer itself, not its factory:"
    f" {fn}(optax.adam(1e-3)), not {fn}(optax.adam)."
  )


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

  On every step :math:`t` (counted from 1) with :math:`t \bmod \Delta T = 0`
  (:math:`\Delta T` = ``interval``), before ``inner`` sees the gradient,
  every leaf of ``inner``'s state that belongs to a copy of the parameter
  tree (Adam's ``mu`` and ``nu``, a momentum trace: what
  ``optax.tree.map_params`` finds) is set to zero. For the :math:`N` =
  ``warmup_steps`` steps starting with each reset, ``inner``'s updates are
  multiplied by the authors' cosine warmup

  .. math::
    s_k = 1 - 0.99 \cdot \frac{1 + \cos\!\big(\pi k / (N + 1)\big)}{2},
    \qquad k = t \bmod \Delta T < N,

  so :math:`s_0 = 0.01` on the reset step, rising towards 1; otherwise (and
  before the first reset) :math:`s = 1`.

  Decisions where the paper is silent, following the authors' code
  (``galore_torch/SPAM.py``):

  * *Step counters are not reset.* Adam's ``count`` keeps counting, so after
    a reset its bias correction :math:`1 - \beta^t` uses the global step
    :math:`t`, not the steps since the reset, exactly as the authors'
    ``state["step"]``. (At :math:`t = 500` with :math:`\beta_2 = 0.999` the
    first update after a reset is about twice Adam's usual size; the warmup's
    :math:`s_0 = 0.01` absorbs it.) Other non-parameter leaves (schedule
    counts, injected hyperparameters) are kept as well.
  * The first reset is at step :math:`\Delta T`, and there is no warmup before
    it (the authors start their warmup counter past :math:`N`).
  * The warmup scales ``inner``'s whole update. In the authors' optimizer
    weight decay is applied outside the warmup scale; to match that, wrap only
    the moment part: ``optax.chain(momentum_reset(optax.scale_by_adam()),
    optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))``.
  * Outputs keep each leaf's dtype; bf16/fp16 leaves are multiplied in
    float32. Non-finite updates pass through (scaled), so ``inner``'s NaNs
    stay loud.

  ``optax.chain(oc.spam_clip(), oc.momentum_reset(optax.adam(lr, b1, b2)))``
  is the authors' SPAM optimizer (with ``density=1``, no weight decay) except
  for two documented details: Adam's ``eps`` is added to
  :math:`\sqrt{\hat v}` in optax and to :math:`\sqrt{v}` in their code, and
  the spike test keeps its own :math:`v` across resets (see
  :func:`spam_clip`; ``spam_clip(reset_interval=interval)`` removes that
  difference).

  Use it with moment-based optimizers (Adam, AdamW, Lion, SGD with
  momentum). An optimizer that keeps a copy of the *parameters* in its state
  (schedule-free, lookahead, EMA of weights) would have that copy zeroed.

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
      non-static ``interval``/``warmup_steps`` (traced under
      ``inject_hyperparams``: pass ``static_args``); from ``update``, for an
      integer or bool leaf.
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
    ...   print(step, int(state.momentum_reset_steps),
    ...         round(float(state.momentum_reset_scale), 4),
    ...         round(float(updates["w"][0]), 4))
    1 1 1.0 -1.0
    2 2 1.0 -1.9
    3 0 0.01 -0.01
    4 1 0.2575 -0.4892
    5 2 1.0 -2.71
    6 0 0.01 -0.01

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025. Authors' code:
    ``TianjinYellow/SPAM-Optimizer``, ``galore_torch/SPAM.py``.
  """
  fn = "momentum_reset"
  _check_inner(fn, inner)
  every = (
    DEFAULT_INTERVAL
    if interval is None
    else _validate.check_static_int(fn, "interval", interval)
  )
  num_warmup = (
    DEFAULT_RESET_WARMUP_STEPS
    if warmup_steps is None
    else _validate.check_static_int(fn, "warmup_steps", warmup_steps, minimum=0)
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
      lambda u: _norms.scale_leaf(u, scale), new_updates
    )
    return new_updates, MomentumResetState(
      momentum_reset_inner_state=inner_state,
      momentum_reset_steps=steps,
      momentum_reset_num_resets=num_resets,
      momentum_reset_scale=scale,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
