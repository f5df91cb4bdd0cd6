"""Library-wide rules, checked on every row of the registry.

* Every public transform has a registry row (so it gets every generic suite).
* Integer and bool gradient leaves: a ``TypeError`` naming the leaf's path,
  whatever the transform.
* ``update(updates, None)`` (as optax's own clipping tests call it): the
  transforms whose state only records diagnostics rebuild it and give exactly
  the result of ``update(updates, init(params))``; the transforms that carry
  history between steps raise a ``ValueError`` that says to call ``init``.
* ``optax.inject_hyperparams`` with every numeric argument traced gives the
  plain transform's result.
* States are ``<Factory>State`` NamedTuples whose field names are unique
  across the library (so ``clip_stats`` keys and logs are unambiguous).
"""

from __future__ import annotations

import inspect
import numbers

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry
from helpers import maybe_jit

import optaxclip as oc

ROWS = registry.ROWS
DIAGNOSTIC_ONLY = [r for r in ROWS if not r.keeps_history]
WITH_HISTORY = [r for r in ROWS if r.keeps_history]


def test_every_public_transform_has_a_registry_row():
  states = {n for n in oc.__all__ if n.endswith("State")}
  factories = set(oc.__all__) - states - registry.NOT_TRANSFORMS
  covered = {r.factory.__name__ for r in ROWS}
  assert factories <= covered, sorted(factories - covered)
  # and the exclusions are still public (a stale name hides nothing).
  assert set(oc.__all__) >= registry.NOT_TRANSFORMS
  names = [r.name for r in ROWS]
  assert len(names) == len(set(names)), names


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_registry_row_makes_an_extra_args_transform(row):
  for make in (row.make, row.passing):
    if make is not None:
      assert isinstance(make(), optax.GradientTransformationExtraArgs)


_INT_DTYPES = [jnp.int32, jnp.uint8, jnp.bool_]


def _leaf_message(fn: str, tree: str, dtype) -> str:
  return (
    rf"^{fn}: every leaf of {tree} must be a floating-point \(or complex\)"
    rf" array, but the leaf at 'step/count' has dtype {np.dtype(dtype).name}"
  )


@pytest.mark.parametrize("row", ROWS, ids=repr)
@pytest.mark.parametrize("dtype", _INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_integer_and_bool_leaves_are_a_type_error_naming_the_path(
  row, dtype, use_jit
):
  tx = row.make()
  params = registry.params(row)
  state = tx.init(params)
  bad = dict(registry.updates(row, params))
  shape = (registry.BATCH,) if row.per_example else ()
  bad["step"] = {"count": jnp.zeros(shape, dtype)}
  update = maybe_jit(registry.update_fn(row, tx), use_jit)
  # A wrapper may leave the check to the transform it wraps.
  fn = r"\w+" if row.wrapper else row.factory.__name__
  with pytest.raises(TypeError, match=_leaf_message(fn, "updates", dtype)):
    update(bad, state, params)


@pytest.mark.parametrize(
  "fn", [oc.global_norm, oc.tree_norms], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("dtype", _INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_norm_functions_reject_integer_leaves_naming_the_path(fn, dtype):
  tree = {"w": jnp.ones(3), "step": {"count": jnp.zeros((2,), dtype)}}
  with pytest.raises(TypeError, match=r"step/count.*" + np.dtype(dtype).name):
    fn(tree)


def test_low_precision_and_complex_leaves_pass_the_leaf_check():
  tree = {
    "bf16": jnp.ones(2, jnp.bfloat16),
    "f16": jnp.ones(2, jnp.float16),
    "c64": jnp.ones(2, jnp.complex64),
  }
  np.testing.assert_allclose(float(oc.global_norm(tree)), np.sqrt(6.0))


@pytest.mark.parametrize("row", DIAGNOSTIC_ONLY, ids=repr)
def test_state_none_rebuilds_a_diagnostic_state(row, use_jit):
  tx = row.make()
  params = registry.params(row, seed=1)
  grads = registry.updates(row, params, scale=-1.5)
  update = maybe_jit(registry.update_fn(row, tx), use_jit)
  want = update(grads, tx.init(params), params)
  got = update(grads, None, params)
  if use_jit:  # two programs (state an input or rebuilt) may round apart
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)
  else:
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("row", WITH_HISTORY, ids=repr)
def test_state_none_on_a_transform_with_history_says_call_init(row):
  tx = row.make()
  params = registry.params(row, seed=2)
  message = (
    rf"^{row.factory.__name__}: update\(\) got state=None, but this"
    r" transform keeps history between steps\. Create the state first:"
    r" state = tx\.init\(params\)"
  )
  with pytest.raises(ValueError, match=message):
    registry.update_fn(row, tx)(registry.updates(row, params), None, params)


def _numeric_arguments(row: registry.Row) -> dict:
  """Every real-number argument of the factory (threshold and defaults)."""
  kwargs = {}
  for name, p in inspect.signature(row.factory).parameters.items():
    value = p.default
    if name == row.threshold_arg and value is inspect.Parameter.empty:
      value = 0.5
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
      kwargs[name] = value
  return kwargs


_INJECTABLE = [r for r in ROWS if not r.wrapper and _numeric_arguments(r)]


@pytest.mark.parametrize("row", _INJECTABLE, ids=repr)
@pytest.mark.usefixtures("standard_promotion")  # optax's dtype of hyperparams
def test_inject_hyperparams_with_every_number_traced(row):
  kwargs = _numeric_arguments(row)
  params = registry.params(row, seed=3)
  grads = registry.updates(row, params, scale=2.0)
  plain = row.factory(**kwargs)
  injected = optax.inject_hyperparams(row.factory)(**kwargs)
  step_plain = jax.jit(registry.update_fn(row, plain))
  step_injected = jax.jit(registry.update_fn(row, injected))
  state_plain, state_injected = plain.init(params), injected.init(params)
  for _ in range(2):
    want, state_plain = step_plain(grads, state_plain, params)
    got, state_injected = step_injected(grads, state_injected, params)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)
  assert set(state_injected.hyperparams) == set(kwargs)


def _state_classes() -> list[type]:
  return [getattr(oc, n) for n in oc.__all__ if n.endswith("State")]


def test_state_field_names_are_unique_and_annotated():
  seen: dict[str, str] = {}
  for cls in _state_classes():
    assert issubclass(cls, tuple) and hasattr(cls, "_fields"), cls
    assert set(cls.__annotations__) == set(cls._fields), cls
    for field in cls._fields:
      assert field not in seen, (field, cls.__name__, seen.get(field))
      seen[field] = cls.__name__


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_state_is_the_factorys_state_and_plain_arrays(row):
  tx = row.make()
  state = tx.init(registry.params(row))
  name = type(state).__name__
  if not isinstance(state, optax.EmptyState):  # clip(), as optax.clip
    # Acronyms keep their case (AdaGCState): compare case-insensitively.
    want = row.factory.__name__.replace("_", "").lower()
    assert name.lower().startswith(want) and name.endswith("State"), name
    assert getattr(oc, name) is type(state), name
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, (jax.Array, np.ndarray)), type(leaf)


# ---------------------------------------------------------------------------
# Hostile inputs every transform must survive: low-precision trees, zeros,
# the empty tree. (Per-transform semantics of inf and NaN are in each
# transform's own test file.)


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


# float32 is every other suite's tree (the default tree mixes float32 and
# bfloat16 leaves).
@pytest.mark.parametrize("row", ROWS, ids=repr)
@pytest.mark.parametrize(
  "dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: np.dtype(d).name
)
def test_low_precision_trees_keep_dtype_and_shape_and_stay_finite(row, dtype):
  tx = row.make()
  params = _cast(registry.params(row, seed=4), dtype)
  step = jax.jit(registry.update_fn(row, tx))
  state = tx.init(params)
  for scale in (1.0, 0.0, 3.0):  # zeros in between: no absorbing state
    grads = registry.updates(row, params, scale)
    out, state = step(grads, state, params)
    want = params if row.per_example else grads
    chex.assert_trees_all_equal_shapes_and_dtypes(out, want)
    for leaf in jax.tree.leaves(out):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (scale, leaf)


@pytest.mark.parametrize(
  "row", [r for r in ROWS if r.tree is registry.default_tree], ids=repr
)
def test_a_tree_with_none_leaves_and_empty_subtrees(row, use_jit):
  params = dict(registry.params(row, seed=5), none=None, empty={})
  tx = row.make()
  grads = registry.updates(row, params)
  out, _ = maybe_jit(registry.update_fn(row, tx), use_jit)(
    grads, tx.init(params), params
  )
  assert out["none"] is None and out["empty"] == {}
  chex.assert_trees_all_equal_shapes_and_dtypes(
    out["kernel"], params["kernel"] if row.per_example else grads["kernel"]
  )


# ---------------------------------------------------------------------------
# clip_stats: every transform's diagnostics, keyed by the transform's name.


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_clip_stats_keys_name_the_transform_and_values_are_arrays(row):
  tx = row.make()
  params = registry.params(row)
  step = jax.jit(registry.update_fn(row, tx))
  _, state = step(registry.updates(row, params), tx.init(params), params)
  stats = oc.clip_stats(state)
  assert bool(stats) == row.stats, sorted(stats)
  # A wrapper's diagnostics may be its inner clipper's (shadow).
  names = {n for n in oc.__all__ if not n.endswith("State")}
  for key, value in stats.items():
    first = key.split("/")[0]
    assert first == row.factory.__name__ or (row.wrapper and first in names)
    assert isinstance(value, jax.Array), (key, type(value))
  # The same keys from a chain with the transform in it, and under jit.
  chained = optax.chain(optax.identity(), tx)
  _, chain_state = jax.jit(registry.update_fn(row, chained))(
    registry.updates(row, params), chained.init(params), params
  )
  assert set(jax.jit(oc.clip_stats)(chain_state)) == set(stats)


# ---------------------------------------------------------------------------
# Constant leaves inside jit. A zero leaf made inside the jitted step (as
# optax.set_to_zero does for a frozen layer, or a zero-initialised bias when
# init runs in the same jit) is a compile-time constant, and XLA's algebraic
# simplifier regroups products of constants: the overflow rescue's
# ``(x * 2**80)**2`` once became ``(2**80)**2 * x**2 = inf * 0 = NaN``.


@pytest.mark.parametrize("value", [0.0, 1e-30, 1e30], ids=["zero", "tiny", "huge"])
@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_uniform_constant_leaves_inside_jit_match_eager(row, value):
  params = registry.params(row, seed=6)
  leaves, treedef = jax.tree.flatten(params)
  # One leaf of a single repeated value, in params and gradients alike.
  leaves[0] = jnp.full_like(leaves[0], value)
  params = jax.tree.unflatten(treedef, leaves)
  grads = registry.updates(row, params)

  def step():
    tx = row.make()
    return registry.update_fn(row, tx)(grads, tx.init(params), params)

  with jax.disable_jit():
    want = step()
  got = jax.jit(step)()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all() or not np.isfinite(b).all(), (a, b)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=0)
