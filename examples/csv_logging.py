"""Logging every clipper's diagnostics with ``oc.clip_stats``: CSV + a plot.

TensorBoard writers need extra dependencies, so this logs the flat
``oc.clip_stats`` dict (every scalar the clippers record in the optimizer
state) to a CSV file each step, then plots the columns with matplotlib. The
optimizer stacks two clippers, so their keys show how ``clip_stats``
disambiguates: ``optax.chain(oc.zclip(max_norm=None), oc.clip_by_global_norm
(5.0), optax.adam(1e-2))``.

Run: ``python examples/csv_logging.py [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc


def main(steps: int = 200, out: str = "demo-results", plot: bool = True
         ) -> str:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((128, 8)), jnp.float32)
  y = jnp.asarray(x @ rng.standard_normal((8, 1)), jnp.float32)
  params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros((1, 1))}
  tx = optax.chain(oc.zclip(max_norm=None, warmup_steps=10),
                   oc.clip_by_global_norm(5.0), optax.adam(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, factor):
    grads = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
    grads = jax.tree.map(lambda g: g * factor, grads)  # occasional spikes
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, oc.clip_stats(
        opt_state)

  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "clip_stats.csv")
  with open(path, "w", newline="") as f:
    writer = None
    for i in range(steps):
      factor = jnp.float32(50.0 if i % 40 == 39 else 1.0)
      params, opt_state, stats = step(params, opt_state, factor)
      row = {"step": i}
      for key, value in stats.items():
        value = np.asarray(value)
        if value.ndim == 0:  # scalars only; vectors (histories) are skipped
          row[key] = value.item()
      if writer is None:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
      writer.writerow(row)
  if plot:
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:
      return path
    with open(path) as f:
      rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in ("zclip/zclip_norm", "zclip/zclip_threshold",
                "clip_by_global_norm/global_norm"):
      ax.plot([float(r[key]) for r in rows], label=key)
    ax.set(yscale="log", xlabel="step", title="clip_stats logged to CSV")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "clip_stats.png"), dpi=100)
  return path


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--out", default="demo-results")
  args = parser.parse_args()
  print("wrote", main(args.steps, args.out))
