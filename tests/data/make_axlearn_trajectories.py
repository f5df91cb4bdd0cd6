"""Makes axlearn_trajectories.npz: axlearn's skip_and_clip_by_global_norm.

Runs axlearn's own ``skip_and_clip_by_global_norm``,
``drop_norm_by_grad_norm_ema`` and ``drop_norm_by_grad_norm_stddev`` from
``apple/axlearn``, file ``axlearn/common/optimizers.py``, commit
c8624c837c55f39d8e8fc4e513d54b7e19d108f6 (2026-05-16). The module imports
most of axlearn (and the released wheels are two years older than these
rules), so the script reads the file from a checkout, given as its only
argument, and executes just those definitions, with stand-ins for the four
axlearn helpers they touch: ``PartitionedGradientTransformation`` (a plain
init/update/partition triple), ``maybe_instantiate`` (the identity: the
arguments are already instances), ``current_context`` (``None``: no
summaries) and the type aliases.

The wrapped optimizer is ``optax.adam(0.01)``, so the recorded updates also
show that a dropped step leaves Adam's moments untouched. Inputs are seeded
float32 gradients (a (5,) and a (3, 4) leaf, ``{"b", "w"}``) with slowly
drifting scale, spikes of 3x to 300x, a NaN element at step 60 and an inf at
step 61:

* ``mean``: ``drop_norm=drop_norm_by_grad_norm_ema(multipliers=(3, 10))``,
  ``grad_norm_ema_decay=0.9``, ``max_norm=2.0``;
* ``stddev``: ``drop_norm=drop_norm_by_grad_norm_stddev(min_count=20,
  multipliers=(3, 6))``, ``grad_norm_ema_decay=0.95``, no ``max_norm``;
* ``fixed``: ``drop_norm=8.0``, ``max_norm=1.5``;
* ``jitter``: 40 steps of one gradient whose scale varies by 1e-5 (seeded),
  ``drop_norm_by_grad_norm_stddev(min_count=3)`` (multipliers 20, 40, 100),
  ``grad_norm_ema_decay=0.9``: axlearn's ``sqrt(square_ema - ema**2)`` is
  then rounding noise, turns NaN, and every later step drops (the case
  where optaxclip documents a deviation).

Produced with (jax 0.10.2, optax 0.2.8, numpy 2.4.6):

  python tests/data/make_axlearn_trajectories.py \
    <axlearn checkout>/axlearn/common/optimizers.py

Arrays (for each case ``c``): ``c_b`` float32[T, 5], ``c_w`` float32[T, 3,
4] the inputs; ``c_out_b``, ``c_out_w`` the updates; ``c_count``,
``c_nonvalid_count`` int32[T]; ``c_ema``, ``c_square_ema`` float32[T] (not
for ``fixed``); ``c_exceeds_<key>`` int32[T], the ``drop_stats`` counters.
"""

from __future__ import annotations
import __future__

import ast
import pathlib
import sys
import typing
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import typing_extensions

NAMES = (
  "DropNormThresholdFn",
  "drop_norm_by_grad_norm_ema",
  "drop_norm_by_grad_norm_stddev",
  "SkipClipState",
  "skip_and_clip_by_global_norm",
)
STEPS = 160
_JITTER_BASE = np.linspace(0.1, 1.7, 17).astype(np.float32)


class PartitionedGradientTransformation(NamedTuple):
  init: Any
  update: Any
  partition: Any


def _load(path: str) -> dict[str, Any]:
  tree = ast.parse(pathlib.Path(path).read_text())
  nodes = [n for n in tree.body if getattr(n, "name", None) in NAMES]
  assert len(nodes) == len(NAMES), [n.name for n in nodes]
  module = ast.Module(body=nodes, type_ignores=[])
  namespace: dict[str, Any] = {
    "Any": Any,
    "NamedTuple": NamedTuple,
    "Optional": Optional,
    "Union": Union,
    "typing": typing,
    "typing_extensions": typing_extensions,
    "jax": jax,
    "jnp": jnp,
    "optax": optax,
    "PartitionedGradientTransformation": PartitionedGradientTransformation,
    "maybe_instantiate": lambda x: x,
    "current_context": lambda: None,
  }
  flags = __future__.annotations.compiler_flag
  exec(compile(module, path, "exec", flags=flags), namespace)
  return namespace


def _sequence(rng: np.random.Generator) -> np.ndarray:
  seq = []
  for t in range(STEPS):
    scale = np.exp(0.2 * rng.normal()) * (1 + t / 80)
    if rng.random() < 0.1:
      scale *= rng.uniform(3, 300)
    seq.append(rng.normal(size=17) * scale)
  seq = np.asarray(seq, np.float32)
  seq[60, 3] = np.nan
  seq[61, 0] = np.inf
  return seq


def _run(tx, seq) -> dict[str, np.ndarray]:
  params = {"b": jnp.zeros(5), "w": jnp.zeros((3, 4))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rows: dict[str, list] = {}
  for g in seq:
    grads = {"b": jnp.asarray(g[:5]), "w": jnp.asarray(g[5:].reshape(3, 4))}
    out, state = update(grads, state, params)
    record = {
      "out_b": out["b"],
      "out_w": out["w"],
      "nonvalid_count": state.nonvalid_count,
    }
    if state.count is not None:
      record["count"] = state.count
      record["ema"] = state.grad_norm_ema
      record["square_ema"] = state.grad_norm_square_ema
    for key, value in (state.drop_stats or {}).items():
      record[f"exceeds_{key}"] = value
    for key, value in record.items():
      rows.setdefault(key, []).append(np.asarray(value))
  arrays = {k: np.stack(v) for k, v in rows.items()}
  arrays["b"] = seq[:, :5]
  arrays["w"] = seq[:, 5:].reshape(len(seq), 3, 4)
  return arrays


def main() -> None:
  axlearn = _load(sys.argv[1])
  skip_and_clip = axlearn["skip_and_clip_by_global_norm"]
  cases = {
    "mean": dict(
      drop_norm=axlearn["drop_norm_by_grad_norm_ema"](multipliers=(3, 10)),
      grad_norm_ema_decay=0.9,
      max_norm=2.0,
    ),
    "stddev": dict(
      drop_norm=axlearn["drop_norm_by_grad_norm_stddev"](
        min_count=20, multipliers=(3, 6)
      ),
      grad_norm_ema_decay=0.95,
    ),
    "fixed": dict(drop_norm=8.0, max_norm=1.5),
  }
  rng = np.random.default_rng(20260516)
  arrays = {}
  for name, kwargs in cases.items():
    tx = skip_and_clip(optax.adam(0.01), **kwargs)
    for key, value in _run(tx, _sequence(rng)).items():
      arrays[f"{name}_{key}"] = value
  jitter = np.stack(
    [
      _JITTER_BASE * np.float32(1 + 1e-5 * rng.standard_normal())
      for _ in range(40)
    ]
  ).astype(np.float32)
  tx = skip_and_clip(
    optax.identity(),
    drop_norm=axlearn["drop_norm_by_grad_norm_stddev"](min_count=3),
    grad_norm_ema_decay=0.9,
  )
  for key, value in _run(tx, jitter).items():
    arrays[f"jitter_{key}"] = value
  path = pathlib.Path(__file__).with_name("axlearn_trajectories.npz")
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
