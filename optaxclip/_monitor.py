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
import numpy as np
import optax

from optaxclip import _norms, _stats, _tree, _validate


def tree_norms(
  tree: Any,
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  stacked: Any = None,
) -> dict[str, jax.Array]:
  r"""The norm of every leaf of a pytree, keyed by its path.

  .. math::
    \{\,\mathrm{path}(\ell) : \|x_\ell\|\,\} \quad \text{for every leaf }
    \ell \text{ (every layer slice of a stacked leaf)}

  Keys are the leaves' normalised ``"/"``-joined paths
  (``{"blocks": {"fc": {"kernel": x}}}`` gives ``"blocks/fc/kernel"``).
  Each value is a scalar, or for a stacked leaf an array of per-layer norms
  with the shape of the stacked axes. Norms follow the library's numerics
  (``docs/design.md#numerics``): bf16 and fp16 accumulate in float32, an
  inf/NaN element gives an inf/NaN norm, an empty leaf has norm 0.

  Args:
    tree: any pytree of arrays (gradients, parameters, updates).
    ord: ``2`` (default, ``None`` means 2), ``1`` or ``jnp.inf``.
    stacked: leading axes of a leaf that index layers: ``None``/0, an int for
      every leaf, a callable ``(path, leaf) -> int`` (see
      :func:`stacked_by_path`), or a pytree of ints.

  Returns:
    ``dict[str, jax.Array]`` in ``jax.tree.leaves`` order.

  Raises:
    ValueError: for an unsupported ``ord`` or a malformed ``stacked``.
    TypeError: for an integer or bool leaf, naming its path.

  Examples:
    >>> import jax.numpy as jnp, optaxclip as oc
    >>> grads = {"fc": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(3)}}
    >>> {k: round(float(v), 3) for k, v in oc.tree_norms(grads).items()}
    {'fc/bias': 1.732, 'fc/kernel': 4.0}
    >>> stack = {"blocks": jnp.stack([jnp.ones(4), 2 * jnp.ones(4)])}
    >>> oc.tree_norms(stack, stacked=1)["blocks"]
    Array([2., 4.], dtype=float32)

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
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


@_stats.register_state(
  "record_norms", history=("spike_norm_ema", "spike_norm_count")
)
class RecordNormsEmaState(NamedTuple):
  """State of ``record_norms(ema=...)``: norms, their history, spike ratios.

  Every field is laid out as :class:`RecordNormsState`'s
  ``recorded_norms`` (a :class:`~optaxclip.PathValues`, one entry per leaf
  or layer slice). ``clip_stats`` shows the norms and the ratios; the EMA
  and the counts are history (``include_history=True``).
  """

  # float: this step's norms, as RecordNormsState's recorded_norms.
  spike_norms: _tree.PathValues
  # float: the EMA of each entry's finite, positive norms after this step,
  # before bias correction.
  spike_norm_ema: _tree.PathValues
  # int32: how many norms each EMA holds; saturates at 2**31 - 1.
  spike_norm_count: _tree.PathValues
  # float: this step's norm over the bias-corrected EMA of the earlier
  # steps; 1 while an entry has no history, inf/NaN for a non-finite norm.
  spike_ratio: _tree.PathValues


def _norm_ema_step(
  norms: jax.Array, ema: jax.Array, count: jax.Array, decay: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One step of ``record_norms``' EMA on flat vectors: the ratio to the
  history before this step, then the EMA and counts after it.

  The EMA is bias-corrected as Adam's moments are, so the first ratios
  compare with the mean of the few norms seen so far rather than with a
  value dragged towards the zero it starts from. Zero and non-finite norms
  are not observations (a frozen tensor, a NaN step): they leave the EMA
  alone, and a non-finite norm shows as an inf or NaN ratio.
  """
  dtype = ema.dtype
  if _validate.is_traced(decay):
    rate = 1 - jnp.asarray(decay).astype(dtype)
  else:  # 1 - decay rounded once, not after decay's own rounding
    rate = jnp.asarray(1.0 - float(np.asarray(decay)), dtype)
  # 1 - decay**count without cancellation for small rates.
  correction = -jnp.expm1(count.astype(dtype) * jnp.log1p(-rate))
  prior = ema / jnp.where(count > 0, correction, jnp.ones_like(correction))
  known = (count > 0) & (prior > 0)
  safe_prior = jnp.where(known, prior, jnp.ones_like(prior))
  ratio = jnp.where(known, norms / safe_prior, jnp.ones_like(norms))
  observed = jnp.isfinite(norms) & (norms > 0)
  safe_norms = jnp.where(observed, norms, ema)
  new_ema = jnp.where(observed, ema + rate * (safe_norms - ema), ema)
  bumped = optax.safe_int32_increment(count)
  return new_ema, jnp.where(observed, bumped, count), ratio


def record_norms(
  *,
  ord: Any | None = None,  # pylint: disable=redefined-builtin
  stacked: Any = None,
  name: str | None = None,
  ema: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""An identity transform that records per-leaf norms of what flows through.

  Place it anywhere in a chain to log per-layer norms at that point:
  ``optax.chain(oc.record_norms(), oc.clip_by_global_norm(1.0),
  oc.record_norms(), optax.adamw(3e-4))`` keeps pre-clip norms (keys
  ``"record_norms/<path>"`` in :func:`clip_stats`) and post-clip norms
  (``"record_norms_1/<path>"``) side by side. The updates pass through
  untouched. The norms are one :class:`~optaxclip.PathValues` vector keyed
  by path, so the state has a fixed shape; ``update(updates, None)`` works
  without ``ema``. With ``ema=beta`` it also keeps, per entry, a
  bias-corrected EMA :math:`\hat m` of the earlier finite, positive norms
  and this step's spike ratio

  .. math::
    r_t = \|g\|_t / \hat m_{t-1} \quad (1 \text{ while there is no history}),

  and :func:`top_spikes` lists the leaves that spiked most. Why a vector:
  ``docs/transforms.md#monitoring``.

  Args:
    ord: ``2`` (default, ``None`` means 2), ``1`` or ``jnp.inf``.
    stacked: leading layer axes, as in :func:`tree_norms`.
    name: the :func:`clip_stats` key prefix instead of ``"record_norms"``
      (``name="pre_clip"`` gives ``"pre_clip/<path>"``): a non-empty string
      without ``"/"`` that is not a clipper's prefix.
    ema: ``None`` (default) to record norms only, or the EMA decay in
      (0, 1), e.g. 0.99, for spike ratios. May be a schedule under
      ``optax.inject_hyperparams``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`RecordNormsState`, or with ``ema`` a
    :class:`RecordNormsEmaState` (then ``update`` needs a state from
    ``init``: the EMA is history).

  Raises:
    ValueError: an unsupported ``ord``, ``ema`` outside (0, 1), or (from
      ``update``) a state from ``init`` on another tree.
    TypeError: from ``update``, for an integer or bool leaf.

  Examples:
    >>> import jax.numpy as jnp, optax, optaxclip as oc
    >>> tx = optax.chain(oc.record_norms(name="pre_clip"),
    ...                  oc.clip_by_global_norm(1.0), oc.record_norms())
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> stats = oc.clip_stats(state)
    >>> float(stats["pre_clip/w"]), float(stats["record_norms/w"])
    (5.0, 1.0)
  """
  fn = "record_norms"
  norm_ord = _validate.canonical_ord(fn, 2 if ord is None else ord)
  slicing = _tree.Slicing(fn, stacked)
  if ema is not None:
    _validate.check_in_range(
      fn, "ema", ema, 0.0, 1.0, low_open=True, high_open=True
    )
  state_cls: Any = _stats.named_state(
    RecordNormsState if ema is None else RecordNormsEmaState, fn, name
  )

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
    if ema is None:
      return state_cls(recorded_norms=layout.full(0, dtype))
    return state_cls(
      spike_norms=layout.full(0, dtype),
      spike_norm_ema=layout.full(0, dtype),
      spike_norm_count=layout.full(0, jnp.int32),
      spike_ratio=layout.full(1, dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if state is None and ema is None:
      return updates, state_cls(recorded_norms=recorded(updates)[1])
    _tree.require_state(fn, state)
    # The dtype init chose, every step (lax.cond in MultiSteps needs it).
    last = state.recorded_norms if ema is None else state.spike_norms
    layout, values = recorded(updates, last.dtype)
    layout.check(fn, last)
    if ema is None:
      return updates, state_cls(recorded_norms=values)
    new_ema, count, ratio = _norm_ema_step(
      _tree.values_of(values),
      _tree.values_of(state.spike_norm_ema),
      _tree.values_of(state.spike_norm_count),
      ema,
    )
    return updates, state_cls(
      spike_norms=values,
      spike_norm_ema=layout.wrap(new_ema),
      spike_norm_count=layout.wrap(count),
      spike_ratio=layout.wrap(ratio),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _host(x: Any) -> np.ndarray:
  """A state array on the host, unwrapping Flax ``OptArray`` variables."""
  while not isinstance(x, (jax.Array, np.ndarray, np.generic)) and hasattr(
    x, "value"
  ):
    x = x.value
  return np.asarray(x)


def top_spikes(
  opt_state: Any, k: int | None = 5, *, index: int = 0
) -> list[tuple[str, float, float]]:
  r"""The leaves whose norm jumped most against their own history.

  Reads a ``record_norms(ema=...)`` state (the ``index``-th in pytree
  order; for ``optax.chain``, chain order) on the host and ranks its
  entries by the spike ratio of the last step,

  .. math::
    r_\ell = \frac{\|g_\ell\|_t}{\hat m_{\ell, t-1}}, \qquad
    \hat m_{\ell, t-1} = \frac{m_{\ell, t-1}}{1 - \beta^{n_\ell}},

  where :math:`m` is the EMA (decay :math:`\beta`) of the leaf's earlier
  finite, positive norms and :math:`n_\ell` their number. Entries with a
  non-finite ratio (an inf or NaN norm) come first, then the largest
  ratios; ties keep leaf order. A stacked leaf contributes one entry per
  layer, named ``"blocks/kernel[3]"``. Put the recorder first in the chain
  (outside ``skip_step``) so it also sees the steps that are skipped; see
  the recipe in the docs, "A spike fired: which layers?".

  Args:
    opt_state: any optimizer state holding a ``record_norms(ema=...)``
      state (also a Flax ``nnx.Optimizer``'s ``opt_state``).
    k: how many entries to return (``None``: all).
    index: which ``record_norms(ema=...)`` state, in pytree order.

  Returns:
    A list of ``(path, norm, ratio)`` with Python floats, largest spike
    first.

  Raises:
    ValueError: no such state in ``opt_state``, or ``k < 1``.
    TypeError: a ``k`` or ``index`` that is not an int.

  Examples:
    >>> import jax.numpy as jnp, optax, optaxclip as oc
    >>> tx = optax.chain(oc.record_norms(ema=0.9), optax.sgd(0.1))
    >>> params = {"attn": jnp.ones(4), "mlp": jnp.ones(4)}
    >>> state = tx.init(params)
    >>> for scale in (1.0, 1.0, 1.0):
    ...   _, state = tx.update({"attn": jnp.ones(4), "mlp": scale * jnp.ones(4)},
    ...                        state, params)
    >>> spike = {"attn": jnp.ones(4), "mlp": 30.0 * jnp.ones(4)}
    >>> _, state = tx.update(spike, state, params)
    >>> [(path, norm, round(ratio, 3))
    ...  for path, norm, ratio in oc.top_spikes(state, k=1)]
    [('mlp', 60.0, 30.0)]

  References:
    Wortsman et al., `Small-scale proxies for large-scale Transformer
    training instabilities <https://arxiv.org/abs/2309.14322>`_, 2023
    (per-layer monitoring of instabilities).
  """
  fn = "top_spikes"
  if k is not None:
    k = _validate.check_static_int(fn, "k", k, minimum=1)
  index = _validate.check_static_int(fn, "index", index, minimum=0)
  is_ema = lambda node: isinstance(node, RecordNormsEmaState)
  found = [
    node for node in jax.tree.leaves(opt_state, is_leaf=is_ema) if is_ema(node)
  ]
  if index >= len(found):
    raise ValueError(
      f"{fn}: the optimizer state holds {len(found)} record_norms(ema=...)"
      f" states, so there is none at index={index}. Add one to the chain,"
      " e.g. optax.chain(oc.record_norms(ema=0.99), ...), and pass the"
      " state it returns."
    )
  state = found[index]
  if not isinstance(state.spike_norms, _tree.PathValues):
    return []  # a tree without leaves
  segments = state.spike_norms.segments
  norms = _host(state.spike_norms.values).astype(np.float64)
  ratios = _host(state.spike_ratio.values).astype(np.float64)
  entries, start = [], 0
  for path, shape in segments:
    for offset, where in enumerate(np.ndindex(*shape)):
      name = f"{path}[{', '.join(map(str, where))}]" if shape else path
      entries.append(
        (name, float(norms[start + offset]), float(ratios[start + offset]))
      )
    start += int(np.prod(shape, dtype=np.int64))
  entries.sort(
    key=lambda e: (np.isfinite(e[2]), -e[2] if np.isfinite(e[2]) else 0.0)
  )
  return entries if k is None else entries[:k]
