"""Sharded clipping step on 8 simulated CPU devices: optaxclip vs optax.

The 12-layer transformer-like tree of ``bench_clipping.py`` (144 leaves, 151
MB) is sharded on a ("data", "model") = 2x4 mesh: kernels split on their last
axis over "model", vectors over "model". Each function is jitted once and
timed as the minimum over interleaved rounds with ``jax.block_until_ready``:

* ``optax.clip_by_global_norm`` / ``oc.clip_by_global_norm`` update alone;
* ``optax.chain(clip, optax.adamw(1e-3))`` update for both.

Run as ``python benchmarks/bench_sharded.py`` (it sets ``XLA_FLAGS`` itself
before importing jax). On a 2-core machine the 8 "devices" share 2 cores,
so only the ratios mean anything. Oversubscribed like that, XLA:CPU's
collective rendezvous can time out and abort the process ("Expected 4
threads to join the rendezvous"); it did so in one of three runs here. Rerun
it, or give the process more cores.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                  ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import datetime  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import optaxclip as oc  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench_clipping import RESULTS_DIR, tree_many  # pylint: disable=g-import-not-at-top,wrong-import-position

ROUNDS = 30


def main():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  grads = tree_many(np.random.default_rng(0))
  # The norm of the unsharded tree: an eager (op-by-op) reduction of the
  # sharded tree deadlocked XLA:CPU's collectives on 8 simulated devices and
  # 2 cores (2026-12-05, optax.global_norm as well); jitted programs do not.
  norm = float(oc.global_norm(grads))
  spec = lambda x: P(None, "model") if x.ndim == 2 else P("model")  # noqa: E731
  grads = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))),
                       grads)
  params = jax.jit(lambda t: jax.tree.map(lambda x: x * 0.5, t))(grads)
  fns = {}
  for name, tx in {
      "optax.clip_by_global_norm": optax.clip_by_global_norm(norm / 2),
      "oc.clip_by_global_norm": oc.clip_by_global_norm(norm / 2),
      "optax clip + adamw": optax.chain(optax.clip_by_global_norm(norm / 2),
                                        optax.adamw(1e-3)),
      "oc clip + adamw": optax.chain(oc.clip_by_global_norm(norm / 2),
                                     optax.adamw(1e-3)),
  }.items():
    state = tx.init(params)
    exe = jax.jit(tx.update).lower(grads, state, params).compile()
    jax.block_until_ready(exe(grads, state, params))
    fns[name] = (exe, state)
  best = {k: float("inf") for k in fns}
  for _ in range(ROUNDS):
    for name, (exe, state) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(exe(grads, state, params))
      best[name] = min(best[name], time.perf_counter() - start)
  rows = {
      "clip alone": best["oc.clip_by_global_norm"] /
                    best["optax.clip_by_global_norm"],
      "clip + adamw": best["oc clip + adamw"] / best["optax clip + adamw"],
  }
  print(f"{datetime.date.today()}, {jax.device_count()} simulated CPU devices"
        f" on {os.cpu_count()} cores, mesh 2x4, min of {ROUNDS} rounds")
  print("| step | optax ms | optaxclip ms | optaxclip / optax |")
  print("|---|---:|---:|---:|")
  for label, (a, b) in {"clip alone": ("optax.clip_by_global_norm",
                                       "oc.clip_by_global_norm"),
                        "clip + adamw": ("optax clip + adamw",
                                         "oc clip + adamw")}.items():
    print(f"| {label} | {1e3 * best[a]:.2f} | {1e3 * best[b]:.2f} |"
          f" {rows[label]:.2f} |")
  os.makedirs(RESULTS_DIR, exist_ok=True)
  with open(os.path.join(RESULTS_DIR, "sharded.json"), "w") as f:
    json.dump(dict(date=str(datetime.date.today()), best_s=best,
                   ratios=rows), f, indent=1)


if __name__ == "__main__":
  main()
