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

Each transform runs in a clipping and a non-clipping configuration, on a small
tree with float32 and bfloat16 leaves (clip_per_example gets a batch of two
examples of that tree).
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


@dataclasses.dataclass(frozen=True)
class Case:
  """A transform in a clipping ("clips") and non-clipping ("passes") setup.

  Attributes:
    name: test id.
    make: regime -> GradientTransformation.
    per_example: updates are a batch of per-example gradients.
    standard_promotion: run under JAX's standard dtype promotion (see
      inject_hyperparams below).
    with_loss: ``update`` also gets a ``loss`` extra argument (computed
      from the updates, so it is an input of the exported function).
  """

  name: str
  make: Callable[[str], optax.GradientTransformation]
  per_example: bool = False
  standard_promotion: bool = False
  with_loss: bool = False


def _by(clips: float, passes: float) -> Callable[[str], float]:
  return lambda regime: clips if regime == "clips" else passes


# Gradients are ~N(0, 1) over 17 elements: a global L2 norm of about 4.
_NORM = _by(0.5, 100.0)

CASES = [
  Case("clip_by_value", lambda r: oc.clip_by_value(_NORM(r))),
  Case("clip", lambda r: oc.clip(_NORM(r))),
  Case("clip_by_norm", lambda r: oc.clip_by_norm(_NORM(r))),
  Case("global_norm_l2", lambda r: oc.clip_by_global_norm(_NORM(r))),
  Case("global_norm_l1", lambda r: oc.clip_by_global_norm(_NORM(r), ord=1)),
  Case(
    "global_norm_linf", lambda r: oc.clip_by_global_norm(_NORM(r), ord="inf")
  ),
  Case("clip_by_block_rms", lambda r: oc.clip_by_block_rms(_NORM(r))),
  # params == updates, so the unit-wise ratio |g|/|w| is 1.
  Case(
    "adaptive_grad_clip", lambda r: oc.adaptive_grad_clip(_by(0.01, 100.0)(r))
  ),
  # autoclip has no fixed threshold: the regimes differ in percentile.
  Case("autoclip", lambda r: oc.autoclip(_by(10.0, 100.0)(r), history_size=4)),
  Case("zclip", lambda r: oc.zclip(max_norm=_NORM(r), warmup_steps=1)),
  Case("adagc", lambda r: oc.adagc(lambda_abs=_NORM(r), warmup_steps=1)),
  Case(
    "skip_step_sgd",
    lambda r: oc.skip_step(
      optax.sgd(0.1),
      max_norm=_NORM(r),
      spike_sigmas=3.0,
      window=4,
      warmup_steps=1,
    ),
  ),
  Case(
    "skip_step_loss",
    lambda r: oc.skip_step(
      optax.sgd(0.1),
      max_norm=_NORM(r),
      loss_window=8,
      loss_warmup_steps=1,
      loss_spike_sigmas=_by(0.5, 100.0)(r),
    ),
    with_loss=True,
  ),
  Case(
    "global_norm_groups",
    lambda r: oc.clip_by_global_norm(
      _NORM(r), groups={"kernel": "k", "bias": "b", "scale": None}
    ),
  ),
  Case("clip_norm_growth", lambda r: oc.clip_norm_growth(_by(1.01, 100.0)(r))),
  Case("spam_clip", lambda r: oc.spam_clip(_by(5000.0, 1e5)(r), warmup_steps=1)),
  Case(
    "momentum_reset_sgd",
    lambda r: oc.momentum_reset(
      optax.sgd(0.1, momentum=0.9),
      interval=1 if r == "clips" else 100,
      warmup_steps=2,
    ),
  ),
  # AdaClip trims a little even at theta = 0.01 on the 3x second step, so
  # the regimes differ in theta only.
  Case("adaclip", lambda r: oc.adaclip(theta=_by(0.999, 0.01)(r))),
  # The regimes cover the per-tensor and the global statistic.
  Case("adagn", lambda r: oc.adagn(per_tensor=(r == "clips"))),
  # "clips" adds DP-SGD Gaussian noise, drawn from the PRNG key the state
  # carries (seeded by ``seed``, split every step); "passes" adds none (the
  # noise std is proportional to the large threshold) and adapts the
  # threshold instead.
  Case(
    "clip_per_example",
    lambda r: oc.clip_per_example(
      _NORM(r),
      noise_multiplier=1.0 if r == "clips" else None,
      seed=7,
      target_quantile=None if r == "clips" else 0.5,
    ),
    per_example=True,
  ),
  # optax (0.2.8) inject_hyperparams computes the params' highest dtype with
  # jnp.promote_types, which strict promotion rejects for a float32/bfloat16
  # tree; optaxclip's own code runs under strict promotion everywhere else.
  Case(
    "inject_hyperparams_global_norm",
    lambda r: optax.inject_hyperparams(oc.clip_by_global_norm)(
      max_norm=_NORM(r)
    ),
    standard_promotion=True,
  ),
]

REGIMES = ("clips", "passes")

PARAMS = [
  pytest.param(case, regime, id=f"{case.name}-{regime}")
  for case in CASES
  for regime in REGIMES
]


def _params_tree() -> dict:
  rng = np.random.default_rng(0)
  return {
    "kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
    "bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    "scale": jnp.asarray(rng.standard_normal((2,)), jnp.bfloat16),
  }


@dataclasses.dataclass
class Setup:
  promotion: str
  update: Callable[..., Any]  # the jitted tx.update
  args: tuple  # (updates, fresh state, params)
  args_next: tuple  # (3 * updates, state after one step, params)


@functools.cache
def _setup(case: Case, regime: str) -> Setup:
  """Builds (once per case) the transform, its jitted update and arguments."""
  promotion = "standard" if case.standard_promotion else "strict"
  params = _params_tree()
  updates = params
  if case.per_example:
    updates = jax.tree.map(lambda x: jnp.stack([x, -2 * x]), params)
  tx = case.make(regime)
  if case.with_loss:
    update = jax.jit(
      lambda u, s, p: tx.update(u, s, p, loss=jnp.sum(u["kernel"] ** 2))
    )
  else:
    update = jax.jit(tx.update)
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


def _export(setup: Setup, platforms) -> export.Exported:
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


@pytest.mark.parametrize("case, regime", PARAMS)
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
  tree = _params_tree()
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
