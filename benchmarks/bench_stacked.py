"""Stacked layers and per-layer norms: run and compile time, in one process.

* For the "many" tree of DESIGN §7 (12 transformer-like layers, d = 512,
  144 leaves), each per-tensor transform -- ``clip_by_norm``,
  ``clip_by_block_rms``, ``adaptive_grad_clip`` -- and ``tree_norms`` runs on
  the unstacked tree and, with ``stacked=1``, on the same parameters stacked
  into one leaf per parameter (12 leaves of shape ``(12, ...)``): the
  scanned-layers layout of ``nnx.scan``. The results are identical slice by
  slice (tests/test_stacked.py); this measures the speed.
* ``tree_norms`` on the "tiny" tree (2000 leaves) against
  ``clip_by_global_norm``'s compile time (the issue's bound: within 1.5x).

Method: every function is jitted once; then rounds run every function once,
in an order rotated by one each round (so no function always follows the
same one and inherits its freed pages); the reported ratio is the median over
rounds of the per-round ratio, with the interquartile range.

Usage: ``python benchmarks/bench_stacked.py [--rounds N] [--out PATH]``.
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

import optaxclip as oc
from bench_clipping import RESULTS_DIR, tree_many, tree_tiny


def _stack(tree: dict) -> dict:
  layers = sorted(tree)
  return {name: jnp.stack([tree[layer][name] for layer in layers])
          for name in tree[layers[0]]}


def _compile(fn, *args):
  start = time.perf_counter()
  exe = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  jax.block_until_ready(exe(*args))
  return exe, seconds


def _rounds(exes: dict, args: dict, rounds: int) -> dict[str, list[float]]:
  names = list(exes)
  times = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      start = time.perf_counter()
      jax.block_until_ready(exes[n](*args[n]))
      times[n].append(time.perf_counter() - start)
  return times


def _ratio(times, num, den):
  ratios = np.asarray(times[num]) / np.asarray(times[den])
  return (float(np.median(ratios)), float(np.percentile(ratios, 25)),
          float(np.percentile(ratios, 75)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=21)
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "stacked"))
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  grads, params = tree_many(rng), tree_many(rng)
  sgrads, sparams = _stack(grads), _stack(params)
  transforms = {
    "clip_by_norm": lambda **kw: oc.clip_by_norm(1.0, **kw),
    "clip_by_block_rms": lambda **kw: oc.clip_by_block_rms(0.5, **kw),
    "adaptive_grad_clip": lambda **kw: oc.adaptive_grad_clip(0.05, **kw),
  }
  exes, call_args, compile_s = {}, {}, {}
  for name, make in transforms.items():
    for variant, g, p, kw in (("unstacked", grads, params, {}),
                              ("stacked", sgrads, sparams, {"stacked": 1})):
      tx = make(**kw)
      key = f"{name}/{variant}"
      exes[key], compile_s[key] = _compile(tx.update, g, None, p)
      call_args[key] = (g, None, p)
      print(f"compiled {key}: {compile_s[key]:.2f} s", flush=True)
  for variant, g, kw in (("unstacked", grads, {}), ("stacked", sgrads, {"stacked": 1})):
    key = f"tree_norms/{variant}"
    exes[key], compile_s[key] = _compile(lambda t, kw=kw: oc.tree_norms(t, **kw), g)
    call_args[key] = (g,)
    print(f"compiled {key}: {compile_s[key]:.2f} s", flush=True)
  times = _rounds(exes, call_args, args.rounds)
  rows = []
  for name in [*transforms, "tree_norms"]:
    med, q1, q3 = _ratio(times, f"{name}/stacked", f"{name}/unstacked")
    rows.append(dict(
      transform=name, run_ms_unstacked=1e3 * float(np.median(times[f"{name}/unstacked"])),
      run_ms_stacked=1e3 * float(np.median(times[f"{name}/stacked"])),
      run_ratio=med, run_ratio_iqr=(q1, q3),
      compile_s_unstacked=compile_s[f"{name}/unstacked"],
      compile_s_stacked=compile_s[f"{name}/stacked"]))
  # tree_norms vs clip_by_global_norm on the 2000-leaf tree: compile time.
  tiny = tree_tiny(rng)
  _, tn_compile = _compile(lambda t: oc.tree_norms(t), tiny)
  cg = oc.clip_by_global_norm(1.0)
  _, cg_compile = _compile(cg.update, tiny, cg.init(tiny))
  meta = dict(date=datetime.date.today().isoformat(), cpus=os.cpu_count(),
              machine=platform.machine(), jax=jax.__version__,
              optax=optax.__version__, rounds=args.rounds)
  lines = ["| transform (many tree) | run stacked / unstacked (median, IQR) |"
           " run ms unstacked | compile s unstacked → stacked |",
           "|---|---:|---:|---:|"]
  for r in rows:
    lines.append(
      f"| `{r['transform']}` | {r['run_ratio']:.2f}"
      f" ({r['run_ratio_iqr'][0]:.2f}–{r['run_ratio_iqr'][1]:.2f}) |"
      f" {r['run_ms_unstacked']:.1f} |"
      f" {r['compile_s_unstacked']:.2f} → {r['compile_s_stacked']:.2f} |")
  lines.append("")
  lines.append(f"tiny tree (2000 leaves): `tree_norms` compiles in"
               f" {tn_compile:.2f} s, `clip_by_global_norm` in {cg_compile:.2f} s"
               f" ({tn_compile / cg_compile:.2f}x)")
  table = "\n".join(lines) + "\n"
  print(f"\n{meta['date']}, {meta['cpus']} CPUs, jax {meta['jax']},"
        f" {args.rounds} rotated rounds\n{table}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows, tiny=dict(
      tree_norms_compile_s=tn_compile,
      clip_by_global_norm_compile_s=cg_compile)), f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(table)


if __name__ == "__main__":
  main()
