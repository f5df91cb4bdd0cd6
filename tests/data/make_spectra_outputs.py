"""Records SPECTRA's spectral clipping from the authors' PyTorch code.

Nothing is transcribed: the script imports the authors' own modules from a
checkout of ``mlolab/llm-spectral-clipping`` (commit
ed9df11d797aa94f312f4d7810d5f8cd8ddc9897, "new .bib"), whose path is the
first argument, and runs

* ``optim.post_process.clip_sigvals(G, clip_c, ns_iter=10, use_float32=True)``
  (their soft spectral clip, Newton-Schulz in float32) on fixed float32
  matrices, ``(out, in)`` as PyTorch weights, at three scales: the largest
  singular value below ``c``, a few times ``c``, and about 30 times ``c``,
  where the iteration's bound is ~1000 c^2; on noise of singular values up
  to ``c`` plus a rank-one spike of ``100 c``, where 10 steps have not
  converged for the noise directions (the recorded output keeps that
  approximation); on a batch of three matrices; and on vectors below and
  above ``c``;
* the same with ``use_float32=False`` (their default: the iteration in
  bfloat16) on bfloat16 inputs;
* one ``optim.spectra.SPECTRA`` step around ``torch.optim.SGD(lr=0.1)``
  (``apply_to="all"``, no weight decay, no warmup) on a tall ``(16, 8)``
  weight, a wide ``(8, 16)`` weight and a bias: ``(X_k - X_{k+1}) / lr`` is
  the processed update, which includes the authors' ``sqrt(max(1, rows /
  cols))`` factor for matrices.

``torch.compile`` is switched off (``TORCHDYNAMO_DISABLE=1``): it only fuses
the same operations.

Command that produced ``spectra_outputs.npz`` (torch 2.14.1, numpy 2.4)::

  python tests/data/make_spectra_outputs.py <checkout of the authors' repo>
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np
import torch

C = 2.0
NS_STEPS = 10
MATRIX_SHAPES = ((8, 16), (16, 8), (12, 12))
# Largest singular value over c, roughly: below, a few times, ~30 times.
SCALES = (0.3, 3.0, 30.0)


def _random_matrix(rng, shape, sigma_over_c):
  x = rng.standard_normal(shape)
  x *= sigma_over_c * C / np.linalg.svd(x, compute_uv=False)[0]
  return x.astype(np.float32)


def main(authors_repo: str) -> None:
  sys.path.insert(0, str(pathlib.Path(authors_repo) / "src"))
  from optim.post_process import clip_sigvals  # pylint: disable=import-outside-toplevel
  from optim.spectra import SPECTRA  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(20260314)
  out: dict[str, np.ndarray] = {
    "c": np.array(C),
    "ns_steps": np.array(NS_STEPS),
  }
  for shape in MATRIX_SHAPES:
    for scale in SCALES:
      name = f"matrix_{shape[0]}x{shape[1]}_s{scale:g}"
      x = _random_matrix(rng, shape, scale)
      with torch.no_grad():
        y = clip_sigvals(torch.from_numpy(x), C, NS_STEPS, use_float32=True)
        y16 = clip_sigvals(
          torch.from_numpy(x).bfloat16(), C, NS_STEPS, use_float32=False
        )
      out[f"{name}_in"] = x
      out[f"{name}_out"] = y.numpy()
      out[f"{name}_out_bf16"] = y16.float().numpy()
  # Noise at the level of c plus a rank-one spike of 100 c: the bound is
  # ~10^4 c^2 and 10 steps leave the noise directions visibly over-shrunk.
  noise = _random_matrix(rng, (8, 16), 1.0).astype(np.float64)
  spike = np.outer(rng.standard_normal(8), rng.standard_normal(16))
  spike *= 100 * C / np.linalg.norm(spike)
  x = (noise + spike).astype(np.float32)
  with torch.no_grad():
    out["spike_in"] = x
    out["spike_out"] = clip_sigvals(
      torch.from_numpy(x), C, NS_STEPS, use_float32=True
    ).numpy()
  # A batch whose matrices differ in scale: the authors bound every matrix
  # by the batch's largest bound.
  batch = np.stack(
    [_random_matrix(rng, (6, 10), s) for s in (0.5, 2.0, 5.0)]
  ).astype(np.float32)
  with torch.no_grad():
    out["batch_in"] = batch
    out["batch_out"] = clip_sigvals(
      torch.from_numpy(batch), C, NS_STEPS, use_float32=True
    ).numpy()
  for name, norm in (("vector_below", 0.7 * C), ("vector_above", 4.0 * C)):
    v = rng.standard_normal(10)
    v = (v * norm / np.linalg.norm(v)).astype(np.float32)
    with torch.no_grad():
      out[f"{name}_in"] = v
      out[f"{name}_out"] = clip_sigvals(
        torch.from_numpy(v), C, NS_STEPS
      ).numpy()

  # One SPECTRA step around plain SGD: the processed update includes the
  # rectangular factor.
  lr = 0.1
  weights = {
    "tall": _random_matrix(rng, (16, 8), 3.0),
    "wide": _random_matrix(rng, (8, 16), 3.0),
    "bias": (rng.standard_normal(8) * 3).astype(np.float32),
  }
  grads = {
    "tall": _random_matrix(rng, (16, 8), 3.0),
    "wide": _random_matrix(rng, (8, 16), 3.0),
    "bias": (rng.standard_normal(8) * 3).astype(np.float32),
  }
  params = {
    k: torch.nn.Parameter(torch.from_numpy(v.copy()))
    for k, v in weights.items()
  }
  for k, p in params.items():
    p.grad = torch.from_numpy(grads[k].copy())
  opt = SPECTRA(
    torch.optim.SGD(list(params.values()), lr=lr),
    post_process="clip",
    clip_c=C,
    ns_steps=NS_STEPS,
    apply_to="all",
    ns_float32=True,
  )
  opt.step()
  for k, p in params.items():
    out[f"step_{k}_grad"] = grads[k]
    out[f"step_{k}_update"] = (
      (torch.from_numpy(weights[k]) - p.detach()) / lr
    ).numpy()
  out["step_lr"] = np.array(lr)
  out["torch_version"] = np.array(torch.__version__)
  path = pathlib.Path(__file__).with_name("spectra_outputs.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({len(out)} arrays)")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  main(sys.argv[1])
