"""Scale-out tests (DESIGN §5) on 8 simulated CPU devices.

Two ways a gradient tree can be spread over devices are covered:

* ``shard_map``: every device holds a different slice of each leaf and the
  global clippers are told so with ``axis_name=``; without it the norm is the
  norm of the local slice (documented semantics, pinned down here).
* Sharded ``jax.jit`` (GSPMD), with auto and explicit mesh axis types: the
  transforms see global arrays, XLA inserts the reductions, and every result
  must equal the single-device one and keep its input's sharding. The
  compiled HLO of ``clip_by_global_norm`` must only communicate scalars.

Expected values come from float64 NumPy formulas written out below, or from
the same transform run on one device on the unsharded tree.
"""

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc

if hasattr(jax, "shard_map"):
  _shard_map = jax.shard_map
else:  # older jax
  from jax.experimental.shard_map import shard_map as _shard_map  # pylint: disable=g-import-not-at-top

_AxisType = getattr(jax.sharding, "AxisType", None)
_set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh",
                                                      None)

# (ord passed to optaxclip, ord used by the NumPy formula).
ORDS = [(2, 2), (1, 1), ("inf", math.inf)]
ORD_IDS = ["l2", "l1", "linf"]

NUM_DEVICES = 8


# ----------------------------------------------------------------- helpers --


def _tree(seed: int = 0) -> dict:
  """float32 leaves whose leading axis divides by 8; ``b`` is tiny."""
  rng = np.random.default_rng(seed)
  return {
      "w": rng.standard_normal((16, 8)).astype(np.float32),
      "b": (0.01 * rng.standard_normal((8,))).astype(np.float32),
      "k": rng.standard_normal((8, 4, 2)).astype(np.float32),
  }


def _np_norm(leaves, ord) -> float:  # pylint: disable=redefined-builtin
  """Float64 textbook norm of a list of arrays taken together."""
  x = np.concatenate([np.asarray(l, np.float64).ravel() for l in leaves])
  if ord == 2:
    return float(np.sqrt(np.sum(x * x)))
  if ord == 1:
    return float(np.sum(np.abs(x)))
  assert ord == math.inf
  return float(np.max(np.abs(x)))


def _np_scale(norm: float, c: float) -> float:
  """Pascanu et al. 2013: scale 1 if ||g|| <= c, else c / ||g||."""
  return 1.0 if norm <= c else c / norm


def _shard(x: np.ndarray, i: int) -> np.ndarray:
  """Device ``i``'s block of ``x`` split on its leading axis (P("x"))."""
  n = x.shape[0] // NUM_DEVICES
  return x[i * n:(i + 1) * n]


def _one_device(tree):
  return jax.device_put(tree, jax.devices()[0])


def _assert_tree_allclose(actual, expected, rtol=1e-6, atol=0.0):
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
      actual, expected)


@functools.cache
def _mesh_x():
  return jax.make_mesh((NUM_DEVICES,), ("x",))


def _shard_map_jit(fn, out_specs):
  """``fn`` under shard_map over "x", leaves split on their leading axis.

  The inputs are placed with ``P("x")`` first: with explicit mesh axes (the
  default of ``jax.make_mesh`` in recent jax) shard_map does not reshard.
  """
  mapped = jax.jit(_shard_map(fn, mesh=_mesh_x(), in_specs=(P("x"),),
                              out_specs=out_specs))
  split = NamedSharding(_mesh_x(), P("x"))
  return lambda tree: mapped(jax.device_put(tree, split))


# --------------------------------------------------------- 1. shard_map ---


@pytest.mark.parametrize("clips", [True, False], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("ord_arg,np_ord", ORDS, ids=ORD_IDS)
def test_shard_map_global_norm_with_axis_name(ord_arg, np_ord, clips):
  tree = _tree(0)
  full_norm = _np_norm(jax.tree.leaves(tree), np_ord)
  max_norm = 0.5 * full_norm if clips else 2.0 * full_norm
  tx = oc.clip_by_global_norm(max_norm, ord=ord_arg, axis_name="x")

  def local(t):
    norm = oc.global_norm(t, ord=ord_arg, axis_name="x")
    updates, state = tx.update(t, tx.init(t))
    # The state twice: as P() (shard_map checks it is device-invariant) and
    # stacked over devices, to compare every device's value explicitly.
    return norm, updates, state, norm[None], state.global_norm[None]

  norm, updates, state, norm_per_dev, state_norm_per_dev = _shard_map_jit(
      local, out_specs=(P(), P("x"), P(), P("x"), P("x")))(tree)

  # The norm is the norm of the full tree, on every device.
  np.testing.assert_allclose(float(norm), full_norm, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(norm_per_dev),
                             np.full(NUM_DEVICES, full_norm), rtol=1e-5)
  np.testing.assert_allclose(float(state.global_norm), full_norm, rtol=1e-5)
  assert state_norm_per_dev.shape == (NUM_DEVICES,)
  state_norm_per_dev = np.asarray(state_norm_per_dev)
  np.testing.assert_array_equal(state_norm_per_dev,
                                np.full(NUM_DEVICES, state_norm_per_dev[0]))
  assert bool(state.global_norm_clipped) == clips

  # The reassembled update equals the single-device transform on the full
  # tree, and the float64 formula.
  ref_tx = oc.clip_by_global_norm(max_norm, ord=ord_arg)
  ref_updates, ref_state = jax.jit(ref_tx.update)(_one_device(tree),
                                                  ref_tx.init(tree))
  jax.tree.map(lambda u, x: np.testing.assert_equal(u.shape, x.shape),
               updates, tree)
  _assert_tree_allclose(updates, ref_updates, rtol=1e-6)
  np.testing.assert_allclose(float(state.global_norm),
                             float(ref_state.global_norm), rtol=1e-6)
  assert bool(state.global_norm_clipped) == bool(ref_state.global_norm_clipped)
  scale = _np_scale(full_norm, max_norm)
  _assert_tree_allclose(
      updates, jax.tree.map(lambda x: np.float64(scale) * x, tree), rtol=1e-5)
  if not clips:  # Unclipped leaves come back bit-identical.
    jax.tree.map(lambda u, x: np.testing.assert_array_equal(np.asarray(u), x),
                 updates, tree)


# --------------------------------------------------- 2. clip_by_norm split ---


@pytest.mark.parametrize("kind", ["tensor", "tree"])
@pytest.mark.parametrize("ord_arg,np_ord", ORDS, ids=ORD_IDS)
def test_shard_map_clip_by_norm_with_axis_name(ord_arg, np_ord, kind):
  tree = _tree(1)
  if kind == "tensor":
    tree = tree["w"]
  leaves = jax.tree.leaves(tree)
  leaf_norms = np.array([_np_norm([x], np_ord) for x in leaves])
  if kind == "tensor":
    max_norm = 0.5 * float(leaf_norms[0])
  else:  # Between the smallest and the middle norm: one leaf unclipped.
    small, middle = np.sort(leaf_norms)[:2]
    max_norm = float(np.sqrt(small * middle))
  tx = oc.clip_by_norm(max_norm, ord=ord_arg, axis_name="x")

  def local(t):
    return tx.update(t, tx.init(t))

  updates, state = _shard_map_jit(local, out_specs=(P("x"), P()))(tree)

  # Per-leaf norms are the full-tensor norms (float64 formula).
  np.testing.assert_allclose(np.asarray(state.leaf_norms), leaf_norms,
                             rtol=1e-5)
  assert int(state.num_clipped_leaves) == int(np.sum(leaf_norms > max_norm))

  # Equal to the single-device transform on the full tensors.
  ref_tx = oc.clip_by_norm(max_norm, ord=ord_arg)
  ref_updates, ref_state = jax.jit(ref_tx.update)(_one_device(tree),
                                                  ref_tx.init(tree))
  _assert_tree_allclose(updates, ref_updates, rtol=1e-6)
  _assert_tree_allclose(state, ref_state, rtol=1e-6)

  # And to the float64 formula, leaf by leaf.
  expected = [np.float64(_np_scale(n, max_norm)) * x
              for n, x in zip(leaf_norms, leaves)]
  for u, e in zip(jax.tree.leaves(updates), expected):
    np.testing.assert_allclose(np.asarray(u), e, rtol=1e-5)


# ------------------------------------------ 3. no axis_name = local norm ---


@pytest.mark.parametrize("ord_arg,np_ord", ORDS, ids=ORD_IDS)
def test_shard_map_without_axis_name_is_local(ord_arg, np_ord):
  """Documented semantics: a split tree needs ``axis_name``.

  Without it each device sees only its slices, so the norm (and the clip
  scale) is that of the local slices, not of the full tree.
  """
  tree = _tree(2)
  full_norm = _np_norm(jax.tree.leaves(tree), np_ord)
  max_norm = 0.5 * full_norm
  tx = oc.clip_by_global_norm(max_norm, ord=ord_arg)

  def local(t):
    norm = oc.global_norm(t, ord=ord_arg)
    updates, state = tx.update(t, tx.init(t))
    return norm[None], updates, state.global_norm[None]

  norm_per_dev, updates, state_norm_per_dev = _shard_map_jit(
      local, out_specs=(P("x"), P("x"), P("x")))(tree)

  local_norms = np.array([
      _np_norm([_shard(x, i) for x in jax.tree.leaves(tree)], np_ord)
      for i in range(NUM_DEVICES)])
  np.testing.assert_allclose(np.asarray(norm_per_dev), local_norms, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state_norm_per_dev), local_norms,
                             rtol=1e-5)
  # ...which is not the full-tree norm (for L-inf, one device may hold the
  # largest element and agree by construction; the other seven cannot).
  differs = ~np.isclose(np.asarray(norm_per_dev), full_norm, rtol=1e-3)
  assert np.sum(differs) >= NUM_DEVICES - 1, (norm_per_dev, full_norm)

  # Each block is scaled by its own device's local factor.
  for name, x in tree.items():
    expected = np.concatenate([
        np.float64(_np_scale(local_norms[i], max_norm)) * _shard(x, i)
        for i in range(NUM_DEVICES)])
    np.testing.assert_allclose(np.asarray(updates[name]), expected, rtol=1e-5)

  # ...so the result is not the single-device clip of the full tree.
  ref_tx = oc.clip_by_global_norm(max_norm, ord=ord_arg)
  ref_updates, _ = jax.jit(ref_tx.update)(_one_device(tree), ref_tx.init(tree))
  assert not all(
      np.allclose(np.asarray(u), np.asarray(r), rtol=1e-3)
      for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)))


# ------------------------------------------------------ 4. sharded jit -----

LAYOUTS = {
    "one_axis": {"w": P("model"), "b": P("model"), "k": P("model")},
    "two_axes": {"w": P("data", "model"), "b": P(("data", "model")),
                 "k": P("data", "model")},
    "replicated": {"w": P(), "b": P(), "k": P()},
    "mixed": {"w": P("data", "model"), "b": P(), "k": P(None, "model")},
}

TRANSFORMS = {
    "global_l2": lambda: oc.clip_by_global_norm(0.5),
    "global_l1": lambda: oc.clip_by_global_norm(0.5, ord=1),
    "global_linf": lambda: oc.clip_by_global_norm(0.5, ord="inf"),
    "per_tensor": lambda: oc.clip_by_norm(0.5),
    "block_rms": lambda: oc.clip_by_block_rms(0.1),
    "value": lambda: oc.clip_by_value(0.1),
}

AXIS_TYPES = ["auto"] + (["explicit"] if _AxisType is not None and hasattr(
    _AxisType, "Explicit") else [])


@functools.cache
def _mesh_2d(axis_type: str):
  if _AxisType is None:
    return jax.make_mesh((2, 4), ("data", "model"))
  kind = _AxisType.Explicit if axis_type == "explicit" else _AxisType.Auto
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)


def _mesh_context(axis_type: str):
  if axis_type == "explicit":
    return _set_mesh(_mesh_2d(axis_type))
  return contextlib.nullcontext()


def _put(tree, mesh, layout):
  return {k: jax.device_put(x, NamedSharding(mesh, layout[k]))
          for k, x in tree.items()}


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_sharded_jit_matches_single_device(transform, layout, axis_type):
  tree = _tree(3)
  tx = TRANSFORMS[transform]()
  mesh = _mesh_2d(axis_type)

  ref_updates, ref_state = jax.jit(tx.update)(_one_device(tree),
                                              tx.init(tree))

  with _mesh_context(axis_type):
    sharded = _put(tree, mesh, LAYOUTS[layout])
    state = tx.init(sharded)
    updates, new_state = jax.jit(tx.update)(sharded, state)

  _assert_tree_allclose(updates, ref_updates, rtol=1e-6)
  _assert_tree_allclose(new_state, ref_state, rtol=1e-6)
  for name, x in sharded.items():
    out = updates[name]
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.sharding.is_equivalent_to(x.sharding, x.ndim), (
        name, out.sharding, x.sharding)


# ------------------------------------------------- 5. HLO communication ----

_ALL_REDUCE = re.compile(r"=\s*(.+?)\s+all-reduce(?:-start)?\(")


def _assert_only_scalar_all_reduces(hlo: str):
  """No all-gather / all-to-all, and at least one all-reduce, all of scalars."""
  assert "all-gather" not in hlo, hlo
  assert "all-to-all" not in hlo, hlo
  lines = [l for l in hlo.splitlines() if _ALL_REDUCE.search(l)]
  # A global norm of sharded leaves must combine across devices somehow.
  assert lines, hlo
  for line in lines:
    # e.g. "%all-reduce.1 = f32[] all-reduce(...)" or a tuple "(f32[], f32[])".
    result_shape = _ALL_REDUCE.search(line).group(1)
    dims = re.findall(r"\[([^\]]*)\]", result_shape)
    assert dims and all(d.strip() == "" for d in dims), line


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("ord_arg", [o for o, _ in ORDS], ids=ORD_IDS)
def test_global_norm_hlo_communicates_only_scalars(ord_arg, axis_type):
  tree = _tree(4)
  tx = oc.clip_by_global_norm(0.5, ord=ord_arg)
  mesh = _mesh_2d(axis_type)
  with _mesh_context(axis_type):
    sharded = _put(tree, mesh, LAYOUTS["two_axes"])
    state = tx.init(sharded)
    hlo = jax.jit(tx.update).lower(sharded, state).compile().as_text()

  _assert_only_scalar_all_reduces(hlo)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_hlo_check_accepts_a_per_leaf_reduction(axis_type):
  """Control for the test above: the check itself is satisfiable.

  A hand-written global-norm clip (one ``jnp.sum`` per leaf, no bucket) on
  the same sharded tree compiles to local reductions and scalar all-reduces.
  """
  tree = _tree(4)
  mesh = _mesh_2d(axis_type)

  def clip(t):
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(t)))
    scale = jnp.minimum(1.0, 0.5 / norm)
    return jax.tree.map(lambda x: x * scale, t)

  with _mesh_context(axis_type):
    sharded = _put(tree, mesh, LAYOUTS["two_axes"])
    hlo = jax.jit(clip).lower(sharded).compile().as_text()
  _assert_only_scalar_all_reduces(hlo)
