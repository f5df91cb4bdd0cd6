"""Adaptive clipping against injected gradient spikes, in a Flax NNX loop.

A small MLP learns a noisy nonlinear regression with Adam. Every
``SPIKE_EVERY`` steps the gradients are multiplied by a large factor (a
stand-in for the bad batches and numerical blow-ups of large runs). The same
run is repeated with no clipping, a fixed ``clip_by_global_norm`` (one norm,
and one per group: kernels and biases), AutoClip, ZClip, AdaGC, Fira's
norm-growth limiter, SPAM (``spam_clip`` + ``momentum_reset``), Stable-SPAM
(``adaclip`` + ``adagn``) and ``skip_step`` (on norm spikes, and on loss
spikes with the loss passed to ``update``); each run logs its pre-clip norm and the
threshold it used from ``oc.clip_stats`` (no second pass over the gradients).

Prints a table (final loss, steps clipped or skipped, wall time) and, with
matplotlib installed, saves ``demo-results/spiky_training.png``: the loss
curves and the gradient norm of each run with its threshold.

Run: ``python examples/spiky_training.py [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

SPIKE_EVERY = 25
SPIKE_FACTOR = 300.0
LEARNING_RATE = 1e-2


def make_data(seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-2, 2, size=(256, 4))
  y = np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.05 * rng.normal(
      size=(256, 1))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 32, rngs=rngs)
    self.out = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.tanh(self.l2(jax.nn.tanh(self.l1(x)))))


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _any_positive(prefix):
  """True when any clip_stats entry under ``prefix`` is nonzero."""
  return lambda stats: any(bool(jnp.any(v)) for k, v in stats.items()
                           if k.startswith(prefix))


def configs():
  """name -> (optimizer, clip_stats key of the pre-clip norm, of the
  threshold, a test of the stats for "this step was clipped or skipped",
  whether update gets the loss)."""
  adam = lambda: optax.adam(LEARNING_RATE)  # noqa: E731
  by_kind = lambda path, leaf: "bias" if leaf.ndim == 1 else "kernel"  # noqa: E731
  return {
      "no clipping": (adam(), None, None, None, False),
      "clip_by_global_norm": (
          optax.chain(oc.clip_by_global_norm(1.0), adam()),
          "clip_by_global_norm/global_norm", None,
          _any_positive("clip_by_global_norm/global_norm_clipped"), False),
      "clip_by_global_norm(groups)": (
          optax.chain(oc.clip_by_global_norm(1.0, groups=by_kind), adam()),
          None, None,
          _any_positive("clip_by_global_norm/group_clipped"), False),
      "autoclip": (optax.chain(oc.autoclip(10.0), adam()),
                   "autoclip/autoclip_norm", "autoclip/autoclip_threshold",
                   _any_positive("autoclip/autoclip_clipped"), False),
      "zclip": (optax.chain(oc.zclip(max_norm=None), adam()),
                "zclip/zclip_norm", "zclip/zclip_threshold",
                _any_positive("zclip/zclip_clipped"), False),
      "adagc": (optax.chain(oc.adagc(warmup_steps=20), adam()),
                "adagc/adagc_global_norm", None,
                _any_positive("adagc/adagc_num_clipped"), False),
      "clip_norm_growth": (
          optax.chain(oc.clip_norm_growth(), adam()),
          "clip_norm_growth/norm_growth_norm",
          "clip_norm_growth/norm_growth_limit",
          _any_positive("clip_norm_growth/norm_growth_clipped"), False),
      "spam (spam_clip + momentum_reset)": (
          optax.chain(oc.spam_clip(), oc.momentum_reset(adam())), None, None,
          _any_positive("spam_clip/spam_clip_num_clipped"), False),
      "stable-spam (adaclip + adagn)": (
          optax.chain(oc.adaclip(), oc.adagn(), adam()), None, None,
          _any_positive("adaclip/adaclip_num_clipped"), False),
      "skip_step": (oc.skip_step(adam(), spike_sigmas=6.0, window=50,
                                 warmup_steps=20),
                    "skip_step/skip_norm", "skip_step/skip_threshold",
                    _any_positive("skip_step/step_skipped"), False),
      "skip_step(loss)": (
          oc.skip_step(adam(), loss_window=50, loss_warmup_steps=20),
          "skip_step/skip_norm", None,
          _any_positive("skip_step/step_skipped"), True),
  }


def train(name, tx, norm_key, threshold_key, acted, with_loss, steps, x, y):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, factor):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    grads = jax.tree.map(lambda g: g * factor, grads)  # the injected spike
    # A spiking batch spikes the loss too (a bad batch): skip_step(loss)
    # sees the loss of the step it judges.
    if with_loss:
      optimizer.update(model, grads, loss=loss * factor)
    else:
      optimizer.update(model, grads)
    return loss, oc.global_norm(grads), oc.clip_stats(optimizer.opt_state)

  history = {"loss": [], "norm": [], "threshold": [], "acted": 0}
  start = time.perf_counter()
  for i in range(steps):
    factor = SPIKE_FACTOR if i > 0 and i % SPIKE_EVERY == 0 else 1.0
    loss, raw_norm, stats = step(model, optimizer, jnp.float32(factor))
    history["loss"].append(float(loss))
    history["norm"].append(float(stats[norm_key]) if norm_key else
                           float(raw_norm))
    history["threshold"].append(
        float(stats[threshold_key]) if threshold_key else
        (1.0 if name == "clip_by_global_norm" else float("nan")))
    if acted is not None:
      history["acted"] += int(acted(stats))
  history["seconds"] = time.perf_counter() - start
  history["final_loss"] = float(loss_fn(model, x, y))
  return history


def main(steps: int = 300, out: str | None = "demo-results",
         verbose: bool = True) -> dict:
  x, y = make_data()
  results = {}
  for name, (tx, norm_key, threshold_key, acted, with_loss) in (
      configs().items()):
    results[name] = train(name, tx, norm_key, threshold_key, acted,
                          with_loss, steps, x, y)
  if verbose:
    print(f"{'run':36s} {'final loss':>11s} {'steps acted':>12s} {'time s':>7s}")
    for name, h in results.items():
      print(f"{name:36s} {h['final_loss']:11.4f} {h['acted']:12d}"
            f" {h['seconds']:7.2f}")
  if out:
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("matplotlib not installed: no plot")
      return results
    os.makedirs(out, exist_ok=True)
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, h in results.items():
      ax_loss.plot(h["loss"], label=name)
      line, = ax_norm.plot(h["norm"], label=f"{name} norm", lw=0.8)
      if not np.all(np.isnan(h["threshold"])):
        ax_norm.plot(h["threshold"], "--", color=line.get_color(), lw=1.2,
                     label=f"{name} threshold")
    ax_loss.set(yscale="log", xlabel="step", ylabel="training loss (MSE)",
                title=f"gradients x{SPIKE_FACTOR:g} every {SPIKE_EVERY} steps")
    ax_norm.set(yscale="log", xlabel="step", ylabel="pre-clip global norm",
                title="norms (solid) and thresholds (dashed)")
    ax_loss.legend(fontsize=8)
    ax_norm.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = os.path.join(out, "spiky_training.png")
    fig.savefig(path, dpi=110)
    if verbose:
      print(f"saved {path}")
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default="demo-results")
  args = parser.parse_args()
  main(steps=args.steps, out=args.out)
