"""Generates ``skip_loss_trajectories.npz``: OLMo-core's loss-skip decisions.

Transcribes, in PyTorch, the rolling loss statistics and the skip decision of
OLMo-core's ``SkipStepOptimizer`` (github.com/allenai/OLMo-core,
``src/olmo_core/optim/skip_step_optimizer.py`` at commit
``c757b7c3c15197154c753d883330afbfa4869dcc``, the commit MaxText's
``skip_step_on_spikes`` cites as its reference; unchanged at ``fa6c501``):

* the ``latest_loss`` setter appends the step's loss tensor to a list and
  drops the oldest entries beyond ``rolling_interval_length + 1``;
* ``get_step_factor`` proceeds (1.0) while the list, counting the current
  loss, holds fewer than ``max(2, rolling_interval_length // 2)`` losses;
  otherwise ``torch.std_mean`` (sample std) of every entry but the last
  gives ``std, mean`` and the step proceeds iff
  ``(latest_loss - mean) <= sigma_factor * std``;
* no gradient norms are set, so only the loss clause runs.

Two drivers feed it:

* ``every``: OLMo-core's trainer sets ``latest_loss`` before every step, so
  the history holds every step's loss, skipped or not
  (``skip_step(..., record_skipped=True)``);
* ``accepted``: the same class, but the driver removes the latest loss again
  when the step was skipped, so the history holds accepted losses only
  (``skip_step``'s default).

The losses are float32 tensors (as OLMo-core's ``ce_batch_loss``); the
decisions are also recomputed in float64 and must agree, and every decision
must sit at least ``1e-4`` (relative) from its boundary unless it is an exact
tie on a constant plateau, so a float32 implementation summing in another
order cannot flip one.

Command (from the repository root, with a CPU torch install):

  /tmp/torchvenv/bin/python tests/data/make_skip_loss_trajectories.py

It writes ``tests/data/skip_loss_trajectories.npz`` with, per case
``<name>``: ``<name>__losses`` (float32[T]), ``<name>__skipped`` (bool[T]),
``<name>__mean`` / ``<name>__std`` (float64[T], NaN while the rule is
inactive), and ``<name>__config`` (``[window, sigma_factor, every]``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

NUM_STEPS = 400


class OlmoCoreLossSkipRule:
  """OLMo-core's ``SkipStepOptimizer`` history and step factor (loss only)."""

  def __init__(self, rolling_interval_length: int, sigma_factor: float):
    self.rolling_interval_length = rolling_interval_length
    self.sigma_factor = sigma_factor
    self._losses: list[torch.Tensor] = []

  @property
  def latest_loss(self) -> torch.Tensor:
    return self._losses[-1]

  @latest_loss.setter
  def latest_loss(self, loss: torch.Tensor) -> None:
    self._losses.append(loss)
    while len(self._losses) > self.rolling_interval_length + 1:
      self._losses.pop(0)

  def statistics(self):
    """``(std, mean)`` of the history before the latest loss, or None."""
    if len(self._losses) < max(2, self.rolling_interval_length // 2):
      return None
    return torch.std_mean(torch.stack(self._losses[:-1]))

  def get_step_factor(self) -> torch.Tensor:
    stats = self.statistics()
    if stats is None:
      return torch.tensor(1.0)
    std, mean = stats
    return ((self.latest_loss - mean) <= self.sigma_factor * std).float()


def loss_sequence(seed: int) -> np.ndarray:
  """400 float32 losses: decay, noise, spikes, a plateau, a shift, drift up."""
  rng = np.random.default_rng(seed)
  t = np.arange(NUM_STEPS, dtype=np.float64)
  losses = 3.0 + 3.0 * np.exp(-t / 60.0)
  losses *= 1.0 + 0.01 * rng.normal(size=NUM_STEPS)
  for step, factor in [(20, 1.8), (70, 1.5), (71, 1.3), (95, 3.5),
                       (96, 2.0), (130, 1.2), (150, 2.8), (260, 2.0),
                       (261, 2.4), (300, 2.5), (320, 1.1), (350, 3.0),
                       (380, 2.5)]:
    losses[step] *= factor
  losses[180:220] = 3.125  # a constant plateau (exact in float32): std 0
  losses[280:292] += 0.25  # a temporary level shift
  losses[300:] += 0.004 * np.arange(NUM_STEPS - 300)  # slow upward drift
  return losses.astype(np.float32)


def run(losses: np.ndarray, window: int, sigma: float, every: bool,
        dtype: torch.dtype):
  rule = OlmoCoreLossSkipRule(window, sigma)
  skipped, means, stds = [], [], []
  for value in losses:
    rule.latest_loss = torch.tensor(float(value), dtype=dtype)
    stats = rule.statistics()
    factor = rule.get_step_factor()
    skip = bool(factor.item() == 0.0)
    if stats is None:
      means.append(np.nan)
      stds.append(np.nan)
    else:
      means.append(float(stats[1]))
      stds.append(float(stats[0]))
    if skip and not every:
      rule._losses.pop()  # pylint: disable=protected-access
    skipped.append(skip)
  return np.array(skipped), np.array(means), np.array(stds)


CASES = {
    "maxtext_default_every": (128, 6.0, True),
    "maxtext_default_accepted": (128, 6.0, False),
    "short_every": (16, 3.0, True),
    "short_accepted": (16, 3.0, False),
    "window_7_every": (7, 2.0, True),
}


def main() -> None:
  out = {}
  for index, (name, (window, sigma, every)) in enumerate(CASES.items()):
    losses = loss_sequence(seed=index)
    skipped, _, _ = run(losses, window, sigma, every, torch.float32)
    skipped64, mean64, std64 = run(losses, window, sigma, every, torch.float64)
    assert np.array_equal(skipped, skipped64), name
    active = ~np.isnan(mean64)
    x = losses.astype(np.float64)
    margin = np.abs(x - mean64 - sigma * std64)[active]
    tie = (std64[active] == 0) & (x[active] == mean64[active])
    scale = np.maximum(std64[active], 1e-3)
    assert np.all(tie | (margin > 1e-4 * scale)), (name, margin.min())
    assert 3 <= skipped.sum() <= NUM_STEPS // 3, (name, skipped.sum())
    print(f"{name}: {int(skipped.sum())} skipped at {np.flatnonzero(skipped)},"
          f" {int(tie.sum())} exact ties")
    out[f"{name}__losses"] = losses
    out[f"{name}__skipped"] = skipped
    out[f"{name}__mean"] = mean64
    out[f"{name}__std"] = std64
    out[f"{name}__config"] = np.array([window, sigma, float(every)])
  path = pathlib.Path(__file__).with_name("skip_loss_trajectories.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
