"""Shared test helpers, and the norm-bound clippers of the property tests.

The list of every public transform is ``tests/registry.py``; the generic
suites run over it. ``CLIPPERS`` below is the specialised table of the
property tests (test_properties.py): the clippers that bound a norm or a
value by a threshold, each with its float64 reference and the bound it
guarantees, and each naming the registry row it specialises (``row``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import optaxclip as oc
import reference


def _version(module) -> tuple[int, ...]:
  return tuple(int(part) for part in
               module.__version__.split("+")[0].split(".")[:3] if part.isdigit())


JAX_VERSION = _version(jax)


def optax_version() -> tuple[int, ...]:
  import optax  # pylint: disable=g-import-not-at-top
  return _version(optax)


def flax_version() -> tuple[int, ...]:
  import flax  # pylint: disable=g-import-not-at-top
  return _version(flax)


def nnx_optimizer_update(optimizer, model, grads):
  """``optimizer.update`` across flax releases.

  flax >= 0.11 takes ``update(model, grads)``; flax 0.10 (the floor, the last
  release for jax 0.5) takes ``update(grads)`` and holds the model itself.
  """
  if flax_version() >= (0, 11):
    return optimizer.update(model, grads)
  return optimizer.update(grads)


def nnx_pure(tree):
  """``nnx.as_pure`` (flax >= 0.11), or unwrapping variables by hand."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if hasattr(nnx, "as_pure"):
    return nnx.as_pure(tree)
  return jax.tree.map(lambda v: v.value if isinstance(v, nnx.Variable) else v,
                      tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def enable_x64():
  """``jax.enable_x64`` (jax >= 0.6) or its older experimental spelling."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as _enable_x64  # pylint: disable=g-import-not-at-top
  return _enable_x64(True)


def maybe_jit(fn, use_jit: bool):
  return jax.jit(fn) if use_jit else fn


@dataclasses.dataclass(frozen=True)
class Clipper:
  """One clipping configuration under test.

  Attributes:
    name: test id.
    make: threshold -> GradientTransformation.
    threshold_arg: the factory's threshold argument name.
    factory: the public factory (for inject_hyperparams).
    reference: (list of float64 leaves, threshold) -> list of float64 leaves.
    bound: (list of float64 output leaves) -> list of (measured, threshold)
      pairs that must satisfy measured <= threshold, or None.
    direction_kept: whether the whole update keeps its direction.
  """

  name: str
  make: Callable[[float], Any]
  threshold_arg: str
  factory: Callable[..., Any]
  reference: Callable[[list, float], list]
  bound: Optional[Callable[[list, float], list]] = None
  direction_kept: bool = True
  # Non-threshold keyword arguments that ``make`` passes to ``factory``.
  options: tuple = ()
  # The registry row of this transform (tests/registry.py).
  row: str = ""

  def __repr__(self):
    return self.name


def _norm_bound(ord):  # pylint: disable=redefined-builtin
  return lambda leaves, c: [(reference.norm(leaves, ord), c)]


def _leaf_bound(ord):  # pylint: disable=redefined-builtin
  return lambda leaves, c: [(reference.norm([x], ord), c) for x in leaves]


def _rms_bound(leaves, c):
  return [(reference.clip_by_block_rms([x], math.inf)[1][0], c) for x in leaves]


def _value_bound(leaves, c):
  return [(float(np.max(np.abs(x))) if x.size else 0.0, c) for x in leaves]


CLIPPERS = [
    Clipper("global_l2", lambda c: oc.clip_by_global_norm(c), "max_norm",
            oc.clip_by_global_norm,
            lambda l, c: reference.clip_by_global_norm(l, c)[0], _norm_bound(2),
            row="clip_by_global_norm"),
    Clipper("global_l1", lambda c: oc.clip_by_global_norm(c, ord=1),
            "max_norm", oc.clip_by_global_norm,
            lambda l, c: reference.clip_by_global_norm(l, c, 1)[0],
            _norm_bound(1), options=(("ord", 1),),
            row="clip_by_global_norm_l1"),
    Clipper("global_linf", lambda c: oc.clip_by_global_norm(c, ord="inf"),
            "max_norm", oc.clip_by_global_norm,
            lambda l, c: reference.clip_by_global_norm(l, c, math.inf)[0],
            _norm_bound(math.inf), options=(("ord", "inf"),),
            row="clip_by_global_norm_linf"),
    Clipper("per_tensor_l2", lambda c: oc.clip_by_norm(c), "max_norm",
            oc.clip_by_norm, lambda l, c: reference.clip_by_norm(l, c)[0],
            _leaf_bound(2), direction_kept=False,
            row="clip_by_norm"),
    Clipper("per_tensor_linf", lambda c: oc.clip_by_norm(c, ord=jnp.inf),
            "max_norm", oc.clip_by_norm,
            lambda l, c: reference.clip_by_norm(l, c, math.inf)[0],
            _leaf_bound(math.inf), direction_kept=False,
            options=(("ord", math.inf),),
            row="clip_by_norm"),
    Clipper("block_rms", lambda c: oc.clip_by_block_rms(c), "threshold",
            oc.clip_by_block_rms,
            lambda l, c: reference.clip_by_block_rms(l, c)[0], _rms_bound,
            direction_kept=False,
            row="clip_by_block_rms"),
    Clipper("value", lambda c: oc.clip_by_value(c), "max_value",
            oc.clip_by_value,
            lambda l, c: reference.clip_by_value(l, -c, c)[0], _value_bound,
            direction_kept=False,
            row="clip_by_value"),
    Clipper("clip_alias", lambda c: oc.clip(c), "max_delta", oc.clip,
            lambda l, c: reference.clip_by_value(l, -c, c)[0], _value_bound,
            direction_kept=False,
            row="clip"),
]

NORM_CLIPPERS = [c for c in CLIPPERS if c.name not in ("value", "clip_alias")]


def run(tx, updates, params=None, use_jit=False, state=None):
  """One update from a fresh (or given) state, optionally jitted."""
  if state is None:
    state = tx.init(updates if params is None else params)
  fn = maybe_jit(lambda u, s, p: tx.update(u, s, p), use_jit)
  return fn(updates, state, params)


def run_steps(tx, trees, use_jit=True, leaves=False):
  """Steps ``tx`` over a sequence of update trees from ``init(trees[0])``.

  Returns ``(outs, states)``: each step's updates (as float64 leaf lists if
  ``leaves``) and its state as host NumPy arrays.
  """
  update = maybe_jit(tx.update, use_jit)
  state = tx.init(trees[0])
  outs, states = [], []
  for tree in trees:
    out, state = update(tree, state)
    outs.append(leaves64(out) if leaves else out)
    states.append(jax.tree.map(np.asarray, state))
  return outs, states


def small_tree(rng: np.random.Generator, dtype=jnp.float32, scale=1.0) -> dict:
  """A small mixed-structure tree: dict, list, tuple, scalar, None leaf."""
  def arr(shape):
    return jnp.asarray(scale * rng.standard_normal(shape)).astype(dtype)
  return {
      "dense": {"kernel": arr((4, 3)), "bias": arr((3,))},
      "layers": [arr((2, 2, 2)), arr(())],
      "none": None,
  }


def leaves64(tree) -> list[np.ndarray]:
  return [np.asarray(x, dtype=np.float64) if not np.iscomplexobj(x)
          else np.asarray(x, dtype=np.complex128)
          for x in jax.tree.leaves(tree)]


# Overflow and underflow cases shared by the norm-kernel and clipper tests.
ORD_BY_NAME = {"l1": 1, "l2": 2, "linf": math.inf}


def big_tree():
  """Float32 elements near 1e20: every sum of squares overflows float32."""
  return {
    "w": jnp.asarray([[1e20, -2e20], [3e19, 0.0]], jnp.float32),
    "b": jnp.asarray([1e20, 5e19, -1e20], jnp.float32),
  }


def tiny_tree(scale=1e-20):
  """Elements whose squares flush to zero in float32."""
  return {
    "w": jnp.asarray(np.array([[1.0, -2.0], [0.5, 0.0]]) * scale, jnp.float32),
    "b": jnp.asarray(np.array([1.0, 3.0, -1.0]) * scale, jnp.float32),
  }


def assert_close_f64(actual, expected, rtol=1e-6):
  """``actual`` equals the float64 ``expected`` to ``rtol`` (no atol)."""
  np.testing.assert_allclose(
    np.asarray(actual, np.float64), expected, rtol=rtol, atol=0
  )


def orbax_round_trip(state: Any, path) -> Any:
  """``state`` saved with orbax's StandardCheckpointer at ``path`` and
  restored into a zeroed target of the same structure."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  return checkpointer.restore(path, jax.tree.map(jnp.zeros_like, state))
