"""Exploding gradients in a vanilla tanh RNN on the adding problem.

The adding problem (Hochreiter & Schmidhuber 1997): each sequence has ``T``
steps of two channels, a value uniform in [0, 1] and a marker that is 1 at
exactly two positions (one in each half) and 0 elsewhere; the target is the
sum of the two marked values. Predicting the mean (1.0) scores MSE ~0.167.

The model is a vanilla tanh RNN written with Flax NNX (``nnx.Linear`` for
input->hidden and hidden->hidden, ``jax.lax.scan`` over time, a linear
readout of the last hidden state). Its recurrent matrix is initialised
orthogonal times ``RECURRENT_GAIN`` > 1, so back-propagation through time
multiplies gradients by a matrix of spectral radius > 1 at every step: the
gradient norm spikes by orders of magnitude and plain SGD at this learning
rate blows up. Every run trains the same model from the same initialisation
on the same stream of batches (one seeded NumPy generator per run), with one
entry of ``configs()`` changed: the clipper chained before SGD.

For every run the loop logs, each step, the training MSE of the fresh batch,
the global norm of the *raw* gradients (``oc.global_norm``, also for the
unclipped baseline) and, from ``oc.clip_stats``, whether the clipper acted
and the threshold of the adaptive methods. A run stops early once its loss
is non-finite.

Prints a table and writes ``<out>/summary.json`` and
``<out>/exploding_gradients.png`` (loss curves, pre-clip norms, adaptive
thresholds).

Metrics: ``final_loss`` is the MSE on a fixed held-out set of sequences
after training; ``best_loss`` the lowest 25-step moving average of the
training MSE; ``steps_to_0.05`` the first step at which that moving average
is below 0.05; ``diverged`` a non-finite loss or a loss above 10x the first
step's; ``pct_clipped`` the percentage of the run's steps on which the
method clipped (or skipped).

Run: ``python examples/exploding_gradients.py [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

try:
  from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in the [examples] extra
  tqdm = None

# Task, model and optimizer (tuned so the unclipped run blows up and the
# clipped one solves the task; see the report in the module docstring).
SEQ_LEN = 50
HIDDEN = 48
BATCH = 64
LEARNING_RATE = 0.1
RECURRENT_GAIN = 1.2
STEPS = 5000
CHUNK = 25          # steps per jitted lax.scan (the progress bar's tick)
SMOOTH = 25         # moving-average window for best_loss / steps_to_target
TARGET = 0.05
TRIVIAL_MSE = 1.0 / 6.0  # predicting 1.0: Var(u1 + u2) = 2 / 12
DATA_SEED = 0
EVAL_SEED = 12345
EVAL_SIZE = 1024
MODEL_SEED = 0


def adding_batch(rng: np.random.Generator, batch: int, seq_len: int):
  """A batch of the adding problem: ``x`` (batch, T, 2), ``y`` (batch, 1)."""
  values = rng.uniform(0.0, 1.0, size=(batch, seq_len)).astype(np.float32)
  half = seq_len // 2
  first = rng.integers(0, half, size=batch)
  second = rng.integers(half, seq_len, size=batch)
  markers = np.zeros((batch, seq_len), np.float32)
  rows = np.arange(batch)
  markers[rows, first] = 1.0
  markers[rows, second] = 1.0
  x = np.stack([values, markers], axis=-1)
  y = (values[rows, first] + values[rows, second])[:, None]
  return x, y.astype(np.float32)


class TanhRNN(nnx.Module):
  """h_t = tanh(W_x x_t + W_h h_{t-1} + b); prediction = readout(h_T)."""

  def __init__(self, hidden: int, gain: float, rngs: nnx.Rngs):
    self.hidden = hidden
    self.input = nnx.Linear(2, hidden, rngs=rngs)
    self.recurrent = nnx.Linear(
        hidden, hidden, use_bias=False,
        kernel_init=nnx.initializers.orthogonal(scale=gain), rngs=rngs)
    self.readout = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x):  # x: (batch, T, 2)
    inputs = self.input(x)  # (batch, T, hidden), bias included

    def cell(h, u):
      h = jnp.tanh(u + self.recurrent(h))
      return h, None

    h0 = jnp.zeros((x.shape[0], self.hidden), x.dtype)
    h_last, _ = jax.lax.scan(cell, h0, jnp.swapaxes(inputs, 0, 1))
    return self.readout(h_last)


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def configs(lr: float | None = None):
  """The one table of runs: name -> a factory of the whole optimizer.

  Every clipper is chained before plain SGD; ``skip_step`` wraps SGD.
  Measured (5000 steps): ``zclip`` keeps its default fixed cap
  ``max_norm=1.0``, which dominates here, so it matches
  ``clip_by_global_norm(1.0)``; with ``max_norm=None`` the 25 unclipped
  warmup steps already blow up. ``skip_step`` alone cannot help when every
  step's gradient is large: with ``max_norm=5`` it skips almost every step
  (no divergence, no learning); without a cap (``spike_sigmas=3``) the
  blow-up passes through during its warmup.
  """
  lr = LEARNING_RATE if lr is None else lr
  sgd = lambda: optax.sgd(lr)  # noqa: E731
  return {
      "baseline": sgd,
      "clip_by_value": lambda: optax.chain(oc.clip_by_value(0.1), sgd()),
      "clip_by_norm": lambda: optax.chain(oc.clip_by_norm(0.5), sgd()),
      "clip_by_global_norm": lambda: optax.chain(
          oc.clip_by_global_norm(1.0), sgd()),
      "adaptive_grad_clip": lambda: optax.chain(
          oc.adaptive_grad_clip(0.05), sgd()),
      "autoclip": lambda: optax.chain(oc.autoclip(10.0), sgd()),
      "zclip": lambda: optax.chain(oc.zclip(max_norm=1.0), sgd()),
      "adagc": lambda: optax.chain(oc.adagc(warmup_steps=100), sgd()),
      "skip_step": lambda: oc.skip_step(sgd(), max_norm=5.0,
                                        spike_sigmas=4.0, warmup_steps=50),
  }


# What counts as "clipped" for each method: a clip_stats key and whether it
# is a count (clipped when > 0) or a flag.
CLIPPED_KEY = {
    "clip_by_value": "clip_by_value/value_clipped",
    "clip_by_norm": "clip_by_norm/num_clipped_leaves",
    "clip_by_global_norm": "clip_by_global_norm/global_norm_clipped",
    "adaptive_grad_clip": "adaptive_grad_clip/num_clipped_units",
    "autoclip": "autoclip/autoclip_clipped",
    "zclip": "zclip/zclip_clipped",
    "adagc": "adagc/adagc_num_clipped",
    "skip_step": "skip_step/step_skipped",
}
THRESHOLD_KEY = {
    "autoclip": "autoclip/autoclip_threshold",
    "zclip": "zclip/zclip_threshold",
    "skip_step": "skip_step/skip_threshold",
}


def _moving_average(values, window):
  v = np.asarray(values, np.float64)
  if len(v) < window:
    return np.array([])
  c = np.cumsum(np.insert(v, 0, 0.0))
  return (c[window:] - c[:-window]) / window


def train(name, make_tx, steps, verbose=True):
  """Trains one run; returns its per-step history and metrics."""
  model = TanhRNN(HIDDEN, RECURRENT_GAIN, nnx.Rngs(MODEL_SEED))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  clipped_key = CLIPPED_KEY.get(name)
  threshold_key = THRESHOLD_KEY.get(name)

  def one_step(state, batch):
    x, y = batch
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    raw_norm = oc.global_norm(grads)  # pre-clip norm, for every run
    optimizer.update(model, grads)
    stats = oc.clip_stats(optimizer.opt_state)
    acted = (jnp.asarray(stats[clipped_key]) > 0 if clipped_key
             else jnp.asarray(False))
    threshold = (jnp.asarray(stats[threshold_key], jnp.float32)
                 if threshold_key else jnp.asarray(jnp.nan, jnp.float32))
    _, state = nnx.split((model, optimizer))
    return state, (loss, raw_norm, acted, threshold)

  @jax.jit
  def run_chunk(state, xs, ys):
    return jax.lax.scan(one_step, state, (xs, ys))

  rng = np.random.default_rng(DATA_SEED)  # same batch stream for every run
  hist = {"loss": [], "norm": [], "acted": [], "threshold": []}
  diverged_nonfinite = False
  bar = (tqdm(total=steps, desc=f"{name:20s}", leave=True, ncols=100)
         if (verbose and tqdm is not None) else None)
  start = time.perf_counter()
  done = 0
  while done < steps:
    n = min(CHUNK, steps - done)
    xs, ys = zip(*(adding_batch(rng, BATCH, SEQ_LEN) for _ in range(n)))
    state, (loss, norm, acted, thr) = run_chunk(
        state, jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)))
    loss, norm, acted, thr = map(np.asarray, (loss, norm, acted, thr))
    bad = np.flatnonzero(~np.isfinite(loss))
    keep = bad[0] + 1 if bad.size else n  # keep the first non-finite loss
    hist["loss"] += loss[:keep].tolist()
    hist["norm"] += norm[:keep].tolist()
    hist["acted"] += acted[:keep].tolist()
    hist["threshold"] += thr[:keep].tolist()
    done += keep
    if bar is not None:
      bar.update(keep)
      bar.set_postfix(loss=f"{float(loss[keep - 1]):.4g}")
    if bad.size:
      diverged_nonfinite = True
      break
  seconds = time.perf_counter() - start
  if bar is not None:
    if diverged_nonfinite:
      bar.set_postfix_str(f"non-finite loss at step {done}: stopped")
    bar.close()

  model, _ = nnx.merge(graphdef, state)
  x_eval, y_eval = adding_batch(np.random.default_rng(EVAL_SEED), EVAL_SIZE,
                                SEQ_LEN)
  final = float(jax.jit(loss_fn)(model, jnp.asarray(x_eval),
                                 jnp.asarray(y_eval)))
  losses = np.asarray(hist["loss"], np.float64)
  smooth = _moving_average(losses, SMOOTH) if np.isfinite(losses).all() else \
      _moving_average(losses[:-1], SMOOTH)
  finite_smooth = smooth[np.isfinite(smooth)]
  best = float(finite_smooth.min()) if finite_smooth.size else None
  hits = np.flatnonzero(smooth < TARGET)
  steps_to = int(hits[0] + SMOOTH) if hits.size else None
  initial = losses[0]
  diverged = bool(diverged_nonfinite or not math.isfinite(final)
                  or np.nanmax(np.where(np.isfinite(losses), losses, np.inf))
                  > 10 * initial)
  return {
      "history": hist,
      "final_loss": final if math.isfinite(final) else None,
      "best_loss": best,
      "diverged": diverged,
      "steps_to_0.05": steps_to,
      "pct_clipped": 100.0 * float(np.mean(hist["acted"])) if hist["acted"]
                     else 0.0,
      "steps_run": len(hist["loss"]),
      "seconds": seconds,
  }


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def print_table(runs):
  print(f"\n{'run':20s} {'final loss':>10s} {'best loss':>10s} "
        f"{'steps<0.05':>10s} {'diverged':>9s} {'% clipped':>9s} "
        f"{'time s':>7s}")
  for name, r in runs.items():
    div = "yes" if r["diverged"] else "no"
    if r["diverged"] and r["steps_run"] < STEPS_RUN[0]:
      div = f"@{r['steps_run']}"
    print(f"{name:20s} {_fmt(r['final_loss'], '10.4g')} "
          f"{_fmt(r['best_loss'], '10.4g')} "
          f"{_fmt(r['steps_to_0.05'], '10d')} {div:>9s} "
          f"{r['pct_clipped']:9.1f} {r['seconds']:7.1f}")
  print(f"(trivial predictor MSE {TRIVIAL_MSE:.3f}; '@N' = stopped at step N"
        " on a non-finite loss)")


STEPS_RUN = [STEPS]


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
  ax_loss, ax_norm, ax_thr = axes
  cmap = plt.get_cmap("tab10")
  for i, (name, r) in enumerate(results.items()):
    h = r["history"]
    color = cmap(i % 10)
    loss = np.asarray(h["loss"], np.float64)
    smooth = _moving_average(np.where(np.isfinite(loss), loss, np.nan), SMOOTH)
    label = name + (" (diverged)" if r["diverged"] else "")
    ax_loss.plot(np.arange(len(loss)), loss, color=color, lw=0.5, alpha=0.25)
    if smooth.size:
      ax_loss.plot(np.arange(SMOOTH - 1, len(loss)), smooth, color=color,
                   lw=1.5, label=label)
    else:
      ax_loss.plot(loss, color=color, lw=1.5, label=label)
    if r["diverged"] and len(loss) < STEPS_RUN[0]:
      ax_loss.axvline(len(loss), color=color, ls=":", lw=1)
      ax_loss.annotate(f"{name}: non-finite at step {len(loss)}",
                       (len(loss), 20.0), xytext=(6, 0),
                       textcoords="offset points", color=color, fontsize=8)
    norm = np.asarray(h["norm"], np.float64)
    ax_norm.plot(norm, color=color, lw=0.6, alpha=0.8, label=name)
    thr = np.asarray(h["threshold"], np.float64)
    if np.isfinite(thr).any():
      ax_thr.plot(norm, color=color, lw=0.4, alpha=0.25)
      ax_thr.plot(thr, color=color, lw=1.6, label=f"{name} threshold")
  ax_loss.axhline(TRIVIAL_MSE, color="k", ls="--", lw=1,
                  label="predict the mean (0.167)")
  ax_loss.axhline(TARGET, color="gray", ls=":", lw=1, label="MSE 0.05")
  ax_loss.set(yscale="log", ylim=(1e-2, 50.0), xlabel="step",
              ylabel="training MSE (axis cut at 50)",
              title=f"adding problem, T={SEQ_LEN}, tanh RNN, SGD lr="
                    f"{LEARNING_RATE:g} ({SMOOTH}-step mean)")
  ax_norm.set(yscale="log", xlabel="step",
              ylabel="global norm of the raw gradients",
              title="pre-clip gradient norm (every run)")
  ax_thr.set(yscale="log", xlabel="step", ylabel="norm",
             title="adaptive thresholds (bold) over each run's raw norm")
  ax_loss.legend(fontsize=7, ncol=2, loc="upper right")
  ax_norm.legend(fontsize=7, ncol=2, loc="upper right")
  if ax_thr.get_legend_handles_labels()[0]:
    ax_thr.legend(fontsize=8, loc="upper right")
  else:
    ax_thr.text(0.5, 0.5, "no run with an adaptive threshold",
                ha="center", transform=ax_thr.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(steps: int | None = None, out: str | None = "demo-results",
         runs=None, verbose: bool = True) -> dict:
  """Trains every run of ``configs()`` (or only ``runs``); returns the summary."""
  steps = STEPS if steps is None else int(steps)
  STEPS_RUN[0] = steps
  table = configs()
  names = list(table) if runs is None else list(runs)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown runs {unknown}; choose from {list(table)}")
  results = {}
  total = time.perf_counter()
  # optax.sgd adds int32 step counts to floats in places; keep JAX's default
  # promotion even if the caller enabled strict mode.
  with jax.numpy_dtype_promotion("standard"):
    for name in names:
      results[name] = train(name, table[name], steps, verbose=verbose)
  total = time.perf_counter() - total
  summary = {
      "runs": {name: {k: r[k] for k in ("final_loss", "best_loss", "diverged",
                                        "steps_to_0.05", "pct_clipped",
                                        "seconds")}
               for name, r in results.items()},
      "config": {
          "task": "adding problem", "seq_len": SEQ_LEN, "hidden": HIDDEN,
          "batch": BATCH, "steps": steps, "optimizer": "sgd",
          "learning_rate": LEARNING_RATE, "recurrent_init":
              f"orthogonal * {RECURRENT_GAIN}",
          "data_seed": DATA_SEED, "model_seed": MODEL_SEED,
          "eval_size": EVAL_SIZE, "smooth_window": SMOOTH,
          "trivial_mse": TRIVIAL_MSE, "total_seconds": total,
      },
  }
  for name, r in results.items():
    summary["runs"][name]["pre_clip_norms"] = [
        float(v) if math.isfinite(v) else None for v in r["history"]["norm"]]
    summary["runs"][name]["losses"] = [
        float(v) if math.isfinite(v) else None for v in r["history"]["loss"]]
  if verbose:
    print_table(results)
    print(f"total time {total:.1f} s")
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    try:
      plot(results, os.path.join(out, "exploding_gradients.png"))
    except ImportError:
      if verbose:
        print("matplotlib not installed: no plot")
    if verbose:
      print(f"wrote {out}/summary.json and {out}/exploding_gradients.png")
  return summary


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None,
                      help=f"training steps per run (default {STEPS})")
  parser.add_argument("--out", default="demo-results")
  args = parser.parse_args()
  main(steps=args.steps, out=args.out)
