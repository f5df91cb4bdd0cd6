"""Train-step overhead: a jitted Flax NNX step with and without each clipper.

Two real models, each trained with AdamW:

* a transformer block (d=256, 4 heads, MLP 1024, layer norms) on a batch of
  16 sequences of 128 tokens (a regression target, as a stand-in layer);
* a small char-level transformer LM (vocab 96, d=128, 4 blocks built with
  ``nnx.vmap`` and run with ``nnx.scan``: stacked parameters) on batches of
  16 x 64 characters, with cross-entropy.

The step is the whole of ``loss -> grad -> optimizer update -> apply``,
jitted once through NNX's functional API. Rounds run every step once, in an
order rotated by one each round, with ``jax.block_until_ready``. A clipper's
overhead is the median over rounds of its per-round ratio to the unclipped
step of the same round, with a 95% bootstrap confidence interval (rounds
resampled with replacement). Rounds are added until every interval is at
most +-1% (half-width <= 0.01) or the time budget per model is spent; the
report says which. ``optax.clip_by_global_norm`` runs in the same rounds.

Usage: ``python benchmarks/bench_train_step.py [--budget SECONDS]``.
Writes ``benchmarks/results/train_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_clipping import RESULTS_DIR
from flax import nnx

import optaxclip as oc

MIN_ROUNDS = 20
TARGET_HALF_WIDTH = 0.01
BOOTSTRAP = 2000


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


class CharLM(nnx.Module):
  """A char-level LM whose blocks are stacked (nnx.vmap) and scanned."""

  def __init__(self, rngs, vocab=96, d=128, layers=4, seq=64):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(rngs, d=d, heads=4)

    self.blocks = make_blocks(rngs)
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(self.ln(run(x, self.blocks)))


def clippers():
  """name -> factory of the clipper (None: the unclipped step)."""
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
      "clip_norm_growth": lambda: oc.clip_norm_growth(),
      "spam_clip": lambda: oc.spam_clip(),
      "adaclip": lambda: oc.adaclip(),
      "adagn": lambda: oc.adagn(),
  }


def make_step(model, loss_of_output, make_clip, x, y):
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-4)
  if make_clip is not None:
    tx = optax.chain(make_clip(), tx)
  opt_state = tx.init(params)

  def loss_fn(p):
    return loss_of_output(nnx.merge(graphdef, p)(x), y)

  @jax.jit
  def step(p, s):
    grads = jax.grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  return step, params, opt_state


def bootstrap_ci(ratios: np.ndarray, rng: np.random.Generator):
  """95% percentile-bootstrap interval of the median of ``ratios``."""
  samples = rng.choice(ratios, size=(BOOTSTRAP, ratios.size), replace=True)
  medians = np.median(samples, axis=1)
  return float(np.percentile(medians, 2.5)), float(np.percentile(medians,
                                                                 97.5))


def bench(name, model_fn, loss_of_output, x, y, budget):
  factories = clippers()
  steps = {k: make_step(model_fn(nnx.Rngs(0)), loss_of_output, v, x, y)
           for k, v in factories.items()}
  for step, p, s in steps.values():
    jax.block_until_ready(step(p, s))
  names = list(steps)
  times = {k: [] for k in names}
  rng = np.random.default_rng(0)
  start_all = time.perf_counter()
  rounds, converged = 0, False
  while True:
    shift = rounds % len(names)
    for k in names[shift:] + names[:shift]:
      step, p, s = steps[k]
      start = time.perf_counter()
      jax.block_until_ready(step(p, s))
      times[k].append(time.perf_counter() - start)
    rounds += 1
    if rounds >= MIN_ROUNDS and rounds % 10 == 0:
      base = np.asarray(times["none"])
      widths = [np.diff(bootstrap_ci(np.asarray(times[k]) / base, rng))[0] / 2
                for k in names if k != "none"]
      converged = max(widths) <= TARGET_HALF_WIDTH
      if converged or time.perf_counter() - start_all > budget:
        break
  base = np.asarray(times["none"])
  out = {}
  for k in names:
    ratio = np.asarray(times[k]) / base
    lo, hi = bootstrap_ci(ratio, rng)
    out[k] = dict(model=name, clipper=k, rounds=rounds,
                  step_ms=1e3 * float(np.median(times[k])),
                  overhead=float(np.median(ratio)) - 1.0,
                  ci95=[lo - 1.0, hi - 1.0])
  print(f"  {name}: {rounds} rounds in {time.perf_counter() - start_all:.0f}"
        f" s, {'converged' if converged else 'budget spent'}", flush=True)
  return out, dict(rounds=rounds, converged=bool(converged),
                   seconds=time.perf_counter() - start_all)


def _mse(out, y):
  return jnp.mean((out - y) ** 2)


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", type=float, default=300.0,
                      help="seconds of rounds per model at most")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  results, meta = {}, {}
  x = jnp.asarray(rng.standard_normal((16, 128, 256)), jnp.float32)
  results["transformer_block"], meta["transformer_block"] = bench(
      "transformer_block", Block, _mse, x, x, args.budget)
  tokens = jnp.asarray(rng.integers(0, 96, (16, 65)), jnp.int32)
  results["char_lm_scanned"], meta["char_lm_scanned"] = bench(
      "char_lm_scanned", CharLM, _xent, tokens[:, :-1], tokens[:, 1:],
      args.budget)

  def cell(r):
    return (f"{r['step_ms']:.1f} | {100 * r['overhead']:+.1f}% "
            f"[{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}]")

  lines = ["| clipper | block step ms | block overhead [95% CI] |"
           " LM step ms | LM overhead [95% CI] |",
           "|---|---:|---:|---:|---:|"]
  for k in clippers():
    a, b = results["transformer_block"][k], results["char_lm_scanned"][k]
    lines.append(f"| `{k}` | {cell(a)} | {cell(b)} |")
  status = "; ".join(
      f"{m}: {v['rounds']} rounds, "
      + ("every CI within +-1%" if v["converged"] else
         f"budget of {args.budget:.0f} s spent before every CI reached +-1%")
      for m, v in meta.items())
  table = "\n".join(lines) + "\n\n" + status + "\n"
  header = (f"{datetime.date.today()}, {os.cpu_count()} CPUs "
            f"({platform.machine()}), jax {jax.__version__}, optax "
            f"{optax.__version__}: median per-round overhead over the "
            "unclipped step, rotated interleaved rounds, bootstrap 95% CI")
  print(header)
  print(table)
  os.makedirs(RESULTS_DIR, exist_ok=True)
  with open(os.path.join(RESULTS_DIR, "train_step.json"), "w") as f:
    json.dump(dict(date=str(datetime.date.today()), header=header,
                   meta=meta, results=results), f, indent=1)
  with open(os.path.join(RESULTS_DIR, "train_step.md"), "w") as f:
    f.write(header + "\n\n" + table)


if __name__ == "__main__":
  main()
