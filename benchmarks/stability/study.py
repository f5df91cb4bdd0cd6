"""Which clipper, when: a learning-rate x clipper sweep on four real tasks.

For every task (``tasks.py``) and every clipper (``clippers.py``) this trains
the task's model at every learning rate of its grid, with the clipper's
default threshold and with one tuned threshold, on three seeds, and reports
the final held-out metric.

How it fits on a laptop: one training run is one ``lax.scan``
over steps; the runs of a clipper are ``jax.vmap``-ed over (learning rate,
seed, threshold), with the learning rate applied after the base optimizer
(``params -= lr * base(clipper(g))``, exactly the optimizer with that learning
rate) and the threshold passed as a traced value. So each (task, clipper)
compiles once, and that program serves the tuning runs and the reported
runs (both batches have ``6 x len(learning_rates)`` runs).

Tuning, the same for every clipper: the tuned threshold is the candidate
(``Clipper.candidates``) with the best median score over all learning rates
on two tuning seeds (100 and 101), which the report does not use; a diverged
run scores as the trivial predictor. Reported seeds are 0, 1 and 2 (six
seeds for rows without a threshold, which need no tuning).

A run *diverged* when its final held-out loss is not finite or is no lower
than at initialisation. A learning rate is *stable* for a row when no seed
diverged; the *stable range* is the ratio of the largest to the smallest
learning rate of the longest run of consecutive stable grid points.

Usage::

  python benchmarks/stability/study.py            # the full study
  python benchmarks/stability/study.py --quick    # CI smoke (see QUICK_*)

Outputs ``stability.json``, ``stability.md`` and ``stability_<task>.png``
in ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clippers as clippers_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import transformer as transformer_lib  # noqa: E402  pylint: disable=g-import-not-at-top

# The tasks of the study: the four of tasks.py, and the transformer
# instability task of transformer.py (its own rows and metrics).
TASK_NAMES = (*tasks_lib.TASKS, "transformer")

REPORT_SEEDS = (0, 1, 2)
TUNING_SEEDS = (100, 101)
# --quick (the CI smoke run): the two extreme learning rates, few steps, the
# baselines and the global norm on every task (tests/test_stability_study.py
# also takes one step with every clipper, which checks the rest of the
# wiring at a fraction of the cost).
QUICK_STEPS = {"lm": 40, "digits": 60, "adding": 60, "dp_digits": 60}
QUICK_CLIPPERS = frozenset({"none", "clip_by_global_norm",
                            "none (not private)", "clip_per_example"})
RESULTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "results"


def make_runner(task: tasks_lib.Task, clipper: clippers_lib.Clipper):
  """A jitted ``(lrs, seeds, thrs) -> dict of per-run arrays``."""

  def one(lr, seed, thr):
    key = jax.random.key(seed)
    k_init, k_data = jax.random.split(key)
    params = task.init(k_init)
    tx = clipper.build(task.base_optimizer(), thr, seed)
    state = tx.init(params)
    initial, _ = task.evaluate(params)

    def step(carry, t):
      params, state = carry
      loss, grads = task.grads(params, jax.random.fold_in(k_data, t))
      updates, state = tx.update(grads, state, params)
      params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype),
                            params, updates)
      return (params, state), loss

    (params, _), losses = jax.lax.scan(step, (params, state),
                                       jnp.arange(task.steps))
    final, metric = task.evaluate(params)
    return {"initial": initial, "final_loss": final, "metric": metric,
            "train_loss": losses}

  return jax.jit(jax.vmap(one))


def diverged(result: dict[str, np.ndarray]) -> np.ndarray:
  final, initial = result["final_loss"], result["initial"]
  return ~np.isfinite(final) | (final >= initial)


def score(task: tasks_lib.Task, result) -> np.ndarray:
  """Higher is better; a diverged run scores as the trivial predictor."""
  metric = np.where(diverged(result), task.chance, result["metric"])
  metric = np.where(np.isfinite(metric), metric, task.chance)
  return metric if task.higher_is_better else -metric


def stable_range(lrs, stable) -> float:
  """Largest/smallest lr of the longest run of consecutive stable lrs (0:
  none stable)."""
  best, start = 0.0, None
  for i, ok in enumerate(list(stable) + [False]):
    if ok and start is None:
      start = i
    if not ok and start is not None:
      best = max(best, lrs[i - 1] / lrs[start])
      start = None
  return best


def run_clipper(task, clipper, *, log=print) -> dict[str, Any]:
  lrs = np.asarray(task.learning_rates, np.float32)
  n_lr = len(lrs)
  runner = make_runner(task, clipper)
  row: dict[str, Any] = {"clipper": clipper.name, "argument": clipper.argument}
  start = time.perf_counter()
  if clipper.default is None:
    seeds = tuple(range(6))
    grid_lr = np.repeat(lrs, len(seeds))
    grid_seed = np.tile(np.asarray(seeds, np.int32), n_lr)
    thr = np.zeros_like(grid_lr)
    out = jax.device_get(runner(grid_lr, grid_seed, thr))
    row["variants"] = {"default": _summarise(task, out, lrs, len(seeds))}
  else:
    # Tuning: candidates x lrs x tuning seeds.
    cands = np.asarray(clipper.candidates, np.float32)
    t_lr = np.tile(np.repeat(lrs, len(TUNING_SEEDS)), len(cands))
    t_seed = np.tile(np.asarray(TUNING_SEEDS, np.int32), n_lr * len(cands))
    t_thr = np.repeat(cands, n_lr * len(TUNING_SEEDS))
    tune = jax.device_get(runner(t_lr, t_seed, t_thr))
    scores = score(task, tune).reshape(len(cands), -1)
    medians = np.median(scores, axis=1)
    tuned = float(clipper.candidates[int(np.argmax(medians))])
    row["tuning"] = {"candidates": list(clipper.candidates),
                     "median_score": medians.tolist(), "tuned": tuned}
    # Reported: {default, tuned} x lrs x report seeds.
    thrs = np.asarray([clipper.default, tuned], np.float32)
    g_lr = np.tile(np.repeat(lrs, len(REPORT_SEEDS)), 2)
    g_seed = np.tile(np.asarray(REPORT_SEEDS, np.int32), 2 * n_lr)
    g_thr = np.repeat(thrs, n_lr * len(REPORT_SEEDS))
    out = jax.device_get(runner(g_lr, g_seed, g_thr))
    half = n_lr * len(REPORT_SEEDS)
    row["variants"] = {
        "default": _summarise(task, _take(out, slice(0, half)), lrs,
                              len(REPORT_SEEDS)),
        "tuned": _summarise(task, _take(out, slice(half, 2 * half)), lrs,
                            len(REPORT_SEEDS)),
    }
    row["variants"]["default"]["threshold"] = clipper.default
    row["variants"]["tuned"]["threshold"] = tuned
  row["seconds"] = time.perf_counter() - start
  log(f"  {task.name:10s} {clipper.name:22s} {row['seconds']:6.1f} s  "
      + "  ".join(f"{k}: " + " ".join(_fmt(m, d) for m, d in zip(
          v["median_metric"], v["any_diverged"]))
                  for k, v in row["variants"].items()))
  return row


def _take(out, index):
  return {k: v[index] for k, v in out.items()}


def _fmt(metric, any_div):
  return ("nan" if metric is None else f"{metric:.3g}") + ("*" if any_div
                                                           else "")


def _summarise(task, out, lrs, n_seeds) -> dict[str, Any]:
  div = diverged(out).reshape(len(lrs), n_seeds)
  metric = out["metric"].reshape(len(lrs), n_seeds)
  med = np.median(np.where(np.isfinite(metric), metric, np.nan), axis=1)
  stable = ~div.any(axis=1)
  ok = metric[~div]
  best = (None if ok.size == 0 else
          float(ok.max() if task.higher_is_better else ok.min()))
  return {
      "median_metric": [None if not np.isfinite(m) else float(m)
                        for m in med],
      "any_diverged": div.any(axis=1).tolist(),
      "num_diverged": div.sum(axis=1).tolist(),
      "stable_range": stable_range(list(map(float, lrs)), stable),
      "best_metric": best,
  }


def run(task_names, *, quick: bool, clipper_names=None, log=print):
  results: dict[str, Any] = {
      "date": datetime.date.today().isoformat(),
      "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                 f"{platform.python_implementation()} "
                 f"{platform.python_version()}",
      "jax": jax.__version__, "quick": quick, "tasks": {},
  }
  for name in task_names:
    if name == "transformer":
      start = time.perf_counter()
      results["tasks"][name] = transformer_lib.run(
          quick=quick, stable_range=stable_range, names=clipper_names,
          log=log)
      results["tasks"][name]["seconds"] = time.perf_counter() - start
      results["tasks"][name]["date"] = results["date"]
      continue
    kwargs = {"steps": QUICK_STEPS[name]} if quick else {}
    task = tasks_lib.TASKS[name](**kwargs)
    if quick:
      task = _quick(task)
    rows = (clippers_lib.DP_CLIPPERS if task.per_example
            else clippers_lib.CLIPPERS)
    if quick:
      rows = [c for c in rows if c.name in QUICK_CLIPPERS]
    if clipper_names:
      rows = [c for c in rows if c.name in clipper_names]
    log(f"{task.name}: {task.metric}, base {task.base_name}, "
        f"{task.steps} steps, lrs {task.learning_rates}")
    start = time.perf_counter()
    results["tasks"][name] = {
        "metric": task.metric, "higher_is_better": task.higher_is_better,
        "base_optimizer": task.base_name, "steps": task.steps,
        "learning_rates": list(task.learning_rates), "chance": task.chance,
        "rows": [run_clipper(task, c, log=log) for c in rows],
    }
    results["tasks"][name]["seconds"] = time.perf_counter() - start
    results["tasks"][name]["date"] = results["date"]
  return results


def merge(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """``saved`` with the rows of ``new`` added or replaced, task by task."""
  for name, task in new["tasks"].items():
    old = saved["tasks"].get(name)
    if old is None or old["learning_rates"] != task["learning_rates"]:
      saved["tasks"][name] = task
      continue
    by_name = {row["clipper"]: row for row in old["rows"]}
    by_name.update({row["clipper"]: row for row in task["rows"]})
    old["rows"] = list(by_name.values())
    old["date"] = task["date"]
    old["seconds"] = sum(row.get("seconds", 0.0) for row in old["rows"])
  saved["date"], saved["jax"] = new["date"], new["jax"]
  saved["seconds"] = sum(t.get("seconds", 0.0)
                         for t in saved["tasks"].values())
  return saved


def _quick(task):
  """CI smoke: the two extreme learning rates, few steps."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  lrs = task.learning_rates
  return dataclasses.replace(task, learning_rates=(lrs[0], lrs[-1]))


def write_markdown(results, path: pathlib.Path) -> None:
  lines = [f"# Stability study ({results['date']}, {results['machine']}, "
           f"jax {results['jax']}{', quick' if results['quick'] else ''})",
           "",
           "Each cell: median over seeds of the final metric; `*` marks a "
           "learning rate where at least one seed diverged (final held-out "
           "loss not finite or no lower than at init). `range`: largest / "
           "smallest learning rate of the longest run of stable learning "
           "rates (0 = none).", ""]
  for name, task in results["tasks"].items():
    lrs = task["learning_rates"]
    lines += [f"## {name}: {task['metric']} ({task['base_optimizer']}, "
              f"{task['steps']} steps; trivial predictor "
              f"{task['chance']:.3g}; run {task.get('date', results['date'])})",
              "",
              "| clipper | threshold | " + " | ".join(f"lr {lr:g}"
                                                     for lr in lrs)
              + " | range | best |",
              "|---|---|" + "---:|" * (len(lrs) + 2)]
    for row in task["rows"]:
      for variant, v in row["variants"].items():
        thr = v.get("threshold")
        label = ("–" if thr is None else
                 f"{row['argument']}={thr:g} ({variant})")
        cells = [_fmt(m, d) for m, d in zip(v["median_metric"],
                                            v["any_diverged"])]
        best = "–" if v["best_metric"] is None else f"{v['best_metric']:.3g}"
        lines.append(f"| {row['clipper']} | {label} | " + " | ".join(cells)
                     + f" | {v['stable_range']:g} | {best} |")
    lines.append("")
    if name == "transformer":
      lines += transformer_lib.markdown(task)
  path.write_text("\n".join(lines))


def write_heatmaps(results, out: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  for name, task in results["tasks"].items():
    labels, grid, marks = [], [], []
    for row in task["rows"]:
      for variant, v in row["variants"].items():
        labels.append(row["clipper"] + ("" if variant == "default"
                                        else " (tuned)"))
        grid.append([np.nan if m is None else m for m in v["median_metric"]])
        marks.append(v["any_diverged"])
    grid = np.asarray(grid, float)
    fig, ax = plt.subplots(figsize=(1.2 * len(task["learning_rates"]) + 3,
                                    0.32 * len(labels) + 1.5))
    if task["higher_is_better"]:
      shown, label = grid, task["metric"]
      vmin, vmax = task["chance"], np.nanmax(grid)
    else:  # losses: log scale, capped at 10x the trivial predictor's
      finite = grid[np.isfinite(grid)]
      low = float(finite.min()) if finite.size else task["chance"] / 10
      shown = np.log10(np.clip(grid, low, 10 * task["chance"]))
      label = f"log10 {task['metric']}"
      vmin, vmax = np.log10(low), np.log10(10 * task["chance"])
    cmap = matplotlib.colormaps["viridis" if task["higher_is_better"]
                                else "viridis_r"].copy()
    cmap.set_bad("lightgray")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, aspect="auto",
                      vmin=vmin, vmax=vmax)
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        text = "nan" if not np.isfinite(grid[i, j]) else f"{grid[i, j]:.2g}"
        level = (shown[i, j] - vmin) / max(vmax - vmin, 1e-12)
        light = (not np.isfinite(grid[i, j])
                 or (level > 0.6 if task["higher_is_better"] else level < 0.4))
        ax.text(j, i, text + ("*" if marks[i][j] else ""), ha="center",
                va="center", fontsize=7, color="k" if light else "w")
    ax.set_xticks(range(len(task["learning_rates"])),
                  [f"{lr:g}" for lr in task["learning_rates"]])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("learning rate")
    ax.set_title(f"{name}: {task['metric']} (median of seeds; * = a seed "
                 "diverged)", fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    path = out / f"stability_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    if name == "transformer":
      paths += transformer_lib.figures(task, out)
  return paths


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--tasks", default=",".join(TASK_NAMES))
  parser.add_argument("--clippers", default="")
  parser.add_argument("--out", default=str(RESULTS_DIR))
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--from-json", default="",
                      help="rewrite the report and plots of a saved run")
  parser.add_argument("--update", action="store_true",
                      help="merge the rows of this run into the saved "
                           "stability.json in --out (same task settings)")
  args = parser.parse_args(argv)
  if args.from_json:
    results = json.loads(pathlib.Path(args.from_json).read_text())
    out = pathlib.Path(args.out)
    write_markdown(results, out / "stability.md")
    write_heatmaps(results, out)
    return results
  start = time.perf_counter()
  results = run(args.tasks.split(","), quick=args.quick,
                clipper_names=[c for c in args.clippers.split(",") if c])
  results["seconds"] = time.perf_counter() - start
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.update and (out / "stability.json").exists():
    results = merge(json.loads((out / "stability.json").read_text()),
                    results)
  (out / "stability.json").write_text(json.dumps(results, indent=1))
  write_markdown(results, out / "stability.md")
  if not args.no_plots:
    write_heatmaps(results, out)
  print(f"done in {results['seconds']:.0f} s -> {out}")
  return results


if __name__ == "__main__":
  main()
