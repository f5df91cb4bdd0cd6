"""Generates tests/data/stable_spam_trajectories.npz from the authors' rules.

A transcription, in PyTorch float64, of ``StableSPAM.step()`` in
``galore_torch/stablespam.py`` of the authors' repository
https://github.com/TianjinYellow/StableSPAM (commit
6a66da1ea7005f7fe7bc570b7968144b42163bed, 2025-03-29): per parameter tensor,
in order,

1. AdaClip: ``max|g|``, the step counter incremented, the EMA of the maximum
   updated with decay ``gamma3`` (theta) *before* the comparison, the
   threshold bias-corrected with the step counter, and the elements above it
   replaced by ``g / max|g| * threshold``;
2. AdaGN: the norm of the clipped gradient, its EMA (decay ``gamma1 *
   scale``) and the EMA of its square (``gamma2``), both bias-corrected
   (the first with ``(gamma1 * scale) ** step``), and ``g`` replaced by
   ``g / norm * m_hat / (sqrt(v_hat) + eps)`` when the norm is positive;
3. Adam with ``beta1 * scale``, bias corrections from the same step counter,
   ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``.

``scale`` is 1 without ``total_T``; with it, the value at step ``t`` (1, 2,
...) of torch's ``CosineAnnealingLR(T_max=total_T + 1, eta_min=0.5)`` on a
learning rate of 1, as the authors' ``CosineDecay`` computes it. Weight decay
is 0 and ``update_proj_gap = 0`` (no momentum reset, which is
``optaxclip.momentum_reset``'s business and which also resets the step
counter used above; see the ``adaclip`` docstring). The transcription is
written from the rules above, not copied.

The gradient sequence has no all-zero tensor (optaxclip deliberately skips
those, where the authors' code folds them in; see the docstrings) but has
zero elements, drifts, plateaus, whole-tensor spikes and single-element
spikes. Inputs and trajectories are stored as float32 to keep the file
small; the tests compare float32 and float64 JAX runs against them. Made
with torch 2.13.0+cpu (stored as ``torch_version``).

Command (from the repository root, with a CPU torch in /tmp/torchvenv):

  /tmp/torchvenv/bin/python tests/data/make_stable_spam_trajectories.py
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch import optim

SHAPES = [(3, 4), (5,)]
NUM_STEPS = 320
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
GAMMA1, GAMMA2, THETA = 0.7, 0.9, 0.999
TOTAL_T = 300


def gradient_sequence(seed: int = 0) -> list[list[np.ndarray]]:
  """Drifting scales, plateaus, spikes and zero elements; float32 values."""
  rng = np.random.default_rng(seed)
  seq = []
  plateau = None
  for t in range(NUM_STEPS):
    scales = [1.5 * math.exp(-t / 120), 0.05 * (1 + t / 60)]
    if 100 <= t < 130:  # a plateau: the same gradient again and again
      if plateau is None:
        plateau = [rng.normal(size=s) * c for s, c in zip(SHAPES, scales)]
      step = [g.copy() for g in plateau]
    else:
      step = []
      for shape, c in zip(SHAPES, scales):
        g = rng.normal(size=shape) * c
        g[rng.random(shape) < 0.15] = 0.0  # sparse zero elements
        if rng.random() < 0.04:
          g = g * 50.0  # whole-tensor spike
        if rng.random() < 0.06:
          g.reshape(-1)[rng.integers(g.size)] *= 1000.0  # one spiking element
        step.append(g)
    seq.append([g.astype(np.float32) for g in step])
  return seq


class _Transcription:
  """The per-tensor state and rules of StableSPAM.step() (see above)."""

  def __init__(self, params, total_t=None):
    self.params = [torch.tensor(p, dtype=torch.float64) for p in params]
    self.total_t = total_t
    self.total_steps = 0
    if total_t is not None:
      holder = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1))])
      self._sgd = optim.SGD(holder, lr=1.0)
      self._cosine = optim.lr_scheduler.CosineAnnealingLR(
        self._sgd, total_t + 1, 0.5, -1
      )
    self.state = [
      dict(
        step=0,
        m_max=0.0,
        m_norm=0.0,
        v_norm=0.0,
        exp_avg=torch.zeros_like(p),
        exp_avg_sq=torch.zeros_like(p),
      )
      for p in self.params
    ]

  def _scale(self) -> float:
    if self.total_t is None:
      return 1.0
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # step(epoch) is deprecated in torch
      self._cosine.step(self.total_steps)
    return self._sgd.param_groups[0]["lr"]

  def step(self, grads):
    self.total_steps += 1
    scale = self._scale()
    clipped, normalized = [], []
    for p, g, st in zip(self.params, grads, self.state):
      g = torch.tensor(g, dtype=torch.float64)
      # AdaClip.
      largest = g.abs().max()
      st["step"] += 1
      t = st["step"]
      st["m_max"] = THETA * st["m_max"] + (1 - THETA) * largest
      threshold = st["m_max"] / (1 - THETA**t)
      above = g.abs() > threshold
      if above.any():
        g[above] = g[above] / largest * threshold
      clipped.append(g.clone())
      # AdaGN.
      norm = torch.linalg.vector_norm(g)
      decay1 = GAMMA1 * scale
      st["m_norm"] = decay1 * st["m_norm"] + (1 - decay1) * norm
      st["v_norm"] = GAMMA2 * st["v_norm"] + (1 - GAMMA2) * norm**2
      m_hat = st["m_norm"] / (1 - decay1**t)
      v_hat = st["v_norm"] / (1 - GAMMA2**t)
      if norm > 0:
        g = g / norm * (m_hat / (torch.sqrt(v_hat) + EPS))
      normalized.append(g.clone())
      # Adam.
      beta1, beta2 = BETAS[0] * scale, BETAS[1]
      st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
      st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
      bc1, bc2 = 1 - beta1**t, 1 - beta2**t
      denom = st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + EPS
      p.add_(st["exp_avg"] / denom, alpha=-LR / bc1)
    stats = [
      [float(st["m_max"]), float(st["m_norm"]), float(st["v_norm"])]
      for st in self.state
    ]
    return clipped, normalized, stats, scale


def _run(seq, params, total_t):
  opt = _Transcription(params, total_t)
  out = {k: [] for k in ("clipped", "normalized", "params", "stats", "scale")}
  for grads in seq:
    clipped, normalized, stats, scale = opt.step(grads)
    out["clipped"].append(np.concatenate([c.reshape(-1) for c in clipped]))
    out["normalized"].append(
      np.concatenate([n.reshape(-1) for n in normalized])
    )
    out["params"].append(
      np.concatenate([p.reshape(-1).numpy() for p in opt.params])
    )
    out["stats"].append(stats)
    out["scale"].append(scale)
  return out


def main():
  seq = gradient_sequence()
  rng = np.random.default_rng(1)
  params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  data = {
    "grads": np.stack(
      [np.concatenate([g.reshape(-1) for g in s]) for s in seq]
    ).astype(np.float32),
    "params0": np.concatenate([p.reshape(-1) for p in params]),
    "hyper": np.array(
      [LR, BETAS[0], BETAS[1], EPS, GAMMA1, GAMMA2, THETA, TOTAL_T]
    ),
  }
  for name, total_t in (("plain", None), ("cosine", TOTAL_T)):
    out = _run(seq, params, total_t)
    keys = (
      ("clipped", "normalized", "params")
      if name == "plain"
      else ("normalized", "params")
    )
    for key in keys:
      data[f"{name}_{key}"] = np.stack(out[key]).astype(np.float32)
    data[f"{name}_stats"] = np.asarray(out["stats"], np.float64)
    if name == "cosine":
      data["cosine_scale"] = np.asarray(out["scale"], np.float64)
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(here, "stable_spam_trajectories.npz")
  np.savez_compressed(path, torch_version=np.array(torch.__version__), **data)
  print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
  main()
