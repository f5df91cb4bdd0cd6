"""How the compiled programs are laid out on XLA:CPU, counted, not timed.

XLA's CPU backend compiles every *distinct* fused computation once (tens of
milliseconds each) and every call site costs a little more, so a transform
whose per-leaf kernels differ from leaf to leaf compiles in time that grows
with the number of leaves, where optax's grows with the number of distinct
shapes. These tests count the distinct fused computations and the
``conditional`` ops in the optimized HLO of one jitted update, on trees of
few and of more leaves of one shape, and require the count not to grow
with the leaves, and bound the kernel calls per leaf. They are the deterministic side of the compile-time rows
in ``benchmarks/`` (which time the same programs): a regression shows here
as a count, independent of the machine's speed.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaxclip as oc

pytestmark = pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="counts XLA:CPU's kernels"
)


def _hlo(tx, tree) -> str:
  state = tx.init(tree)
  return (
    jax.jit(lambda g, s: tx.update(g, s, g)).lower(tree, state).compile()
  ).as_text()


def calls(tx, tree) -> int:
  """How many fused computations ``tx.update`` calls (both branches of a
  conditional counted)."""
  return len(re.findall(r"kind=k\w+, calls=%", _hlo(tx, tree)))


def kernels(tx, tree) -> tuple[int, int]:
  """``(distinct fused computations, conditionals)`` of ``tx.update``."""
  text = _hlo(tx, tree)
  bodies = {}
  for m in re.finditer(
    r"^%?([\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", text, re.S | re.M
  ):
    body = re.sub(r"%[\w.\-]+", "%x", m.group(2))
    bodies[m.group(1)] = re.sub(r", metadata=\{[^}]*\}", "", body)
  called = re.findall(r"kind=k\w+, calls=%([\w.\-]+)", text)
  assert called, "no fusions found: the HLO text format changed"
  distinct = len({bodies[c] for c in called if c in bodies})
  return distinct, text.count(" conditional(")


def _tree(n: int, shape: tuple[int, ...]) -> dict:
  rng = np.random.default_rng(n)
  return {
    f"w{i:02d}": jnp.asarray(rng.standard_normal(shape), jnp.float32)
    for i in range(n)
  }


# (256, 128) has 2**15 elements: a large leaf, reduced on its own; (64,) is
# a small one, reduced in a stack with the others of its shape.
SHAPES = {"large": (256, 128), "small": (64,)}

TRANSFORMS = {
  "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.05),
  "clip_by_norm": lambda: oc.clip_by_norm(1.0),
  "clip_by_block_rms": lambda: oc.clip_by_block_rms(0.5),
  "adagc": lambda: oc.adagc(warmup_steps=1),
  "record_norms": oc.record_norms,
  "tree_norms_state": lambda: oc.record_norms(ord=1),
}


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_distinct_kernels_do_not_grow_with_the_leaves(name, size):
  few = kernels(TRANSFORMS[name](), _tree(3, SHAPES[size]))
  more = kernels(TRANSFORMS[name](), _tree(12, SHAPES[size]))
  # Nine more leaves: a kernel per leaf would add nine. A reduction over
  # more entries may add a step or two (XLA:CPU splits long reductions).
  assert more[0] <= few[0] + 3, (few, more)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_one_overflow_rescue_for_all_large_leaves(name):
  _, conds = kernels(TRANSFORMS[name](), _tree(12, SHAPES["large"]))
  assert conds == 1


# Per large leaf: its reduction and its update, the read of its scale from
# the vector of scales (clippers), and in the rescue branch (compiled, run
# only for an overflowing sum) the read of its rescue scale and the scaled
# sum. The per-leaf chains of scalar kernels this replaced cost 7-10.
CALLS_PER_LEAF = {
  # Two arrays per leaf (gradient and parameter), per-unit norms.
  "adaptive_grad_clip": 18,
  "clip_by_norm": 5,
  "clip_by_block_rms": 5,
  "adagc": 5,
  "record_norms": 3,
  "tree_norms_state": 3,
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_kernel_calls_per_large_leaf(name):
  few = calls(TRANSFORMS[name](), _tree(3, SHAPES["large"]))
  more = calls(TRANSFORMS[name](), _tree(12, SHAPES["large"]))
  assert (more - few) / 9 <= CALLS_PER_LEAF[name], (few, more)
