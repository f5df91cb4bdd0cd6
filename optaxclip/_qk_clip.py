r"""QK-Clip (Kimi K2's MuonClip): cap attention logits by rescaling W_q, W_k.

Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534, Section
2.1: after each optimizer step, every attention head whose largest
pre-softmax logit :math:`S^h_{\max}` exceeded a threshold :math:`\tau` has
its query and key projection weights multiplied by :math:`\sqrt{\gamma_h}`
with :math:`\gamma_h = \tau / S^h_{\max}`, so the same batch would now give
that head logits of at most :math:`\tau`. The forward and backward passes
are untouched; only the weights are rewritten.

Here the rewrite is an optax transform placed last in a chain: it emits the
update that lands the weights on the rescaled values. Which leaves are query
and key projections, and where the heads sit in them, is a small static spec
resolved against the params tree (see ``docs/llm_stability.md``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _norms, _stats, _tree, _validate

_FN = "qk_clip"

LAYOUTS = ("flax", "dense", "torch")

PathSpec = str | Callable[[str], bool] | None


@_stats.register_state("qk_clip")
class QKClipState(NamedTuple):
  """State of :func:`qk_clip`: what the last step saw and did.

  Per-head fields are :class:`optaxclip.PathValues` keyed by the
  attention layer's path, one value per query head (``(*layers, heads)`` for
  stacked layers); ``clip_stats`` returns them per path.
  """

  # float32 per query head: the step's S_max (after pmax under axis_name).
  qk_max_logits: Any
  # float32 per query head: the gamma applied (1 = untouched; with log_only,
  # the gamma that would have been applied).
  qk_gamma: Any
  # float32 scalar: the largest S_max over every head (NaN if any is NaN).
  qk_max_logit: jax.Array
  # int32 scalar: heads with S_max > threshold (finite).
  qk_num_clipped_heads: jax.Array
  # int32 scalar: heads whose S_max was NaN or +inf (left unchanged).
  qk_num_nonfinite_heads: jax.Array


def qk_clip_rule(
  max_logits: jax.Array, threshold: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Per head: :math:`\gamma`, whether it clips, whether S_max is unusable.

  :math:`\gamma = \tau / S` where :math:`S > \tau` and S is finite, else 1:
  a head at or below the threshold (negative and ``-inf`` maxima included,
  e.g. a fully masked head) is untouched, and so is a head whose maximum is
  NaN or ``+inf`` (flagged instead: no finite rescaling can bring an
  overflowed logit to :math:`\tau`, and :math:`\tau/\infty = 0` would zero
  the head for good). A threshold that is not positive (a traced value that
  skipped validation) gives NaN everywhere.

  Args:
    max_logits: per-head maxima, any shape.
    threshold: :math:`\tau`.

  Returns:
    ``(gamma, clipped, nonfinite)``, each of ``max_logits``'s shape.
  """
  s = max_logits
  tau = jnp.asarray(threshold).astype(s.dtype)
  nonfinite = jnp.isnan(s) | (s == jnp.inf)
  clipped = (s > tau) & ~nonfinite
  # Two-sided where: the division only ever sees S > tau > 0.
  safe = jnp.where(clipped, s, jnp.ones_like(s))
  gamma = jnp.where(clipped, tau / safe, jnp.ones_like(s))
  gamma = jnp.where(tau > 0, gamma, jnp.full_like(s, jnp.nan))
  return gamma, clipped, nonfinite


# --------------------------------------------------------------------------
# The static plan: which leaves belong to which attention layer, and how.


@dataclasses.dataclass(frozen=True)
class _Leaf:
  index: int  # position in jax.tree.leaves(params)
  path: str
  role: str  # "query", "key" or "qkv"
  axis: int  # the leaf axis that indexes heads
  unit: int  # entries per head along that axis (1, or head_dim when fused)


@dataclasses.dataclass(frozen=True)
class _Attention:
  path: str
  stack_shape: tuple[int, ...]
  num_heads: int
  num_kv_heads: int
  leaves: tuple[_Leaf, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.stack_shape, self.num_heads)


def _matches(spec: PathSpec, rel: str) -> bool:
  if spec is None:
    return False
  if callable(spec):
    return bool(spec(rel))
  return (
    rel == spec or rel.startswith(spec + "/") or fnmatch.fnmatchcase(rel, spec)
  )


def _relative(prefix: str, path: str) -> str | None:
  if not prefix:
    return path
  if path.startswith(prefix + "/"):
    return path[len(prefix) + 1 :]
  return None


def _prefixes(path: str) -> list[str]:
  """Module paths above a leaf, deepest first (``""`` is the root)."""
  parts = path.split("/")
  return ["/".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _head_geometry(
  path: str,
  shape: tuple[int, ...],
  count: int,
  layout: str,
  head_dim: int | None,
) -> tuple[int, int]:
  """The axis indexing heads and the entries per head along it."""
  slice_ndim = len(shape) - count
  need = 2 if layout == "flax" else 1
  if slice_ndim < need:
    raise ValueError(
      f"{_FN}: the leaf at {path!r} has shape {shape} ({count} stacked"
      f" axes); layout={layout!r} needs at least {need} axes per layer."
      " Check the query/key/qkv patterns (they select every leaf below a"
      " matching path) and the layout: 'flax' is (..., heads, head_dim),"
      " 'dense' is (..., heads * head_dim), 'torch' is (heads * head_dim,"
      " ...)."
    )
  if layout == "flax":
    return len(shape) - 2, 1
  axis = len(shape) - 1 if layout == "dense" else count
  assert head_dim is not None
  if shape[axis] % head_dim:
    raise ValueError(
      f"{_FN}: the leaf at {path!r} has {shape[axis]} entries along its head"
      f" axis ({axis}, layout={layout!r}), not a multiple of"
      f" head_dim={head_dim}."
    )
  return axis, head_dim


def _build_plan(
  params: Any,
  *,
  query: PathSpec,
  key: PathSpec,
  qkv: PathSpec,
  layout: str,
  head_dim: int | None,
  num_heads: int | None,
  slicing: _tree.Slicing,
  qk_nope_head_dim: int | None,
) -> tuple[_Attention, ...]:
  # Per leaf: its path, its stacked axes, and (the shape of one value per
  # layer slice) the leading layer shape. Two leaves whose paths print alike
  # are an error here: patterns and max_logits keys could not tell them
  # apart, and two attention modules would silently share one gamma.
  leaf_layout = slicing.layout(params)
  paths, counts = leaf_layout.paths, leaf_layout.counts
  shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
  # Each matching leaf belongs to the deepest module path it matches under.
  found: dict[str, list[tuple[int, str]]] = {}
  for index, path in enumerate(paths):
    for prefix in _prefixes(path):
      rel = _relative(prefix, path)
      matched = [
        role
        for role, spec in (("qkv", qkv), ("query", query), ("key", key))
        if rel is not None and _matches(spec, rel)
      ]
      if matched:
        found.setdefault(prefix, []).append((index, matched[0]))
        break
  if not found:
    shown = ", ".join(repr(p) for p in paths[:8])
    raise ValueError(
      f"{_FN}: no query/key projection found in params: no leaf path matches"
      f" query={query!r}, key={key!r}, qkv={qkv!r} below any module. The"
      " patterns name the projections relative to their attention module"
      " (e.g. query='query', key='key' for nnx.MultiHeadAttention; every"
      f" leaf below a matching path is selected). Paths: {shown}"
      f"{', ...' if len(paths) > 8 else ''}."
    )
  attentions = []
  for prefix, members in found.items():
    roles = {role for _, role in members}
    where = prefix or "<root>"
    if "qkv" not in roles and roles != {"query", "key"}:
      missing = "key" if "query" in roles else "query"
      raise ValueError(
        f"{_FN}: the attention module at {where!r} has {sorted(roles)}"
        f" projections but no {missing} projection matching"
        f" {missing}={key if missing == 'key' else query!r}; QK-Clip needs"
        " both (or one fused qkv=)."
      )
    leaves, heads, kv_heads, stacks = [], set(), set(), set()
    for index, role in members:
      path, shape, count = paths[index], shapes[index], counts[index]
      axis, unit = _head_geometry(path, shape, count, layout, head_dim)
      total = shape[axis] // unit
      if role == "query":
        heads.add(total)
      elif role == "key":
        kv_heads.add(total)
      else:
        q = num_heads if num_heads is not None else total // 3
        kv, rest = divmod(total - q, 2)
        if rest or kv < 1 or (num_heads is None and total % 3):
          raise ValueError(
            f"{_FN}: the fused qkv leaf at {path!r} has {total} heads along"
            f" axis {axis}; that is not 3 * heads"
            f"{'' if num_heads is None else f' or {num_heads} + 2 * kv_heads'}"
            ". For grouped-query attention pass num_heads= (query heads)."
          )
        heads.add(q)
        kv_heads.add(kv)
      if qk_nope_head_dim is not None and shape[-1] < qk_nope_head_dim:
        raise ValueError(
          f"{_FN}: the leaf at {path!r} has per-head width {shape[-1]},"
          f" less than qk_nope_head_dim={qk_nope_head_dim}."
        )
      stacks.add(leaf_layout.segments[index][1])
      leaves.append(_Leaf(index, path, role, axis, unit))
    if len(heads) != 1 or len(kv_heads) != 1 or len(stacks) != 1:
      raise ValueError(
        f"{_FN}: the projections of the attention module at {where!r}"
        f" disagree: query heads {sorted(heads)}, key heads"
        f" {sorted(kv_heads)}, stacked layer shapes {sorted(stacks)}. Every"
        " query leaf must hold the same heads (likewise key leaves), and"
        " stacked= must give them the same leading layer axes."
      )
    (h,), (hk,), (stack,) = heads, kv_heads, stacks
    if h % hk:
      raise ValueError(
        f"{_FN}: the attention module at {where!r} has {h} query heads and"
        f" {hk} key heads; grouped-query attention needs the key heads to"
        " divide the query heads."
      )
    if qk_nope_head_dim is not None and h != hk:
      raise ValueError(
        f"{_FN}: qk_nope_head_dim= (MLA) needs as many key heads as query"
        f" heads; the module at {where!r} has {h} and {hk}."
      )
    attentions.append(_Attention(prefix, stack, h, hk, tuple(leaves)))
  return tuple(sorted(attentions, key=lambda a: a.path))


def _state_layout(plan: tuple[_Attention, ...]) -> _tree.Layout:
  """One value per query head, attention module after module: the
  per-head fields are keyed by the module's path, not by a leaf's."""
  # A model that is one attention module is keyed "<root>" in clip_stats
  # (not "qk_clip/qk_gamma/", with a dangling slash).
  return _tree.Layout(tuple((a.path or "<root>", a.shape) for a in plan))


# --------------------------------------------------------------------------
# Reading max_logits.


def _collect_max_logits(
  max_logits: Any, plan: tuple[_Attention, ...], dtype: Any
) -> list[jax.Array]:
  """One (*layers, heads) array per attention module, in plan order.

  Entries are matched to the attention module whose path is the longest
  prefix of theirs, so a flat ``{path: array}`` dict, a bare array (one
  attention module) and a Flax ``nnx.Intermediate`` state from ``sow``
  (``.../attn/max_logits/0``) all work; several entries for one module
  (several ``sow`` calls) are combined by their maximum.
  """
  if max_logits is None:
    raise ValueError(
      f"{_FN}: update() needs the step's per-head maximum attention logits:"
      " tx.update(updates, state, params, max_logits=...), or"
      " optimizer.update(model, grads, max_logits=...) with nnx.Optimizer."
      " Compute them in the forward pass with oc.max_attention_logits(q, k)"
      " and return or sow them (see docs: Transformer stability tools)."
    )
  entries = jax.tree_util.tree_leaves_with_path(
    max_logits, is_leaf=_tree.is_wrapped_leaf
  )
  by_module: dict[str, list[jax.Array]] = {a.path: [] for a in plan}
  known = sorted(by_module, key=len, reverse=True)
  for key_path, value in entries:
    path = _tree.path_str(key_path)
    owner: str | None
    if not path and len(entries) == 1 and len(plan) == 1:
      owner = plan[0].path
    else:
      owner = next(
        (p for p in known if p == path or _relative(p, path) is not None),
        None,
      )
    if owner is None:
      raise ValueError(
        f"{_FN}: max_logits has an entry at {path or '<root>'!r}, which is"
        " not (below) any attention module found in params:"
        f" {[p or '<root>' for p in sorted(by_module)]}. Key max_logits by"
        " the attention module's path (the one the query/key patterns are"
        " relative to)."
      )
    by_module[owner].append(jnp.asarray(_tree.unwrap(value)))
  out = []
  for attention in plan:
    values = by_module[attention.path]
    where = attention.path or "<root>"
    if not values:
      raise ValueError(
        f"{_FN}: max_logits has no entry for the attention module at"
        f" {where!r}; every clipped attention layer must report its"
        " per-head maxima each step."
      )
    for v in values:
      if tuple(v.shape) != attention.shape:
        raise ValueError(
          f"{_FN}: max_logits for the attention module at {where!r} has"
          f" shape {tuple(v.shape)}, expected {attention.shape} ("
          f"{'stacked layers ' + str(attention.stack_shape) + ', ' if attention.stack_shape else ''}"
          f"{attention.num_heads} query heads). Reduce over the batch and"
          " positions in the model (oc.max_attention_logits does)."
        )
    combined = values[0].astype(dtype)
    for v in values[1:]:
      combined = jnp.maximum(combined, v.astype(dtype))
    out.append(jax.lax.stop_gradient(combined))
  return out


# --------------------------------------------------------------------------
# Rewriting the leaves.


def _along(vector: jax.Array, leaf: Any, axis: int, count: int) -> jax.Array:
  """``vector`` (*layers, n) shaped to broadcast along ``axis`` of ``leaf``."""
  ndim = np.ndim(leaf)
  shape = list(vector.shape[:count]) + [1] * (ndim - count)
  shape[axis] = vector.shape[-1]
  return vector.reshape(shape)


def _multiplier(
  attention: _Attention,
  leaf: _Leaf,
  value: Any,
  rq: jax.Array,
  rk: jax.Array,
  gq: jax.Array,
  qk_nope_head_dim: int | None,
) -> jax.Array:
  """The per-element factor of one leaf, broadcastable against it."""
  count = len(attention.stack_shape)
  if qk_nope_head_dim is not None:
    width = np.shape(value)[-1]
    nope = qk_nope_head_dim
    if leaf.role == "query":
      content, rest = rq, gq  # the per-head rotary query takes gamma itself
    else:
      content, rest = rk, jnp.ones_like(rk)  # the value slice is untouched
    grid = jnp.concatenate(
      [
        jnp.repeat(content[..., None], nope, axis=-1),
        jnp.repeat(rest[..., None], width - nope, axis=-1),
      ],
      axis=-1,
    )
    ndim = np.ndim(value)
    shape = list(grid.shape[:count]) + [1] * (ndim - count)
    shape[-2:] = grid.shape[-2:]
    return grid.reshape(shape)
  if leaf.role == "query":
    vector = jnp.repeat(rq, leaf.unit, axis=-1)
  elif leaf.role == "key":
    vector = jnp.repeat(rk, leaf.unit, axis=-1)
  else:
    ones = jnp.ones((*rk.shape[:-1], attention.num_kv_heads * leaf.unit))
    vector = jnp.concatenate(
      [
        jnp.repeat(rq, leaf.unit, axis=-1),
        jnp.repeat(rk, leaf.unit, axis=-1),
        ones.astype(rk.dtype),
      ],
      axis=-1,
    )
  return _along(vector, value, leaf.axis, count)


def _rewrite(update: Any, param: Any, factor: jax.Array) -> jax.Array:
  """The update landing ``param`` on ``factor * (param + update)``.

  Where the factor is exactly 1 the update is selected, so untouched heads
  come back bit-identical; elsewhere the arithmetic is in at least float32.
  """
  update, param = jnp.asarray(update), jnp.asarray(param)
  dtype = _norms.widest_dtype(
    [
      _norms.accumulation_dtype(update.dtype),
      _norms.accumulation_dtype(param.dtype),
    ]
  )
  p, u, f = param.astype(dtype), update.astype(dtype), factor.astype(dtype)
  rewritten = (f * (p + u) - p).astype(update.dtype)
  return jnp.where(f == 1, update, rewritten)


def _check_spec(arg: str, spec: Any) -> None:
  if spec is None or callable(spec):
    return
  if not isinstance(spec, str):
    raise TypeError(
      f"{_FN}: {arg} must be a path pattern (str), a callable (relative"
      f" path) -> bool, or None; got {spec!r} of type {type(spec).__name__}."
    )


def _check_positive_threshold(threshold: Any) -> None:
  value = _validate.check_real(_FN, "threshold", threshold)
  if value is not None and not 0 < value < math.inf:
    raise ValueError(
      f"{_FN}: threshold must be a positive finite scalar (the largest"
      f" allowed attention logit; Kimi K2 uses 100), got {threshold!r}."
    )


def _optional_int(arg: str, value: Any, minimum: int) -> int | None:
  if value is None:
    return None
  return _validate.check_static_int(_FN, arg, value, minimum=minimum)


def qk_clip(
  threshold: Any = 100.0,
  *,
  query: PathSpec = "query",
  key: PathSpec = "key",
  qkv: PathSpec = None,
  layout: str = "flax",
  head_dim: Any = None,
  num_heads: Any = None,
  qk_nope_head_dim: Any = None,
  stacked: Any = None,
  group_queries: bool = False,
  log_only: bool = False,
  axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""QK-Clip (MuonClip): shrinks W_q, W_k of heads whose logits exceed tau.

  Placed last in a chain (after the optimizer and the learning rate), with
  ``update(updates, state, params, max_logits=...)`` given the step's
  per-head :math:`S^h_{\max} = \max_{b,i,j} q_i \cdot k_j / \sqrt{d}`:

  .. math::
    \gamma_h = \min(1, \tau / S^h_{\max}), \qquad
    W^h_{q,k} + u' = \sqrt{\gamma_h}\,(W^h_{q,k} + u)

  Other leaves and heads pass through bit-identical. A key head shared by a
  group of query heads (GQA) takes the group's maximum; with
  ``qk_nope_head_dim`` (MLA, MaxText's rule) the rotary query part takes
  :math:`\gamma_h` and the value part of the key projection is untouched.
  NaN and ``+inf`` maxima leave their head unchanged and are counted in
  ``qk_num_nonfinite_heads``; maxima at or below :math:`\tau` (negative,
  ``-inf``) never clip. Spec and recipes: ``docs/llm_stability.md``.

  Args:
    threshold: :math:`\tau > 0`, finite; may be a schedule under
      ``optax.inject_hyperparams``.
    query: pattern (or callable ``(relative path) -> bool``) naming the
      query projection relative to its attention module; every leaf below a
      match (kernel and bias) is selected. The attention module is the path
      ``max_logits`` is keyed by.
    key: the same for the key projection.
    qkv: pattern of fused projections holding ``[q | k | v]`` heads.
    layout: where heads sit in a layer's leaf: ``"flax"`` ``(..., heads,
      head_dim)``, ``"dense"`` ``(..., heads*head_dim)``, ``"torch"``
      ``(heads*head_dim, ...)`` (Equinox, PyTorch).
    head_dim: required by ``"dense"`` and ``"torch"``.
    num_heads: query heads of a fused ``qkv`` leaf with GQA.
    qk_nope_head_dim: MLA: width of the non-rotary part (``"flax"`` only).
    stacked: leading layer axes of the projections (int, callable, pytree;
      see :func:`optaxclip.stacked_by_path`).
    group_queries: every query head takes its group's gamma (Megatron-LM).
    log_only: record the diagnostics without changing the updates.
    axis_name: ``pmax`` the maxima over this mapped axis.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; state :class:`QKClipState`.

  Raises:
    ValueError: for a non-positive or non-finite threshold, an unknown
      layout, or (``init``/``update``) a spec that matches no attention.
    TypeError: for a pattern that is not a string or callable.

  Examples:
    >>> import jax.numpy as jnp, optax, optaxclip as oc
    >>> params = {"attn": {"query": jnp.ones((2, 1, 1)), "key": jnp.ones((2, 1, 1))}}
    >>> tx = optax.chain(optax.sgd(0.0), oc.qk_clip(100.0))
    >>> state = tx.init(params)
    >>> u, state = tx.update(params, state, params, max_logits={"attn": jnp.array([400.0])})
    >>> optax.apply_updates(params, u)["attn"]["query"][:, 0, 0]  # sqrt(100/400)
    Array([0.5, 0.5], dtype=float32)

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025.
  """
  _check_positive_threshold(threshold)
  for arg, spec in (("query", query), ("key", key), ("qkv", qkv)):
    _check_spec(arg, spec)
  layout = _validate.check_choice(_FN, "layout", layout, LAYOUTS)
  head_dim = _optional_int("head_dim", head_dim, 1)
  num_heads = _optional_int("num_heads", num_heads, 1)
  qk_nope_head_dim = _optional_int("qk_nope_head_dim", qk_nope_head_dim, 0)
  slicing = _tree.Slicing(_FN, stacked)
  if layout != "flax" and head_dim is None:
    raise ValueError(
      f"{_FN}: layout={layout!r} fuses heads and head_dim on one axis;"
      " pass head_dim= to tell them apart."
    )
  if qk_nope_head_dim is not None and (layout != "flax" or qkv is not None):
    raise ValueError(
      f"{_FN}: qk_nope_head_dim= (MLA) needs layout='flax' (kernels"
      " (rank, heads, width)) and separate query= and key= projections."
    )
  for arg, flag in (("group_queries", group_queries), ("log_only", log_only)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{_FN}: {arg} must be a bool, got {flag!r}.")

  def plan_of(params: Any) -> tuple[_Attention, ...]:
    return _build_plan(
      params,
      query=query,
      key=key,
      qkv=qkv,
      layout=layout,
      head_dim=head_dim,
      num_heads=num_heads,
      slicing=slicing,
      qk_nope_head_dim=qk_nope_head_dim,
    )

  def fresh_state(layout: _tree.Layout, dtype: Any) -> QKClipState:
    return QKClipState(
      qk_max_logits=layout.full(0, dtype),
      qk_gamma=layout.full(1, dtype),
      qk_max_logit=jnp.zeros((), dtype),
      qk_num_clipped_heads=jnp.zeros((), jnp.int32),
      qk_num_nonfinite_heads=jnp.zeros((), jnp.int32),
    )

  def init_fn(params):
    if not any(hasattr(x, "shape") for x in jax.tree.leaves(params)):
      # optax.tree.map_params initialises on a placeholder object that has
      # no attention to find: a layout without entries gives the plain
      # one-entry fields, which match any real state as a prefix.
      return fresh_state(_tree.Layout(()), jnp.float32)
    layout = _state_layout(plan_of(params))
    return fresh_state(layout, _norms.tree_accumulation_dtype(params))

  def update_fn(updates, state, params=None, *, max_logits=None, **extra):
    del extra
    if params is None:
      raise ValueError(
        f"{_FN}: update() needs params (it rescales the new query and key"
        " weights, params + updates): call tx.update(updates, state, params,"
        " max_logits=...)."
      )
    _tree.check_float_leaves(_FN, updates)
    plan = plan_of(params)
    dtype = _norms.tree_accumulation_dtype(params)
    layout = _state_layout(plan)
    if state is None:
      state = fresh_state(layout, dtype)
    layout.check(_FN, state.qk_max_logits, keyed=("attention layers", "params"))
    maxima = _collect_max_logits(max_logits, plan, dtype)
    if axis_name is not None:
      maxima = [jax.lax.pmax(m, axis_name) for m in maxima]
    update_leaves, treedef = jax.tree.flatten(updates)
    param_leaves = jax.tree.leaves(params)
    if len(param_leaves) != len(update_leaves):
      raise ValueError(
        f"{_FN}: params has {len(param_leaves)} leaves but updates has"
        f" {len(update_leaves)}; they must have the same structure."
      )
    gammas, clipped_counts, nonfinite_counts = [], [], []
    out = list(update_leaves)
    for attention, s in zip(plan, maxima, strict=True):
      gamma, clipped, nonfinite = qk_clip_rule(s, threshold)
      gammas.append(gamma)
      clipped_counts.append(jnp.sum(clipped.astype(jnp.int32)))
      nonfinite_counts.append(jnp.sum(nonfinite.astype(jnp.int32)))
      if log_only:
        continue
      group = attention.num_heads // attention.num_kv_heads
      grouped = gamma.reshape((*gamma.shape[:-1], -1, group))
      gk = jnp.min(grouped, axis=-1)
      gq = jnp.repeat(gk, group, axis=-1) if group_queries else gamma
      rq, rk = _norms.safe_sqrt(gq), _norms.safe_sqrt(gk)
      for leaf in attention.leaves:
        factor = _multiplier(
          attention,
          leaf,
          param_leaves[leaf.index],
          rq,
          rk,
          gq,
          qk_nope_head_dim,
        )
        out[leaf.index] = _rewrite(
          out[leaf.index], _tree.unwrap(param_leaves[leaf.index]), factor
        )
    max_field = layout.gather(maxima, dtype)
    new_state = QKClipState(
      qk_max_logits=max_field,
      qk_gamma=layout.gather(gammas, dtype),
      qk_max_logit=jnp.max(_tree.values_of(max_field)),
      qk_num_clipped_heads=sum(clipped_counts, jnp.zeros((), jnp.int32)),
      qk_num_nonfinite_heads=sum(nonfinite_counts, jnp.zeros((), jnp.int32)),
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def max_attention_logits(
  query: Any,
  key: Any,
  *,
  mask: Any = None,
  is_causal: bool = False,
  scale: Any = None,
) -> jax.Array:
  r"""Per-head maximum pre-softmax attention logit, for :func:`qk_clip`.

  .. math::
    S^h_{\max} = \max_{b, i, j \,:\, \text{mask}} \; s\, q^h_{b,i} \cdot
    k^{g(h)}_{b,j}, \qquad s = 1/\sqrt{d} \text{ by default}

  Call it where the attention computes ``q`` and ``k`` (after rotary
  embeddings and any q/k normalisation) and hand the result to
  ``qk_clip``'s ``update`` (return it, or ``sow`` it). Query head ``h`` reads
  key head ``h // (heads / kv_heads)`` (grouped-query attention, as
  ``jax.nn.dot_product_attention``). Inputs are not differentiated through
  and bf16/fp16 logits are accumulated in float32.

  Args:
    query: ``(..., T, heads, d)``.
    key: ``(..., S, kv_heads, d)``, the same leading axes.
    mask: optional bool, broadcastable to ``(..., heads, T, S)``; False
      entries are left out (``-inf`` if a head has none).
    is_causal: also leave out ``j > i``.
    scale: the logit scale; default ``1/sqrt(d)``.

  Returns:
    A ``(heads,)`` array, float32 (float64 for float64 inputs).

  Raises:
    ValueError: if ``kv_heads`` does not divide ``heads`` or shapes differ.

  Examples:
    >>> import jax.numpy as jnp, optaxclip as oc
    >>> q = jnp.ones((1, 2, 2, 4)); k = 3 * jnp.ones((1, 2, 1, 4))
    >>> oc.max_attention_logits(q, k)  # 4 * 3 / sqrt(4), both query heads
    Array([6., 6.], dtype=float32)

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025 (Algorithm 1).
  """
  fn = "max_attention_logits"
  q = jax.lax.stop_gradient(jnp.asarray(query))
  k = jax.lax.stop_gradient(jnp.asarray(key))
  if q.ndim < 3 or q.ndim != k.ndim or q.shape[:-3] != k.shape[:-3]:
    raise ValueError(
      f"{fn}: query must be (..., T, heads, d) and key (..., S, kv_heads, d)"
      f" with the same leading axes; got {q.shape} and {k.shape}."
    )
  *batch, length, heads, depth = q.shape
  kv_heads = k.shape[-2]
  if heads % kv_heads or k.shape[-1] != depth:
    raise ValueError(
      f"{fn}: key has {kv_heads} heads of width {k.shape[-1]}, query"
      f" {heads} of width {depth}; key heads must divide query heads and"
      " the widths must match."
    )
  group = heads // kv_heads
  dtype = _norms.widest_dtype(
    [_norms.accumulation_dtype(q.dtype), _norms.accumulation_dtype(k.dtype)]
  )
  grouped = q.reshape(*batch, length, kv_heads, group, depth)
  logits = jnp.einsum(
    "...tkgd,...skd->...kgts", grouped, k, preferred_element_type=dtype
  )
  logits = logits.reshape(*batch, heads, length, k.shape[-3])
  if scale is None:
    scale = 1.0 / _norms.static_sqrt(depth)
  logits = logits * jnp.asarray(scale).astype(dtype)
  keep = None
  if mask is not None:
    keep = jnp.broadcast_to(jnp.asarray(mask, jnp.bool_), logits.shape)
  if is_causal:
    causal = jnp.tril(jnp.ones((length, k.shape[-3]), jnp.bool_))
    causal = jnp.broadcast_to(causal, logits.shape)
    keep = causal if keep is None else keep & causal
  if keep is not None:
    logits = jnp.where(keep, logits, jnp.full_like(logits, -jnp.inf))
  axes = tuple(a for a in range(logits.ndim) if a != logits.ndim - 3)
  return jnp.max(logits, axis=axes)
