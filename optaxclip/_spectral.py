"""``spectral_clip``: SPECTRA's soft spectral clipping of matrix updates.

Jiang et al. (SPECTRA, arXiv 2603.14315) replace each matrix update ``U`` by

    H_c(U) = (I + U U^T / c^2)^(-1/2) U,

which maps every singular value ``s`` to ``s / sqrt(1 + s^2 / c^2)``: small
singular values pass, large ones are pulled smoothly towards ``c``. The
inverse square root is their coupled Newton-Schulz iteration on the wide
orientation of ``U`` (``U U^T`` is the smaller Gram matrix), started from
``A / alpha`` with ``alpha`` the smaller of the Gershgorin and Frobenius upper
bounds on the largest eigenvalue of ``A = I + U U^T / c^2``, run for a fixed
number of steps (10). Vectors get the authors' vector rule.

Numerics. Every matrix is first divided by its Frobenius norm (from the norm
kernel), so the Gram matrix has entries of magnitude at most 1 and the
iteration matrix ``A / alpha`` is formed without squaring large or tiny
entries: in exact arithmetic this is the authors' iteration, and finite
updates of any representable size give finite results. bf16/fp16 updates are
computed in float32, float64 in float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _grouping, _norms, _scale, _stats, _tree, _validate

_DEFAULT_NS_STEPS = 10
_LAYOUTS = ("flax", "torch")


@_stats.register_state("spectral_clip")
class SpectralClipState(NamedTuple):
  """State of :func:`spectral_clip`: what the last step saw, per tensor.

  ``spectral_bounds`` is a :class:`~optaxclip.PathValues`, laid out as
  ``clip_by_norm``'s ``leaf_norms``: one entry per clipped matrix
  (one per layer for stacked leaves) or vector, leaf after leaf, with the
  paths as static metadata; ``clip_stats`` returns
  ``"spectral_clip/spectral_bounds/<path>"``. For a matrix the entry is the
  authors' upper bound on its largest pre-clip singular value (the square
  root of the bound the iteration is scaled by); for a vector it is the
  vector's norm (its only singular value). When no leaf is clipped the field
  is the plain array ``[0.]`` (no paths to keep).
  """

  # PathValues of float32[max(num_tensors, 1)] (float64 for float64 params):
  # upper bounds on the pre-clip spectral norms.
  spectral_bounds: _tree.PathValues
  # int32 scalar: how many of those bounds exceed the threshold.
  num_spectral_over_threshold: jax.Array


def _compute_dtype(dtype: Any) -> jnp.dtype:
  """float64/complex128 stay; complex64 stays; every other float is float32."""
  dtype = jnp.dtype(dtype)
  if dtype in (jnp.dtype(np.complex64), jnp.dtype(np.complex128)):
    return dtype
  return _norms.accumulation_dtype(dtype)


def _plan(
  slicing: _tree.Slicing, tree: Any, matrices_only: bool
) -> tuple[list[str], tuple[int, ...], _tree.Layout]:
  """Per leaf: ``"matrix"``, ``"vector"`` or ``"skip"`` and its stacked
  axes; and the layout of the bounds in the state.

  A leaf is a (batch of) matrices when at least two axes remain after its
  stacked axes: every axis but the last two then indexes a separate matrix,
  and the leaf owns a bound per matrix. A vector owns one per layer slice.
  """
  leaf_layout = slicing.layout(tree)
  kinds, segments = [], []
  for (path, per_slice), count, leaf in zip(
    leaf_layout.segments,
    leaf_layout.counts,
    jax.tree.leaves(tree),
    strict=True,
  ):
    shape = np.shape(leaf)
    if len(shape) - count >= 2:
      kinds.append("matrix")
      segments.append((path, tuple(shape[:-2])))
    elif matrices_only:
      kinds.append("skip")
    else:
      kinds.append("vector")
      segments.append((path, per_slice))
  return kinds, leaf_layout.counts, _tree.Layout(tuple(segments))


def _clip_vectors(
  x: jax.Array, norms: jax.Array, count: int, threshold: Any
) -> jax.Array:
  """The authors' vector rule, per layer slice (``norms``): unchanged while
  the norm is at most ``c``, else divided by ``sqrt(1 + norm^2 / c^2)``."""
  # clip_scale gives q = c / norm exactly where norm > c (NaN for a
  # non-finite norm), so the divisor is sqrt(1 + 1/q^2) = sqrt(1 + q^2) / q
  # without squaring the norm.
  ratio, over = _scale.clip_scale(norms, threshold)
  soft = ratio / _norms.safe_sqrt(1 + jnp.square(ratio))
  scale = jnp.where(over, soft, jnp.ones_like(soft))
  scale = scale.reshape(scale.shape + (1,) * (x.ndim - count))
  return _scale.scale_leaf(x, scale)


def _inverse_sqrt_ns(ahat: jax.Array, ns_steps: int) -> jax.Array:
  """The authors' coupled Newton-Schulz iteration: ``ahat^(-1/2)`` for
  Hermitian ``ahat`` with eigenvalues in ``(0, 1]`` (batched over axis 0).

  ``Y -> ahat^(1/2)`` and ``Z -> ahat^(-1/2)``; only ``Z`` is returned, so
  XLA drops the last step's update of ``Y``.
  """
  eye = jnp.eye(ahat.shape[-1], dtype=ahat.dtype)[None]

  def step(_, yz):
    y, z = yz
    t = 1.5 * eye - 0.5 * (z @ y)
    return y @ t, t @ z

  # A loop, not ten unrolled steps: a tenth of the program to compile.
  y, z = jax.lax.fori_loop(
    0, ns_steps - 1, step, (ahat, jnp.broadcast_to(eye, ahat.shape))
  )
  return (1.5 * eye - 0.5 * (z @ y)) @ z


def _clip_batch(
  mats: jax.Array,
  frob: jax.Array,
  row_sums: jax.Array,
  gram_frob: jax.Array,
  unit: jax.Array,
  gram: jax.Array,
  threshold: Any,
  ns_steps: int,
) -> tuple[jax.Array, jax.Array]:
  """H_c of a batch of wide matrices ``mats`` (b, p, q), from their
  Frobenius norms ``frob`` (b, 1, 1), their normalised versions ``unit`` and
  Gram matrices ``gram``, and the gram's row sums and Frobenius norms.

  Returns the clipped batch and upper bounds on the largest singular values.
  """
  dtype = mats.dtype
  real = frob.dtype
  nonzero = frob > 0
  # The authors' bound on the largest eigenvalue of the Gram matrix: the
  # smaller of the largest absolute row sum and the Frobenius norm. For the
  # unit matrix s' is in (0, 1]; for U U^T it is frob^2 * s' (both bounds
  # are homogeneous).
  gershgorin = jnp.max(row_sums, axis=1, keepdims=True)
  bound = jnp.where(nonzero, jnp.minimum(gershgorin, gram_frob), 1)
  c = jnp.asarray(threshold).astype(real)
  # A / alpha = beta I + gamma G' with alpha = 1 + frob^2 s' / c^2. Written
  # with q = c / frob on one side of 1 and 1 / q on the other, no term
  # overflows or divides by zero (c = 0, c = inf, zero matrices included).
  q = c / jnp.where(nonzero, frob, 1)
  small = q > 1  # the matrix is small next to c
  q_lo = jnp.where(small, 1, q)
  r_hi = 1 / jnp.where(small, q, 1)
  lo_denom = jnp.square(q_lo) + bound
  hi_denom = 1 + jnp.square(r_hi) * bound
  beta = jnp.where(small, 1 / hi_denom, jnp.square(q_lo) / lo_denom)
  gamma = jnp.where(small, jnp.square(r_hi) / hi_denom, 1 / lo_denom)
  # frob / sqrt(alpha): the factor that undoes the normalisation.
  out_scale = jnp.where(
    small,
    frob / _norms.safe_sqrt(hi_denom),
    c / _norms.safe_sqrt(lo_denom),
  )
  eye = jnp.eye(gram.shape[-1], dtype=dtype)[None]
  ahat = beta.astype(dtype) * eye + gamma.astype(dtype) * gram
  out = (_inverse_sqrt_ns(ahat, ns_steps) @ unit) * out_scale.astype(dtype)
  # A non-finite matrix (or a negative or NaN traced threshold) is NaN
  # everywhere, never silently finite.
  valid = jnp.isfinite(frob) & (c >= 0)
  out = jnp.where(valid, out, jnp.full_like(out, jnp.nan))
  return out, (frob * _norms.safe_sqrt(bound)).reshape(-1)


def _clip_matrices(
  xs: list[jax.Array],
  factors: list[float],
  threshold: Any,
  ns_steps: int,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """H_c of every trailing matrix of every leaf in ``xs``, times its
  rectangular factor; also per-matrix upper bounds on the largest singular
  values (shaped ``x.shape[:-2]``).

  Small leaves of one shape run as one batch (one iteration for all, as
  stacked layers do), and the norms of all batches share one overflow
  rescue each: per-leaf programs made a tree of many small matrices slow to
  compile.
  """
  batches: dict[Any, list[int]] = {}
  for i, x in enumerate(xs):
    small = x.size < _grouping.SMALL_LEAF_SIZE
    key = (x.shape[-2:], x.dtype) if small else i
    batches.setdefault(key, []).append(i)
  members = list(batches.values())
  mats = []
  for idx in members:
    rows, cols = xs[idx[0]].shape[-2:]
    dtype = _compute_dtype(xs[idx[0]].dtype)
    parts = [xs[i].astype(dtype).reshape((-1, rows, cols)) for i in idx]
    batch = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    # The wide orientation: U U^T is the smaller Gram matrix.
    mats.append(batch if rows <= cols else jnp.swapaxes(batch, 1, 2))
  frobs = _norms.axes_norms_each(mats, [(1, 2)] * len(mats), 2)
  units, grams = [], []
  for m, frob in zip(mats, frobs, strict=True):
    unit = m / jnp.where(frob > 0, frob, 1).astype(m.dtype)
    units.append(unit)
    grams.append(unit @ jnp.conj(jnp.swapaxes(unit, 1, 2)))
  # The Gram matrix of a unit-Frobenius matrix has entries of magnitude <= 1
  # and trace 1, so its row sums and Frobenius norm lie in [1/p, p] (p <= the
  # smaller side): they can neither overflow nor underflow, and skip the
  # kernel's rescue (whose branches made each matrix slow to compile).
  row_sums, gram_frobs = [], []
  for gram in grams:
    magnitudes = jnp.abs(gram)
    row_sums.append(jnp.sum(magnitudes, axis=2, keepdims=True))
    gram_frobs.append(
      _norms.safe_sqrt(
        jnp.sum(jnp.square(magnitudes), axis=(1, 2), keepdims=True)
      )
    )
  outs: list[Any] = [None] * len(xs)
  bounds: list[Any] = [None] * len(xs)
  for k, idx in enumerate(members):
    out, bound = _clip_batch(
      mats[k],
      frobs[k],
      row_sums[k],
      gram_frobs[k],
      units[k],
      grams[k],
      threshold,
      ns_steps,
    )
    rows, cols = xs[idx[0]].shape[-2:]
    if rows > cols:
      out = jnp.swapaxes(out, 1, 2)
    start = 0
    for i in idx:
      x = xs[i]
      n = int(np.prod(x.shape[:-2], dtype=np.int64))
      piece = out if len(idx) == 1 else out[start : start + n]
      if factors[i] != 1.0:
        piece = piece * factors[i]
      piece = piece.reshape(x.shape).astype(x.dtype)
      # An elementwise select with x as an operand (equal to piece: a NaN in
      # x already made piece NaN) lets sharding propagation give the result
      # x's sharding; the matmuls' own output sharding drops one axis.
      outs[i] = jnp.where(jnp.isnan(x), jnp.full_like(piece, jnp.nan), piece)
      bounds[i] = bound[start : start + n].reshape(x.shape[:-2])
      start += n
  return outs, bounds


def _explicit_sharding(x: jax.Array) -> Any:
  """``x``'s sharding when it is typed with explicit mesh axes, else None."""
  typeof = getattr(jax, "typeof", None)
  sharding = getattr(typeof(x), "sharding", None) if typeof else None
  axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  if explicit is None or explicit not in tuple(axis_types):
    return None
  return sharding


def _clip_matrices_sharded(
  xs: list[jax.Array],
  factors: list[float],
  threshold: Any,
  ns_steps: int,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """:func:`_clip_matrices`; under explicit mesh axes it runs with automatic
  axes (a Gram matrix contracts over sharded axes, whose output sharding
  explicit axes leave ambiguous) and returns each leaf in its own sharding,
  the bounds replicated."""
  shardings = [_explicit_sharding(x) for x in xs]
  if all(s is None for s in shardings):
    return _clip_matrices(xs, factors, threshold, ns_steps)
  (mesh,) = {s.mesh for s in shardings if s is not None}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out_sharding = (
    [s if s is not None else replicated for s in shardings],
    [replicated] * len(xs),
  )
  run = jax.sharding.auto_axes(
    lambda xs, c: _clip_matrices(xs, factors, c, ns_steps),
    out_sharding=out_sharding,
  )
  return run(xs, jnp.asarray(threshold))


def _rectangular_factor(shape: tuple, layout: str, enabled: bool) -> float:
  """The authors' sqrt(max(1, fan_out / fan_in)) (Muon's), from static
  shapes: PyTorch weights are ``(out, in)``, Flax kernels ``(in, out)``."""
  if not enabled:
    return 1.0
  rows, cols = shape[-2], shape[-1]
  fan_out, fan_in = (cols, rows) if layout == "flax" else (rows, cols)
  return _norms.static_sqrt(max(1.0, fan_out / max(fan_in, 1)))


def spectral_clip(
  threshold: Any,
  *,
  ns_steps: Any = None,
  matrices_only: bool = False,
  stacked: Any = None,
  layout: str = "flax",
  rectangular_scale: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""SPECTRA's soft spectral clipping: each matrix update's singular values
  are pulled smoothly below ``threshold``.

  .. math::
    H_c(U) = \left(I + U U^\top / c^2\right)^{-1/2} U, \qquad
    \sigma_i \mapsto \sigma_i / \sqrt{1 + \sigma_i^2 / c^2}

  computed, as the authors do, by a coupled Newton-Schulz iteration
  (``ns_steps`` steps) scaled by the smaller of the Gershgorin and
  Frobenius bounds on :math:`\sigma_{\max}^2`, so it is approximate when
  that bound is far above :math:`c^2` (see the docs page "Transformer
  stability tools"). Matrices are then multiplied by
  :math:`\sqrt{\max(1, \text{fan-out}/\text{fan-in})}`. A vector ``v``
  stays unchanged while :math:`\|v\| \le c` and becomes
  :math:`v / \sqrt{1 + \|v\|^2/c^2}` otherwise. Leaves with more than two
  axes (after ``stacked`` ones) are batches of their trailing matrices.
  Place it after the base optimizer, before weight decay and the learning
  rate (``SPECTRA-AdamW`` is ``chain(scale_by_adam(), spectral_clip(c),
  add_decayed_weights(wd), scale_by_learning_rate(lr))``).

  Args:
    threshold: the clipping level ``c`` >= 0 (``inject_hyperparams`` may
      schedule it).
    ns_steps: Newton-Schulz steps, a static int (``None``: the authors' 10).
    matrices_only: leave vectors and scalars unchanged (authors' ``"2d"``).
    stacked: leading axes that index layers (int, callable or pytree).
    layout: ``"flax"`` (``(in, out)`` kernels) or ``"torch"`` (``(out,
      in)``), for the rectangular factor only.
    rectangular_scale: apply the rectangular factor (default True).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpectralClipState`.

  Raises:
    ValueError: a negative or NaN ``threshold``, ``ns_steps < 1``, an
      unknown ``layout``.
    TypeError: a traced ``ns_steps``; (from ``update``) an integer leaf.

  Examples:
    >>> import jax.numpy as jnp, optaxclip as oc
    >>> tx = oc.spectral_clip(1.0)
    >>> u = {"w": jnp.diag(jnp.array([3.0, 0.1]))}
    >>> out, state = tx.update(u, tx.init(u))
    >>> [round(float(s), 4) for s in jnp.diag(out["w"])]
    [0.9487, 0.0995]
    >>> oc.clip_stats(state)["spectral_clip/spectral_bounds/w"]
    Array(3., dtype=float32)

  References:
    Jiang et al., `Enhancing LLM Training via Spectral Clipping
    <https://arxiv.org/abs/2603.14315>`_, 2026.
  """
  fn = "spectral_clip"
  _validate.check_threshold(fn, "threshold", threshold)
  steps = _validate.check_static_int_or(
    fn, "ns_steps", ns_steps, _DEFAULT_NS_STEPS
  )
  layout = _validate.check_choice(fn, "layout", layout, _LAYOUTS)
  for arg, value in (
    ("matrices_only", matrices_only),
    ("rectangular_scale", rectangular_scale),
  ):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"{fn}: {arg} must be True or False, got {value!r}.")
  slicing = _tree.Slicing(fn, stacked)

  def init_fn(params):
    _, _, bounds_layout = _plan(slicing, params, matrices_only)
    dtype = _norms.tree_accumulation_dtype(params)
    return SpectralClipState(
      spectral_bounds=bounds_layout.full(0, dtype),
      num_spectral_over_threshold=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    state = _tree.diagnostics_state(fn, updates, state, init_fn)
    kinds, counts, bounds_layout = _plan(slicing, updates, matrices_only)
    bounds_layout.check(fn, state.spectral_bounds)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(x) for x in leaves]
    new_leaves = list(leaves)
    bounds: list[Any] = [None] * len(leaves)
    for i, (x, kind, count) in enumerate(
      zip(leaves, kinds, counts, strict=True)
    ):
      if kind != "skip" and x.size == 0:
        shape = x.shape[:-2] if kind == "matrix" else x.shape[:count]
        bounds[i] = jnp.zeros(shape, _norms.accumulation_dtype(x.dtype))
    todo = [i for i, x in enumerate(leaves) if x.size and kinds[i] != "skip"]
    vec = [i for i in todo if kinds[i] == "vector"]
    if vec:
      norms = _norms.slice_norms(
        [leaves[i] for i in vec], [counts[i] for i in vec], 2
      )
      for i, n in zip(vec, norms, strict=True):
        new_leaves[i] = _clip_vectors(leaves[i], n, counts[i], threshold)
        bounds[i] = n
    mat = [i for i in todo if kinds[i] == "matrix"]
    if mat:
      factors = [
        _rectangular_factor(leaves[i].shape, layout, rectangular_scale)
        for i in mat
      ]
      outs, mat_bounds = _clip_matrices_sharded(
        [leaves[i] for i in mat], factors, threshold, steps
      )
      for i, out, bound in zip(mat, outs, mat_bounds, strict=True):
        new_leaves[i], bounds[i] = out, bound
    bounds = [b for b in bounds if b is not None]
    dtype = state.spectral_bounds.dtype
    field = bounds_layout.gather(bounds, dtype)
    count_over = jnp.zeros((), jnp.int32)
    if bounds:
      flat = _tree.values_of(field)
      over = jnp.logical_not(flat <= jnp.asarray(threshold).astype(dtype))
      count_over = jnp.sum(over, dtype=jnp.int32)
    return jax.tree.unflatten(treedef, new_leaves), SpectralClipState(
      spectral_bounds=field,
      num_spectral_over_threshold=count_over,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
