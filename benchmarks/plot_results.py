"""Bar chart of the clipping benchmark's ratios (run time vs baseline, vs floor).

Reads ``benchmarks/results/clipping.json`` (written by ``bench_clipping.py``)
and writes ``benchmarks/results/clipping.png``. Needs matplotlib.
"""

from __future__ import annotations

import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(path: str = os.path.join(RESULTS_DIR, "clipping.json")) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    rows = [r for r in json.load(f)["rows"] if r["fn"].startswith("oc.")]
  trees = ["few", "many", "tiny"]
  names = sorted({r["fn"] for r in rows}, key=[r["fn"] for r in rows].index)
  fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
  for ax, key, title in ((axes[0], "run_vs_baseline",
                          "run time / baseline (optax or oc.clip_by_global_norm)"),
                         (axes[1], "vs_floor", "run time / memory floor")):
    width = 0.8 / len(trees)
    for i, tree in enumerate(trees):
      values = [next((r.get(key, float("nan")) for r in rows
                      if r["fn"] == n and r["tree"] == tree), float("nan"))
                for n in names]
      ax.barh([j + i * width for j in range(len(names))], values, height=width,
              label=tree)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(title=title, yticks=[j + width for j in range(len(names))],
           yticklabels=names)
    ax.legend()
  fig.tight_layout()
  out = os.path.splitext(path)[0] + ".png"
  fig.savefig(out, dpi=100)
  return out


if __name__ == "__main__":
  print("wrote", main())
