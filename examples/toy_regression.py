"""Gradient clipping in a real Flax NNX training loop: a toy regression.

Trains a small MLP (10 -> 5 -> 1, ReLU) on 100 generated samples of a noisy
linear target with full-batch SGD (learning rate 0.01), behind
``optaxclip.clip_by_global_norm(1.0)``::

  tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.01))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

The target is scaled so the raw gradients start out too large: their global
norm is about 1.5 at the start, so the clipper rescales the first ~20 steps to
norm 1 (SGD then moves the parameters by exactly ``0.01`` per step). As the
loss falls the norm drops below 1, and the later steps pass through unchanged.

Each epoch prints the loss, the pre-clip gradient norm the clipper logged in
its state (read with ``oc.clip_stats(optimizer.opt_state)``, no second pass
over the gradients) and whether that step was clipped. The loop also computes
``oc.global_norm`` of the raw gradients itself, so the logged norm can be
checked against it (``tests/test_examples.py`` does).

Run with ``make demo`` or ``python examples/toy_regression.py [--epochs N]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

NUM_SAMPLES = 100
NUM_FEATURES = 10
HIDDEN = 5
LEARNING_RATE = 0.01
MAX_NORM = 1.0
# Multiplies the target. It sets the size of the raw gradients: at 0.5 their
# global norm starts near 1.5 (so the early steps are clipped) and falls below
# MAX_NORM after about 20 epochs. Larger values clip every step of the run.
TARGET_SCALE = 0.5


def make_data(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """A noisy linear regression problem with a fixed NumPy seed.

  Args:
    seed: the NumPy random seed.

  Returns:
    ``(x, y)``: float32 inputs of shape ``(100, 10)`` and targets of shape
    ``(100, 1)``, ``y = TARGET_SCALE * (x @ w + 0.1 * noise)``.
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(NUM_SAMPLES, NUM_FEATURES))
  w = rng.normal(size=(NUM_FEATURES, 1))
  noise = rng.normal(size=(NUM_SAMPLES, 1))
  y = TARGET_SCALE * (x @ w + 0.1 * noise)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


class MLP(nnx.Module):
  """A 10 -> 5 -> 1 multi-layer perceptron with a ReLU hidden layer."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(NUM_FEATURES, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(x)))


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of ``model`` on ``(x, y)``."""
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array,
               y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One full-batch step; returns the loss before it and the raw grad norm."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  # Computed here, independently of the clipper, to check what it logs.
  raw_norm = oc.global_norm(grads)
  optimizer.update(model, grads)
  return loss, raw_norm


def main(epochs: int = 50, verbose: bool = True) -> dict[str, list]:
  """Trains the MLP and returns its per-epoch history.

  Args:
    epochs: number of full-batch SGD steps.
    verbose: print one line per epoch.

  Returns:
    A dict of per-epoch lists: ``losses`` (loss before the step, float),
    ``logged_norms`` (the pre-clip global norm from
    ``oc.clip_stats``, float), ``raw_norms`` (``oc.global_norm`` of the raw
    gradients computed in the loop, float) and ``clipped`` (bool).
  """
  x, y = make_data()
  model = MLP(nnx.Rngs(0))
  tx = optax.chain(oc.clip_by_global_norm(MAX_NORM), optax.sgd(LEARNING_RATE))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  history: dict[str, list] = {
      "losses": [], "logged_norms": [], "raw_norms": [], "clipped": []}
  for epoch in range(epochs):
    loss, raw_norm = train_step(model, optimizer, x, y)
    stats = oc.clip_stats(optimizer.opt_state)
    logged_norm = float(stats["clip_by_global_norm/global_norm"])
    clipped = bool(stats["clip_by_global_norm/global_norm_clipped"])
    history["losses"].append(float(loss))
    history["logged_norms"].append(logged_norm)
    history["raw_norms"].append(float(raw_norm))
    history["clipped"].append(clipped)
    if verbose:
      print(f"epoch {epoch + 1:3d}  loss {float(loss):10.4f}  "
            f"grad norm {logged_norm:9.4f}  "
            f"{'clipped to ' + str(MAX_NORM) if clipped else 'not clipped'}")
  if verbose and epochs:
    num_clipped = sum(history["clipped"])
    print(f"{num_clipped}/{epochs} steps clipped; loss "
          f"{history['losses'][0]:.4f} -> {history['losses'][-1]:.4f}")
  return history


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=50,
                      help="number of full-batch training steps (default 50)")
  main(epochs=parser.parse_args().epochs)
