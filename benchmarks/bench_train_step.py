"""Train-step overhead: a jitted Flax NNX step with and without each clipper.

Two models, each trained with Adam: an MLP (512-2048-2048-512) on a batch of
256, and a transformer block (d=256, 4 heads, MLP 1024, layer norms) on a
batch of 16 sequences of 128 tokens. The step is the whole of
``loss -> grad -> optimizer update -> apply``, jitted once through NNX's
functional API, and timed as the minimum over interleaved rounds with
``jax.block_until_ready``. The number reported is each step's time over the
unclipped step's time (DESIGN target: ``clip_by_global_norm`` adds <= 3%).

Writes ``benchmarks/results/train_step.{json,md}``.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc
from bench_clipping import RESULTS_DIR

ROUNDS = 30


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(512, 2048, rngs=rngs)
    self.l2 = nnx.Linear(2048, 2048, rngs=rngs)
    self.l3 = nnx.Linear(2048, 512, rngs=rngs)

  def __call__(self, x):
    return self.l3(jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x)))))


class Block(nnx.Module):

  def __init__(self, rngs, d=256, heads=4):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


def clippers():
  return {
      "none": None,
      "clip_by_global_norm": lambda: oc.clip_by_global_norm(1.0),
      "optax.clip_by_global_norm": lambda: optax.clip_by_global_norm(1.0),
      "clip_by_norm": lambda: oc.clip_by_norm(1.0),
      "clip_by_value": lambda: oc.clip_by_value(0.01),
      "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.01),
      "autoclip": lambda: oc.autoclip(10.0),
      "zclip": lambda: oc.zclip(),
      "adagc": lambda: oc.adagc(),
  }


def make_step(model_fn, make_clip, x, y):
  model = model_fn(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-4)
  if make_clip is not None:
    tx = optax.chain(make_clip(), tx)
  opt_state = tx.init(params)

  def loss_fn(p):
    return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

  @jax.jit
  def step(p, s):
    grads = jax.grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  return step, params, opt_state


def bench(name, model_fn, x, y):
  steps = {k: make_step(model_fn, v, x, y) for k, v in clippers().items()}
  for step, p, s in steps.values():
    jax.block_until_ready(step(p, s))
  best = {k: float("inf") for k in steps}
  for _ in range(ROUNDS):
    for k, (step, p, s) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(p, s))
      best[k] = min(best[k], time.perf_counter() - start)
  return {k: dict(model=name, clipper=k, step_ms=1e3 * v,
                  vs_unclipped=v / best["none"]) for k, v in best.items()}


def main():
  rng = np.random.default_rng(0)
  results = {}
  x = jnp.asarray(rng.standard_normal((256, 512)), jnp.float32)
  results["mlp"] = bench("mlp", MLP, x, x)
  x = jnp.asarray(rng.standard_normal((16, 128, 256)), jnp.float32)
  results["transformer_block"] = bench("transformer_block", Block, x, x)
  lines = ["| clipper | MLP step ms | vs unclipped | transformer block step ms |"
           " vs unclipped |", "|---|---:|---:|---:|---:|"]
  for k in clippers():
    a, b = results["mlp"][k], results["transformer_block"][k]
    lines.append(f"| `{k}` | {a['step_ms']:.2f} | {a['vs_unclipped']:.3f} |"
                 f" {b['step_ms']:.2f} | {b['vs_unclipped']:.3f} |")
  table = "\n".join(lines) + "\n"
  print(f"{datetime.date.today()}, {os.cpu_count()} CPUs, jax {jax.__version__},"
        f" min of {ROUNDS} interleaved rounds")
  print(table)
  os.makedirs(RESULTS_DIR, exist_ok=True)
  with open(os.path.join(RESULTS_DIR, "train_step.json"), "w") as f:
    json.dump(dict(date=str(datetime.date.today()), results=results), f,
              indent=1)
  with open(os.path.join(RESULTS_DIR, "train_step.md"), "w") as f:
    f.write(table)


if __name__ == "__main__":
  main()
