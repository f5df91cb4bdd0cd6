"""Records SPAM optimizer trajectories from PyTorch for tests/test_spam.py.

What is transcribed: ``AdamW.step()`` (exported as ``SPAM``) from the
authors' repository ``TianjinYellow/SPAM-Optimizer``, file
``galore_torch/SPAM.py`` at commit e8185fbe695fdc449953b4a1f96121df5bf0d268
("update hyperparameters", 2025-03-12), for a parameter group without
``density`` (for ``density=1.0`` the random masks select every element and
the mask update copies the moments unchanged, so the arithmetic is the same),
without weight decay, with ``correct_bias=True``. Rewritten here, step for
step:

* the warmup scale ``1 - CosineDecay(0.99, N).get_dr(current_step)``, with
  ``current_step`` starting at ``N + 1`` and set to 0 at the end of every step
  after which ``(total_step + 1) % DeltaT == 0``; ``get_dr`` is 0 from ``N``
  on and otherwise PyTorch's ``CosineAnnealingLR(T_max=N + 1)`` stepped to
  ``current_step`` (the real scheduler is used below, as in their code);
* at the start of a step with ``(total_step + 1) % DeltaT == 0``, ``exp_avg``
  and ``exp_avg_sq`` are zeroed (``state["step"]`` is not);
* the spike test on ``step = total_step + 1``: when ``step >=
  grad_accu_steps`` and ``step % DeltaT >= grad_accu_steps``, elements with
  ``grad**2 > threshold * exp_avg_sq`` (the raw second moment *before* this
  gradient) are replaced by ``sign(grad) * sqrt(exp_avg_sq * threshold)``;
* Adam with the clipped gradient: ``exp_avg``, ``exp_avg_sq`` EMAs, ``denom =
  sqrt(exp_avg_sq) + eps``, ``step_size = lr * sqrt(1 - b2**step) / (1 -
  b1**step)``, ``p -= step_size * scale * exp_avg / denom``.

Two trajectories are recorded on the same gradients:

``authors_*``
  the authors' optimizer as above.
``decomposed_*``
  the same code with one change, the semantics of
  ``optax.chain(oc.spam_clip(), oc.momentum_reset(optax.adam(...)))``: the
  spike test uses its own EMA of the clipped squares, which is never reset,
  and is active from ``step >= grad_accu_steps`` on; Adam's moments are still
  reset every ``DeltaT`` steps.

Gradients are a fixed sequence (they do not depend on the parameters):
Gaussian noise whose scale drifts from 0.5 to 2, spikes of 20x to 1000x
(inside and outside the warmup windows, on a reset step and right after
resets), an element that is zero throughout, stretches of zeros (chosen so
that no element has ``exp_avg_sq == 0`` with a nonzero gradient while the
authors' test is active: the one case where optaxclip deliberately differs,
asserted below) and a constant plateau. The run is in float64; eps is 1e-8
(optax adds eps to sqrt(v_hat), the authors to sqrt(v): with gradients of
order 1 the two differ by < 1e-7 relative at 1e-8).

Command that produced ``spam_trajectories.npz`` (torch 2.13.0+cpu, numpy
2.4.6)::

  /tmp/torchvenv/bin/python tests/data/make_spam_trajectories.py
"""

from __future__ import annotations

import math
import pathlib
import warnings

import numpy as np
import torch

STEPS = 320
LR = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8
THRESHOLD = 5000.0
DELTA_T = 100
WARMUP_STEPS = 40  # N, the warmup after a reset
GRAD_ACCU_STEPS = 20
SHAPES = ((3, 3), (3,))
SIZE = 12

# (step (1-based), flat element, factor times the noise scale)
SPIKES = (
  (5, 1, 1000.0),  # in the initial warmup: not clipped
  (25, 3, -1000.0),
  (60, 8, 1000.0),
  (70, 0, 20.0),
  (101, 5, 1000.0),  # in the authors' post-reset warmup only
  (110, 9, -500.0),  # likewise
  (125, 6, 1000.0),  # right after the authors' warmup (v from 25 steps)
  (150, 11, -1000.0),
  (200, 2, 1000.0),  # a reset step
  (230, 4, 300.0),
  (261, 1, -1000.0),
  (299, 8, 1000.0),
  (310, 3, 50.0),
)
ZERO_RUNS = ((4, 40, 80), (7, 130, 175))  # (element, first step, last step)
ALWAYS_ZERO = 10
PLATEAU = (2, 205, 260, 0.7)  # (element, first step, last step, value)


def gradients() -> np.ndarray:
  rng = np.random.default_rng(20250114)
  steps = np.arange(1, STEPS + 1, dtype=np.float64)
  scale = 0.5 + 1.5 * steps / STEPS
  grads = rng.standard_normal((STEPS, SIZE)) * scale[:, None]
  for step, element, factor in SPIKES:
    grads[step - 1, element] = factor * scale[step - 1]
  for element, first, last in ZERO_RUNS:
    grads[first - 1 : last, element] = 0.0
  grads[:, ALWAYS_ZERO] = 0.0
  element, first, last, value = PLATEAU
  grads[first - 1 : last, element] = value
  # Exactly representable in float32, so the JAX run sees the same inputs.
  return grads.astype(np.float32)


class CosineDecay:
  """The authors' warmup helper: PyTorch's CosineAnnealingLR on a dummy SGD."""

  def __init__(self, death_rate: float, t_max: int):
    dummy = torch.nn.Parameter(torch.zeros(1))
    self.sgd = torch.optim.SGD([dummy], lr=death_rate)
    self.stepper = torch.optim.lr_scheduler.CosineAnnealingLR(
      self.sgd, t_max + 1, 0.0, -1
    )
    self.t_max = t_max

  def get_dr(self, current_step: int) -> float:
    if current_step >= self.t_max:
      return 0.0
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # step(epoch) is deprecated
      self.stepper.step(current_step)
    return self.sgd.param_groups[0]["lr"]


class Spam:
  """The authors' SPAM step (see the module docstring), optionally with the
  spike test on a separate, never-reset EMA (``own_v=True``)."""

  def __init__(self, params: list[torch.Tensor], own_v: bool):
    self.params = params
    self.own_v = own_v
    self.total_step = 0
    self.current_step = WARMUP_STEPS + 1
    self.warmup = CosineDecay(0.99, WARMUP_STEPS)
    self.state = [
      {
        "step": 0,
        "exp_avg": torch.zeros_like(p),
        "exp_avg_sq": torch.zeros_like(p),
        "spike_v": torch.zeros_like(p),
      }
      for p in params
    ]

  @torch.no_grad()
  def step(self, grads: list[torch.Tensor]) -> tuple[float, int, list]:
    """One step; returns (warmup scale, #clipped, clipped grads)."""
    scale = 1.0 - self.warmup.get_dr(self.current_step)
    beta1, beta2 = BETAS
    number = self.total_step + 1
    num_clipped = 0
    clipped_grads = []
    for p, grad, state in zip(self.params, grads, self.state, strict=True):
      grad = grad.clone()
      if number % DELTA_T == 0:
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
      exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
      state["step"] += 1
      if self.own_v:
        spike_v = state["spike_v"]
        active = number >= GRAD_ACCU_STEPS
      else:
        spike_v = exp_avg_sq
        active = (
          number >= GRAD_ACCU_STEPS and number % DELTA_T >= GRAD_ACCU_STEPS
        )
      if active:
        mask = grad**2 > THRESHOLD * spike_v
        # The one case optaxclip handles differently (spam_clip docstring):
        # a nonzero value against v == 0. Not exercised by these inputs.
        assert not bool((mask & (spike_v == 0)).any()), number
        grad[mask] = grad[mask].sign() * torch.sqrt(spike_v[mask] * THRESHOLD)
        num_clipped += int(mask.sum())
      if self.own_v:
        spike_v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
      clipped_grads.append(grad.clone())
      exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
      exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
      denom = exp_avg_sq.sqrt().add_(EPS)
      step_size = LR * math.sqrt(1.0 - beta2 ** state["step"])
      step_size /= 1.0 - beta1 ** state["step"]
      p.add_(exp_avg / denom, alpha=-step_size * scale)
    self.total_step += 1
    self.current_step += 1
    if (self.total_step + 1) % DELTA_T == 0:
      self.current_step = 0
      self.warmup = CosineDecay(0.99, WARMUP_STEPS)
    return scale, num_clipped, clipped_grads


def margin(grads: np.ndarray) -> float:
  """Smallest relative distance of g**2 from threshold * v (decomposed run),
  so that float32 rounding cannot flip a spike decision."""
  v = np.zeros(SIZE)
  smallest = math.inf
  b2 = BETAS[1]
  for number, g in enumerate(grads.astype(np.float64), start=1):
    if number >= GRAD_ACCU_STEPS:
      live = v > 0
      ratio = g[live] ** 2 / (THRESHOLD * v[live])
      if ratio.size:
        smallest = min(smallest, float(np.min(np.abs(ratio - 1))))
      spike = live & (g**2 > THRESHOLD * v)
      g = np.where(spike, np.sign(g) * np.sqrt(THRESHOLD * v), g)
    v = b2 * v + (1 - b2) * g**2
  return smallest


def run(grads: np.ndarray, params0: np.ndarray, own_v: bool) -> dict:
  params, start = [], 0
  for shape in SHAPES:
    size = int(np.prod(shape))
    chunk = params0[start : start + size].reshape(shape)
    params.append(torch.tensor(chunk, dtype=torch.float64))
    start += size
  optimizer = Spam(params, own_v=own_v)
  trajectory, scales, counts, clipped = [], [], [], []
  for row in grads.astype(np.float64):
    pieces, start = [], 0
    for shape in SHAPES:
      size = int(np.prod(shape))
      pieces.append(torch.tensor(row[start : start + size].reshape(shape)))
      start += size
    scale, num_clipped, out = optimizer.step(pieces)
    trajectory.append(np.concatenate([p.numpy().ravel() for p in params]))
    clipped.append(np.concatenate([g.numpy().ravel() for g in out]))
    scales.append(scale)
    counts.append(num_clipped)
  return {
    "params": np.stack(trajectory),
    "scale": np.asarray(scales),
    "num_clipped": np.asarray(counts, np.int32),
    "clipped_grads": np.stack(clipped),
  }


def main() -> None:
  torch.set_default_dtype(torch.float64)
  grads = gradients()
  params0 = np.random.default_rng(7).standard_normal(SIZE).astype(np.float32)
  authors = run(grads, params0, own_v=False)
  decomposed = run(grads, params0, own_v=True)
  print(
    "authors: clipped per step at", np.nonzero(authors["num_clipped"])[0] + 1
  )
  print("decomposed: clipped at", np.nonzero(decomposed["num_clipped"])[0] + 1)
  print("smallest |g^2 / (theta v) - 1|:", margin(grads))
  out = pathlib.Path(__file__).with_name("spam_trajectories.npz")
  np.savez_compressed(
    out,
    grads=grads,
    params0=params0,
    lr=LR,
    b1=BETAS[0],
    b2=BETAS[1],
    eps=EPS,
    threshold=THRESHOLD,
    interval=DELTA_T,
    warmup_steps=WARMUP_STEPS,
    clip_warmup_steps=GRAD_ACCU_STEPS,
    authors_params=authors["params"],
    authors_scale=authors["scale"],
    authors_num_clipped=authors["num_clipped"],
    decomposed_params=decomposed["params"],
    decomposed_num_clipped=decomposed["num_clipped"],
    decomposed_clipped_grads=decomposed["clipped_grads"],
  )
  print("wrote", out, out.stat().st_size, "bytes")


if __name__ == "__main__":
  main()
