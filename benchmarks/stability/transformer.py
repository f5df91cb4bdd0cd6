"""Transformer instabilities at laptop scale: which clipper helps, and when.

Wortsman et al., `Small-scale proxies for large-scale Transformer training
instabilities <https://arxiv.org/abs/2309.14322>`_, 2023, showed that the two
instabilities of large transformers appear in small ones at high learning
rates: attention-logit growth (without qk-layernorm) and output-logit
divergence (without z-loss). This task reproduces the first on a char-level
LM that trains on 2 CPU cores, and measures every clipper against it with
their summary number, the **LR sensitivity**:

  E over lr of [ min(loss(lr), loss at init) - min over lr of loss(lr) ]

over the learning rates of the sweep, per seed (lower is better).

The model follows their recipe at a small size: a pre-LayerNorm decoder
without biases, learned positions, untied output head; AdamW (0.9, 0.95,
eps 1e-8) with independent weight decay 1e-4, linear warmup then cosine
decay; z-loss 1e-4. The rows change one thing each: a clipper in the
optimizer chain, or an architectural fix (qk-layernorm), or the recipe
without z-loss and weight decay (the output-logit instability).

Every run records the held-out loss at the end, the largest pre-softmax
attention logit of each layer over training (the maximum over heads, batch
and causal positions, on the training batches), and a layer-0 trace for
the figure. A run **diverged** when its final held-out loss is not finite
or not below its loss at init, or when an attention logit passed 1e4.

All runs of a row (learning rates x seeds) are one ``jax.vmap`` of one
``lax.scan``: one compile per row.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top

# Wortsman et al.'s sweep (3e-4 ... 3e-1), one half-decade apart.
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SEEDS = (0, 1, 2)
LOGIT_DIVERGED = 1e4
WEIGHT_DECAY = 1e-4
Z_LOSS = 1e-4


@dataclasses.dataclass(frozen=True)
class Config:
  d: int = 64
  heads: int = 2
  layers: int = 2
  seq: int = 32
  batch: int = 8
  steps: int = 300
  warmup: int = 30
  vocab: int = tasks_lib._VOCAB  # pylint: disable=protected-access


def _dense(rngs: nnx.Rngs, *shape: int, fan_in: int) -> nnx.Param:
  return nnx.Param(jax.random.normal(rngs.params(), shape) / math.sqrt(fan_in))


def _layer_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  # No bias, as in the recipe; statistics in float32.
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale


class Attention(nnx.Module):
  """Causal multi-head attention; q/k/v kernels are ``(d, heads, head_dim)``
  (Flax's ``MultiHeadAttention`` layout), the output ``(heads, head_dim, d)``.
  """

  def __init__(self, cfg: Config, qk_norm: bool, rngs: nnx.Rngs):
    hd = cfg.d // cfg.heads
    self.query = _dense(rngs, cfg.d, cfg.heads, hd, fan_in=cfg.d)
    self.key = _dense(rngs, cfg.d, cfg.heads, hd, fan_in=cfg.d)
    self.value = _dense(rngs, cfg.d, cfg.heads, hd, fan_in=cfg.d)
    self.out = _dense(rngs, cfg.heads, hd, cfg.d, fan_in=cfg.d)
    self.qk_norm = qk_norm
    if qk_norm:
      self.query_norm = nnx.Param(jnp.ones((hd,)))
      self.key_norm = nnx.Param(jnp.ones((hd,)))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    q = jnp.einsum("btd,dhk->bthk", x, self.query[...])
    k = jnp.einsum("btd,dhk->bthk", x, self.key[...])
    v = jnp.einsum("btd,dhk->bthk", x, self.value[...])
    if self.qk_norm:
      q = _layer_norm(q, self.query_norm[...])
      k = _layer_norm(k, self.key_norm[...])
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
    seq = x.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    # Per-head maximum over the batch and the causal positions: what
    # QK-Clip needs, and what the study logs.
    max_logits = oc.max_attention_logits(q, k, is_causal=True)
    weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    mixed = jnp.einsum("bhqt,bthk->bqhk", weights, v)
    return jnp.einsum("bqhk,hkd->bqd", mixed, self.out[...]), max_logits


class Block(nnx.Module):

  def __init__(self, cfg: Config, qk_norm: bool, rngs: nnx.Rngs):
    self.ln1 = nnx.Param(jnp.ones((cfg.d,)))
    self.attn = Attention(cfg, qk_norm, rngs)
    self.ln2 = nnx.Param(jnp.ones((cfg.d,)))
    self.up = _dense(rngs, cfg.d, 4 * cfg.d, fan_in=cfg.d)
    self.down = _dense(rngs, 4 * cfg.d, cfg.d, fan_in=4 * cfg.d)

  def __call__(self, x):
    attended, max_logits = self.attn(_layer_norm(x, self.ln1[...]))
    x = x + attended
    hidden = jax.nn.gelu(_layer_norm(x, self.ln2[...]) @ self.up[...])
    return x + hidden @ self.down[...], max_logits


class Decoder(nnx.Module):
  """A pre-LN decoder-only char LM. ``__call__`` returns the logits and the
  per-layer, per-head maximum attention logits ``(layers, heads)``."""

  def __init__(self, cfg: Config, qk_norm: bool, rngs: nnx.Rngs):
    self.embed = nnx.Param(jax.random.normal(rngs.params(),
                                             (cfg.vocab, cfg.d)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                  (cfg.seq, cfg.d)))
    self.blocks = nnx.List([Block(cfg, qk_norm, rngs)
                            for _ in range(cfg.layers)])
    self.ln = nnx.Param(jnp.ones((cfg.d,)))
    self.head = _dense(rngs, cfg.d, cfg.vocab, fan_in=cfg.d)

  def __call__(self, tokens):
    x = self.embed[...][tokens] + self.pos[...][: tokens.shape[-1]]
    maxima = []
    for block in self.blocks:
      x, max_logits = block(x)
      maxima.append(max_logits)
    return _layer_norm(x, self.ln[...]) @ self.head[...], jnp.stack(maxima)


# ---------------------------------------------------------------------------
# Rows.


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the sweep.

  ``clip`` builds the transform that goes before Adam (on the gradient),
  ``after_adam`` one between Adam and the learning-rate scale (on the
  update direction), ``last`` one after the whole update is formed (with
  ``params``); ``wrap`` wraps the whole optimizer. ``extra`` names the
  update's extra arguments the row needs (``loss``, ``max_logits``).
  """

  name: str
  clip: Callable[[], optax.GradientTransformation] | None = None
  after_adam: Callable[[], optax.GradientTransformation] | None = None
  last: Callable[[], optax.GradientTransformation] | None = None
  wrap: Callable[[optax.GradientTransformation],
                 optax.GradientTransformation] | None = None
  qk_norm: bool = False
  z_loss: float = Z_LOSS
  weight_decay: float = WEIGHT_DECAY
  extra: tuple[str, ...] = ()
  note: str = ""


def _stable_spam(inner):
  return oc.momentum_reset(optax.chain(oc.adaclip(), oc.adagn(), inner))


def _rows() -> list[Row]:
  rows = [
      Row("none", note="the unstable reference"),
      Row("qk_layernorm", qk_norm=True, note="architectural fix"),
      Row("no z-loss, no wd", z_loss=0.0, weight_decay=0.0,
          note="output-logit reference"),
      Row("clip_by_global_norm(1)", clip=lambda: oc.clip_by_global_norm(1.0)),
      Row("clip_by_norm(1)", clip=lambda: oc.clip_by_norm(1.0)),
      Row("adaptive_grad_clip(0.01)",
          clip=lambda: oc.adaptive_grad_clip(0.01)),
      Row("zclip()", clip=oc.zclip),
      Row("adagc()", clip=oc.adagc),
      # The norm rule at the study's default (the library's default turns
      # it off and only skips non-finite steps).
      Row("skip_step(norm)", wrap=lambda inner: oc.skip_step(
          inner, spike_sigmas=6.0)),
      Row("skip_step(loss)", wrap=lambda inner: oc.skip_step(
          inner, spike_sigmas=None, loss_spike_sigmas=6.0), extra=("loss",)),
      Row("spam", clip=oc.spam_clip, wrap=oc.momentum_reset),
      Row("stable_spam", wrap=_stable_spam),
      Row("clip_norm_growth()", clip=oc.clip_norm_growth),
  ]
  if hasattr(oc, "spectral_clip"):
    # c = 5: the authors' value for their 160M-parameter runs.
    rows.append(Row("spectral_clip(5)", after_adam=lambda: oc.spectral_clip(
        5.0)))
  if hasattr(oc, "qk_clip"):
    rows += [qk_clip_row(100.0), qk_clip_row(TUNED_TAU)]
  return rows


TUNED_TAU = 30.0


def qk_clip_row(tau: float) -> Row:
  return Row(f"qk_clip({tau:g})", last=lambda: _qk_clip(tau),
             extra=("max_logits",),
             note="default tau" if tau == 100.0 else "tuned tau")


def _qk_clip(tau: float) -> optax.GradientTransformation:
  """QK-Clip on every layer's ``query`` and ``key`` kernels (the library's
  default patterns; heads on axis 1, Flax's layout)."""
  return oc.qk_clip(tau)


# ---------------------------------------------------------------------------
# The runner.


def _schedule(cfg: Config) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup to 1, then cosine decay to 0 (multiplies lr and wd)."""
  def factor(step):
    step = step.astype(jnp.float32)
    warm = step / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
    return jnp.where(step < cfg.warmup, warm, cosine)
  return factor


def build_optimizer(row: Row, cfg: Config, lr: jax.Array):
  """AdamW with independent weight decay: ``p -= s_t (lr * adam + wd * p)``."""
  sched = _schedule(cfg)
  parts = [] if row.clip is None else [row.clip()]
  parts.append(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8))
  if row.after_adam is not None:
    parts.append(row.after_adam())
  parts += [optax.add_decayed_weights(row.weight_decay / lr),
            optax.scale_by_schedule(lambda t: -lr * sched(t))]
  tx = optax.chain(*parts)
  if row.wrap is not None:
    tx = row.wrap(tx)
  if row.last is not None:
    tx = optax.chain(tx, row.last())
  return tx


def _data(cfg: Config):
  ids = tasks_lib.stdlib_text()
  split = int(0.9 * ids.size)
  train = jnp.asarray(ids[:split])
  held = ids[split:]
  n_eval = min(64, (held.size - 1) // (cfg.seq + 1))
  held_batch = jnp.asarray(
      held[: n_eval * (cfg.seq + 1)].reshape(n_eval, cfg.seq + 1))
  return train, held_batch


def make_runner(row: Row, cfg: Config):
  """A jitted ``(lrs, seeds) -> dict of per-run arrays`` for one row."""
  train, held_batch = _data(cfg)
  graphdef, _ = nnx.split(Decoder(cfg, row.qk_norm, nnx.Rngs(0)))

  def forward(state, windows):
    logits, max_logits = nnx.merge(graphdef, state)(windows[:, :-1])
    logits = logits.astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(
        logits, windows[:, 1:]).mean()
    z = jax.nn.logsumexp(logits, axis=-1)
    return xent + row.z_loss * jnp.mean(jnp.square(z)), (xent, max_logits)

  def one(lr, seed):
    key = jax.random.key(seed)
    k_init, k_data = jax.random.split(key)
    params = nnx.split(Decoder(cfg, row.qk_norm, nnx.Rngs(params=k_init)))[1]
    tx = build_optimizer(row, cfg, lr)
    opt_state = tx.init(params)
    initial = forward(params, held_batch)[1][0]

    def step(carry, t):
      params, opt_state = carry
      starts = jax.random.randint(jax.random.fold_in(k_data, t), (cfg.batch,),
                                  0, train.size - cfg.seq - 1)
      windows = jax.vmap(lambda s: jax.lax.dynamic_slice(
          train, (s,), (cfg.seq + 1,)))(starts)
      (loss, (xent, max_logits)), grads = jax.value_and_grad(
          forward, has_aux=True)(params, windows)
      extra = {}
      if "loss" in row.extra:
        extra["loss"] = loss
      if "max_logits" in row.extra:
        extra["max_logits"] = qk_maxima(max_logits)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (xent, jnp.max(max_logits, axis=1),
                                   _fired(opt_state))

    (params, opt_state), (losses, maxima, fired) = jax.lax.scan(
        step, (params, opt_state), jnp.arange(cfg.steps))
    final = forward(params, held_batch)[1][0]
    return {"initial": initial, "final_loss": final, "train_loss": losses,
            "max_logit": maxima, "fired": fired}

  return jax.jit(jax.vmap(one))


def qk_maxima(max_logits: jax.Array) -> dict[str, jax.Array]:
  """The model's ``(layers, heads)`` maxima keyed by attention module, as
  ``oc.qk_clip`` takes them."""
  return {f"blocks/{i}/attn": m for i, m in enumerate(max_logits)}


def _fired(opt_state) -> jax.Array:
  """How many heads QK-Clip clipped this step (0 for the other rows)."""
  stats = oc.clip_stats(opt_state)
  for key, value in stats.items():
    if key.endswith("num_clipped_heads"):
      return jnp.asarray(value, jnp.int32).sum()
  return jnp.zeros((), jnp.int32)


# ---------------------------------------------------------------------------
# Metrics.


def lr_sensitivity(final: np.ndarray, initial: np.ndarray) -> np.ndarray:
  """Wortsman et al.'s LR sensitivity per seed.

  ``final`` and ``initial`` are ``(num_lrs, num_seeds)``; a non-finite
  final loss counts as the loss at init.
  """
  capped = np.where(np.isfinite(final), np.minimum(final, initial), initial)
  best = capped.min(axis=0)
  return (capped - best).mean(axis=0)


def summarise(row: Row, out: dict[str, np.ndarray], lrs, n_seeds: int,
              seconds: float, stable_range) -> dict[str, Any]:
  n_lr = len(lrs)
  final = out["final_loss"].reshape(n_lr, n_seeds)
  initial = out["initial"].reshape(n_lr, n_seeds)
  peak = out["max_logit"].reshape(n_lr, n_seeds, *out["max_logit"].shape[1:])
  peak_per_layer = np.nanmax(np.where(np.isfinite(peak), peak, np.inf),
                             axis=2)  # (lr, seed, layers)
  blowup = (peak_per_layer > LOGIT_DIVERGED).any(-1)
  div = ~np.isfinite(final) | (final >= initial) | blowup
  sens = lr_sensitivity(final, initial)
  med = np.median(np.where(np.isfinite(final), final, np.nan), axis=1)
  ok = final[~div]
  fired = out["fired"].reshape(n_lr, n_seeds, -1)
  # The layer-0 trace of seed 0 at the top two learning rates, for figures.
  trace = out["max_logit"].reshape(n_lr, n_seeds, -1,
                                   peak.shape[-1])[:, 0, :, 0]
  return {
      "clipper": row.name, "argument": "", "note": row.note,
      "variants": {"default": {
          "median_metric": [None if not np.isfinite(m) else float(m)
                            for m in med],
          "any_diverged": div.any(axis=1).tolist(),
          "num_diverged": div.sum(axis=1).tolist(),
          "stable_range": stable_range(list(lrs), ~div.any(axis=1)),
          "best_metric": None if ok.size == 0 else float(ok.min()),
          "lr_sensitivity": sens.tolist(),
          "lr_sensitivity_median": float(np.median(sens)),
          "lr_sensitivity_spread": [float(sens.min()), float(sens.max())],
          "max_logit_per_layer": _listify(np.median(peak_per_layer, axis=1)),
          "logit_blowup": blowup.sum(axis=1).tolist(),
          "qk_clip_fired_steps": (fired > 0).sum(-1).mean(-1).tolist(),
          "final_max_logit_layer0": _listify(np.median(
              out["max_logit"].reshape(n_lr, n_seeds, -1, peak.shape[-1])[
                  :, :, -1, 0], axis=1)),
          "layer0_trace_seed0": _listify(trace[-3:]),
      }},
      "seconds": seconds,
  }


def _listify(a: np.ndarray):
  return [[None if not np.isfinite(x) else float(x) for x in r]
          if np.ndim(r) else (None if not np.isfinite(r) else float(r))
          for r in a]


def run(*, quick: bool, stable_range, names=None, log=print
        ) -> dict[str, Any]:
  """Every row of the task; ``stable_range`` is the study's rule."""
  cfg = Config(steps=30, warmup=5, batch=4, seq=32) if quick else Config()
  lrs = (LEARNING_RATES[0], LEARNING_RATES[-1]) if quick else LEARNING_RATES
  seeds = SEEDS[:1] if quick else SEEDS
  rows = _rows()
  if quick:
    rows = [r for r in rows if r.name in QUICK_ROWS]
  if names:
    rows = [r for r in rows if r.name in names]
  grid_lr = np.repeat(np.asarray(lrs, np.float32), len(seeds))
  grid_seed = np.tile(np.asarray(seeds, np.int32), len(lrs))
  log(f"transformer: d={cfg.d} layers={cfg.layers} heads={cfg.heads} "
      f"T={cfg.seq} batch={cfg.batch} steps={cfg.steps}, lrs {lrs}, "
      f"seeds {seeds}")
  out_rows = []
  for row in rows:
    start = time.perf_counter()
    out = jax.device_get(make_runner(row, cfg)(grid_lr, grid_seed))
    summary = summarise(row, out, lrs, len(seeds),
                        time.perf_counter() - start, stable_range)
    v = summary["variants"]["default"]
    log(f"  {row.name:26s} {summary['seconds']:6.1f} s  sens "
        f"{v['lr_sensitivity_median']:.3f}  loss "
        + " ".join("nan" if m is None else f"{m:.2f}"
                   for m in v["median_metric"])
        + "  logit0 " + " ".join("nan" if m[0] is None else f"{m[0]:.3g}"
                                 for m in v["max_logit_per_layer"]))
    out_rows.append(summary)
  return {
      "metric": "held-out loss (nats/char)", "higher_is_better": False,
      "base_optimizer": "AdamW (0.9, 0.95, eps 1e-8), wd 1e-4 independent, "
                        "warmup + cosine, z-loss 1e-4",
      "steps": cfg.steps, "config": dataclasses.asdict(cfg),
      "learning_rates": list(lrs), "seeds": list(seeds),
      "chance": float(np.log(cfg.vocab)), "rows": out_rows,
  }


QUICK_ROWS = frozenset({"none", "qk_layernorm", "qk_clip(100)"})


# ---------------------------------------------------------------------------
# Report.


def markdown(task: dict[str, Any]) -> list[str]:
  """The transformer task's summary table (LR sensitivity first)."""
  lrs = task["learning_rates"]
  lines = ["### transformer: LR sensitivity and attention logits", "",
           "LR sensitivity (Wortsman et al.): mean over the learning rates "
           "of min(loss, loss at init) - best loss, per seed; median "
           "[min, max] over seeds. `max logit`: median over seeds of the "
           "largest layer-0 attention logit during training, at the top "
           "three learning rates. `fired`: steps on which QK-Clip clipped a "
           "head (mean over seeds), at the top three learning rates.", "",
           "| row | LR sensitivity | stable range | best loss | max logit "
           f"(lr {', '.join(f'{lr:g}' for lr in lrs[-3:])}) | diverged runs "
           "| fired |", "|---|---|---:|---:|---|---:|---|"]
  for row in sorted(task["rows"], key=lambda r: r["variants"]["default"][
      "lr_sensitivity_median"]):
    v = row["variants"]["default"]
    low, high = v["lr_sensitivity_spread"]
    logits = ", ".join("nan" if m[0] is None else f"{m[0]:.3g}"
                       for m in v["max_logit_per_layer"][-3:])
    fired = ", ".join(f"{f:.0f}" for f in v["qk_clip_fired_steps"][-3:])
    best = "–" if v["best_metric"] is None else f"{v['best_metric']:.3f}"
    lines.append(
        f"| {row['clipper']} | {v['lr_sensitivity_median']:.3f} "
        f"[{low:.3f}, {high:.3f}] | {v['stable_range']:g} | {best} | "
        f"{logits} | {sum(v['num_diverged'])} | "
        f"{fired if row['clipper'].startswith('qk_clip') else '–'} |")
  return lines + [""]


def figures(task: dict[str, Any], out) -> list:
  """Final loss against lr (one curve per row), and the layer-0 maximum
  attention logit over training at the top learning rates."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lrs = task["learning_rates"]
  fig, ax = plt.subplots(figsize=(8, 5))
  for row in task["rows"]:
    v = row["variants"]["default"]
    losses = [np.nan if m is None else m for m in v["median_metric"]]
    style = "-" if row["note"] else "--"
    ax.plot(lrs, losses, style, marker="o", ms=3, label=row["clipper"],
            lw=2.2 if row["note"] else 1.0)
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("final held-out loss (median of seeds)")
  finite = [m for row in task["rows"]
            for m in row["variants"]["default"]["median_metric"]
            if m is not None]
  ax.set_ylim(min(finite) - 0.05, max(finite) + 0.1)
  ax.set_title("transformer: final loss against learning rate")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  first = out / "stability_transformer_lr.png"
  fig.savefig(first, dpi=110)
  plt.close(fig)
  shown = [r for r in task["rows"] if r["clipper"] in (
      "none", "qk_layernorm", "clip_by_global_norm(1)", "spectral_clip(5)")
           or r["clipper"].startswith("qk_clip")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, index in zip(axes, (-2, -1)):
    for row in shown:
      trace = row["variants"]["default"]["layer0_trace_seed0"][index]
      ax.plot([np.nan if t is None else t for t in trace],
              label=row["clipper"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"layer-0 max attention logit, lr {lrs[index]:g}, seed 0")
  axes[0].set_ylabel("max pre-softmax logit")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  second = out / "stability_transformer_logits.png"
  fig.savefig(second, dpi=110)
  plt.close(fig)
  return [first, second]
