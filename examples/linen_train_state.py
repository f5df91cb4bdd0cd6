"""optaxclip in a Flax linen ``TrainState`` loop.

A linen MLP fits a noisy sine; the optimizer is
``optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-2))`` inside
``flax.training.train_state.TrainState``. The pre-clip norm is read from the
state with ``optax.tree.get(state.opt_state, "global_norm")``.

Run: ``python examples/linen_train_state.py [--steps N]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import optaxclip as oc


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(32)(x))
    x = nn.tanh(nn.Dense(32)(x))
    return nn.Dense(1)(x)


def main(steps: int = 200, verbose: bool = True) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-3, 3, (256, 1)), jnp.float32)
  y = jnp.sin(x) + 0.05 * jnp.asarray(rng.standard_normal((256, 1)),
                                      jnp.float32)
  model = MLP()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(0), x),
      tx=optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-2)))

  @jax.jit
  def step(state):
    def loss_fn(params):
      return jnp.mean((state.apply_fn(params, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss, oc.global_norm(grads)

  history = {"losses": [], "logged_norms": [], "raw_norms": []}
  for i in range(steps):
    state, loss, raw_norm = step(state)
    logged = float(optax.tree.get(state.opt_state, "global_norm"))
    history["losses"].append(float(loss))
    history["logged_norms"].append(logged)
    history["raw_norms"].append(float(raw_norm))
    if verbose and (i % 20 == 0 or i == steps - 1):
      print(f"step {i:4d}  loss {float(loss):.4f}  pre-clip norm {logged:.4f}")
  return history


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  main(parser.parse_args().steps)
