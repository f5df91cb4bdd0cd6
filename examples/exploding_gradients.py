"""Exploding gradients in a vanilla tanh RNN on the adding problem.

The adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013):
each sequence has ``T`` steps of two channels, a value uniform in [0, 1] and
a marker that is 1 at exactly two positions (one in each half) and 0
elsewhere; the target is the sum of the two marked values. Predicting the
mean (1.0) scores MSE 1/6 ~ 0.167.

The model is a vanilla tanh RNN written with Flax NNX (``nnx.Linear`` for
input->hidden and hidden->hidden, ``jax.lax.scan`` over time, a linear
readout of the last hidden state); no gates. Its recurrent matrix is
initialised orthogonal times ``RECURRENT_GAIN`` > 1, so back-propagation
through time multiplies gradients by a matrix of spectral radius > 1 at every
step and the gradient norm spikes by orders of magnitude. The optimizer is
SGD with Nesterov momentum 0.9 and a cosine learning-rate decay to 0 over
the run; without clipping, its first large steps blow the loss up.

Every run trains the same model from the same initialisation on the same
stream of fresh batches, with one entry of ``configs()`` changed: the
clipper chained before SGD. A whole run -- data generation
(``jax.random``), ``STEPS`` training steps and a held-out evaluation every
``EVAL_EVERY`` steps -- is one jitted program (a ``lax.scan`` over blocks of
``EVAL_EVERY`` steps, each a ``lax.scan`` over steps), ``vmap``-ed over
seeds: ``--seeds N`` trains N seeds of every run with one compile per run.
Each run is compiled in a background thread while the previous one trains.
The held-out set (``EVAL_SIZE`` sequences) is drawn from its own seed
(``EVAL_SEED``), never from the training stream.

For every step the loop logs the training MSE of the fresh batch, the global
norm of the *raw* gradients (``oc.global_norm``, also for the unclipped
baseline) and, from ``oc.clip_stats``, whether the clipper acted and the
threshold of the adaptive methods.

Metrics (all MSEs of the held-out set, except ``diverged``):
``final_mse`` after the last step; ``best_mse`` the lowest of the
evaluations; ``steps_to_0.05`` / ``steps_to_0.01`` the first evaluation step
below that MSE; ``diverged`` a non-finite training loss or one above 10x the
first step's; ``pct_clipped`` the percentage of the steps on which the
method clipped (or skipped). With several seeds, these are seed 0's, and
``seeds`` in the summary holds every seed's final and best MSE.

Prints a table and writes ``<out>/summary.json`` and
``<out>/exploding_gradients.png`` (MSE curves, pre-clip norms, adaptive
thresholds).

Run: ``python examples/exploding_gradients.py [--steps N] [--out DIR]
[--seeds N] [--runs NAME ...]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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

# Task, model and optimizer. Measured (docs/demo.md): with these settings the
# unclipped run blows up within its first steps, and clip_by_global_norm(0.5)
# ends below held-out MSE 0.01 for every seed tried.
SEQ_LEN = 50
HIDDEN = 48
BATCH = 64
LEARNING_RATE = 0.05  # peak; cosine decay to 0 over the run
MOMENTUM = 0.9        # Nesterov
RECURRENT_GAIN = 1.2
STEPS = 3000
EVAL_EVERY = 100      # held-out evaluation period (steps)
SMOOTH = 25           # moving-average window of the plotted training MSE
TARGETS = (0.05, 0.01)
DIVERGE_FACTOR = 10.0
TRIVIAL_MSE = 1.0 / 6.0  # predicting 1.0: Var(u1 + u2) = 2 / 12
DATA_SEED = 0
EVAL_SEED = 12345
EVAL_SIZE = 1024
MODEL_SEED = 0


def adding_batch(key, batch: int, seq_len: int):
  """A batch of the adding problem: ``x`` (batch, T, 2), ``y`` (batch, 1).

  One ``jax.random.uniform`` call per batch: ``T`` values and two more
  uniforms that place the markers (one in each half).
  """
  u = jax.random.uniform(key, (batch, seq_len + 2), jnp.float32)
  values = u[:, :seq_len]
  half = seq_len // 2
  first = jnp.minimum(jnp.floor(u[:, seq_len:seq_len + 1] * half), half - 1)
  second = half + jnp.minimum(
      jnp.floor(u[:, seq_len + 1:] * (seq_len - half)), seq_len - half - 1)
  t = jnp.arange(seq_len, dtype=jnp.float32)
  markers = ((t[None, :] == first) | (t[None, :] == second)).astype(
      jnp.float32)
  x = jnp.stack([values, markers], axis=-1)
  y = jnp.sum(values * markers, axis=1, keepdims=True)
  return x, y


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


def configs(lr: float | None = None, steps: int | None = None):
  """The one table of runs: name -> a factory of the whole optimizer.

  Every clipper is chained before the same SGD (Nesterov momentum, cosine
  decay); ``skip_step`` wraps it. The thresholds were picked on this task
  (docs/demo.md has the measurements). ``zclip`` keeps its defaults: it
  ends close to ``clip_by_global_norm(1.0)`` (measured: held-out MSE 0.0080,
  35% of steps clipped), and with ``max_norm=None`` its unclipped warmup
  steps already blow up. ``autoclip``'s threshold is a percentile of the
  norms seen so far, so its first steps are not clipped: from seed 0 it
  learns, from seeds 1-4 (first norms 8-38) it stalls at the mean.
  ``skip_step`` is a guard against rare spikes, not a clipper: here it
  accepts the first step, which leaves the model worse than predicting the
  mean, and every later gradient is above its cap, so it skips the rest.
  """
  lr = LEARNING_RATE if lr is None else lr
  steps = STEPS if steps is None else steps
  schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
  sgd = lambda: optax.sgd(schedule, momentum=MOMENTUM, nesterov=True)  # noqa: E731
  return {
      "baseline": sgd,
      "clip_by_value": lambda: optax.chain(
          oc.clip_by_value(0.01, diagnostics=True), sgd()),
      "clip_by_norm": lambda: optax.chain(oc.clip_by_norm(0.25), sgd()),
      "clip_by_global_norm": lambda: optax.chain(
          oc.clip_by_global_norm(0.5), sgd()),
      "adaptive_grad_clip": lambda: optax.chain(
          oc.adaptive_grad_clip(0.05), sgd()),
      "autoclip": lambda: optax.chain(oc.autoclip(10.0), sgd()),
      "zclip": lambda: optax.chain(oc.zclip(), sgd()),
      "adagc": lambda: optax.chain(oc.adagc(warmup_steps=20), sgd()),
      "skip_step": lambda: oc.skip_step(sgd(), max_norm=5.0,
                                        spike_sigmas=4.0, warmup_steps=50),
  }


# What counts as "clipped" for each method: a clip_stats key, clipped when
# > 0 (a count or a flag).
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


def _eval_period(steps):
  """``EVAL_EVERY``, or a divisor of ``steps`` (evaluations on a grid)."""
  return math.gcd(steps, EVAL_EVERY)


def make_run(name, make_tx, graphdef, steps):
  """The whole training run of one seed, as a pure function to jit/vmap.

  ``run(params, data_key, x_eval, y_eval)`` returns the per-step history
  (training loss, raw gradient norm, clipped flag, threshold) and the
  held-out MSE before training and after every ``_eval_period(steps)``
  steps.
  """
  tx = make_tx()
  clipped_key = CLIPPED_KEY.get(name)
  threshold_key = THRESHOLD_KEY.get(name)
  period = _eval_period(steps)

  def mse(params, x, y):
    return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

  def run(params, data_key, x_eval, y_eval):
    def one_step(carry, batch):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(mse)(params, *batch)
      raw_norm = oc.global_norm(grads)  # pre-clip norm, for every run
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      stats = oc.clip_stats(opt_state)
      acted = (jnp.asarray(stats[clipped_key]) > 0 if clipped_key
               else jnp.asarray(False))
      threshold = (jnp.asarray(stats[threshold_key], jnp.float32)
                   if threshold_key else jnp.asarray(jnp.nan, jnp.float32))
      return (params, opt_state), (loss, raw_norm, acted, threshold)

    def block(carry, b):
      # `period` fresh batches (one draw), `period` steps, then a held-out
      # evaluation.
      x, y = adding_batch(jax.random.fold_in(data_key, b), period * BATCH,
                          SEQ_LEN)
      batches = (x.reshape(period, BATCH, SEQ_LEN, 2),
                 y.reshape(period, BATCH, 1))
      carry, hist = jax.lax.scan(one_step, carry, batches)
      return carry, (hist, mse(carry[0], x_eval, y_eval))

    first = mse(params, x_eval, y_eval)
    _, (hist, evals) = jax.lax.scan(block, (params, tx.init(params)),
                                    jnp.arange(steps // period))
    hist = jax.tree.map(lambda a: a.reshape(steps), hist)
    return hist, jnp.concatenate([first[None], evals])

  return run


def metrics(loss, norm, acted, threshold, evals, steps):
  """One seed's history (NumPy) -> its history lists and metrics."""
  bad = np.flatnonzero(~np.isfinite(loss))
  keep = bad[0] + 1 if bad.size else steps  # keep the first non-finite loss
  period = _eval_period(steps)
  eval_steps = np.arange(0, steps + 1, period)
  finite_evals = np.where(np.isfinite(evals), evals, np.inf)
  final = float(evals[-1]) if math.isfinite(evals[-1]) else None
  kept = loss[:keep]
  peak = np.max(np.where(np.isfinite(kept), kept, np.inf))
  out = {
      "final_mse": final,
      "best_mse": (float(finite_evals.min()) if np.isfinite(finite_evals).any()
                   else None),
      "diverged": bool(bad.size or final is None
                       or peak > DIVERGE_FACTOR * loss[0]),
      "pct_clipped": 100.0 * float(np.mean(acted[:keep])),
      "steps_run": int(keep),
      "history": {
          "loss": kept, "norm": norm[:keep], "acted": acted[:keep],
          "threshold": threshold[:keep], "eval_steps": eval_steps,
          "heldout_mse": evals,
      },
  }
  for target in TARGETS:
    hits = np.flatnonzero(evals < target)
    out[f"steps_to_{target:g}"] = int(eval_steps[hits[0]]) if hits.size else None
  return out


def compile_run(name, make_tx, steps, seeds=1):
  """Builds ``seeds`` seeds of one run and compiles their vmapped training.

  Returns ``(run, compile_seconds)``: ``run()`` trains every seed and
  returns seed 0's history and metrics, plus every seed's final and best
  MSE. ``main`` compiles the next run in a background thread while this
  one trains.
  """
  start = time.perf_counter()
  models = [TanhRNN(HIDDEN, RECURRENT_GAIN, nnx.Rngs(MODEL_SEED + s))
            for s in range(seeds)]
  graphdef = nnx.graphdef(models[0])
  params = jax.tree.map(lambda *a: jnp.stack(a),
                        *[nnx.state(m) for m in models])
  # One stream of fresh training batches per seed; the held-out set comes
  # from its own seed.
  data_keys = jax.vmap(lambda s: jax.random.fold_in(
      jax.random.key(DATA_SEED), s))(jnp.arange(seeds))
  x_eval, y_eval = adding_batch(jax.random.key(EVAL_SEED), EVAL_SIZE, SEQ_LEN)
  # optax.sgd adds int32 step counts to floats in places; keep JAX's default
  # promotion even if the caller enabled strict mode (a thread-local
  # setting: it must be set in the thread that traces).
  with jax.numpy_dtype_promotion("standard"):
    vmapped = jax.vmap(make_run(name, make_tx, graphdef, steps),
                       in_axes=(0, 0, None, None))
    compiled = jax.jit(vmapped).lower(
        params, data_keys, x_eval, y_eval).compile()
  compile_seconds = time.perf_counter() - start

  def run():
    start = time.perf_counter()
    (loss, norm, acted, threshold), evals = jax.block_until_ready(
        compiled(params, data_keys, x_eval, y_eval))
    seconds = time.perf_counter() - start
    loss, norm, acted, threshold, evals = map(
        np.asarray, (loss, norm, acted, threshold, evals))
    per_seed = [metrics(loss[s], norm[s], acted[s], threshold[s], evals[s],
                        steps) for s in range(seeds)]
    result = dict(per_seed[0])
    result["seconds"] = seconds
    result["compile_seconds"] = compile_seconds
    if seeds > 1:
      result["seeds"] = {
          k: [r[k] for r in per_seed]
          for k in ("final_mse", "best_mse", "diverged", "steps_to_0.01")}
    return result

  return run, compile_seconds


def _fmt(v, spec):
  width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
  return "-".rjust(width) if v is None else format(v, spec)


def print_table(runs, steps):
  seeds = "seeds" in next(iter(runs.values()))
  print(f"\n{'run':20s} {'final MSE':>9s} {'best MSE':>9s} {'to<0.05':>7s} "
        f"{'to<0.01':>7s} {'%clip':>6s} {'diverged':>9s} {'train s':>7s} "
        f"{'compile s':>9s}"
        + ("  final MSE of every seed" if seeds else ""))
  for name, r in runs.items():
    div = "yes" if r["diverged"] else "no"
    if r["steps_run"] < steps:
      div = f"@{r['steps_run']}"
    line = (f"{name:20s} {_fmt(r['final_mse'], '9.4f')} "
            f"{_fmt(r['best_mse'], '9.4f')} "
            f"{_fmt(r['steps_to_0.05'], '7d')} "
            f"{_fmt(r['steps_to_0.01'], '7d')} {r['pct_clipped']:6.1f} "
            f"{div:>9s} {r['seconds']:7.1f} {r['compile_seconds']:9.1f}")
    if seeds:
      line += "  " + " ".join(_fmt(v, ".4f")
                              for v in r["seeds"]["final_mse"])
    print(line)
  print(f"(held-out MSE; predicting the mean scores {TRIVIAL_MSE:.3f}; "
        "'@N' = non-finite loss at step N)")


def plot(results, steps, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
  ax_loss, ax_norm, ax_thr = axes
  cmap = plt.get_cmap("tab10")
  top = 50.0
  for i, (name, r) in enumerate(results.items()):
    h = r["history"]
    color = cmap(i % 10)
    loss = np.asarray(h["loss"], np.float64)
    smooth = _moving_average(np.where(np.isfinite(loss), loss, np.nan), SMOOTH)
    if smooth.size:
      ax_loss.plot(np.arange(SMOOTH - 1, len(loss)), smooth, color=color,
                   lw=0.6, alpha=0.35)
    else:
      ax_loss.plot(loss, color=color, lw=0.6, alpha=0.35)
    evals = np.asarray(h["heldout_mse"], np.float64)
    shown = np.isfinite(evals)
    label = name + (" (diverged)" if r["diverged"] else "")
    ax_loss.plot(np.asarray(h["eval_steps"])[shown], evals[shown],
                 color=color, lw=1.8, label=label)
    if r["diverged"]:  # its every-step training MSE, bold, up to the cut
      finite = np.where(np.isfinite(loss), loss, np.nan)
      ax_loss.plot(np.arange(len(loss)), np.minimum(finite, top), color=color,
                   lw=1.8)
      where = r["steps_run"] if r["steps_run"] < steps else int(
          np.nanargmax(finite))
      what = ("training MSE non-finite" if r["steps_run"] < steps else
              f"training MSE {np.nanmax(finite):.2g}")
      ax_loss.annotate(f"{name}: {what} at step {where}", (where, top),
                       xytext=(8, -12 - 10 * i), textcoords="offset points",
                       color=color, fontsize=8)
    norm = np.asarray(h["norm"], np.float64)
    ax_norm.plot(norm, color=color, lw=0.6, alpha=0.8, label=name)
    thr = np.asarray(h["threshold"], np.float64)
    if np.isfinite(thr).any():
      ax_thr.plot(norm, color=color, lw=0.4, alpha=0.25)
      ax_thr.plot(thr, color=color, lw=1.6, label=f"{name} threshold")
  ax_loss.axhline(TRIVIAL_MSE, color="k", ls="--", lw=1,
                  label="predict the mean (0.167)")
  for target, ls in zip(TARGETS, (":", "-.")):
    ax_loss.axhline(target, color="gray", ls=ls, lw=1, label=f"MSE {target:g}")
  ax_loss.set(yscale="log", ylim=(1e-3, top), xlabel="step",
              ylabel="MSE (axis cut at 50)",
              title=f"adding problem T={SEQ_LEN}, tanh RNN, SGD "
                    f"lr={LEARNING_RATE:g} mom={MOMENTUM:g} cosine\n"
                    f"bold: held-out MSE every {_eval_period(steps)} steps; "
                    f"faint: training MSE ({SMOOTH}-step mean)")
  ax_norm.set(yscale="log", xlabel="step",
              ylabel="global norm of the raw gradients",
              title="pre-clip gradient norm (every run)")
  ax_thr.set(yscale="log", xlabel="step", ylabel="norm",
             title="adaptive thresholds (bold) over each run's raw norm")
  ax_loss.legend(fontsize=7, ncol=2, loc="lower left")
  ax_norm.legend(fontsize=7, ncol=2, loc="upper right")
  if ax_thr.get_legend_handles_labels()[0]:
    ax_thr.legend(fontsize=8, loc="upper right")
  else:
    ax_thr.text(0.5, 0.5, "no run with an adaptive threshold",
                ha="center", transform=ax_thr.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _jsonable(values):
  return [None if not math.isfinite(v) else float(v) for v in values]


def main(steps: int | None = None, out: str | None = "demo-results",
         runs=None, verbose: bool = True, seeds: int = 1) -> dict:
  """Trains every run of ``configs()`` (or only ``runs``); returns the summary."""
  steps = STEPS if steps is None else int(steps)
  table = configs(steps=steps)
  names = list(table) if runs is None else list(runs)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown runs {unknown}; choose from {list(table)}")
  results = {}
  total = time.perf_counter()
  bar = (tqdm(total=len(names), ncols=100, leave=False)
         if (verbose and tqdm is not None) else None)
  # Compiling is single-threaded and so is training this small RNN: compile
  # run i+1 in a background thread while run i trains.
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = [pool.submit(compile_run, name, table[name], steps, seeds)
               for name in names]
    for name, future in zip(names, pending):
      if bar is not None:
        bar.set_description(f"{name:20s}")
      run, _ = future.result()
      results[name] = run()
      if bar is not None:
        bar.update()
  if bar is not None:
    bar.close()
  total = time.perf_counter() - total
  keys = ("final_mse", "best_mse", "steps_to_0.05", "steps_to_0.01",
          "pct_clipped", "diverged", "steps_run", "seconds", "compile_seconds")
  summary = {
      "runs": {name: {k: r[k] for k in keys} for name, r in results.items()},
      "config": {
          "task": "adding problem", "seq_len": SEQ_LEN, "hidden": HIDDEN,
          "batch": BATCH, "steps": steps, "optimizer":
              f"sgd nesterov momentum {MOMENTUM:g}, cosine decay to 0",
          "learning_rate": LEARNING_RATE, "recurrent_init":
              f"orthogonal * {RECURRENT_GAIN}",
          "data_seed": DATA_SEED, "model_seed": MODEL_SEED,
          "eval_seed": EVAL_SEED, "eval_size": EVAL_SIZE,
          "eval_every": _eval_period(steps), "seeds": seeds,
          "diverge_factor": DIVERGE_FACTOR, "trivial_mse": TRIVIAL_MSE,
          "total_seconds": total,
      },
  }
  for name, r in results.items():
    h, s = r["history"], summary["runs"][name]
    if "seeds" in r:
      s["seeds"] = r["seeds"]
    s["eval_steps"] = [int(v) for v in h["eval_steps"]]
    s["heldout_mse"] = _jsonable(h["heldout_mse"])
    s["losses"] = _jsonable(h["loss"])
    s["pre_clip_norms"] = _jsonable(h["norm"])
  if verbose:
    print_table(results, steps)
    print(f"total time {total:.1f} s")
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    try:
      plot(results, steps, os.path.join(out, "exploding_gradients.png"))
    except ImportError:
      if verbose:
        print("matplotlib not installed: no plot")
    if verbose:
      print(f"wrote {out}/summary.json and {out}/exploding_gradients.png")
  return summary


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None,
                      help=f"training steps per run (default {STEPS}; "
                           f"held-out evaluations every gcd(steps, "
                           f"{EVAL_EVERY}) steps)")
  parser.add_argument("--out", default="demo-results")
  parser.add_argument("--seeds", type=int, default=1,
                      help="seeds per run, vmapped (one compile per run); "
                           "the table and figure show seed 0")
  parser.add_argument("--runs", nargs="*", default=None,
                      help="a subset of the runs (default: all)")
  args = parser.parse_args()
  main(steps=args.steps, out=args.out, runs=args.runs, seeds=args.seeds)
