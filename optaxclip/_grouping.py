"""The leaf-grouping scheduler: how work over many leaves is laid out.

XLA's CPU backend compiles and launches every per-leaf operation on its own,
so a tree of thousands of small leaves is slow to compile and to run when
each leaf gets its own reduction. This module decides how leaves are grouped
before anything is computed on them:

* :func:`reduction_groups` concatenates small leaves into one bucket per
  dtype for a whole-tree reduction (a copy of the small leaves only; a large
  leaf keeps its own one-pass reduction, since copying it would cost a full
  extra read and write);
* :func:`map_leaves` runs a per-leaf function with small leaves of one kind
  stacked and vmapped;
* :func:`count_true` counts True elements over many masks with the same
  bucketing.

It knows nothing about norms: callers pass the per-leaf function or the
reduction. Layering (imports point one way only): ``_grouping`` imports no
other optaxclip module; ``_norms`` builds the norms on it, ``_scale`` holds
the clip-scale rule, and the transforms use all three.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ``rest_flat`` of :func:`map_leaves`: leaf indices to (vectors, sizes).
RestFlat = Callable[[list[int]], tuple[list[jax.Array], list[int]]]

# Leaves with fewer elements than this are grouped (bucketed or stacked).
# 2**15 float32 elements is 128 KiB: well above per-op overhead territory for
# the leaves it catches (biases, norms, small kernels), well below the sizes
# where an extra copy would show in run time or temporary memory.
SMALL_LEAF_SIZE = 2**15


def _widest(dtypes: Iterable[Any]) -> jnp.dtype:
  """The widest of ``dtypes`` (by item size), for concatenating pieces."""
  return max((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)


# --------------------------------------------------------------------------
# Backend policy. Everything in this module that groups leaves, and the
# optimization barriers, exists because XLA:CPU compiles or runs it faster;
# nothing has measured it on GPU or TPU. So it applies only to the program
# lowered for CPU: :func:`by_platform` traces a computation twice, once as the
# CPU program (:func:`on_cpu` is True while it is traced) and once as the
# plain program (one reduction per leaf, no buckets, stacks or barriers), and
# ``lax.platform_dependent`` keeps the one for the platform being lowered for.
# Both give the same values (to float rounding: a bucket sums in another
# order).

_PROGRAM = threading.local()


def on_cpu() -> bool:
  """Whether the code being traced is :func:`by_platform`'s CPU program."""
  return bool(getattr(_PROGRAM, "cpu", False))


@contextlib.contextmanager
def _program(cpu: bool):
  previous = getattr(_PROGRAM, "cpu", None)
  _PROGRAM.cpu = cpu
  try:
    yield
  finally:
    _PROGRAM.cpu = previous


def by_platform(fn: Callable[..., Any], *args: Any) -> Any:
  """``fn(*args)``, as the CPU program when lowering for CPU, else plain.

  Inside an enclosing :func:`by_platform` the program is already chosen and
  ``fn`` simply runs (one platform switch per computation, not per leaf).
  """
  if getattr(_PROGRAM, "cpu", None) is not None:
    return fn(*args)

  def program(cpu: bool) -> Callable[..., Any]:
    def run(*a: Any) -> Any:
      with _program(cpu):
        return fn(*a)

    return run

  return jax.lax.platform_dependent(
    *args, cpu=program(True), default=program(False)
  )


def barrier(tree: Any) -> Any:
  """``lax.optimization_barrier`` on the CPU program; identity otherwise."""
  return _barrier(tree) if on_cpu() else tree


def may_bucket(x: jax.Array) -> bool:
  """Whether flattening ``x`` into the shared bucket is free of communication.

  Concatenating a *sharded* leaf into a flat bucket makes XLA all-gather it
  (and explicit-sharding mode rejects the reshape outright), while a per-leaf
  reduction of a sharded leaf costs one scalar all-reduce. So a leaf is
  bucketed only when it cannot be sharded: the process sees a single device,
  or the leaf's type says it is unsharded (explicit axes with an all-None
  spec, or inside ``shard_map`` where arrays are device-local). Under
  auto-sharded ``jit`` on several devices the layout is unknown at trace time
  and leaves are reduced one by one: correct and communication-optimal, only
  slower to compile.
  """
  if jax.device_count() == 1:
    return True
  try:
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
  except (AttributeError, TypeError):  # pragma: no cover - older jax
    return False
  if mesh.empty:
    return False  # no mesh in the type: layout unknown, do not risk a gather
  axis_types = tuple(mesh.axis_types)
  if any(t == jax.sharding.AxisType.Auto for t in axis_types):
    return False  # auto axes: the compiler decides the layout later
  # Only manual (device-local inside shard_map) and explicit axes remain; the
  # type's spec is then exact, and an all-None spec means replicated.
  return all(p is None for p in sharding.spec)


def _map_leaves(
  fn: Callable[..., tuple[jax.Array, ...]],
  arrays: Sequence[Sequence[jax.Array]],
  keys: Sequence[Hashable],
  *,
  num_flat: int = 0,
  rest: Callable[[list[int]], list[tuple[jax.Array, ...]]] | None = None,
  rest_flat: RestFlat | None = None,
  done: dict[int, tuple[jax.Array, ...]] | None = None,
  done_flat: tuple[list[int], list[jax.Array], list[int]] | None = None,
) -> tuple[list[tuple[jax.Array, ...]], list[jax.Array | None]]:
  """``[fn(keys[i], *(a[i] for a in arrays)) for i in range(n)]``, with
  small leaves of one kind computed together.

  On the CPU program (:func:`by_platform`), leaves ``i`` with the same
  ``keys[i]`` (which must capture everything ``fn`` specialises on: shapes,
  dtypes, axes), fewer than
  :data:`SMALL_LEAF_SIZE` elements and an unsharded layout
  (:func:`may_bucket`) are stacked and run as one ``jax.vmap(fn)``. Other
  leaves run ``fn`` one by one. ``fn`` must be a per-leaf function whose
  result does not depend on being batched, so both routes give the same
  values (to float32 rounding: a batched reduction may sum in another
  order).

  Why: XLA's CPU backend compiles and launches every per-leaf operation
  separately, so a per-leaf transform on thousands of small leaves is slow
  to compile and to run, while a stack of 1000 such leaves is one operation.
  Slicing per-leaf results back out of a stack costs one small kernel per
  leaf (XLA:CPU compiles a kernel per distinct slice offset), so results
  that are only wanted as one flat vector (per-leaf diagnostics) are never
  sliced: the last ``num_flat`` results of ``fn`` come back as one vector
  each, flattened in leaf order, built from the stacks with one gather.

  Args:
    fn: maps one leaf's static key and arrays to a tuple of arrays.
    arrays: lists of equal length, the per-leaf arguments of ``fn``.
    keys: hashable per-leaf grouping keys, also passed to ``fn``.
    num_flat: how many trailing results of ``fn`` to return flat.
    rest: computes the results of every leaf that is not stacked (large,
      sharded, empty, or alone of its kind) at once, given their indices,
      in the format of ``fn``; by default ``fn`` runs on each. Lets a caller
      put all large leaves' overflow rescues under one ``lax.cond``.
    rest_flat: for an ``fn`` whose results are all flat (``num_flat`` of
      them, no leading ones): computes the leaves that are not stacked at
      once, given their indices, as ``(vectors, sizes)``: one vector per
      result, the leaves' entries concatenated in index order, and each
      leaf's number of entries. Lets a caller keep per-leaf values that are
      only wanted flat as a vector throughout (no per-leaf scalars).
    done: leaves already computed, by index: only their ``num_flat``
      trailing results (their leading results come back as ``()``).
    done_flat: leaves already computed as ``rest_flat`` returns them:
      ``(indices, vectors, sizes)``.

  Returns:
    ``(per_leaf, flat)``: per leaf, the tuple of ``fn``'s leading results;
    and for each trailing result, the concatenation over leaves of that
    result raveled (``None`` when there are no leaves).
  """
  n = len(keys)
  per_leaf: list[Any] = [None] * n
  # Per trailing result: raveled pieces, and for each piece the leaves it
  # holds (in order) with their sizes.
  pieces: list[list[jax.Array]] = [[] for _ in range(num_flat)]
  owners: list[tuple[int, int]] = []  # (leaf, size) in piece order
  groups: dict[Hashable, list[int]] = {}

  def record(i: int, res: tuple) -> None:
    cut = len(res) - num_flat
    per_leaf[i] = res[:cut]
    for k in range(num_flat):
      pieces[k].append(res[cut + k].reshape(-1))
    owners.append((i, int(np.prod(res[cut].shape)) if num_flat else 0))

  def record_flat(index: list[int], vecs: list[jax.Array], sizes) -> None:
    for k in range(num_flat):
      pieces[k].append(vecs[k].reshape(-1))
    for i, size in zip(index, sizes, strict=True):
      per_leaf[i] = ()
      owners.append((i, int(size)))

  singles = []
  for i, res in (done or {}).items():
    record(i, res)
  if done_flat is not None:
    record_flat(*done_flat)
  skip = set(done or ()) | set(done_flat[0] if done_flat else ())
  for i in range(n):
    if i in skip:
      continue
    xs = [a[i] for a in arrays]
    if on_cpu() and all(
      0 < x.size < SMALL_LEAF_SIZE and may_bucket(x) for x in xs
    ):
      groups.setdefault(keys[i], []).append(i)
    else:
      singles.append(i)
  singles += [idx[0] for idx in groups.values() if len(idx) == 1]
  if rest_flat is not None and singles:
    record_flat(singles, *rest_flat(singles))
  elif rest is not None and singles:
    for i, res in zip(singles, rest(singles), strict=True):
      record(i, tuple(res))
  else:
    for i in singles:
      record(i, tuple(fn(keys[i], *(a[i] for a in arrays))))
  for key, idx in groups.items():
    if len(idx) == 1:
      continue
    stacks = [jnp.stack([a[i] for i in idx]) for a in arrays]
    res = jax.vmap(lambda *xs, key=key: tuple(fn(key, *xs)))(*stacks)
    cut = len(res) - num_flat
    for j, i in enumerate(idx):
      per_leaf[i] = tuple(r[j] for r in res[:cut])
    for k in range(num_flat):
      pieces[k].append(res[cut + k].reshape(-1))
    if num_flat:
      size = int(np.prod(res[cut].shape[1:]))
      owners.extend((i, size) for i in idx)
  if not num_flat:
    return per_leaf, []
  if not owners:
    return per_leaf, [None] * num_flat
  # Where each leaf's entries sit in the concatenated pieces.
  starts, offset = {}, 0
  for i, size in owners:
    starts[i] = (offset, size)
    offset += size
  order = np.concatenate(
    [np.arange(starts[i][0], starts[i][0] + starts[i][1]) for i in range(n)]
  ).astype(np.int32)
  identity = bool(np.array_equal(order, np.arange(order.size)))
  flat: list[jax.Array | None] = []
  for k in range(num_flat):
    dtype = _widest(p.dtype for p in pieces[k])
    vec = jnp.concatenate([p.astype(dtype) for p in pieces[k]])
    flat.append(vec if identity else vec[order])
  return per_leaf, flat


def map_leaves(
  fn: Callable[..., tuple[jax.Array, ...]],
  arrays: Sequence[Sequence[jax.Array]],
  keys: Sequence[Hashable],
  *,
  num_flat: int = 0,
  rest: Callable[[list[int]], list[tuple[jax.Array, ...]]] | None = None,
  rest_flat: RestFlat | None = None,
) -> tuple[list[tuple[jax.Array, ...]], list[jax.Array | None]]:
  """See :func:`_map_leaves`; small leaves are stacked on the CPU program
  only (:func:`by_platform`), the plain program runs ``fn`` leaf by leaf.

  Leaves that no program stacks (large, sharded or empty ones) get the same
  computation on every platform, so they are computed once, outside the
  platform switch: inside it they would be traced and lowered twice (once
  per program), which on the 144-leaf benchmark tree was most of
  ``clip_by_block_rms``'s trace time. Only the small leaves, and the flat
  vectors that interleave both kinds, go through :func:`by_platform`.
  """
  arrays = [list(a) for a in arrays]
  n = len(keys)
  if getattr(_PROGRAM, "cpu", None) is not None:
    # Already inside a program: nothing to hoist.
    return _map_leaves(
      fn, arrays, keys, num_flat=num_flat, rest=rest, rest_flat=rest_flat
    )
  fixed = [
    i
    for i in range(n)
    if not all(
      0 < a[i].size < SMALL_LEAF_SIZE and may_bucket(a[i]) for a in arrays
    )
  ]
  fixed_set = set(fixed)
  small = [i for i in range(n) if i not in fixed_set]
  per_leaf: list[Any] = [None] * n
  if fixed and rest_flat is not None:
    fixed_vecs, fixed_sizes = rest_flat(fixed)
    for i in fixed:
      per_leaf[i] = ()
    if not small:
      return per_leaf, list(fixed_vecs)

    def run_flat(small_arrays, fixed_vecs):
      full: list[list[Any]] = [[None] * n for _ in arrays]
      for a, sa in zip(full, small_arrays, strict=True):
        for i, x in zip(small, sa, strict=True):
          a[i] = x
      res, flat = _map_leaves(
        fn,
        full,
        keys,
        num_flat=num_flat,
        rest_flat=rest_flat,
        done_flat=(fixed, fixed_vecs, fixed_sizes),
      )
      return [res[i] for i in small], flat

    small_out, flat_out = by_platform(
      run_flat, [[a[i] for i in small] for a in arrays], list(fixed_vecs)
    )
    for i, res in zip(small, small_out, strict=True):
      per_leaf[i] = tuple(res)
    return per_leaf, list(flat_out)
  if fixed:
    if rest is not None:
      fixed_res = [tuple(r) for r in rest(fixed)]
    else:
      fixed_res = [tuple(fn(keys[i], *(a[i] for a in arrays))) for i in fixed]
    cut = len(fixed_res[0]) - num_flat
    for i, res in zip(fixed, fixed_res, strict=True):
      per_leaf[i] = res[:cut]
  if not small:
    if not num_flat:
      return per_leaf, []
    if not fixed:
      return per_leaf, [None] * num_flat
    flat: list[jax.Array | None] = []
    for k in range(num_flat):
      parts = [res[cut + k].reshape(-1) for res in fixed_res]
      dtype = _widest(p.dtype for p in parts)
      flat.append(jnp.concatenate([p.astype(dtype) for p in parts]))
    return per_leaf, flat

  # The small leaves go through the platform switch. The fixed leaves' flat
  # results (one entry per slice) go in as operands, so each flat vector
  # comes out in leaf order, built once; their other results stay outside.
  fixed_flat = (
    [[res[cut + k] for res in fixed_res] for k in range(num_flat)]
    if fixed
    else [[] for _ in range(num_flat)]
  )

  def run(small_arrays, fixed_flat):
    full: list[list[Any]] = [[None] * n for _ in arrays]
    for a, sa in zip(full, small_arrays, strict=True):
      for i, x in zip(small, sa, strict=True):
        a[i] = x
    done = {i: tuple(f[j] for f in fixed_flat) for j, i in enumerate(fixed)}
    res, flat = _map_leaves(
      fn,
      full,
      keys,
      num_flat=num_flat,
      rest=rest,
      done=done,
      rest_flat=rest_flat,
    )
    return [res[i] for i in small], flat

  small_res, flat = by_platform(
    run, [[a[i] for i in small] for a in arrays], fixed_flat
  )
  for i, res in zip(small, small_res, strict=True):
    per_leaf[i] = tuple(res)
  return per_leaf, list(flat)


def reduction_groups(
  leaves: Sequence[jax.Array], cast: Callable[[Any], Any]
) -> list[jax.Array]:
  """The arrays a whole-tree reduction runs over: large leaves and buckets.

  On the CPU program (:func:`by_platform`), small leaves (fewer than
  :data:`SMALL_LEAF_SIZE` elements, and unsharded, see :func:`may_bucket`)
  are flattened and concatenated into one bucket per dtype; large leaves, and
  every leaf of the plain program, are returned as they are. Real leaves come back cast to
  ``cast(dtype)`` (the cast fuses into the reduction or the concatenation),
  complex leaves keep their dtype. Empty leaves are dropped.

  Args:
    leaves: the arrays.
    cast: maps a real leaf's dtype to the dtype its group is reduced in.

  Returns:
    A list of arrays whose elements, taken together, are the tree's elements.
  """
  groups: list[jax.Array] = []
  buckets: dict[Any, list[jax.Array]] = {}
  for x in leaves:
    if x.size == 0:
      continue
    dtype = x.dtype if jnp.iscomplexobj(x) else cast(x.dtype)
    if on_cpu() and x.size < SMALL_LEAF_SIZE and may_bucket(x):
      buckets.setdefault(jnp.dtype(dtype), []).append(
        x.reshape(-1).astype(dtype)
      )
    else:
      groups.append(x.astype(dtype))
  for bucket in buckets.values():
    flat = bucket[0] if len(bucket) == 1 else jnp.concatenate(bucket)
    # Without the barrier XLA fuses the element-wise work of thousands of
    # leaves and the concatenation into one reduction whose compile time grows
    # with the number of leaves (~16 s for 2000 leaves, as slow as optax);
    # with it the bucket is one copy and one cheap reduction (~3 s).
    groups.append(_barrier(flat))
  return groups


def opaque(x: Any) -> Any:
  """``lax.optimization_barrier`` on every platform, with an identity
  derivative: for numerics that must not be rewritten by XLA's algebraic
  simplifier (:func:`_norms._scaled_partial`), not for speed."""
  return _barrier(x)


def _barrier(x: Any) -> Any:
  """``lax.optimization_barrier``, differentiable on every supported jax.

  jax >= 0.6 differentiates the primitive itself, and calling it directly
  traces fastest: a ``custom_jvp`` wrapper made tracing a 2000-leaf
  ``record_norms`` update 1.5-1.9 s (50-65%) slower. jax < 0.6 has no
  differentiation rule for it and gets :func:`_barrier_with_jvp`.
  """
  if _barrier_differentiates():
    return jax.lax.optimization_barrier(x)
  return _barrier_with_jvp(x)


@functools.cache
def _barrier_differentiates() -> bool:
  """Whether this jax can ``grad`` through ``lax.optimization_barrier``.

  Probed abstractly (``eval_shape``), so it touches no device.
  """
  try:
    jax.eval_shape(jax.grad(jax.lax.optimization_barrier), 0.0)
  except Exception:  # pylint: disable=broad-except
    # NotImplementedError on jax < 0.6; whatever else fails, the wrapper
    # is always correct.
    return False
  return True


@jax.custom_jvp
def _barrier_with_jvp(x: jax.Array) -> jax.Array:
  """``lax.optimization_barrier`` with an identity derivative (jax < 0.6).

  The barrier only orders compilation, so its tangent is the input's tangent.
  """
  return jax.lax.optimization_barrier(x)


@_barrier_with_jvp.defjvp
def _barrier_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return _barrier_with_jvp(x), x_dot


# The block that :func:`split_entries` reads one entry from: XLA:CPU splits
# a longer reduction into a windowed pre-reduction and a final one (three
# kernels instead of one).
_SPLIT_BLOCK = 32


def split_entries(vec: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
  """``vec`` cut into consecutive chunks of ``sizes`` entries, in order.

  On the plain program, for chunks of more than one entry and for vectors
  that are not floating point, slices. On the CPU program a one-entry chunk
  (one value per leaf) is instead read as the masked maximum
  ``max(where(mask, block, -inf))`` over the aligned block of
  :data:`_SPLIT_BLOCK` entries that holds it, with a constant mask that
  picks the entry. Why: XLA:CPU compiles one kernel per distinct fused
  computation, and a slice's offset is part of the computation, so a
  per-leaf value sliced out of a vector and fused into the leaf's update
  made every leaf's update kernel distinct (144 of them on the 144-leaf
  benchmark tree, most of ``adagc``'s compile time). A mask is an operand,
  not part of the kernel, so the values of one block share one small
  kernel, and the leaves' updates share one kernel per shape. The other
  entries are masked to ``-inf`` and the block's maximum taken, which
  returns the entry bit for bit (``nan``, ``inf`` and ``-0.0`` included).

  Args:
    vec: a 1-D array with ``sum(sizes)`` entries.
    sizes: the chunks' lengths.

  Returns:
    One 1-D array per size.
  """
  sizes = [int(s) for s in sizes]
  starts = [int(a) for a in np.cumsum([0, *sizes])[:-1]]

  def split(vec):
    if (
      not on_cpu()
      or len(sizes) < 2
      or not jnp.issubdtype(vec.dtype, jnp.floating)
    ):
      return [vec[a : a + s] for a, s in zip(starts, sizes, strict=True)]
    n, b = vec.shape[0], _SPLIT_BLOCK
    padded = jnp.pad(vec, (0, -n % b)) if n > b else vec
    lowest = jnp.asarray(-jnp.inf, vec.dtype)
    out = []
    for a, s in zip(starts, sizes, strict=True):
      if s != 1:
        out.append(vec[a : a + s])
        continue
      lo = a - a % b if n > b else 0
      block = padded[lo : lo + min(b, n)]
      mask = np.arange(block.shape[0]) == a - lo
      out.append(jnp.max(jnp.where(mask, block, lowest)).reshape(1))
    return out

  return by_platform(split, vec)


def count_true(masks: Sequence[jax.Array]) -> jax.Array:
  """How many elements of the boolean ``masks`` are True, as int32.

  Uses the same bucketing as the norms, so thousands of small masks cost one
  reduction (and sharded ones are never gathered).
  """
  if not masks:
    return jnp.zeros((), jnp.int32)

  def count(masks):
    groups = reduction_groups(
      [m.astype(jnp.float32) for m in masks], lambda d: jnp.dtype(jnp.float32)
    )
    if not groups:
      return jnp.zeros((), jnp.int32)
    total = jnp.stack([jnp.sum(g) for g in groups])
    return jnp.sum(total).astype(jnp.int32)

  return by_platform(count, list(masks))
