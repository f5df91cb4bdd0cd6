"""spectral_clip: SPECTRA's soft spectral clipping against float64 SVD
references and the authors' recorded PyTorch outputs."""

from __future__ import annotations

import pathlib

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import optaxclip as oc

DATA = pathlib.Path(__file__).parent / "data" / "spectra_outputs.npz"


def _svals(x) -> np.ndarray:
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def _clip(x, c, use_jit=False, **kw):
  tx = oc.spectral_clip(c, **kw)
  updates = {"w": jnp.asarray(x)}
  out, state = helpers.run(tx, updates, use_jit=use_jit)
  return out["w"], state


def _with_singular_values(rng, rows, cols, sigmas):
  """A random (rows, cols) matrix with the given singular values."""
  k = min(rows, cols)
  left, _ = np.linalg.qr(rng.standard_normal((rows, k)))
  right, _ = np.linalg.qr(rng.standard_normal((cols, k)))
  return (left * np.asarray(sigmas, np.float64)) @ right.T


# -- the rule against float64 SVD references ---------------------------------


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)])
@pytest.mark.parametrize("sigma_max_over_c", [0.3, 3.0])
def test_every_singular_value_follows_the_soft_clip(
  shape, sigma_max_over_c, use_jit
):
  """sigma -> sigma / sqrt(1 + sigma^2/c^2), singular vectors kept (float64;
  with the bound below 100 c^2, 10 steps have converged)."""
  rng = np.random.default_rng(0)
  c = 2.0
  x = rng.standard_normal(shape)
  x *= sigma_max_over_c * c / _svals(x)[0]
  with helpers.enable_x64():
    out, _ = _clip(x, c, use_jit, rectangular_scale=False)
    out = np.asarray(out)
  assert out.dtype == np.float64
  sigma = _svals(x)
  np.testing.assert_allclose(
    _svals(out), sigma / np.sqrt(1 + (sigma / c) ** 2), rtol=1e-10
  )
  np.testing.assert_allclose(out, ref.spectra_clip_exact(x, c), atol=1e-12)


# The tolerance 10 Newton-Schulz steps achieve. Every iterate is a polynomial
# in A / alpha, so each singular value s gets s * z_10(lam) / sqrt(alpha)
# with lam = (1 + s^2/c^2) / alpha: exact for lam near 1, and furthest off
# for s -> 0 (lam = 1/alpha). Diagonal matrices make the Gershgorin bound
# exact (alpha = 1 + s_max^2 / c^2). Worst relative error per singular value:
#   s_max <= 9.9 c (alpha <= 99):  below 1e-10
#   s_max = 17 c   (alpha = 290):  5e-5
#   s_max = 31 c   (alpha = 962):  2.3e-2 (small singular values shrink more)
@pytest.mark.parametrize(
  "sigma_max_over_c, rtol", [(3.0, 1e-12), (9.9, 1e-10), (17.0, 1e-4)]
)
def test_tolerance_of_the_authors_ten_steps(sigma_max_over_c, rtol):
  c = 1.5
  sigmas = np.array([sigma_max_over_c, 1.0, 0.3, 0.01]) * c
  x = np.zeros((4, 5))
  x[np.arange(4), np.arange(4)] = sigmas
  with helpers.enable_x64():
    out, _ = _clip(x, c, rectangular_scale=False)
  got = np.diag(np.asarray(out))
  np.testing.assert_allclose(
    got, sigmas / np.sqrt(1 + (sigmas / c) ** 2), rtol=rtol
  )
  # and, to rounding, what the iteration computes in exact arithmetic
  np.testing.assert_allclose(
    np.asarray(out), ref.spectra_clip_ns(x, c), rtol=1e-12, atol=1e-15
  )


def test_unconverged_iteration_matches_its_exact_arithmetic():
  """A spike of 100 c over noise: alpha ~ 1e4, 10 steps shrink the noise
  directions ~30% below the exact rule; the implementation reproduces the
  iteration, not the SVD formula."""
  rng = np.random.default_rng(1)
  c = 1.0
  x = _with_singular_values(rng, 6, 9, [100.0, 1.0, 0.8, 0.5, 0.3, 0.1])
  with helpers.enable_x64():
    out, _ = _clip(x, c, rectangular_scale=False)
  np.testing.assert_allclose(
    np.asarray(out), ref.spectra_clip_ns(x, c), rtol=1e-9, atol=1e-12
  )
  exact = ref.spectra_clip_exact(x, c)
  assert np.abs(np.asarray(out) - exact).max() > 0.1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_low_precision_is_computed_in_float32(dtype):
  rng = np.random.default_rng(2)
  x = _with_singular_values(
    rng, 8, 12, [6.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.0]
  )
  xd = jnp.asarray(x, dtype)
  out, state = _clip(xd, 2.0, rectangular_scale=False)
  assert out.dtype == dtype and out.shape == x.shape
  expected = ref.spectra_clip_exact(np.asarray(xd, np.float64), 2.0)
  tol = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}[dtype]
  np.testing.assert_allclose(
    np.asarray(out, np.float64), expected, atol=tol * 2
  )
  assert state.spectral_bounds.dtype == jnp.float32
  # The float32 result rounded once: bf16 is the float32 answer cast.
  out32, _ = _clip(jnp.asarray(xd, jnp.float32), 2.0, rectangular_scale=False)
  np.testing.assert_array_equal(
    np.asarray(out), np.asarray(out32.astype(dtype))
  )


def test_complex_matrices():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 6)) + 1j * rng.standard_normal((4, 6))
  with helpers.enable_x64():
    out, _ = _clip(x, 1.5, rectangular_scale=False)
  assert np.asarray(out).dtype == np.complex128
  np.testing.assert_allclose(
    np.asarray(out), ref.spectra_clip_exact(x, 1.5), atol=1e-12
  )


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_extreme_magnitudes_stay_finite(magnitude):
  """Finite updates of any representable size have a finite answer: the
  Gram matrix is formed from the Frobenius-normalised matrix."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((5, 7)) * magnitude
  out, _ = _clip(jnp.asarray(x, jnp.float32), 1.0, rectangular_scale=False)
  out = np.asarray(out, np.float64)
  assert np.all(np.isfinite(out))
  expected = ref.spectra_clip_ns(x, 1.0)
  np.testing.assert_allclose(
    out, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max()
  )


# -- the authors' rules: vectors, rectangular factor, layouts -----------------


def test_vectors_follow_the_authors_rule(use_jit):
  c = 2.0
  below = jnp.array([0.6, -0.8, 1.2])  # norm 1.56 <= c: bit-identical
  above = jnp.array([3.0, 4.0, 12.0])
  tx = oc.spectral_clip(c)
  updates = {"below": below, "above": above, "scalar": jnp.array(-5.0)}
  out, state = helpers.run(tx, updates, use_jit=use_jit)
  np.testing.assert_array_equal(np.asarray(out["below"]), np.asarray(below))
  np.testing.assert_allclose(
    out["above"], ref.spectra_vector(above, c), rtol=1e-6
  )
  # a scalar is a vector of one element
  np.testing.assert_allclose(
    out["scalar"], ref.spectra_vector([-5.0], c)[0], rtol=1e-6
  )
  stats = oc.clip_stats(state)
  np.testing.assert_allclose(stats["spectral_clip/spectral_bounds/above"], 13.0)
  assert int(stats["spectral_clip/num_spectral_over_threshold"]) == 2


def test_matrices_only_leaves_vectors_alone():
  tree = {"w": jnp.ones((3, 4)), "b": jnp.array([30.0, 40.0])}
  tx = oc.spectral_clip(1.0, matrices_only=True)
  out, state = tx.update(tree, tx.init(tree))
  assert out["b"] is tree["b"] or np.array_equal(out["b"], tree["b"])
  assert [p for p, _ in state.spectral_bounds.segments] == ["w"]


@pytest.mark.parametrize(
  "shape, layout, factor",
  [
    ((8, 16), "flax", 2**0.5),  # (in, out): fan-out 16 over fan-in 8
    ((16, 8), "flax", 1.0),
    ((8, 16), "torch", 1.0),  # (out, in): the authors' rows / cols
    ((16, 8), "torch", 2**0.5),
  ],
)
def test_rectangular_factor(shape, layout, factor):
  rng = np.random.default_rng(5)
  x = rng.standard_normal(shape)
  with helpers.enable_x64():
    out, _ = _clip(x, 1.0, layout=layout)
    plain, _ = _clip(x, 1.0, layout=layout, rectangular_scale=False)
  np.testing.assert_allclose(
    np.asarray(out), factor * np.asarray(plain), rtol=1e-14
  )
  if layout == "torch":
    assert factor == pytest.approx(ref.spectra_rectangular_factor(*shape))


def test_bound_diagnostic_is_the_authors_bound():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((5, 9)) * 3
  with helpers.enable_x64():
    _, state = _clip(x, 1.0)
  (value,) = np.asarray(state.spectral_bounds.values)
  np.testing.assert_allclose(
    value, np.sqrt(ref.spectra_gram_bound(x)), rtol=1e-12
  )
  assert value >= _svals(x)[0]


# -- the authors' recorded outputs (tests/data/make_spectra_outputs.py) ------


@pytest.fixture(scope="module")
def recorded():
  return dict(np.load(DATA))


def _close(got, expected, rel=3e-6):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(got, expected, atol=rel * np.abs(expected).max())


def test_authors_matrices(recorded):
  c = float(recorded["c"])
  names = [
    k[:-3] for k in recorded if k.startswith("matrix_") and k.endswith("_in")
  ]
  assert len(names) == 9
  tx = oc.spectral_clip(c, rectangular_scale=False)
  fn = jax.jit(lambda u: tx.update(u, None)[0])
  for name in [*names, "spike"]:
    out = fn({"w": jnp.asarray(recorded[f"{name}_in"])})["w"]
    _close(out, recorded[f"{name}_out"], rel=2e-5 if name == "spike" else 3e-6)


def test_authors_batch_and_vectors(recorded):
  """The authors scale a batch by its largest bound, this per matrix; once
  the iteration has converged (here) both give H_c."""
  c = float(recorded["c"])
  tx = oc.spectral_clip(c, rectangular_scale=False)
  out, _ = tx.update({"w": jnp.asarray(recorded["batch_in"])}, None)
  _close(out["w"], recorded["batch_out"])
  for name in ("vector_below", "vector_above"):
    out, _ = tx.update({"v": jnp.asarray(recorded[f"{name}_in"])}, None)
    _close(out["v"], recorded[f"{name}_out"])
  np.testing.assert_array_equal(
    np.asarray(
      tx.update({"v": jnp.asarray(recorded["vector_below_in"])}, None)[0]["v"]
    ),
    recorded["vector_below_in"],
  )


def test_authors_spectra_step(recorded):
  """One SPECTRA step around SGD: (X_k - X_{k+1}) / lr is H_c of the
  gradient times the authors' rectangular factor, for PyTorch (out, in)
  weights."""
  c = float(recorded["c"])
  tx = oc.spectral_clip(c, layout="torch")
  grads = {
    k: jnp.asarray(recorded[f"step_{k}_grad"]) for k in ("tall", "wide", "bias")
  }
  out, _ = tx.update(grads, tx.init(grads))
  for k in grads:
    _close(out[k], recorded[f"step_{k}_update"], rel=1e-5)


# -- stacked layers, shapes, jit ---------------------------------------------


def test_stacked_layers_equal_each_layer(use_jit):
  rng = np.random.default_rng(7)
  kernel = jnp.asarray(rng.standard_normal((3, 6, 10)) * 4, jnp.float32)
  scales = jnp.asarray(rng.standard_normal((3, 5)) * 3, jnp.float32)
  tree = {"kernel": kernel, "scale": scales}
  tx = oc.spectral_clip(1.0, stacked=1)
  out, state = helpers.run(tx, tree, use_jit=use_jit)
  for i in range(3):
    one = {"kernel": kernel[i], "scale": scales[i]}
    expected, _ = oc.spectral_clip(1.0).update(one, None)
    np.testing.assert_allclose(
      out["kernel"][i], expected["kernel"], rtol=2e-6, atol=1e-7
    )
    np.testing.assert_allclose(out["scale"][i], expected["scale"], rtol=1e-6)
  assert state.spectral_bounds.values.shape == (6,)
  assert oc.clip_stats(state)["spectral_clip/spectral_bounds/kernel"].shape == (
    3,
  )
  # Without stacked=, the (3, 5) leaf is one matrix; a 3-D leaf is already a
  # batch of its trailing matrices.
  plain, _ = oc.spectral_clip(1.0).update(tree, None)
  np.testing.assert_allclose(
    plain["kernel"], out["kernel"], rtol=1e-6, atol=1e-7
  )
  factor = (5 / 3) ** 0.5  # a flax (in=3, out=5) matrix
  np.testing.assert_allclose(
    plain["scale"],
    factor * ref.spectra_clip_exact(scales, 1.0),
    rtol=1e-5,
    atol=1e-6,
  )


def test_jit_compiles_once_across_thresholds():
  tree = {"w": jnp.ones((4, 6)), "b": jnp.ones(3)}
  tx = optax.inject_hyperparams(oc.spectral_clip)(threshold=1.0)
  state = tx.init(tree)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(u, s):
    return tx.update(u, s)

  outs = []
  for c in (0.5, 1.0, 2.0):
    state.hyperparams["threshold"] = jnp.asarray(c)
    out, state = step(tree, state)
    outs.append(out)
    fixed, _ = oc.spectral_clip(c).update(tree, None)
    np.testing.assert_allclose(out["w"], fixed["w"], rtol=1e-6)
    np.testing.assert_allclose(out["b"], fixed["b"], rtol=1e-6)
  assert "spectral_clip/threshold" in oc.clip_stats(state)


def test_schedule_through_inject_hyperparams():
  tx = optax.inject_hyperparams(oc.spectral_clip)(
    threshold=optax.linear_schedule(4.0, 1.0, 3)
  )
  tree = {"w": jnp.eye(3) * 5.0}
  state = tx.init(tree)
  for c in (4.0, 3.0, 2.0):
    out, state = tx.update(tree, state)
    np.testing.assert_allclose(
      np.diag(out["w"]), 5.0 / np.sqrt(1 + (5.0 / c) ** 2), rtol=1e-6
    )


# -- zeros, non-finite, gradients, validation --------------------------------


def test_zeros_and_zero_threshold(use_jit):
  tree = {
    "w": jnp.zeros((3, 5)),
    "b": jnp.zeros(4),
    "s": jnp.ones((2, 2), jnp.bfloat16),
  }
  out, state = helpers.run(oc.spectral_clip(1.0), tree, use_jit=use_jit)
  assert not np.any(np.isnan(np.asarray(out["w"])))
  np.testing.assert_array_equal(out["w"], 0.0)
  np.testing.assert_array_equal(out["b"], 0.0)
  stats = oc.clip_stats(state)
  assert float(stats["spectral_clip/spectral_bounds/w"]) == 0.0
  assert float(stats["spectral_clip/spectral_bounds/b"]) == 0.0
  out, _ = helpers.run(oc.spectral_clip(0.0), tree, use_jit=use_jit)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)


def test_infinite_threshold_is_identity():
  rng = np.random.default_rng(8)
  x = rng.standard_normal((4, 7))
  with helpers.enable_x64():
    out, _ = _clip(x, np.inf, rectangular_scale=False)
  np.testing.assert_allclose(np.asarray(out), x, rtol=1e-14)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_matrices_are_nan(bad, use_jit):
  w = jnp.ones((3, 4)).at[1, 2].set(bad)
  tree = {"w": w, "v": jnp.array([bad, 1.0]), "ok": jnp.eye(2)}
  out, state = helpers.run(oc.spectral_clip(1.0), tree, use_jit=use_jit)
  assert np.all(np.isnan(np.asarray(out["w"])))
  assert np.all(np.isnan(np.asarray(out["v"])))
  assert np.all(np.isfinite(np.asarray(out["ok"])))
  stats = oc.clip_stats(state)
  assert np.isnan(stats["spectral_clip/spectral_bounds/w"])


def test_gradient_is_finite_at_zero():
  tx = oc.spectral_clip(1.0)

  def loss(tree):
    out, _ = tx.update(tree, None)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

  for scale in (0.0, 1.0):
    tree = {"w": jnp.ones((3, 4)) * scale, "b": jnp.ones(3) * scale}
    grads = jax.grad(loss)(tree)
    assert all(
      np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads)
    )


def test_validation():
  with pytest.raises(ValueError, match="spectral_clip: threshold"):
    oc.spectral_clip(-1.0)
  with pytest.raises(ValueError, match="ns_steps"):
    oc.spectral_clip(1.0, ns_steps=0)
  with pytest.raises(ValueError, match="layout"):
    oc.spectral_clip(1.0, layout="keras")
  with pytest.raises(TypeError, match="matrices_only"):
    oc.spectral_clip(1.0, matrices_only="yes")
  injected = optax.inject_hyperparams(oc.spectral_clip)(
    threshold=1.0, ns_steps=5
  )
  with pytest.raises(TypeError, match="static_args"):
    injected.init({"w": jnp.ones((2, 2))})
  tx = optax.inject_hyperparams(oc.spectral_clip, static_args=("ns_steps",))(
    threshold=1.0, ns_steps=5
  )
  tx.update({"w": jnp.ones((2, 2))}, tx.init({"w": jnp.ones((2, 2))}))
  with pytest.raises(TypeError, match="'w'"):
    oc.spectral_clip(1.0).update({"w": jnp.ones((2, 2), jnp.int32)}, None)
  tx = oc.spectral_clip(1.0)
  with pytest.raises(ValueError, match="init"):
    tx.update({"w": jnp.ones((2, 2))}, tx.init({"v": jnp.ones((2, 2))}))


def test_leaves_whose_paths_print_alike_are_an_error():
  """Bounds are keyed by path: ["a/b"] and ["a"]["b"] would share one
  clip_stats key, so init and update name both leaves instead."""
  grads = {"a/b": jnp.ones((2, 2)), "a": {"b": 3 * jnp.ones((2, 2))}}
  tx = oc.spectral_clip(1.0)
  clash = r"\['a'\]\['b'\] and \['a/b'\] both have the path 'a/b'"
  with pytest.raises(ValueError, match=clash):
    tx.init(grads)
  with pytest.raises(ValueError, match=clash):
    tx.update(grads, None)
