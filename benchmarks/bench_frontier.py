"""Frontier benchmark: the transformer-stability transforms' cost.

Method as in ``bench_clipping.py`` (whose trees it reuses): every function is
a jitted ``update`` from a fresh state; compile time is one
``jax.jit(f).lower(...).compile()``; run time comes from interleaved rounds
in a fresh random order every round, reported as the median of per-round
ratios (``run ms`` is the minimum); temporary memory is
``compiled.memory_analysis().temp_size_in_bytes``.

Every row is compared with ``oc.clip_by_global_norm`` on the same tree (run
and compile time), and with its own reference where it has one:

* ``oc.shadow(T)`` against ``T`` itself, alone and inside a chain with SGD:
  a shadow must cost no more than the transform it runs (XLA removes the
  discarded updates);
* ``oc.spectral_clip`` against one Newton-Schulz matmul chain of the same
  shapes (the coupled iteration's ten steps on each matrix's Gram matrix,
  with the two matmuls around it, and nothing else), and Muon's quintic
  five-step orthogonalisation as a familiar yardstick. Spectral clipping is
  matmul-bound, so it runs on a smaller transformer-like tree (4 layers,
  d = 256) than ``bench_clipping``'s.

Rows for other transforms: add them to :func:`cases` (one entry per row,
``name -> (fn, state, reference name, (grads, params) or None)``).

Usage::

  python benchmarks/bench_frontier.py           # full run
  python benchmarks/bench_frontier.py --quick   # 3 rounds, a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import bench_clipping as bc
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc

MIN_SECONDS = 15.0
RESULTS_DIR = bc.RESULTS_DIR
BASELINE = "oc.clip_by_global_norm"
NS_STEPS = 10


def tree_small(rng) -> dict:
  """A 4-layer d=256 transformer-like tree: 48 leaves, 12.6 MB."""
  return bc.tree_many(rng, layers=4, d=256)


TREES = {
  "few": bc.tree_few,
  "many": bc.tree_many,
  "tiny": bc.tree_tiny,
  "small": tree_small,
}


# ----------------------------------------------------------------------------
# Reference programs
# ----------------------------------------------------------------------------


def _wide(x: jax.Array) -> jax.Array:
  return x if x.shape[-2] <= x.shape[-1] else jnp.swapaxes(x, -1, -2)


def ns_chain_fn(grads, state, params):
  """One coupled Newton-Schulz chain per matrix, of spectral_clip's shapes:
  the Gram matrix, ten steps, and the product with the matrix."""
  del state, params

  def chain(x):
    if x.ndim < 2:
      return x
    w = _wide(x)
    gram = w @ jnp.swapaxes(w, -1, -2)
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    y, z = gram, jnp.broadcast_to(eye, gram.shape)
    for _ in range(NS_STEPS):
      t = 1.5 * eye - 0.5 * (z @ y)
      y, z = y @ t, t @ z
    return z @ w

  return jax.tree.map(chain, grads)


def muon_ns_fn(grads, state, params):
  """Muon's orthogonalisation (five quintic Newton-Schulz steps)."""
  del state, params
  a, b, c = 3.4445, -4.7750, 2.0315

  def orthogonalise(x):
    if x.ndim < 2:
      return x
    w = _wide(x)
    w = w / (jnp.max(jnp.abs(w)) * w.shape[-1])  # any bound will do here
    for _ in range(5):
      gram = w @ jnp.swapaxes(w, -1, -2)
      w = a * w + (b * gram + c * gram @ gram) @ w
    return w

  return jax.tree.map(orthogonalise, grads)


def qk_only_fn(grads, state, params):
  """One elementwise pass (update and param in, update out) over the q and
  k leaves only; every other leaf passes through: qk_clip's floor."""
  del state

  def touch(path, g, p):
    name = path[-1].key
    return g + 0.5 * p if name in ("q", "k") else g

  return jax.tree_util.tree_map_with_path(touch, grads, params)


# ----------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------


def _update_fn(tx, **extra_args) -> Callable[..., Any]:
  def step(grads, state, params):
    return tx.update(grads, state, params, **extra_args)

  return step


def cases(tree_name: str, grads, params) -> dict[str, tuple]:
  """name -> (fn(grads, state, params), state, reference name or None,
  (grads, params) to call it with, or None for the tree's own)."""
  norm = float(oc.global_norm(grads))
  out: dict[str, tuple] = {"floor": (bc.floor_fn, None, None, None)}

  def add(name, tx, reference=None, own=None, **extra_args):
    g = grads if own is None else own[0]
    out[name] = (_update_fn(tx, **extra_args), tx.init(g), reference, own)

  add(BASELINE, oc.clip_by_global_norm(norm / 2))
  # shadow: against the transform it runs.
  add(
    "oc.shadow(clip_by_global_norm)",
    oc.shadow(oc.clip_by_global_norm(norm / 2)),
    BASELINE,
  )
  add("oc.zclip", oc.zclip(max_norm=None, warmup_steps=1))
  add(
    "oc.shadow(zclip)",
    oc.shadow(oc.zclip(max_norm=None, warmup_steps=1)),
    "oc.zclip",
  )
  # The same inside a training chain (the clipped updates feed SGD), where
  # an applied clipper's output buffers are needed anyway.
  for inner, make in (
    ("clip_by_global_norm", lambda: oc.clip_by_global_norm(norm / 2)),
    ("zclip", lambda: oc.zclip(max_norm=None, warmup_steps=1)),
  ):
    add(f"chain(oc.{inner}, sgd)", optax.chain(make(), optax.sgd(1e-3)))
    add(
      f"chain(oc.shadow({inner}), sgd)",
      optax.chain(oc.shadow(make()), optax.sgd(1e-3)),
      f"chain(oc.{inner}, sgd)",
    )
  if tree_name == "small":
    out["ns_chain"] = (ns_chain_fn, None, None, None)
    out["muon_ns"] = (muon_ns_fn, None, None, None)
    add("oc.spectral_clip", oc.spectral_clip(1.0), "ns_chain")
    stacked = (bc.stack_layers(grads), bc.stack_layers(params))
    tx = oc.spectral_clip(1.0, stacked=1)
    out["oc.spectral_clip(stacked=1)"] = (
      _update_fn(tx),
      tx.init(stacked[0]),
      "oc.spectral_clip",
      stacked,
    )
    add(
      "oc.shadow(spectral_clip)",
      oc.shadow(oc.spectral_clip(1.0)),
      "oc.spectral_clip",
    )
  if tree_name in ("many", "small"):
    # qk_clip rewrites only the q/k leaves (dense (d, heads * 64) kernels,
    # half of the heads clipped); its reference does one elementwise pass
    # over exactly those leaves (reading the update and the param, as the
    # rewrite does) and passes every other leaf through.
    heads = next(iter(grads.values()))["q"].shape[-1] // 64
    max_logits = {
      layer: jnp.asarray([200.0, 50.0] * (heads // 2)) for layer in grads
    }
    out["qk_only"] = (qk_only_fn, None, None, None)
    add(
      "oc.qk_clip",
      oc.qk_clip(100.0, query="q", key="k", layout="dense", head_dim=64),
      "qk_only",
      max_logits=max_logits,
    )
  # Peer rules: Levanter's historical clip and axlearn's drop-and-clip
  # wrapper (around the identity, so only its own work is timed); both do
  # one global norm like the baseline, plus scalar statistics.
  add("oc.clip_by_historical_norm", oc.clip_by_historical_norm())
  add(
    "oc.skip_and_clip_by_global_norm",
    oc.skip_and_clip_by_global_norm(
      optax.identity(),
      drop_norm="mean",
      grad_norm_ema_decay=0.99,
      max_norm=norm / 2,
    ),
  )
  # Other transforms' rows go here.
  return out


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------


def measure_tree(tree_name: str, rounds: int, only: set[str] | None) -> list:
  rng = np.random.default_rng(0)
  grads = TREES[tree_name](rng)
  params = TREES[tree_name](rng)
  leaves = jax.tree.leaves(grads)
  grad_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  entries = cases(tree_name, grads, params)
  if only:
    wanted = {"floor", BASELINE} | {k for k in entries if k in only}
    wanted |= {entries[k][2] for k in list(wanted) if entries[k][2]}
    entries = {k: v for k, v in entries.items() if k in wanted}
  compiled, rows = {}, {}
  for name, (fn, state, reference, own) in entries.items():
    g, p = own if own is not None else (grads, params)
    start = time.perf_counter()
    exe = jax.jit(fn).lower(g, state, p).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(exe(g, state, p))  # warm up
    compiled[name] = (exe, state, g, p)
    rows[name] = dict(
      tree=tree_name,
      fn=name,
      reference=reference,
      compile_s=compile_s,
      temp_bytes=int(exe.memory_analysis().temp_size_in_bytes),
      grad_bytes=int(grad_bytes),
      leaves=len(leaves),
    )
    print(f"  compiled {tree_name:5s} {name:32s} {compile_s:7.2f} s", flush=True)
  names = list(compiled)
  times: dict[str, list[float]] = {name: [] for name in names}
  done, start_all = 0, time.perf_counter()
  order_rng = np.random.default_rng(1)
  # A fresh random order every round (a rotation keeps each call's
  # predecessor, whose freed pages it inherits).
  while done < rounds or time.perf_counter() - start_all < MIN_SECONDS:
    for name in order_rng.permutation(names):
      exe, state, g, p = compiled[name]
      start = time.perf_counter()
      jax.block_until_ready(exe(g, state, p))
      times[name].append(time.perf_counter() - start)
    done += 1
  per_round = {name: np.asarray(t) for name, t in times.items()}

  def ratios(row, other, prefix):
    ratio = per_round[row["fn"]] / per_round[other]
    row[f"run_vs_{prefix}"] = float(np.median(ratio))
    row[f"run_vs_{prefix}_iqr"] = [
      float(np.percentile(ratio, 25)),
      float(np.percentile(ratio, 75)),
    ]
    row[f"compile_vs_{prefix}"] = row["compile_s"] / rows[other]["compile_s"]
    row[f"extra_temp_vs_{prefix}"] = (
      row["temp_bytes"] - rows[other]["temp_bytes"]
    ) / grad_bytes

  for name, row in rows.items():
    row["rounds"] = done
    row["run_s"] = float(per_round[name].min())
    row["vs_floor"] = float(np.median(per_round[name] / per_round["floor"]))
    if BASELINE in rows:
      ratios(row, BASELINE, "clip_by_global_norm")
    if row["reference"] in rows:
      ratios(row, row["reference"], "reference")
  return list(rows.values())


def markdown(rows: list[dict]) -> str:
  head = (
    "| tree | transform | min run ms | vs floor | run vs clip_by_global_norm"
    " | compile s | compile vs clip_by_global_norm | reference | run vs"
    " reference | compile vs reference | temp MB | extra temp vs reference /"
    " grad bytes |\n"
    "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n"
  )
  lines = []
  for r in rows:

    def fmt(key, spec, r=r):
      return format(r[key], spec) if key in r else "–"

    ref = f"`{r['reference']}`" if r["reference"] else "–"
    lines.append(
      f"| {r['tree']} | `{r['fn']}` | {1e3 * r['run_s']:.2f} |"
      f" {r['vs_floor']:.2f} | {fmt('run_vs_clip_by_global_norm', '.2f')} |"
      f" {r['compile_s']:.2f} | {fmt('compile_vs_clip_by_global_norm', '.2f')}"
      f" | {ref} | {fmt('run_vs_reference', '.2f')} |"
      f" {fmt('compile_vs_reference', '.2f')} | {r['temp_bytes'] / 1e6:.2f} |"
      f" {fmt('extra_temp_vs_reference', '+.2%')} |"
    )
  return head + "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", default="few,many,tiny,small")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--quick", action="store_true", help="3 rounds")
  parser.add_argument(
    "--only", default="", help="comma-separated row names (floor is kept)"
  )
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "frontier"))
  parser.add_argument(
    "--note", default="", help="a remark stored with the results"
  )
  args = parser.parse_args()
  rounds = 3 if args.quick else args.rounds
  if args.quick:
    global MIN_SECONDS  # pylint: disable=global-statement
    MIN_SECONDS = 0.0
  only = {s for s in args.only.split(",") if s} or None
  rows = []
  for tree_name in args.trees.split(","):
    rows += measure_tree(tree_name, rounds, only)
  meta = dict(
    date=datetime.date.today().isoformat(),
    machine=platform.machine(),
    processor=platform.processor() or platform.machine(),
    cpus=os.cpu_count(),
    jax=jax.__version__,
    optax=optax.__version__,
    backend=jax.default_backend(),
    rounds=rounds,
    note=args.note,
  )
  table = markdown(rows)
  header = (
    f"{meta['date']}, {meta['cpus']} CPUs ({meta['processor']}), jax"
    f" {meta['jax']}, optax {meta['optax']}, median of per-round ratios over"
    f" >= {rounds} randomly ordered interleaved rounds"
    + (f". {args.note}" if args.note else "")
  )
  print()
  print(header)
  print(table)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(header + "\n\n" + table)


if __name__ == "__main__":
  main()
