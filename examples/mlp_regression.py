"""The seeds' MLP experiment: SGD with momentum, with and without clipping.

``make_regression``-like data (1000 samples, 20 features, a random linear
target plus noise, generated with NumPy), a 20 -> 25 -> 1 ReLU MLP in Flax
NNX, SGD with learning rate 0.07 and momentum 0.8. Without clipping the
large targets make the first gradients huge and the run diverges; with
``oc.clip_by_global_norm(1.0)`` it trains. Each epoch logs the loss and the
pre-clip gradient norm read from ``oc.clip_stats``.

Run: ``python examples/mlp_regression.py [--epochs N]``.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc


def make_regression(n_samples=1000, n_features=20, noise=0.1, seed=0):
  """A linear target with scikit-learn's ``make_regression`` scale (coef ~ U(0, 100))."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_samples, n_features))
  coef = 100 * rng.uniform(size=(n_features, 1))
  y = x @ coef + noise * rng.standard_normal((n_samples, 1))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(20, 25, rngs=rngs)
    self.out = nnx.Linear(25, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def train(clip: bool, epochs: int, x, y, verbose: bool):
  model = MLP(nnx.Rngs(0))
  sgd = optax.sgd(0.07, momentum=0.8)
  tx = optax.chain(oc.clip_by_global_norm(1.0), sgd) if clip else sgd
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, oc.global_norm(grads)

  losses, norms, raw_norms = [], [], []
  for epoch in range(epochs):
    loss, raw_norm = step(model, optimizer)
    stats = oc.clip_stats(optimizer.opt_state)
    norm = float(stats["clip_by_global_norm/global_norm"]) if clip else float(
        raw_norm)
    losses.append(float(loss))
    norms.append(norm)
    raw_norms.append(float(raw_norm))
    if verbose:
      print(f"{'clipped' if clip else 'unclipped':9s} epoch {epoch + 1:3d}"
            f"  loss {float(loss):12.4f}  grad norm {norm:12.4f}")
    if not math.isfinite(float(loss)):
      break
  return {"losses": losses, "norms": norms, "raw_norms": raw_norms}


def main(epochs: int = 100, verbose: bool = True) -> dict:
  x, y = make_regression()
  return {"unclipped": train(False, epochs, x, y, verbose),
          "clipped": train(True, epochs, x, y, verbose)}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=100)
  main(parser.parse_args().epochs)
