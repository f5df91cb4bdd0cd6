"""Summarise several full ``bench_clipping.py`` runs against the targets.

Each run is one JSON file written by ``bench_clipping.py --out``. For every
(tree, transform) row this prints the median over runs of the run and
compile ratios against the row's baseline, with each run's value, and then
checks the targets listed in docs/benchmarks.md,
marking each as met or not with the number of runs that met it.

Usage::

  python benchmarks/summarize_runs.py results/clipping_run1.json \
      results/clipping_run2.json results/clipping_run3.json > summary.md
"""

from __future__ import annotations

import json
import statistics
import sys

TREES = ("few", "many", "tiny")


def load(paths: list[str]) -> list[dict]:
  runs = []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    runs.append({(r["tree"], r["fn"]): r for r in data["rows"]})
  return runs


def values(runs, tree, fn, key) -> list[float]:
  return [run[(tree, fn)][key] for run in runs
          if (tree, fn) in run and key in run[(tree, fn)]]


def compile_ratio(runs, tree, fn, other) -> list[float]:
  out = []
  for run in runs:
    if (tree, fn) in run and (tree, other) in run:
      base = run[(tree, other)]["compile_s"]
      if base >= 0.01:  # below: a jit cache hit, not a compile
        out.append(run[(tree, fn)]["compile_s"] / base)
  return out


def fmt(vals: list[float], spec: str = ".2f") -> str:
  if not vals:
    return "–"
  med = statistics.median(vals)
  each = ", ".join(format(v, spec) for v in vals)
  return f"{format(med, spec)} ({each})"


def full_table(runs) -> str:
  keys = []
  for run in runs:
    for key in run:
      if key not in keys:
        keys.append(key)
  lines = ["| tree | transform | baseline | run vs baseline, median (each run) |"
           " compile vs baseline | compile s | vs floor |",
           "|---|---|---|---:|---:|---:|---:|"]
  for tree, fn in keys:
    row = next(run[(tree, fn)] for run in runs if (tree, fn) in run)
    base = row["baseline"]
    lines.append(
        f"| {tree} | `{fn}` | {('`' + base + '`') if base else '–'} |"
        f" {fmt(values(runs, tree, fn, 'run_vs_baseline'))} |"
        f" {fmt(compile_ratio(runs, tree, fn, base) if base else [])} |"
        f" {fmt(values(runs, tree, fn, 'compile_s'), '.1f')} |"
        f" {fmt(values(runs, tree, fn, 'vs_floor'))} |")
  return "\n".join(lines) + "\n"


def check(lines, name: str, vals: list[float], bound: float) -> None:
  if not vals:
    lines.append(f"| {name} | – | ≤ {bound:g} | not measured |")
    return
  met = sum(v <= bound for v in vals)
  med = statistics.median(vals)
  verdict = "met" if med <= bound and met == len(vals) else (
      f"**not met** ({met}/{len(vals)} runs)" if med > bound
      else f"met in the median ({met}/{len(vals)} runs)")
  lines.append(f"| {name} | {fmt(vals)} | ≤ {bound:g} | {verdict} |")


def targets(runs) -> str:
  lines = ["| target | median (each run) | bound | verdict |",
           "|---|---:|---:|---|"]
  counterparts = {
      "oc.clip": "optax.clip", "oc.clip_by_value": "optax.clip",
      "oc.clip_by_block_rms": "optax.clip_by_block_rms",
      "oc.adaptive_grad_clip": "optax.adaptive_grad_clip",
      "oc.clip_by_global_norm": "optax.clip_by_global_norm",
  }
  for fn in counterparts:
    for tree in TREES:
      check(lines, f"`{fn}` run vs optax, {tree}",
            values(runs, tree, fn, "run_vs_baseline"), 1.0)
      check(lines, f"`{fn}` compile vs optax, {tree}",
            values(runs, tree, fn, "compile_vs_baseline"), 1.0)
  for fn in ("oc.clip_by_norm", "oc.clip_by_block_rms",
             "oc.adaptive_grad_clip", "oc.adagc", "oc.tree_norms",
             "oc.record_norms"):
    check(lines, f"`{fn}` compile on tiny vs `optax.clip_by_global_norm`'s",
          compile_ratio(runs, "tiny", fn, "optax.clip_by_global_norm"), 0.3)
  for fn in ("oc.autoclip", "oc.zclip", "oc.adagc", "oc.skip_step(identity)"):
    for tree in TREES:
      check(lines, f"`{fn}` run vs `oc.clip_by_global_norm`, {tree}",
            values(runs, tree, fn, "run_vs_baseline"), 1.05)
      check(lines, f"`{fn}` compile vs `oc.clip_by_global_norm`, {tree}",
            values(runs, tree, fn, "compile_vs_baseline"), 1.5)
  for fn in counterparts:
    for tree in ("few", "many"):
      check(lines, f"`{fn}` extra temp / gradient bytes, {tree}",
            values(runs, tree, fn, "extra_temp_vs_grad_bytes"), 0.01)
  check(lines, "`oc.tree_norms` compile on tiny vs `oc.clip_by_global_norm`'s",
        compile_ratio(runs, "tiny", "oc.tree_norms", "oc.clip_by_global_norm"),
        1.5)
  for fn in ("oc.clip_by_norm", "oc.clip_by_block_rms",
             "oc.adaptive_grad_clip", "oc.tree_norms", "oc.record_norms"):
    check(lines, f"`{fn}(stacked=1)` run vs unstacked",
          values(runs, "stacked", fn + "(stacked=1)", "run_vs_baseline"), 1.0)
  return "\n".join(lines) + "\n"


def med(vals: list[float]) -> str:
  return format(statistics.median(vals), ".2f") if vals else "–"


def verdict(vals_by_cell: list[list[float]], bound: float) -> str:
  cells = [statistics.median(v) for v in vals_by_cell if v]
  if not cells:
    return "not measured"
  bad = sum(c > bound for c in cells)
  return "met" if not bad else f"**not met** ({bad}/{len(cells)} cells)"


def compact(runs) -> str:
  """The targets in four short tables (medians over runs)."""
  out = ["Median over runs; each cell's per-run values are in the long table.",
         "",
         "| vs optax's counterpart | run few / many / tiny | run ≤ 1.00 |"
         " compile few / many / tiny | compile ≤ 1.00 |",
         "|---|---|---|---|---|"]
  counterparts = ["oc.clip_by_global_norm", "oc.clip", "oc.clip_by_value",
                  "oc.clip_by_block_rms", "oc.adaptive_grad_clip"]
  def per_tree_row(fn: str, run_bound: float, compile_bound: float) -> str:
    run = [values(runs, t, fn, "run_vs_baseline") for t in TREES]
    comp = [values(runs, t, fn, "compile_vs_baseline") for t in TREES]
    return (f"| `{fn}` | {' / '.join(med(v) for v in run)} |"
            f" {verdict(run, run_bound)} |"
            f" {' / '.join(med(v) for v in comp)} |"
            f" {verdict(comp, compile_bound)} |")

  out += [per_tree_row(fn, 1.0, 1.0) for fn in counterparts]
  out += ["", "| compile on tiny | seconds | vs `optax.clip_by_global_norm`"
          " (≤ 0.30) | vs `oc.clip_by_global_norm` |", "|---|---:|---:|---:|"]
  for fn in ("oc.clip_by_norm", "oc.clip_by_block_rms",
             "oc.adaptive_grad_clip", "oc.adagc", "oc.tree_norms",
             "oc.record_norms"):
    secs = values(runs, "tiny", fn, "compile_s")
    vs_optax = compile_ratio(runs, "tiny", fn, "optax.clip_by_global_norm")
    vs_oc = compile_ratio(runs, "tiny", fn, "oc.clip_by_global_norm")
    out.append(f"| `{fn}` | {med(secs)} | {med(vs_optax)}"
               f" ({verdict([vs_optax], 0.3)}) | {med(vs_oc)} |")
  out += ["", "| adaptive, vs `oc.clip_by_global_norm` | run few / many / tiny"
          " | run ≤ 1.05 | compile few / many / tiny | compile ≤ 1.5 |",
          "|---|---|---|---|---|"]
  out += [per_tree_row(fn, 1.05, 1.5) for fn in
          ("oc.autoclip", "oc.zclip", "oc.adagc", "oc.skip_step(identity)")]
  out += ["", "| stacked tree | run stacked / unstacked (≤ 1.00) |"
          " compile unstacked → stacked (s) |", "|---|---:|---:|"]
  for fn in ("oc.clip_by_norm", "oc.clip_by_block_rms",
             "oc.adaptive_grad_clip", "oc.record_norms", "oc.tree_norms"):
    run = values(runs, "stacked", fn + "(stacked=1)", "run_vs_baseline")
    c0 = values(runs, "stacked", fn, "compile_s")
    c1 = values(runs, "stacked", fn + "(stacked=1)", "compile_s")
    out.append(f"| `{fn}` | {med(run)} ({verdict([run], 1.0)}) |"
               f" {med(c0)} → {med(c1)} |")
  return "\n".join(out) + "\n"


def main(paths: list[str]) -> None:
  runs = load(paths)
  print(f"## Targets, compact ({len(runs)} full runs)\n")
  print(compact(runs))
  print(f"## Targets ({len(runs)} full runs)\n")
  print(targets(runs))
  print(f"## Every row ({len(runs)} full runs)\n")
  print(full_table(runs))


if __name__ == "__main__":
  main(sys.argv[1:])
