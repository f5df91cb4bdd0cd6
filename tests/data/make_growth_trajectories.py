"""Makes growth_trajectories.npz: Fira's norm-growth limiter run in PyTorch.

Transcribes the "Norm-Growth Limiter" block of ``AdamW.step`` in the authors'
repository ``xichen-fy/Fira``, file ``optimizer_torch/fira_adamw.py`` (the
same block is in ``optimizer_torch/fira_rmsprop.py``), commit
5c28b13408282b3ee65386b110318659412ddad9 (2024-10-21). There the limiter acts
on one tensor, the norm-scaled residual ``scaling_grad``; its per-parameter
state keeps ``state["scaling_grad"]``, the *limited* norm of the previous
step, and the growth ratio 1.01 is hard-coded:

* first step: nothing is limited; the tensor's norm is stored;
* later steps: ``limiter = max(norm / (stored + 1e-8), 1.01) / 1.01``; the
  tensor is divided by ``limiter`` and ``norm / limiter`` is stored.

Here the tensor is the concatenation of a two-leaf update tree (a (5,) and a
(3, 4) leaf, in ``jax.tree.leaves`` order "b", "w" of ``{"b": ..., "w":
...}``), so its norm is the tree's global norm and the result is comparable
with ``optaxclip.clip_norm_growth(1.01)``. The limiter runs in float64 on
float32 inputs, so the file records the authors' semantics without float32
rounding.

Three fixed input sequences (seeded NumPy, float32):

* ``clean``: 320 steps with noise, an upward drift of 3% per step (limited
  at every step), a plateau (the same gradient repeated), a downward drift,
  isolated spikes (x30, x1000) and a low-scale tail; every norm finite and
  nonzero, where the authors' code and optaxclip must agree;
* ``zero``: 60 steps with an all-zero update at step 20 (0-based);
* ``nan``: 60 steps with a NaN element at step 20.

The last two record what the authors' code does where optaxclip documents a
deviation (it stores 0 and then crushes every update to ~1e-8; it stores NaN
and turns every later update into NaN).

Produced with (torch 2.13.0+cpu, numpy 2.4.6):

  /tmp/torchvenv/bin/python tests/data/make_growth_trajectories.py

Arrays (for each sequence name ``s``): ``s_b`` float32[T, 5] and ``s_w``
float32[T, 3, 4] the inputs; ``s_out_b``/``s_out_w`` float64 the limited
outputs; ``s_limiter`` float64[T] the divisor applied (1 on the first step);
``s_stored`` float64[T] ``state["scaling_grad"]`` after each step.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

GAMMA = 1.01  # hard-coded in the authors' code
SHAPES = {"b": (5,), "w": (3, 4)}
SIZE_B = 5


class AuthorsNormGrowthLimiter:
  """The limiter block of Fira's ``AdamW.step`` for one parameter's state."""

  def __init__(self):
    self.state: dict[str, torch.Tensor] = {}

  def __call__(self, scaling_grad: torch.Tensor):
    state = self.state
    if "scaling_grad" in state:
      scaling_grad_norm = torch.norm(scaling_grad)
      # Python's max, as in the authors' code: max(nan, 1.01) is nan.
      limiter = (
        max(scaling_grad_norm / (state["scaling_grad"] + 1e-8), GAMMA) / GAMMA
      )
      scaling_grad = scaling_grad / limiter
      state["scaling_grad"] = scaling_grad_norm / limiter
    else:
      state["scaling_grad"] = torch.norm(scaling_grad)
      limiter = 1.0
    return scaling_grad, float(limiter)


def _clean(rng: np.random.Generator, steps: int = 320) -> np.ndarray:
  size = SIZE_B + 12
  seq = np.empty((steps, size))
  plateau = rng.normal(size=size)
  for t in range(steps):
    noise = rng.normal(size=size)
    if t < 80:
      g = noise
    elif t < 140:
      g = noise * 1.03 ** (t - 80)  # grows faster than 1.01: always limited
    elif t < 200:
      g = plateau * 5.0  # the same gradient: ratio exactly 1
    elif t < 260:
      g = noise * 5.0 * 0.98 ** (t - 200)
    else:
      g = noise * 0.1
    if t in (30, 31, 150, 230, 290):
      g = g * 30.0
    if t in (60, 275):
      g = g * 1000.0
    seq[t] = g
  return seq.astype(np.float32)


def _with_event(rng: np.random.Generator, kind: str) -> np.ndarray:
  seq = rng.normal(size=(60, SIZE_B + 12))
  if kind == "zero":
    seq[20] = 0.0
  else:
    seq[20, 3] = np.nan
  return seq.astype(np.float32)


def _run(seq: np.ndarray) -> dict[str, np.ndarray]:
  limiter_fn = AuthorsNormGrowthLimiter()
  outs, limiters, stored = [], [], []
  for step in seq:
    x = torch.tensor(step, dtype=torch.float64)
    y, limiter = limiter_fn(x)
    outs.append(y.numpy())
    limiters.append(limiter)
    stored.append(float(limiter_fn.state["scaling_grad"]))
  out = np.stack(outs)
  steps = len(seq)
  return {
    "b": seq[:, :SIZE_B],
    "w": seq[:, SIZE_B:].reshape(steps, *SHAPES["w"]),
    "out_b": out[:, :SIZE_B],
    "out_w": out[:, SIZE_B:].reshape(steps, *SHAPES["w"]),
    "limiter": np.asarray(limiters, np.float64),
    "stored": np.asarray(stored, np.float64),
  }


def main() -> None:
  rng = np.random.default_rng(20241003)
  arrays = {}
  for name, seq in (
    ("clean", _clean(rng)),
    ("zero", _with_event(rng, "zero")),
    ("nan", _with_event(rng, "nan")),
  ):
    for key, value in _run(seq).items():
      arrays[f"{name}_{key}"] = value
  path = pathlib.Path(__file__).with_name("growth_trajectories.npz")
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
