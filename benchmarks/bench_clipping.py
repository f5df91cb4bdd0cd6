"""Clipping benchmark: optaxclip against optax and a memory-traffic floor.

For each benchmark tree (few large leaves, a transformer-like tree, many
tiny leaves) and each clipper, this script jits ``update``, measures

* compile time (``jax.jit(f).lower(...).compile()``, once per function),
* run time over interleaved rounds: every function runs once per round, in
  a fresh random order every round (a call that follows another reuses its
  freed pages, so a fixed order biases the ratios, and so does a rotation,
  which keeps every call's predecessor), with
  ``jax.block_until_ready``; ratios are the median over rounds of the
  per-round ratio (``run_ms`` is the minimum, for reference),
* temporary memory (``compiled.memory_analysis().temp_size_in_bytes``),

and reports ratios against optax's equivalent transform and against the
floor, a jitted ``x * 0.5`` over the same tree (one read and one write of
every gradient byte). All numbers come from one process, so the ratios are
meaningful on a noisy shared machine even when absolute times are not.

Usage::

  python benchmarks/bench_clipping.py            # full run
  python benchmarks/bench_clipping.py --quick    # fewer rounds, for a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc

MIN_SECONDS = 15.0
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------
# Trees (docs/benchmarks.md#method)
# ----------------------------------------------------------------------------


def _array(rng: np.random.Generator, shape) -> jax.Array:
  return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def tree_few(rng) -> dict:
  """8 leaves of 2000x1000 float32 (64 MB)."""
  return {f"w{i}": _array(rng, (2000, 1000)) for i in range(8)}


def tree_many(rng, layers: int = 12, d: int = 512) -> dict:
  """A 12-layer d=512 transformer-like tree: 144 leaves, 151 MB."""
  tree = {}
  for layer in range(layers):
    tree[f"layer{layer:02d}"] = {
        "q": _array(rng, (d, d)), "k": _array(rng, (d, d)),
        "v": _array(rng, (d, d)), "o": _array(rng, (d, d)),
        "mlp_in": _array(rng, (d, 4 * d)), "mlp_in_bias": _array(rng, (4 * d,)),
        "mlp_out": _array(rng, (4 * d, d)), "mlp_out_bias": _array(rng, (d,)),
        "ln1_scale": _array(rng, (d,)), "ln1_bias": _array(rng, (d,)),
        "ln2_scale": _array(rng, (d,)), "ln2_bias": _array(rng, (d,)),
    }
  return tree


def tree_tiny(rng) -> dict:
  """1000 leaves of 64x32 plus 1000 of 32 (8.3 MB, 2000 leaves)."""
  tree = {f"k{i:04d}": _array(rng, (64, 32)) for i in range(1000)}
  tree.update({f"b{i:04d}": _array(rng, (32,)) for i in range(1000)})
  return tree


def tree_four(rng) -> dict:
  """Four 1 MiB float32 leaves (512x512): leaves of one shape."""
  return {f"w{i}": _array(rng, (512, 512)) for i in range(4)}


def tree_mixed(rng) -> dict:
  """Mixed leaf sizes: a 16 MiB leaf, three 1 MiB leaves, 6 biases and 4
  small 64x64 kernels (the small ones are bucketed or stacked on CPU)."""
  tree = {"big": _array(rng, (2048, 2048))}
  tree.update({f"w{i}": _array(rng, (512, 512)) for i in range(3)})
  tree.update({f"b{i}": _array(rng, (512,)) for i in range(6)})
  tree.update({f"s{i}": _array(rng, (64, 64)) for i in range(4)})
  return tree


def stack_layers(tree: dict) -> dict:
  """The "many" tree with its 12 layers stacked: one (12, ...) leaf per
  parameter, the layout of ``nnx.scan``/``nnx.vmap`` blocks."""
  layers = sorted(tree)
  return {name: jnp.stack([tree[layer][name] for layer in layers])
          for name in tree[layers[0]]}


# "stacked" is the many tree twice: each per-tensor transform runs on the
# unstacked tree and, with stacked=1, on the stacked one (the trees of
# docs/benchmarks.md#method and their stacked variant).
TREES = {"few": tree_few, "many": tree_many, "tiny": tree_tiny,
         "four": tree_four, "mixed": tree_mixed,
         "stacked": tree_many}


# ----------------------------------------------------------------------------
# Functions under test
# ----------------------------------------------------------------------------


def _update_fn(tx, **extra_args) -> Callable[[Any], Any]:
  """A pure function of the gradients: one ``update`` from a fresh state."""

  def step(grads, state, params):
    return tx.update(grads, state, params, **extra_args)

  return step


def _two_groups(path: str, leaf) -> str:
  """Groups for the grouped global norm: two groups of leaves, by path (a
  deterministic hash: Python's own ``hash`` of a str changes per process)."""
  del leaf
  return "a" if zlib.crc32(jax.tree_util.keystr(path).encode()) % 2 else "b"


def _extra_args(name: str) -> dict:
  return {"loss": jnp.float32(1.0)} if "loss" in name else {}


def floor_fn(grads, state, params):
  del state, params
  return jax.tree.map(lambda x: x * 0.5, grads)


def cases(tree_name: str, grads, params
          ) -> dict[str, tuple[Callable, Any, str | None, Any]]:
  """name -> (jittable fn(grads, state, params), state, baseline name,
  (grads, params) to call it with, or None for the tree's own)."""
  # Thresholds are chosen so that the clippers actually rescale.
  norm = float(oc.global_norm(grads))
  entries = {
      "floor": (floor_fn, None, None),
      "optax.clip_by_global_norm": (optax.clip_by_global_norm(norm / 2), None, None),
      "oc.clip_by_global_norm": (oc.clip_by_global_norm(norm / 2), None,
                                 "optax.clip_by_global_norm"),
      "oc.clip_by_global_norm(ord=inf)": (
          oc.clip_by_global_norm(0.5, ord="inf"), None, None),
      "optax.clip_by_block_rms": (optax.clip_by_block_rms(0.5), None, None),
      "oc.clip_by_block_rms": (oc.clip_by_block_rms(0.5), None,
                               "optax.clip_by_block_rms"),
      "oc.clip_by_norm": (oc.clip_by_norm(1.0), None, None),
      "optax.clip": (optax.clip(0.5), None, None),
      "oc.clip": (oc.clip(0.5), None, "optax.clip"),
      "oc.clip_by_value": (oc.clip_by_value(0.5), None, "optax.clip"),
      # Its opt-in diagnostics: one more read (docs/transforms.md).
      "oc.clip_by_value(diagnostics)": (
          oc.clip_by_value(0.5, diagnostics=True), None, "optax.clip"),
      # Adaptive thresholds: the target is <= 1.05x clip_by_global_norm.
      "oc.autoclip": (oc.autoclip(10.0), None, "oc.clip_by_global_norm"),
      "oc.zclip": (oc.zclip(max_norm=None, warmup_steps=1), None,
                   "oc.clip_by_global_norm"),
      "oc.adagc": (oc.adagc(warmup_steps=1), None, "oc.clip_by_global_norm"),
      "oc.skip_step(identity)": (oc.skip_step(optax.identity(), max_norm=1e9),
                                 None, "oc.clip_by_global_norm"),
      # AGC needs params; lambda = 0.05 with params ~ N(0, 1) and grads ~
      # N(0, 1) clips most units, as in training.
      "optax.adaptive_grad_clip": (optax.adaptive_grad_clip(0.05), None, None),
      "oc.adaptive_grad_clip": (oc.adaptive_grad_clip(0.05), None,
                                "optax.adaptive_grad_clip"),
      # Per-leaf monitoring, against the one global norm.
      "oc.record_norms": (oc.record_norms(), None, "oc.clip_by_global_norm"),
      # Spike-era methods: against clip_by_global_norm.
      "oc.clip_by_global_norm(groups)": (
          oc.clip_by_global_norm(norm / 2, groups=_two_groups), None,
          "oc.clip_by_global_norm"),
      "oc.clip_norm_growth": (oc.clip_norm_growth(), None,
                              "oc.clip_by_global_norm"),
      "oc.spam_clip": (oc.spam_clip(), None, "oc.clip_by_global_norm"),
      "oc.adaclip": (oc.adaclip(), None, "oc.clip_by_global_norm"),
      "oc.adagn": (oc.adagn(), None, "oc.clip_by_global_norm"),
      "oc.momentum_reset(identity)": (oc.momentum_reset(optax.identity()),
                                      None, "oc.clip_by_global_norm"),
      "oc.skip_step(identity)+loss": (
          oc.skip_step(optax.identity(), max_norm=1e9, loss_spike_sigmas=6.0),
          None, "oc.clip_by_global_norm"),
  }
  if tree_name == "stacked":
    return stacked_cases(grads, params)
  out = {}
  for name, (tx, _, baseline) in entries.items():
    if name == "floor":
      out[name] = (floor_fn, None, None, None)
    else:
      out[name] = (_update_fn(tx, **_extra_args(name)), tx.init(grads),
                   baseline, None)
  # Per-leaf norms as a function (no transform state), against the one
  # global norm.
  out["oc.tree_norms"] = (tree_norms_fn, None, "oc.clip_by_global_norm", None)
  return out


def tree_norms_fn(grads, state, params):
  del state, params
  return oc.tree_norms(grads)


def stacked_cases(grads, params) -> dict:
  """Each per-tensor transform on the unstacked many tree and, as
  ``stacked=1``, on the same values stacked by layer (its baseline)."""
  grads_st, params_st = stack_layers(grads), stack_layers(params)
  unstacked, stacked = (grads, params), (grads_st, params_st)
  # Fresh functions: jax.jit caches by function, and the many tree already
  # compiled floor_fn and tree_norms_fn on the unstacked tree.
  out = {"floor": (lambda g, s, p: floor_fn(g, s, p), None, None, stacked),
         "floor(unstacked)": (lambda g, s, p: floor_fn(g, s, p), None, None,
                              unstacked)}
  for name, make in (
      ("oc.clip_by_norm", lambda k: oc.clip_by_norm(1.0, stacked=k)),
      ("oc.clip_by_block_rms", lambda k: oc.clip_by_block_rms(0.5, stacked=k)),
      ("oc.adaptive_grad_clip",
       lambda k: oc.adaptive_grad_clip(0.05, stacked=k)),
      ("oc.record_norms", lambda k: oc.record_norms(stacked=k)),
  ):
    tx, tx_st = make(None), make(1)
    out[name] = (_update_fn(tx), tx.init(grads), None, unstacked)
    out[name + "(stacked=1)"] = (_update_fn(tx_st), tx_st.init(grads_st),
                                 name, stacked)
  out["oc.tree_norms"] = (lambda g, s, p: tree_norms_fn(g, s, p), None, None,
                          unstacked)
  out["oc.tree_norms(stacked=1)"] = (
      lambda g, s, p: oc.tree_norms(g, stacked=1), None, "oc.tree_norms",
      stacked)
  return out


# ----------------------------------------------------------------------------
# Memory with donation (deterministic: XLA's buffer assignment, no timing)
# ----------------------------------------------------------------------------

# Every transform with an optax counterpart, against it.
MEMORY_PAIRS = {
    "oc.clip_by_global_norm": (lambda: oc.clip_by_global_norm(1.0),
                               lambda: optax.clip_by_global_norm(1.0)),
    "oc.clip_by_block_rms": (lambda: oc.clip_by_block_rms(0.5),
                             lambda: optax.clip_by_block_rms(0.5)),
    "oc.adaptive_grad_clip": (lambda: oc.adaptive_grad_clip(0.05),
                              lambda: optax.adaptive_grad_clip(0.05)),
    "oc.clip": (lambda: oc.clip(0.5), lambda: optax.clip(0.5)),
    "oc.clip_by_value": (lambda: oc.clip_by_value(0.5),
                         lambda: optax.clip(0.5)),
}
MEMORY_TREES = ("four", "mixed", "few", "many")


def _donated_temp(tx, grads, params) -> tuple[int, int]:
  """Temporary bytes of a donated ``update``, and of a donated train step
  (grad -> transform -> sgd -> apply_updates)."""
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(0,))
  temp = update.lower(grads, state, params).compile().memory_analysis()
  opt = optax.chain(tx, optax.sgd(0.1))

  def step(p, s, x):
    loss = lambda p: sum(jnp.sum(jnp.tanh(v) * x) for v in jax.tree.leaves(p))
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  train = jax.jit(step, donate_argnums=(0, 1))
  temp_step = train.lower(params, opt.init(params), jnp.float32(1.0)
                          ).compile().memory_analysis()
  return int(temp.temp_size_in_bytes), int(temp_step.temp_size_in_bytes)


def measure_memory(tree_name: str) -> list[dict]:
  """Donated temporary memory of every counterpart pair on one tree."""
  rng = np.random.default_rng(0)
  grads, params = TREES[tree_name](rng), TREES[tree_name](rng)
  grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(grads))
  rows = []
  for name, (ours, theirs) in MEMORY_PAIRS.items():
    temp, temp_step = _donated_temp(ours(), grads, params)
    base, base_step = _donated_temp(theirs(), grads, params)
    rows.append(dict(
        tree=tree_name, fn=name, grad_bytes=int(grad_bytes),
        temp_bytes=temp, optax_temp_bytes=base,
        step_temp_bytes=temp_step, optax_step_temp_bytes=base_step,
        extra_vs_grad_bytes=(temp - base) / grad_bytes,
        step_extra_vs_grad_bytes=(temp_step - base_step) / grad_bytes))
    print(f"  memory {tree_name:5s} {name:24s} update {temp - base:+9d} B"
          f"  train step {temp_step - base_step:+9d} B", flush=True)
  return rows


def memory_markdown(rows: list[dict]) -> str:
  head = ("| tree | transform | grad MB | update: extra temp vs optax |"
          " train step: extra temp vs optax | within optax + 1%? |\n"
          "|---|---|---:|---:|---:|---|\n")
  lines = []
  for r in rows:
    worst = max(r["extra_vs_grad_bytes"], r["step_extra_vs_grad_bytes"])
    lines.append(
        f"| {r['tree']} | `{r['fn']}` | {r['grad_bytes'] / 1e6:.1f} |"
        f" {r['temp_bytes'] - r['optax_temp_bytes']:+d} B"
        f" ({r['extra_vs_grad_bytes']:+.3%}) |"
        f" {r['step_temp_bytes'] - r['optax_step_temp_bytes']:+d} B"
        f" ({r['step_extra_vs_grad_bytes']:+.3%}) |"
        f" {'yes' if worst <= 0.01 else 'NO'} |")
  return head + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------


def measure_tree(tree_name: str, rounds: int, only: set[str] | None) -> list[dict]:
  rng = np.random.default_rng(0)
  grads = TREES[tree_name](rng)
  params = TREES[tree_name](rng)
  leaves = jax.tree.leaves(grads)
  grad_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  entries = cases(tree_name, grads, params)
  if only:
    wanted = {"floor"} | {k for k in entries if k in only}
    wanted |= {entries[k][2] for k in list(wanted) if entries[k][2]}
    entries = {k: v for k, v in entries.items() if k in wanted}
  compiled, rows = {}, {}
  for name, (fn, state, baseline, own) in entries.items():
    g, p = own if own is not None else (grads, params)
    start = time.perf_counter()
    exe = jax.jit(fn).lower(g, state, p).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(exe(g, state, p))  # warm up
    compiled[name] = (exe, state, g, p)
    temp = exe.memory_analysis().temp_size_in_bytes
    rows[name] = dict(tree=tree_name, fn=name, baseline=baseline,
                      compile_s=compile_s, temp_bytes=int(temp),
                      grad_bytes=int(grad_bytes), leaves=len(leaves),
                      run_s=float("inf"))
    print(f"  compiled {tree_name:5s} {name:28s} {compile_s:7.2f} s", flush=True)
  # Interleaved: every function once per round, so slow phases of the shared
  # machine hit all of them alike, in a random order each round.
  # At least `rounds` rounds, and at least MIN_SECONDS of rounds.
  names = list(compiled)
  times: dict[str, list[float]] = {name: [] for name in names}
  done, start_all = 0, time.perf_counter()
  order_rng = np.random.default_rng(1)
  while done < rounds or time.perf_counter() - start_all < MIN_SECONDS:
    # A fresh random order every round: a rotation keeps each call's
    # predecessor (the cyclic order), and a call inherits its predecessor's
    # freed pages; measured, two identical programs differed by 2.9x under
    # rotation on the few tree.
    for name in order_rng.permutation(names):
      exe, state, g, p = compiled[name]
      start = time.perf_counter()
      jax.block_until_ready(exe(g, state, p))
      times[name].append(time.perf_counter() - start)
    done += 1
  per_round = {name: np.asarray(t) for name, t in times.items()}
  for name, row in rows.items():
    row["rounds"] = done
    row["run_s"] = float(per_round[name].min())
  for name, row in rows.items():
    ratio = per_round[name] / per_round["floor"]
    row["vs_floor"] = float(np.median(ratio))
    base = rows.get(row["baseline"]) if row["baseline"] else None
    if base is not None:
      ratio = per_round[name] / per_round[row["baseline"]]
      row["run_vs_baseline"] = float(np.median(ratio))
      row["run_vs_baseline_iqr"] = [float(np.percentile(ratio, 25)),
                                    float(np.percentile(ratio, 75))]
      row["compile_vs_baseline"] = row["compile_s"] / base["compile_s"]
      row["extra_temp_vs_grad_bytes"] = (
          (row["temp_bytes"] - base["temp_bytes"]) / grad_bytes)
  return list(rows.values())


def markdown(rows: list[dict]) -> str:
  head = ("| tree | transform | baseline | min run ms | vs floor | run vs baseline |"
          " compile s | compile vs baseline | temp MB | extra temp / grad bytes |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
  lines = []
  for r in rows:
    def fmt(key, spec):
      return format(r[key], spec) if key in r else "–"
    lines.append(
        f"| {r['tree']} | `{r['fn']}` |"
        f" {('`' + r['baseline'] + '`') if r['baseline'] else '–'} |"
        f" {1e3 * r['run_s']:.2f} |"
        f" {r['vs_floor']:.2f} | {fmt('run_vs_baseline', '.2f')} |"
        f" {r['compile_s']:.2f} | {fmt('compile_vs_baseline', '.2f')} |"
        f" {r['temp_bytes'] / 1e6:.2f} | {fmt('extra_temp_vs_grad_bytes', '+.2%')} |")
  return head + "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", default="few,many,mixed,tiny,stacked")
  parser.add_argument("--memory-trees", default=",".join(MEMORY_TREES),
                      help="trees for the donated-memory table ('' skips it)")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--quick", action="store_true", help="3 rounds")
  parser.add_argument("--only", default="",
                      help="comma-separated transform names (floor is kept)")
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "clipping"))
  args = parser.parse_args()
  rounds = 3 if args.quick else args.rounds
  if args.quick:
    global MIN_SECONDS  # pylint: disable=global-statement
    MIN_SECONDS = 0.0
  only = {s for s in args.only.split(",") if s} or None
  rows = []
  for tree_name in filter(None, args.trees.split(",")):
    rows += measure_tree(tree_name, rounds, only)
  memory = []
  for tree_name in filter(None, args.memory_trees.split(",")):
    memory += measure_memory(tree_name)
  meta = dict(
      date=datetime.date.today().isoformat(), machine=platform.machine(),
      processor=platform.processor() or platform.machine(),
      cpus=os.cpu_count(), jax=jax.__version__, optax=optax.__version__,
      backend=jax.default_backend(), rounds=rounds,
      # glibc returns buffers above its mmap threshold (at most 32 MB by
      # default) to the OS on free, so they page-fault anew on every call:
      # this decides the stacked tree's ratios (see docs/benchmarks.md).
      malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
      malloc_trim_threshold=os.environ.get("MALLOC_TRIM_THRESHOLD_"))
  table = markdown(rows)
  print()
  print(f"{meta['date']}, {meta['cpus']} CPUs ({meta['processor']}), jax"
        f" {meta['jax']}, optax {meta['optax']}, median of per-round ratios"
        f" over >= {rounds} randomly ordered interleaved rounds (and at least 15 s of"
        " rounds per tree)")
  print(table)
  memory_table = memory_markdown(memory) if memory else ""
  print(memory_table)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows, memory=memory), f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(table)
  if memory:
    with open(args.out + "_memory.md", "w") as f:
      f.write(memory_table)
  if not rows:
    return
  try:
    import plot_results  # pylint: disable=g-import-not-at-top
    print("wrote", plot_results.main(args.out + ".json"))
  except ImportError:  # matplotlib is in the examples extra, not test
    pass


if __name__ == "__main__":
  main()
