"""Per-layer gradient norms and every clipper statistic in TensorBoard.

"Logging is king": watch per-layer gradient norms to catch an explosion
before the loss shows it. This trains a small Flax NNX MLP on generated
regression data with

    optax.chain(oc.record_norms(), oc.clip_by_global_norm(1.0),
                oc.record_norms(), optax.adam(1e-2))

and writes, every step, each scalar of ``oc.clip_stats`` (the global norm,
whether it clipped, the pre-clip norm of every layer under
``record_norms/<path>`` and the post-clip one under ``record_norms_1/<path>``)
plus a histogram of every layer's gradient values, with ``tensorboardX`` (no
TensorFlow needed). Open it with ``tensorboard --logdir demo-results/tb``.

Run: ``python examples/tensorboard_logging.py [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tensorboardX import SummaryWriter

import optaxclip as oc


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(8, 32, rngs=rngs)
    self.out = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.gelu(self.hidden(x)))


def scalars(stats: dict[str, jax.Array]) -> dict[str, float]:
  """The ``clip_stats`` entries a scalar plot can show, as Python floats.

  Per-layer vectors (stacked leaves) become one scalar per layer:
  ``"<key>/<layer index>"``.
  """
  out = {}
  for key, value in stats.items():
    value = np.asarray(value, np.float64)
    if value.ndim == 0:
      out[key] = float(value)
    else:
      for index, item in np.ndenumerate(value):
        out[f"{key}/{'_'.join(map(str, index))}"] = float(item)
  return out


def main(steps: int = 100, out: str = "demo-results/tb") -> tuple[str, list]:
  """Trains, logs to ``out``, and returns the log dir and the logged rows."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((256, 8)), jnp.float32)
  y = jnp.asarray(np.sin(x @ rng.standard_normal((8, 1))), jnp.float32)
  model = MLP(nnx.Rngs(0))
  tx = optax.chain(oc.record_norms(), oc.clip_by_global_norm(1.0),
                   oc.record_norms(), optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, scale):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    # Every 25th step the gradient is blown up 100x: the spike shows in the
    # pre-clip per-layer norms, and the clip keeps the update bounded.
    grads = jax.tree.map(lambda g: g * scale, grads)
    optimizer.update(model, grads)
    return loss, grads, oc.clip_stats(optimizer.opt_state)

  rows = []
  with SummaryWriter(out) as writer:
    for step in range(steps):
      scale = jnp.float32(100.0 if step % 25 == 24 else 1.0)
      loss, grads, stats = train_step(model, optimizer, scale)
      row = {"loss": float(loss), **scalars(stats)}
      for key, value in row.items():
        writer.add_scalar(key, value, step)
      # tree_norms' keys are the leaves' paths ("hidden/kernel"), in
      # jax.tree.leaves order: they name each layer's histogram.
      for path, grad in zip(oc.tree_norms(grads), jax.tree.leaves(grads)):
        writer.add_histogram(f"grad/{path}", np.asarray(grad), step)
      rows.append(row)
  return out, rows


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--out", default="demo-results/tb")
  args = parser.parse_args()
  logdir, logged = main(args.steps, args.out)
  last = logged[-1]
  print(f"wrote {len(logged)} steps to {logdir}: final loss {last['loss']:.4f},"
        f" {len(last) - 1} clip_stats scalars per step")
