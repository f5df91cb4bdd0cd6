"""Makes levanter_trajectories.npz: Levanter's historical update-norm clipping.

Runs Levanter's own ``clip_update_by_historical_norm`` from
``stanford-crfm/levanter``, file ``src/levanter/optim/clip_update_norm.py``,
commit 9fde0781a1737e088535c392cf239aba5e1143e2 (2025-09-11). The released
``levanter`` wheels predate that module, so the script loads the file from a
checkout, given as its only argument; the module's one Levanter import,
``levanter.tracker.jit_log``, is replaced by a recorder of the logged values
(the transform runs eagerly, so they are concrete).

Sequences (seeded NumPy, float32; a (5,) and a (3, 4) leaf, ``{"b", "w"}``):

* ``default``: 320 steps at Levanter's defaults (window 128, sigma 3);
* ``w8``: 200 steps with window 8, sigma 3;
* ``nan``: 60 steps (window 8) with a NaN element at step 30, recording what
  Levanter does with a non-finite norm (it enters the history, the mean turns
  NaN, and no later step is ever clipped), where optaxclip documents a
  deviation.

Produced with (jax 0.10.2, optax 0.2.8, numpy 2.4.6):

  python tests/data/make_levanter_trajectories.py \
    <levanter checkout>/src/levanter/optim/clip_update_norm.py

Arrays (for each sequence ``s``): ``s_config`` float64[2] (window, sigma);
``s_b`` float32[T, 5], ``s_w`` float32[T, 3, 4] the inputs; ``s_out_b``,
``s_out_w`` float32 Levanter's outputs; ``s_norm`` float32[T] its
``pre_clip_norm``; ``s_threshold`` float32[T] its logged
``update_norm_threshold`` (computed even while inactive); ``s_did_clip``
bool[T].
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import jax.numpy as jnp
import numpy as np

LOGGED: dict[str, float] = {}


def _load(path: str):
  tracker = types.ModuleType("levanter.tracker")
  tracker.jit_log = lambda metrics, **_: LOGGED.update(
    {k: float(v) for k, v in metrics.items()}
  )
  package = types.ModuleType("levanter")
  package.tracker = tracker
  sys.modules["levanter"] = package
  sys.modules["levanter.tracker"] = tracker
  spec = importlib.util.spec_from_file_location("levanter_clip", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.clip_update_by_historical_norm


def _sequence(rng, steps, nan_at=None):
  seq = []
  for t in range(steps):
    scale = np.exp(0.3 * rng.normal()) * (1 + t / 100)
    if rng.random() < 0.08:
      scale *= rng.uniform(3, 50)
    seq.append(rng.normal(size=17) * scale)
  seq = np.asarray(seq, np.float32)
  if nan_at is not None:
    seq[nan_at, 3] = np.nan
  return seq


def _run(factory, seq, window, sigma):
  tx = factory(window, sigma)
  tree = {"b": jnp.zeros(5), "w": jnp.zeros((3, 4))}
  state = tx.init(tree)
  out_b, out_w, norm, threshold, did_clip = [], [], [], [], []
  for g in seq:
    updates = {"b": jnp.asarray(g[:5]), "w": jnp.asarray(g[5:].reshape(3, 4))}
    out, state = tx.update(updates, state)
    out_b.append(np.asarray(out["b"]))
    out_w.append(np.asarray(out["w"]))
    norm.append(LOGGED["optim/clip_update/pre_clip_norm"])
    threshold.append(LOGGED["optim/clip_update/update_norm_threshold"])
    did_clip.append(LOGGED["optim/clip_update/did_clip"] > 0)
  steps = len(seq)
  return {
    "config": np.array([window, sigma], np.float64),
    "b": seq[:, :5],
    "w": seq[:, 5:].reshape(steps, 3, 4),
    "out_b": np.stack(out_b),
    "out_w": np.stack(out_w),
    "norm": np.asarray(norm, np.float32),
    "threshold": np.asarray(threshold, np.float32),
    "did_clip": np.asarray(did_clip, bool),
  }


def main() -> None:
  factory = _load(sys.argv[1])
  rng = np.random.default_rng(20250911)
  arrays = {}
  for name, seq, window, sigma in (
    ("default", _sequence(rng, 320), 128, 3.0),
    ("w8", _sequence(rng, 200), 8, 3.0),
    ("nan", _sequence(rng, 60, nan_at=30), 8, 3.0),
  ):
    for key, value in _run(factory, seq, window, sigma).items():
      arrays[f"{name}_{key}"] = value
  path = pathlib.Path(__file__).with_name("levanter_trajectories.npz")
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
