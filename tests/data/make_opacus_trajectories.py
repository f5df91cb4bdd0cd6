"""Makes opacus_trajectories.npz: Opacus' automatic (AUTO-S) clipping.

Runs Opacus' own ``DPAutomaticClippingOptimizer`` and
``DPPerLayerAutomaticClippingOptimizer`` from
``opacus/optimizers/optimizer_automatic_clipping.py`` of pull request #798 of
``meta-pytorch/opacus`` (head commit
a42721f1bbf07e6306faf50731e501f99cf10636, 2025-11-20), which adds
``PrivacyEngine.make_private(clipping="automatic" | "automatic_per_layer")``.
No released wheel has that file yet (opacus 1.6.0 does not), so the script
loads it from a checkout, given as its only argument, on top of the
installed opacus 1.6.0, whose ``DPOptimizer`` and ``DPPerLayerOptimizer`` it
subclasses unchanged.

The optimizers wrap ``torch.optim.SGD`` over four parameters, two linear
layers' weights and biases (``w1`` (3, 4), ``b1`` (3,), ``w2`` (2, 3), ``b2``
(2,)). Each step sets every parameter's ``grad_sample`` to a batch of 6
seeded per-example gradients (float32) and calls ``pre_step()``, the part of
``step()`` that clips, accumulates, adds noise and scales; ``p.grad`` is then
the aggregated gradient. Per-example scales vary over eight orders of
magnitude, and one example per step is all zero, so AUTO-S's scaling *up*
of small gradients and its stability constant both matter.

Cases (noise_multiplier 0, so the outputs are deterministic):

* ``flat_mean``: ``DPAutomaticClippingOptimizer``, max_grad_norm 1.0,
  ``loss_reduction="mean"``, expected_batch_size 6;
* ``flat_sum``: the same with max_grad_norm 0.5 and ``loss_reduction="sum"``;
* ``layer_mean``: ``DPPerLayerAutomaticClippingOptimizer``, max_grad_norm
  ``[0.7] * 4``, ``loss_reduction="mean"``.

For the noise, each case also records the standard deviation Opacus uses
with ``noise_multiplier=1.3``: ``noise_multiplier * optimizer.max_grad_norm``
(for the per-layer optimizer, ``max_grad_norm`` is the norm of the list).

Produced with (torch 2.14.1, opacus 1.6.0, numpy 2.4.6):

  python tests/data/make_opacus_trajectories.py \
    <opacus checkout>/opacus/optimizers/optimizer_automatic_clipping.py

Arrays (for each case ``c`` and parameter ``p`` in w1, b1, w2, b2):
``c_config`` float64[3] (max_grad_norm per layer, 1 for mean / 0 for sum,
per_layer); ``c_in_p`` float32[T, 6, *shape] the per-example gradients;
``c_out_p`` float32[T, *shape] Opacus' ``p.grad``; ``c_noise_std`` float64.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import torch

SHAPES = {"w1": (3, 4), "b1": (3,), "w2": (2, 3), "b2": (2,)}
BATCH = 6
STEPS = 12
NOISE_MULTIPLIER = 1.3


def _load(path: str):
  spec = importlib.util.spec_from_file_location("opacus_automatic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _batches(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  steps = []
  for _ in range(STEPS):
    scales = 10.0 ** rng.uniform(-5, 3, size=BATCH)
    scales[rng.integers(BATCH)] = 0.0
    batch = {}
    for name, shape in SHAPES.items():
      # Per-layer spread too: each layer gets its own factor per example.
      layer = 10.0 ** rng.uniform(-1, 1, size=BATCH)
      g = rng.normal(size=(BATCH, *shape))
      factor = (scales * layer).reshape((BATCH,) + (1,) * len(shape))
      batch[name] = (g * factor).astype(np.float32)
    steps.append(batch)
  return steps


def _run(optimizer_cls, max_grad_norm, reduction, steps, noise=0.0):
  params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES.values()]
  optimizer = optimizer_cls(
    torch.optim.SGD(params, lr=1.0),
    noise_multiplier=noise,
    max_grad_norm=max_grad_norm,
    expected_batch_size=BATCH,
    loss_reduction=reduction,
  )
  outputs = {name: [] for name in SHAPES}
  for batch in steps:
    for p, name in zip(params, SHAPES):
      p.grad_sample = torch.from_numpy(batch[name].copy())
    assert optimizer.pre_step()
    for p, name in zip(params, SHAPES):
      outputs[name].append(p.grad.detach().numpy().copy())
    optimizer.zero_grad()
  return outputs, NOISE_MULTIPLIER * float(optimizer.max_grad_norm)


def main() -> None:
  module = _load(sys.argv[1])
  flat = module.DPAutomaticClippingOptimizer
  layer = module.DPPerLayerAutomaticClippingOptimizer
  rng = np.random.default_rng(20251120)
  arrays = {}
  for case, cls, norm, reduction, per_layer in (
    ("flat_mean", flat, 1.0, "mean", False),
    ("flat_sum", flat, 0.5, "sum", False),
    ("layer_mean", layer, 0.7, "mean", True),
  ):
    steps = _batches(rng)
    max_grad_norm = [norm] * len(SHAPES) if per_layer else norm
    outputs, noise_std = _run(cls, max_grad_norm, reduction, steps)
    arrays[f"{case}_config"] = np.array(
      [norm, reduction == "mean", per_layer], np.float64
    )
    arrays[f"{case}_noise_std"] = np.float64(noise_std)
    for name in SHAPES:
      arrays[f"{case}_in_{name}"] = np.stack([b[name] for b in steps])
      arrays[f"{case}_out_{name}"] = np.stack(outputs[name])
  path = pathlib.Path(__file__).with_name("opacus_trajectories.npz")
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
