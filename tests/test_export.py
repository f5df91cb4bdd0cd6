"""Every transform lowers for every platform, with no host or custom calls.

For each public transform, its jitted ``update`` is exported with
``jax.export`` for ``cpu``, ``cuda``, ``rocm`` and ``tpu`` at once (lowering
needs no device of those kinds). The exported StableHLO must be portable:

* no ``custom_call`` of any target (a custom call is a backend-specific
  kernel, e.g. LAPACK on CPU or cuSOLVER on GPU, that another platform may
  lack and whose ABI is only promised for a fixed list of targets);
* no host callback (``pure_callback``/``io_callback``/``jax.debug``: the
  ``xla_*python*_callback`` custom calls), host transfer (``send``/``recv``,
  ``infeed``/``outfeed``, ``_xla_host_transfer``), host memory or host
  compute annotation, and no effect token (ordered side effects);
* no JAX effects recorded on the ``Exported``.

Then the export runs on CPU and must reproduce the jitted function bit for
bit (updates and state), from a fresh state and from the state after one
step, and so must the module after ``serialize``/``deserialize`` (needs the
``flatbuffers`` package, which JAX's serializer imports; the test skips
without it).

Every row of ``tests/registry.py`` runs in its acting and (if it has one) its
passing configuration, on the registry's small tree with float32 and bfloat16
leaves (per-example rows get a batch of two examples of that tree).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import optaxclip as oc
import registry

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

# custom_call targets that would be acceptable. Under the GSPMD partitioner
# (jax 0.5's default) JAX emits custom calls that are sharding annotations,
# not kernels: ``@Sharding`` (``with_sharding_constraint``, explicit in/out
# shardings) and ``@SPMDFullToShardShape``/``@SPMDShardToFullShape`` (around
# ``shard_map`` bodies). Every backend's SPMD partitioner consumes them, so
# they would not make a module platform-specific. Shardy (the default on jax
# 0.10) writes ``sdy.*`` ops instead. Both appear only when the traced code
# annotates shardings; optaxclip annotates none, and these single-device
# exports contain no custom call on jax 0.5 or 0.10 (checked), so none is
# allowed. If the library starts to annotate shardings, allow those names
# here.
ALLOWED_CUSTOM_CALLS: frozenset[str] = frozenset()

# Substrings (matched case-insensitively, in the module without debug
# locations) that mark host interaction or side effects. "callback" covers
# the host-callback targets (xla_python_cpu_callback,
# xla_ffi_python_cpu_callback, xla_python_gpu_callback,
# xla_ffi_python_gpu_callback, the old host_callback); "host" covers those too
# and host transfers (_xla_host_transfer), host memory spaces (pinned_host,
# unpinned_host) and host compute (compute_on("device_host")).
FORBIDDEN_SUBSTRINGS = (
  "callback",
  "host",
  "stablehlo.send",
  "stablehlo.recv",
  "stablehlo.infeed",
  "stablehlo.outfeed",
  "!stablehlo.token",
)

# ``loc(...)`` debug locations name source files and functions; they are not
# part of the computation (a path containing "host" must not fail the test).
_LOC_DEF = re.compile(r"^#loc\w*\s*=.*$", re.MULTILINE)
_LOC_REF = re.compile(r"\s*loc\((?:\"(?:[^\"\\]|\\.)*\"|[^()\"])*\)")
_CUSTOM_CALL_TARGET = re.compile(
  r"custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*\"([^\"]*)\""
)


def _strip_debug_info(text: str) -> str:
  return _LOC_REF.sub("", _LOC_DEF.sub("", text))


def _portability_problems(text: str) -> list[str]:
  """The lines of a StableHLO module that are not portable (see above)."""
  problems = []
  for line in _strip_debug_info(text).splitlines():
    lowered = line.lower()
    if "custom_call" in lowered:
      targets = [a or b for a, b in _CUSTOM_CALL_TARGET.findall(line)]
      if not targets or any(t not in ALLOWED_CUSTOM_CALLS for t in targets):
        problems.append(f"custom call {targets}: {line.strip()}")
        continue
    for word in FORBIDDEN_SUBSTRINGS:
      if word in lowered:
        problems.append(f"{word!r}: {line.strip()}")
        break
  return problems


def _assert_portable(exported: export.Exported) -> None:
  assert tuple(exported.platforms) == PLATFORMS
  assert exported.nr_devices == 1
  assert not exported.ordered_effects
  assert not exported.unordered_effects
  problems = _portability_problems(exported.mlir_module())
  assert not problems, "\n".join(problems)


def _assert_identical(actual: Any, expected: Any) -> None:
  """Same tree structure, dtypes, shapes and bits (so -0.0 != 0.0)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)
    uint = np.dtype(f"u{a.dtype.itemsize}")
    np.testing.assert_array_equal(a.view(uint), e.view(uint))


def _register_namedtuples(tree: Any) -> None:
  """Registers the tree's NamedTuple nodes (the states) for serialization.

  ``Exported.serialize`` stores the in/out pytree structure and rejects
  node types it does not know; NamedTuples must be registered once per
  process under a unique name (a second registration raises ValueError,
  e.g. if the library or another test already registered the type).
  """

  def walk(treedef):
    node = treedef.node_data()
    if node is not None:
      cls = node[0]
      if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        with contextlib.suppress(ValueError):
          export.register_namedtuple_serialization(
            cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}"
          )
    for child in treedef.children():
      walk(child)

  walk(jax.tree.structure(tree))


# ---------------------------------------------------------------------------
# The transforms under test.


# The registry's rows, each in its acting ("clips") configuration and, if it
# has one, its passing ("passes") one, plus inject_hyperparams.

# optax (0.2.8) inject_hyperparams computes the params' highest dtype with
# jnp.promote_types, which strict promotion rejects for a float32/bfloat16
# tree; optaxclip's own code runs under strict promotion everywhere else.
INJECTED = registry.Row(
  "inject_hyperparams_global_norm",
  oc.clip_by_global_norm,
  lambda: optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=0.5),
  lambda: optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=100.0),
)
STANDARD_PROMOTION = {INJECTED.name}
CASES = [*registry.ROWS, INJECTED]
REGIMES = ("clips", "passes")

PARAMS = [
  pytest.param(case, regime, id=f"{case.name}-{regime}")
  for case in CASES
  for regime in REGIMES
  if regime == "clips" or case.passing is not None
]


@dataclasses.dataclass(eq=False)  # hashed by identity (_export caches on it)
class Setup:
  promotion: str
  update: Callable[..., Any]  # the jitted tx.update
  args: tuple  # (updates, fresh state, params)
  args_next: tuple  # (3 * updates, state after one step, params)


@functools.cache
def _setup(case: registry.Row, regime: str) -> Setup:
  """Builds (once per case) the transform, its jitted update and arguments."""
  promotion = "standard" if case.name in STANDARD_PROMOTION else "strict"
  params = registry.params(case)
  updates = registry.updates(case, params)
  tx = (case.make if regime == "clips" else case.passing)()
  update = jax.jit(registry.update_fn(case, tx))
  with jax.numpy_dtype_promotion(promotion):
    state = tx.init(params)
    _, state_next = update(updates, state, params)
  updates_next = jax.tree.map(lambda x: x * 3, updates)
  return Setup(
    promotion,
    update,
    (updates, state, params),
    (updates_next, state_next, params),
  )


def _check_calls(exported: export.Exported, setup: Setup) -> None:
  """``exported.call`` equals the jitted update, fresh and after a step."""
  with jax.numpy_dtype_promotion(setup.promotion):
    for args in (setup.args, setup.args_next):
      _assert_identical(exported.call(*args), setup.update(*args))


@functools.cache
def _export(setup: Setup, platforms) -> export.Exported:
  # Cached: the serialization test re-uses the modules exported above.
  with jax.numpy_dtype_promotion(setup.promotion):
    return export.export(setup.update, platforms=platforms)(*setup.args)


# ---------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("case, regime", PARAMS)
def test_lowers_for_every_platform(case, regime):
  setup = _setup(case, regime)
  exported = _export(setup, PLATFORMS)
  _assert_portable(exported)
  # The multi-platform module also runs here (it dispatches on the platform
  # index). Once per transform, as every call compiles; the CPU-only export
  # below runs both regimes.
  if regime == "clips":
    _check_calls(exported, setup)


# The acting regime's CPU module is called by the serialization test below
# (after a round trip), and its multi-platform module above.
@pytest.mark.parametrize(
  "case, regime", [p for p in PARAMS if p.values[1] == "passes"]
)
def test_cpu_export_matches_jit(case, regime):
  setup = _setup(case, regime)
  exported = _export(setup, ("cpu",))
  assert tuple(exported.platforms) == ("cpu",)
  _check_calls(exported, setup)


# One regime per transform: each restored module compiles again to be called.
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_serialize_round_trip(case):
  pytest.importorskip(
    "flatbuffers",
    reason="jax.export serialization needs the flatbuffers package",
  )
  setup = _setup(case, "clips")
  _register_namedtuples(setup.args)
  restored = {}
  for platforms in (("cpu",), PLATFORMS):
    exported = _export(setup, platforms)
    restored[platforms] = export.deserialize(exported.serialize())
    assert restored[platforms].platforms == exported.platforms
    assert restored[platforms].in_tree == exported.in_tree
    assert restored[platforms].out_tree == exported.out_tree
    assert restored[platforms].in_avals == exported.in_avals
    assert restored[platforms].out_avals == exported.out_avals
    assert restored[platforms].mlir_module() == exported.mlir_module()
  # Running the restored multi-platform module too would add a compile per
  # case for no new coverage: its text equals the module run above.
  _check_calls(restored[("cpu",)], setup)


@pytest.mark.parametrize("ord", [2, 1, "inf"], ids=["l2", "l1", "linf"])
def test_global_norm_lowers_for_every_platform(ord):  # pylint: disable=redefined-builtin
  tree = registry.params(registry.by_name("clip_by_global_norm"))
  norm = jax.jit(functools.partial(oc.global_norm, ord=ord))
  exported = export.export(norm, platforms=PLATFORMS)(tree)
  _assert_portable(exported)
  _assert_identical(exported.call(tree), norm(tree))


# ---------------------------------------------------------------------------
# The checker itself must catch what it looks for (a regex that silently
# matches nothing would pass every transform).


def test_checker_flags_custom_call():
  # LAPACK's eigh is a custom call that jax.export itself accepts (its target
  # is on JAX's stable list), so only our check stands in its way.
  exported = export.export(
    jax.jit(lambda a: jnp.linalg.eigh(a)[0]), platforms=("cpu",)
  )(jnp.eye(3, dtype=jnp.float32))
  problems = _portability_problems(exported.mlir_module())
  assert any(p.startswith("custom call") for p in problems), problems


def test_checker_flags_host_callback():
  # jax.export refuses host callbacks outright; check the lowered text too.
  def f(x):
    return jax.pure_callback(
      lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x
    )

  x = jnp.ones((3,), jnp.float32)
  with pytest.raises(NotImplementedError, match="host_callbacks"):
    export.export(jax.jit(f), platforms=("cpu",))(x)
  problems = _portability_problems(jax.jit(f).lower(x).as_text())
  assert any("callback" in p for p in problems), problems


def test_checker_ignores_debug_locations():
  text = (
    '%0 = stablehlo.add %a, %b : tensor<f32> loc("/home/host/cb.py":1)\n'
    '#loc3 = loc("/srv/localhost/callback.py":3:4)\n'
  )
  assert not _portability_problems(text)


# The backend policy: what exists only because XLA:CPU compiles or runs it
# faster (small leaves bucketed or stacked, optimization barriers) is in the
# program lowered for CPU only; cuda, rocm and tpu get the plain program (one
# reduction per leaf). jax < 0.6 lowers both programs and leaves the choice
# to XLA, so only newer jax shows the difference in the exported text.
@pytest.mark.skipif(
  tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 6),
  reason="jax < 0.6 keeps every platform's program in the StableHLO",
)
@pytest.mark.parametrize(
  "make",
  [
    lambda: oc.clip_by_global_norm(1.0),
    lambda: oc.clip_by_block_rms(1.0),
    lambda: oc.record_norms(),
  ],
  ids=["clip_by_global_norm", "clip_by_block_rms", "record_norms"],
)
def test_cpu_tuning_is_lowered_for_cpu_only(make):
  # Small leaves of one shape (bucketed/stacked on CPU) and a large one.
  tree = {f"b{i}": jnp.ones((8,), jnp.float32) for i in range(6)}
  tree["w"] = jnp.ones((256, 256), jnp.float32)
  tx = make()
  state = tx.init(tree)

  def text(platform: str) -> str:
    exp = export.export(
      jax.jit(lambda g, s: tx.update(g, s)), platforms=(platform,)
    )(tree, state)
    return exp.mlir_module()

  cpu = text("cpu")
  # On CPU the six small leaves are reduced together (bucketed or stacked):
  # no reduction of one small leaf on its own.
  one_small_leaf = "(tensor<8xf32>, tensor<f32>) -> tensor<f32>"
  assert one_small_leaf not in cpu
  for platform in ("cuda", "rocm", "tpu"):
    plain = text(platform)
    # The only barriers left wrap one leaf each, as it enters the overflow
    # rescue (a numerics guard, on every platform: see _norms); the CPU
    # tuning's barriers over several values or over a bucket are gone.
    leaf_types = {"tensor<8xf32>", "tensor<256x256xf32>"}
    for line in plain.splitlines():
      if "= stablehlo.optimization_barrier" in line:
        operands, types = line.split("optimization_barrier", 1)[1].split(":")
        assert operands.strip().startswith("%arg"), (platform, line)
        assert "," not in operands, (platform, line)
        assert types.split(" loc(")[0].strip() in leaf_types, (platform, line)
    # At least one reduction per leaf: nothing was bucketed or stacked.
    assert plain.count("stablehlo.reduce") >= len(tree), platform
    assert plain.count(one_small_leaf) >= 6, platform
