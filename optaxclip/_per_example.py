"""Per-example clipping for DP-SGD, with optional noise and adaptive threshold.

:func:`clip_per_example` takes a batch of per-example gradients (every leaf
has a leading batch axis, e.g. from ``jax.vmap(jax.grad(loss))``), clips each
example by its own global L2 norm, and sums or averages the clipped examples:
the clipping step of DP-SGD (Abadi et al. 2016). Optionally it adds the
Gaussian noise of DP-SGD to the sum, and adapts the threshold towards a target
quantile of the per-example norms (Andrew et al. 2019, non-private estimator).
Instead of the clamp ``min(1, C/||g||)`` it can apply automatic clipping
(AUTO-S, Bu et al. 2022, as Opacus' ``clipping="automatic"`` does): every
example is normalised to ``C/(||g|| + 0.01)``, and with ``per_layer=True``
each leaf by its own per-example norm (Opacus' ``"automatic_per_layer"``).

The per-example norms come from the one norm kernel (``_norms.batch_norms``:
per-leaf reductions over the non-batch axes) and the scale rule from
``_scale.clip_scale``. The three papers' full references are in
:func:`clip_per_example`'s docstring.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _norms, _scale, _stats, _tree, _validate

_FN = "clip_per_example"
_REDUCTIONS = ("mean", "sum")
# "clamp": min(1, C / ||g||) (Abadi et al.); "automatic": C / (||g|| + gamma)
# with no clamp (AUTO-S, Bu et al.; Opacus' automatic clipping).
_RULES = ("clamp", "automatic")
# Bounds of the adaptive threshold C: the smallest normal and the largest
# finite float32 (see the ``target_quantile`` docs).
_C_FLOOR = np.float32(np.finfo(np.float32).tiny)
_C_CEILING = np.float32(np.finfo(np.float32).max)


@_stats.register_state("clip_per_example")
class ClipPerExampleState(NamedTuple):
  """State of :func:`clip_per_example`: what the last step did."""

  # scalar float32: the threshold C for the *next* step (fixed at max_norm
  # unless target_quantile is set, then adapted after every step).
  per_example_max_norm: jax.Array
  # int32 scalar: how many finite examples were scaled down in the last step
  # (with per_layer=True: examples with at least one leaf scaled down).
  num_clipped_examples: jax.Array
  # int32 scalar: how many examples had a non-finite norm (and were excluded).
  num_nonfinite_examples: jax.Array
  # scalar float32: mean pre-clip norm of the finite examples (0 if none).
  per_example_norm_mean: jax.Array
  # uint32[2]: raw PRNG key for the next step's noise (split every step).
  per_example_rng: jax.Array


def _check_seed(seed: Any) -> None:
  if _validate.is_traced(seed):
    return
  array = np.asarray(seed) if not isinstance(seed, (bool, np.bool_)) else None
  if (
    array is None
    or array.ndim != 0
    or not np.issubdtype(array.dtype, np.integer)
  ):
    raise ValueError(
      f"{_FN}: seed must be an int (the PRNG seed of the noise), got {seed!r}."
    )


def _batch_size(leaves: list[jax.Array]) -> int:
  """The shared leading-axis size of all leaves, or a ValueError."""
  shapes = [tuple(x.shape) for x in leaves]
  sizes = {s[0] if s else -1 for s in shapes}
  if -1 in sizes or len(sizes) != 1:
    raise ValueError(
      f"{_FN}: every leaf of updates must be a batch of per-example"
      " gradients with the same leading (batch) axis, e.g. from"
      f" jax.vmap(jax.grad(loss)); got leaf shapes {shapes}."
    )
  return sizes.pop()


def _check_against_params(updates: Any, params: Any) -> None:
  """Each per-example leaf must be its parameter's shape behind a batch axis.

  Without this check a gradient that was never vmapped -- e.g. a ``(64, 10)``
  mean gradient of a one-leaf model with ``(64, 10)`` weights -- would be
  read as 64 examples of shape ``(10,)`` and silently clipped row by row.
  """
  treedef = jax.tree.structure(updates)
  try:
    param_leaves = treedef.flatten_up_to(params)  # type: ignore[attr-defined]
  except (ValueError, TypeError) as exc:
    raise ValueError(
      f"{_FN}: params must have the structure of the per-example gradients"
      f" (one parameter per gradient leaf); gradients are {treedef}, params"
      f" are {jax.tree.structure(params)}."
    ) from exc
  with_path = jax.tree_util.tree_leaves_with_path(updates)
  for (key_path, x), p in zip(with_path, param_leaves):
    x_shape, p_shape = tuple(np.shape(x)), tuple(np.shape(p))
    if len(x_shape) != len(p_shape) + 1 or x_shape[1:] != p_shape:
      path = _tree.path_str(key_path) or "<root>"
      raise ValueError(
        f"{_FN}: the per-example gradients at {path!r} have shape {x_shape},"
        f" but their parameter has shape {p_shape}: expected (batch,) +"
        f" {p_shape}, a leading batch axis followed by the parameter's"
        " shape. Compute per-example gradients with"
        " jax.vmap(jax.grad(loss), in_axes=(None, 0)), not jax.grad of the"
        " batch loss."
      )


def _sum_dtype(dtype: Any) -> jnp.dtype:
  """The dtype the batch sum runs in: at least float32, complex kept."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return dtype
  return _norms.accumulation_dtype(dtype)


def _example_scale(
  norms: jax.Array, threshold: jax.Array, rule: str, stability: Any
) -> tuple[jax.Array, jax.Array]:
  """Per-example factors under ``rule``, and which examples they shrink."""
  if rule == "clamp":
    return _scale.clip_scale(norms, threshold)
  # AUTO-S: C / (norm + stability), never clamped to 1, so small gradients
  # are scaled up; stability > 0 keeps a zero gradient finite.
  threshold = jnp.asarray(threshold).astype(norms.dtype)
  stability = jnp.asarray(stability).astype(norms.dtype)
  scale = threshold / (norms + stability)
  # Traced values skip construction-time checks: a negative C or a
  # non-positive stability would flip signs or divide by zero silently.
  valid = (threshold >= 0) & (stability > 0)
  scale = jnp.where(valid, scale, jnp.full_like(scale, jnp.nan))
  return scale, scale < 1


def clip_per_example(
  max_norm: Any,
  *,
  reduce: str = "mean",
  noise_multiplier: Any | None = None,
  seed: Any = 0,
  target_quantile: Any | None = None,
  quantile_lr: Any = 0.2,
  rule: str = "clamp",
  stability: Any = 0.01,
  per_layer: bool = False,
  axis_name: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips each example's gradient by its global L2 norm, then sums or averages.

  ``updates`` is a tree of per-example gradients: every leaf has a leading
  batch axis of the same size :math:`B`. With :math:`g_b` the gradient of
  example :math:`b` (all leaves) and threshold :math:`C`:

  .. math::
    \bar g = \frac{1}{B}\Big(\sum_{b} g_b \cdot \min\!\big(1, C/\|g_b\|_2\big)
    + \mathcal{N}(0, \sigma^2 C^2 I)\Big)

  (no :math:`1/B` with ``reduce="sum"``, no noise without ``noise_multiplier``
  :math:`\sigma`; ``rule="automatic"`` scales by :math:`C/(\|g_b\|_2 + s)`,
  :math:`s` = ``stability``). Non-finite examples are excluded and counted.
  ``target_quantile`` adapts :math:`C` (Andrew et al.; the state holds the
  *next* step's :math:`C`). Details: ``docs/transforms.md#per-example``.

  Args:
    max_norm: :math:`C \ge 0` (the initial value with ``target_quantile``).
    reduce: ``"mean"`` (default, divide by the batch size) or ``"sum"``.
    noise_multiplier: :math:`\sigma \ge 0`; ``None`` (default) adds no noise.
      Requires a finite ``max_norm``.
    seed: int seed of the noise PRNG key (kept in the state, split per step).
    target_quantile: in [0, 1], to adapt :math:`C`; ``None`` (default): fixed.
    quantile_lr: :math:`\eta \ge 0`, the threshold's step size (default 0.2).
    rule: ``"clamp"`` (default) or ``"automatic"`` (AUTO-S, Opacus'
      ``clipping="automatic"``: no clamp, every example normalised).
    stability: AUTO-S's :math:`s > 0` (default 0.01, Opacus' value).
    per_layer: scale each leaf by its own per-example norm (Opacus' per-layer
      clipping, threshold :math:`C` each; noise std :math:`\sigma C\sqrt{L}`).
    axis_name: inside ``shard_map``/``pmap``, the mapped axis across which
      each example's gradient is *split* (partial norms are ``psum``-ed).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipPerExampleState`.

  Raises:
    ValueError: for an argument out of range or an unknown ``reduce`` or
      ``rule``; from ``update``, for leaves without one shared batch size (or
      not matching ``params``), an empty batch with ``reduce="mean"``, or
      ``state=None``.
    TypeError: from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tx = oc.clip_per_example(1.0, reduce="sum")
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> updates, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]
    Array([0.90000004, 1.2       ], dtype=float32)

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, 2019.
    Bu et al., `Automatic Clipping: Differentially Private Deep Learning Made
    Easier and Stronger <https://arxiv.org/abs/2206.07136>`_, 2022
  """
  _validate.check_threshold(_FN, "max_norm", max_norm)
  reduce = _validate.check_choice(_FN, "reduce", reduce, _REDUCTIONS)
  if noise_multiplier is not None:
    _validate.check_threshold(_FN, "noise_multiplier", noise_multiplier)
    if not _validate.is_traced(max_norm) and not np.isfinite(
      float(np.asarray(max_norm))
    ):
      raise ValueError(
        f"{_FN}: noise_multiplier needs a finite max_norm (the noise std is"
        f" noise_multiplier * max_norm), got max_norm={max_norm!r}."
      )
  if target_quantile is not None:
    _validate.check_in_range(
      _FN,
      "target_quantile",
      target_quantile,
      0.0,
      1.0,
      low_open=False,
      high_open=False,
    )
  _validate.check_threshold(_FN, "quantile_lr", quantile_lr)
  _check_seed(seed)
  rule = _validate.check_choice(_FN, "rule", rule, _RULES)
  _validate.check_in_range(
    _FN, "stability", stability, 0.0, np.inf, low_open=True, high_open=True
  )
  if not isinstance(per_layer, (bool, np.bool_)):
    raise TypeError(f"{_FN}: per_layer must be a bool, got {per_layer!r}.")
  if target_quantile is not None and (rule == "automatic" or per_layer):
    raise ValueError(
      f"{_FN}: target_quantile adapts C to a quantile of the per-example"
      " global norms under the clamp rule; it cannot be combined with"
      f" rule={rule!r}, per_layer={per_layer!r}. Use rule='clamp',"
      " per_layer=False, or drop target_quantile."
    )
  concrete_max_norm = not _validate.is_traced(max_norm)
  if (
    rule == "automatic"
    and concrete_max_norm
    and not np.isfinite(float(np.asarray(max_norm)))
  ):
    raise ValueError(
      f"{_FN}: rule='automatic' scales every example by"
      " max_norm / (norm + stability) and needs a finite max_norm, got"
      f" max_norm={max_norm!r}."
    )

  def init_fn(params):
    del params
    return ClipPerExampleState(
      per_example_max_norm=jnp.asarray(max_norm).astype(jnp.float32),
      num_clipped_examples=jnp.zeros((), jnp.int32),
      num_nonfinite_examples=jnp.zeros((), jnp.int32),
      per_example_norm_mean=jnp.zeros((), jnp.float32),
      per_example_rng=jax.random.PRNGKey(seed),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _tree.check_float_leaves(_FN, updates)
    # The state carries the noise PRNG key (split every step) and the
    # adaptive threshold: history that init cannot rebuild.
    _tree.require_state(_FN, state)
    if params is not None:
      _check_against_params(updates, params)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(x) for x in leaves]
    if target_quantile is None:
      # Read from the argument, not the state, so injected schedules apply.
      threshold = jnp.asarray(max_norm).astype(jnp.float32)
    else:
      threshold = state.per_example_max_norm
    noise_rng, next_rng = jax.random.split(state.per_example_rng)
    if not leaves:
      return updates, state._replace(
        per_example_max_norm=threshold, per_example_rng=next_rng
      )
    batch = _batch_size(leaves)
    if batch == 0 and reduce == "mean":
      raise ValueError(
        f"{_FN}: the batch is empty (leading axis of size 0), and"
        ' reduce="mean" would divide by 0. Skip empty batches, or use'
        ' reduce="sum" and divide by the expected batch size yourself (as'
        " DP-SGD with Poisson sampling does)."
      )

    if per_layer:
      layer_norms = [_norms.batch_norms([x], 2, axis_name) for x in leaves]
      dtype = _norms.widest_dtype(n.dtype for n in layer_norms)
      layer_norms = [n.astype(dtype) for n in layer_norms]
      # Each example's global norm, for the diagnostics and the policy: an
      # example with any non-finite leaf is excluded as a whole.
      norms = _norms.batch_norms([jnp.stack(layer_norms, axis=1)], 2)
    else:
      norms = _norms.batch_norms(leaves, 2, axis_name)
      layer_norms = [norms]
    finite = jnp.isfinite(norms)
    scales, clipped = [], jnp.zeros(norms.shape, jnp.bool_)
    for layer_norm in layer_norms:
      scale, shrunk = _example_scale(layer_norm, threshold, rule, stability)
      # Excluded examples contribute an exact zero: zero both factors, so
      # the forward pass never computes 0 * nan.
      scales.append(jnp.where(finite, scale, jnp.zeros_like(scale)))
      clipped = clipped | shrunk
    if not per_layer:
      scales = scales * len(leaves)

    if noise_multiplier is not None:
      if axis_name is not None:
        noise_rng = jax.random.fold_in(noise_rng, jax.lax.axis_index(axis_name))
      noise_keys = list(jax.random.split(noise_rng, len(leaves)))
      noise_std = jnp.asarray(noise_multiplier).astype(jnp.float32) * threshold
      if per_layer:
        # Opacus' per-layer sensitivity: the norm of the L per-leaf bounds.
        noise_std = noise_std * np.float32(_norms.static_sqrt(len(leaves)))

    out = []
    for i, x in enumerate(leaves):
      dtype = _sum_dtype(x.dtype)
      mask = finite.reshape((batch,) + (1,) * (x.ndim - 1))
      x_safe = jnp.where(mask, x, jnp.zeros_like(x)).astype(dtype)
      # A broadcast multiply and a sum over the batch axis (not tensordot):
      # under explicit sharding a batch split over devices is then reduced
      # with an all-reduce instead of being an ambiguous sharded contraction.
      scale = scales[i].astype(dtype).reshape(mask.shape)
      total = jnp.sum(scale * x_safe, axis=0)
      if noise_multiplier is not None:
        noise = jax.random.normal(noise_keys[i], total.shape, dtype)
        total = total + noise * noise_std.astype(dtype)
      if reduce == "mean":
        total = total / jnp.asarray(batch, dtype)
      out.append(total.astype(x.dtype))

    num_finite = jnp.sum(finite, dtype=jnp.int32)
    finite_norms = jnp.where(finite, norms, jnp.zeros_like(norms))
    norm_mean = jnp.sum(finite_norms) / jnp.maximum(num_finite, 1).astype(
      norms.dtype
    )
    if target_quantile is None:
      next_threshold = threshold
    else:
      num_within = jnp.sum(finite & jnp.logical_not(clipped), dtype=jnp.int32)
      fraction = num_within.astype(jnp.float32) / jnp.maximum(
        num_finite, 1
      ).astype(jnp.float32)
      gamma = jnp.asarray(target_quantile).astype(jnp.float32)
      lr = jnp.asarray(quantile_lr).astype(jnp.float32)
      adapted = threshold * jnp.exp(-lr * (fraction - gamma))
      # exp() > 0, so the exact update never reaches 0 or inf, but float32
      # can: ~1000 steps of zero gradients underflow C to 0, where it stays
      # forever (0 * exp(...) = 0) and every later update is zero; an
      # infinite C would never come down. Keep C in [tiny, max] of float32.
      # An invalid C (NaN, or negative from a traced max_norm) is kept as
      # is, so every step stays loudly NaN rather than silently repaired.
      adapted = jnp.clip(adapted, _C_FLOOR, _C_CEILING)
      # Traced hyperparameters skip construction-time checks: a target
      # quantile outside [0, 1] or a negative rate would silently drive C to
      # a bound, so they make C NaN instead (every later update NaN: loud).
      valid_rule = (gamma >= 0) & (gamma <= 1) & (lr >= 0)
      adapted = jnp.where(valid_rule, adapted, jnp.full_like(adapted, jnp.nan))
      valid = threshold >= 0
      next_threshold = jnp.where(valid & (num_finite > 0), adapted, threshold)

    new_state = ClipPerExampleState(
      per_example_max_norm=next_threshold,
      num_clipped_examples=jnp.sum(clipped & finite, dtype=jnp.int32),
      num_nonfinite_examples=batch - num_finite,
      per_example_norm_mean=norm_mean.astype(jnp.float32),
      per_example_rng=next_rng,
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
