"""QK-Clip (``oc.qk_clip``) and ``oc.max_attention_logits``.

Expected values come from the float64 per-head loops in ``reference.py``
(the paper's rule, MaxText's MLA rule, the grouped rule), from logits
recomputed with the new weights, or from hand-worked numbers.
"""

from __future__ import annotations

import math

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import optaxclip as oc

TAU = 10.0


def _rng(seed=0):
  return np.random.default_rng(seed)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _run(tx, updates, params, max_logits, use_jit=False, state=None):
  if state is None:
    state = tx.init(params)

  def step(u, s, p, m):
    return tx.update(u, s, p, max_logits=m)

  return helpers.maybe_jit(step, use_jit)(updates, state, params, max_logits)


def _new(params, updates):
  return jax.tree.map(
    lambda p, u: np.asarray(p, np.float64) + np.asarray(u, np.float64),
    params,
    updates,
  )


def _bits_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------
# The rule.


def test_rule_matches_reference_on_every_kind_of_maximum():
  s = np.array(
    [400.0, 10.0, 10.5, 3.0, -5.0, -0.0, 0.0, -np.inf, np.inf, np.nan, 1e30],
    np.float32,
  )
  gamma, clipped, nonfinite = oc._qk_clip.qk_clip_rule(_f32(s), TAU)
  np.testing.assert_allclose(gamma, reference.qk_gamma(s, TAU), rtol=1e-7)
  np.testing.assert_array_equal(clipped, np.isfinite(s) & (s > TAU))
  np.testing.assert_array_equal(nonfinite, np.isnan(s) | (s == np.inf))
  assert np.all(np.isfinite(gamma))


def test_the_bare_rule_goes_nan_where_this_one_does_not():
  """min(1, tau / S) is NaN after the square root for a negative maximum
  (and -0.0), and NaN for a NaN maximum; inf zeroes the head."""
  s = np.array([-5.0, -0.0, np.nan, np.inf], np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    bare = np.sqrt(np.minimum(1.0, TAU / s))
  assert np.isnan(bare[:3]).all() and bare[3] == 0.0
  gamma, _, _ = oc._qk_clip.qk_clip_rule(_f32(s), TAU)
  np.testing.assert_array_equal(gamma, np.ones(4, np.float32))


# --------------------------------------------------------------------------
# Layouts against the float64 reference.


def _mha(rng, d=6, heads=4, kv_heads=4, hd=3, bias=True):
  attn = {
    "query": {"kernel": _f32(rng.standard_normal((d, heads, hd)))},
    "key": {"kernel": _f32(rng.standard_normal((d, kv_heads, hd)))},
    "value": {"kernel": _f32(rng.standard_normal((d, kv_heads, hd)))},
  }
  if bias:
    attn["query"]["bias"] = _f32(rng.standard_normal((heads, hd)))
    attn["key"]["bias"] = _f32(rng.standard_normal((kv_heads, hd)))
  return {"attn": attn, "mlp": _f32(rng.standard_normal((d, 5)))}


def test_flax_layout_matches_reference_and_leaves_the_rest_bit_identical(
  use_jit,
):
  rng = _rng(0)
  params = _mha(rng)
  updates = jax.tree.map(
    lambda x: _f32(rng.standard_normal(x.shape) * 0.1), params
  )
  s = np.array([400.0, 5.0, 12.5, np.nan], np.float32)
  out, state = _run(
    oc.qk_clip(TAU), updates, params, {"attn": _f32(s)}, use_jit
  )
  new = _new(params, out)
  stepped = _new(params, updates)
  for part in ("kernel", "bias"):
    want_q, want_k = reference.qk_clip_heads(
      stepped["attn"]["query"][part], stepped["attn"]["key"][part], s, TAU
    )
    np.testing.assert_allclose(
      new["attn"]["query"][part], want_q, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      new["attn"]["key"][part], want_k, rtol=1e-5, atol=1e-6
    )
  # Untouched leaves and heads (gamma = 1: heads 1 and 3) are bit-identical.
  assert _bits_equal(out["mlp"], updates["mlp"])
  assert _bits_equal(out["attn"]["value"]["kernel"], updates["attn"]["value"]["kernel"])
  for h in (1, 3):
    assert _bits_equal(
      out["attn"]["query"]["kernel"][:, h], updates["attn"]["query"]["kernel"][:, h]
    )
  assert not np.isnan(np.asarray(out["attn"]["query"]["kernel"])).any()
  stats = oc.clip_stats(state)
  np.testing.assert_array_equal(stats["qk_clip/qk_max_logits/attn"], s)
  np.testing.assert_allclose(
    stats["qk_clip/qk_gamma/attn"], reference.qk_gamma(s, TAU), rtol=1e-7
  )
  assert int(stats["qk_clip/qk_num_clipped_heads"]) == 2
  assert int(stats["qk_clip/qk_num_nonfinite_heads"]) == 1
  assert np.isnan(stats["qk_clip/qk_max_logit"])


@pytest.mark.parametrize("group_queries", [False, True])
def test_gqa_key_head_takes_its_groups_maximum(group_queries):
  rng = _rng(1)
  params = _mha(rng, heads=4, kv_heads=2)
  updates = jax.tree.map(lambda x: jnp.zeros_like(x), params)
  s = np.array([40.0, 20.0, 5.0, 8.0], np.float32)
  tx = oc.qk_clip(TAU, group_queries=group_queries)
  out, _ = _run(tx, updates, params, {"attn": _f32(s)})
  new = _new(params, out)
  for part in ("kernel", "bias"):
    want_q, want_k = reference.qk_clip_heads(
      params["attn"]["query"][part], params["attn"]["key"][part], s, TAU,
      group_queries=group_queries,
    )
    np.testing.assert_allclose(new["attn"]["query"][part], want_q, rtol=1e-6)
    np.testing.assert_allclose(new["attn"]["key"][part], want_k, rtol=1e-6)
  # The quiet group (heads 2, 3 on key head 1) keeps its weights exactly.
  assert _bits_equal(out["attn"]["key"]["kernel"][:, 1], updates["attn"]["key"]["kernel"][:, 1])


@pytest.mark.parametrize("layout", ["dense", "torch"])
def test_fused_head_axis_layouts(layout):
  rng = _rng(2)
  d, heads, hd = 5, 3, 4
  canon_q = rng.standard_normal((d, heads, hd))
  canon_k = rng.standard_normal((d, heads, hd))

  def to_layout(w):  # canonical (in, heads, hd) -> the layout's kernel
    fused = w.reshape(d, heads * hd)
    return _f32(fused if layout == "dense" else fused.T)

  params = {"q_proj": {"weight": to_layout(canon_q)},
            "k_proj": {"weight": to_layout(canon_k)}}
  updates = jax.tree.map(jnp.zeros_like, params)
  s = np.array([25.0, 1.0, 11.0], np.float32)
  tx = oc.qk_clip(TAU, query="q_proj", key="k_proj", layout=layout, head_dim=hd)
  out, _ = _run(tx, updates, params, _f32(s))  # bare array: one attention
  new = _new(params, out)
  want_q, want_k = reference.qk_clip_heads(canon_q, canon_k, s, TAU)
  for name, want in (("q_proj", want_q), ("k_proj", want_k)):
    fused = want.reshape(d, heads * hd)
    want_layout = fused if layout == "dense" else fused.T
    np.testing.assert_allclose(new[name]["weight"], want_layout, rtol=1e-6)


@pytest.mark.parametrize("kv_heads", [3, 1])
def test_fused_qkv_kernel(kv_heads):
  """A (d, (heads + 2 kv_heads) * hd) kernel holding [q | k | v]."""
  rng = _rng(3)
  d, heads, hd = 4, 3, 2
  q = rng.standard_normal((d, heads, hd))
  k = rng.standard_normal((d, kv_heads, hd))
  v = rng.standard_normal((d, kv_heads, hd))
  fused = np.concatenate([x.reshape(d, -1) for x in (q, k, v)], axis=1)
  params = {"attn": {"c_attn": {"kernel": _f32(fused)}}}
  updates = jax.tree.map(jnp.zeros_like, params)
  s = np.array([30.0, 2.0, 15.0], np.float32)
  tx = oc.qk_clip(
    TAU, query=None, key=None, qkv="c_attn", layout="dense", head_dim=hd,
    num_heads=heads if kv_heads != heads else None,
  )
  out, _ = _run(tx, updates, params, {"attn": _f32(s)})
  new = _new(params, out)["attn"]["c_attn"]["kernel"]
  want_q, want_k = reference.qk_clip_heads(q, k, s, TAU)
  want = np.concatenate([x.reshape(d, -1) for x in (want_q, want_k, v)], 1)
  np.testing.assert_allclose(new, want, rtol=1e-6)
  # The value block is untouched, bit for bit.
  cut = (heads + kv_heads) * hd
  assert _bits_equal(out["attn"]["c_attn"]["kernel"][:, cut:],
                     updates["attn"]["c_attn"]["kernel"][:, cut:])


def test_mla_follows_maxtexts_rule():
  rng = _rng(4)
  rank, heads, nope, rope, vdim = 5, 3, 4, 2, 3
  wq = rng.standard_normal((rank, heads, nope + rope))
  wkv = rng.standard_normal((rank, heads, nope + vdim))
  params = {
    "layer": {
      "wq_b": {"kernel": _f32(wq)},
      "wkv_b": {"kernel": _f32(wkv)},
      # The shared rotary key lives in wkv_a: not selected, never touched.
      "wkv_a": {"kernel": _f32(rng.standard_normal((8, 6 + rope)))},
    }
  }
  updates = jax.tree.map(jnp.zeros_like, params)
  s = np.array([50.0, 9.0, 20.0], np.float32)
  tx = oc.qk_clip(TAU, query="wq_b", key="wkv_b", qk_nope_head_dim=nope)
  out, _ = _run(tx, updates, params, {"layer": _f32(s)})
  new = _new(params, out)["layer"]
  want_q, want_kv = reference.qk_clip_mla(wq, wkv, s, TAU, nope)
  np.testing.assert_allclose(new["wq_b"]["kernel"], want_q, rtol=1e-6)
  np.testing.assert_allclose(new["wkv_b"]["kernel"], want_kv, rtol=1e-6)
  assert _bits_equal(out["layer"]["wkv_a"]["kernel"], updates["layer"]["wkv_a"]["kernel"])


def test_stacked_layers_equal_each_layer_alone(use_jit):
  rng = _rng(5)
  layers, d, heads, hd = 3, 4, 2, 3
  wq = rng.standard_normal((layers, d, heads, hd))
  wk = rng.standard_normal((layers, d, heads, hd))
  params = {"blocks": {"attn": {"wq": _f32(wq), "wk": _f32(wk)}}}
  updates = jax.tree.map(lambda x: _f32(0.01 * np.ones(x.shape)), params)
  s = np.array([[20.0, 1.0], [5.0, 5.0], [np.inf, 30.0]], np.float32)
  tx = oc.qk_clip(
    TAU, query="wq", key="wk", stacked=oc.stacked_by_path({"blocks": 1})
  )
  out, state = _run(tx, updates, params, {"blocks/attn": _f32(s)}, use_jit)
  new = _new(params, out)["blocks"]["attn"]
  stepped = _new(params, updates)["blocks"]["attn"]
  for layer in range(layers):
    want_q, want_k = reference.qk_clip_heads(
      stepped["wq"][layer], stepped["wk"][layer], s[layer], TAU
    )
    np.testing.assert_allclose(new["wq"][layer], want_q, rtol=1e-6)
    np.testing.assert_allclose(new["wk"][layer], want_k, rtol=1e-6)
  stats = oc.clip_stats(state)
  assert stats["qk_clip/qk_gamma/blocks/attn"].shape == (layers, heads)
  assert int(stats["qk_clip/qk_num_nonfinite_heads"]) == 1


# --------------------------------------------------------------------------
# The invariant: the same batch through the new weights.


def _attention_logits_max(x, attn, causal=True):
  q = np.einsum("btd,dhk->bthk", x, np.asarray(attn["query"]["kernel"], np.float64))
  k = np.einsum("btd,dhk->bthk", x, np.asarray(attn["key"]["kernel"], np.float64))
  q = q + np.asarray(attn["query"]["bias"], np.float64)
  k = k + np.asarray(attn["key"]["bias"], np.float64)
  return reference.attention_max_logits(q, k, causal=causal)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_new_weights_bring_every_head_to_at_most_tau(kv_heads):
  rng = _rng(6)
  params = jax.tree.map(lambda w: 3.0 * w, _mha(rng, kv_heads=kv_heads))
  x = rng.standard_normal((2, 5, 6))
  before = _attention_logits_max(x, params["attn"])
  tau = float(np.sort(before)[1])  # some heads above, some below
  q = jnp.einsum("btd,dhk->bthk", _f32(x), params["attn"]["query"]["kernel"])
  k = jnp.einsum("btd,dhk->bthk", _f32(x), params["attn"]["key"]["kernel"])
  s = oc.max_attention_logits(
    q + params["attn"]["query"]["bias"][None, None],
    k + params["attn"]["key"]["bias"][None, None],
    is_causal=True,
  )
  np.testing.assert_allclose(s, before, rtol=1e-5)
  tx = optax.chain(optax.sgd(0.0), oc.qk_clip(tau))
  out, _ = _run(tx, params, params, {"attn": s})
  after = _attention_logits_max(x, optax.apply_updates(params, out)["attn"])
  assert np.all(after <= tau * (1 + 1e-5))
  group = 4 // kv_heads
  for h in range(4):
    members = range(h // group * group, (h // group + 1) * group)
    if before[h] > tau and before[h] == max(before[m] for m in members):
      np.testing.assert_allclose(after[h], tau, rtol=1e-5)
    elif all(before[m] <= tau for m in members):
      np.testing.assert_allclose(after[h], before[h], rtol=1e-6)


# --------------------------------------------------------------------------
# Real models.


@pytest.mark.skipif(helpers.flax_version() < (0, 11), reason="nnx API")
def test_nnx_model_with_sow_and_optimizer():
  from flax import nnx

  class Attn(nnx.Module):
    def __init__(self, rngs):
      self.wq = nnx.Param(jax.random.normal(rngs.params(), (4, 2, 3)) * 4)
      self.wk = nnx.Param(jax.random.normal(rngs.params(), (4, 2, 3)) * 4)

    def __call__(self, x):
      q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
      k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
      self.sow(nnx.Intermediate, "max_logits",
               oc.max_attention_logits(q, k, is_causal=True))
      return jax.nn.dot_product_attention(q, k, q, is_causal=True).sum()

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([Attn(rngs), Attn(rngs)])

    def __call__(self, x):
      return sum(layer(x) for layer in self.layers)

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, 4))
  tx = optax.chain(optax.sgd(0.0), oc.qk_clip(TAU, query="wq", key="wk"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model):
    if hasattr(nnx, "capture"):  # flax >= 0.12
      return nnx.capture(model, nnx.Intermediate)(x)
    return model(x), nnx.pop(model, nnx.Intermediate)

  (_, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads, max_logits=inter)
  stats = oc.clip_stats(optimizer.opt_state)
  before = np.concatenate([stats[f"qk_clip/qk_max_logits/layers/{i}"] for i in (0, 1)])
  assert before.max() > TAU
  _, inter = loss_fn(model)
  after = np.concatenate(
    [jax.tree.leaves(inter["layers"][i])[0] for i in (0, 1)]
  )
  assert np.all(after <= TAU * (1 + 1e-5))
  clipped = before > TAU
  np.testing.assert_allclose(after[clipped], TAU, rtol=1e-5)
  np.testing.assert_allclose(after[~clipped], before[~clipped], rtol=1e-5)


@pytest.mark.skipif(helpers.flax_version() < (0, 11), reason="nnx API")
def test_nnx_multi_head_attention_kernels_and_biases():
  from flax import nnx

  mha = nnx.MultiHeadAttention(4, 8, 8, rngs=nnx.Rngs(0), decode=False)
  for proj in (mha.query, mha.key):
    proj.kernel[...] = proj.kernel[...] * 6
    proj.bias[...] = jnp.ones_like(proj.bias[...])
  x = jax.random.normal(jax.random.key(2), (2, 5, 8))
  s = oc.max_attention_logits(mha.query(x), mha.key(x))
  params = nnx.state(mha, nnx.Param)
  tx = optax.chain(optax.sgd(0.0), oc.qk_clip(TAU))
  out, _ = _run(tx, params, params, s)
  nnx.update(mha, optax.apply_updates(params, out))
  after = oc.max_attention_logits(mha.query(x), mha.key(x))
  assert float(jnp.max(s)) > TAU
  np.testing.assert_allclose(np.minimum(s, TAU), after, rtol=1e-5)


def test_equinox_multihead_attention():
  eqx = pytest.importorskip("equinox")
  heads, dim = 2, 8
  mha = eqx.nn.MultiheadAttention(heads, dim, use_query_bias=True,
                                  use_key_bias=True, key=jax.random.key(0))
  mha = jax.tree.map(lambda w: w * 5 if eqx.is_inexact_array(w) else w, mha)
  x = jax.random.normal(jax.random.key(3), (6, dim))
  hd = dim // heads

  def max_logits(m):
    q = jax.vmap(m.query_proj)(x).reshape(1, 6, heads, hd)
    k = jax.vmap(m.key_proj)(x).reshape(1, 6, heads, hd)
    return oc.max_attention_logits(q, k)

  params = eqx.filter(mha, eqx.is_inexact_array)
  s = max_logits(mha)
  tx = optax.chain(
    optax.sgd(0.0),
    oc.qk_clip(TAU, query="query_proj", key="key_proj", layout="torch",
               head_dim=hd),
  )
  state = tx.init(params)
  out, state = tx.update(params, state, params, max_logits=s)
  new = eqx.apply_updates(mha, out)
  assert float(jnp.max(s)) > TAU
  np.testing.assert_allclose(np.minimum(s, TAU), max_logits(new), rtol=1e-5)
  sgd = optax.sgd(0.0)
  plain, _ = sgd.update(params, sgd.init(params))
  assert _bits_equal(out.output_proj.weight, plain.output_proj.weight)


# --------------------------------------------------------------------------
# Options, numerics, composition.


def test_nonfinite_maxima_leave_their_heads_unchanged_and_are_counted():
  params = _mha(_rng(7))
  updates = jax.tree.map(lambda x: _f32(np.full(x.shape, 0.5)), params)
  s = _f32([np.nan, np.inf, -np.inf, 20.0])
  out, state = _run(oc.qk_clip(TAU), updates, params, {"attn": s})
  for h in (0, 1, 2):
    assert _bits_equal(out["attn"]["query"]["kernel"][:, h],
                       updates["attn"]["query"]["kernel"][:, h])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
  assert int(state.qk_num_nonfinite_heads) == 2
  assert int(state.qk_num_clipped_heads) == 1


def test_log_only_records_without_changing_anything():
  params = _mha(_rng(8))
  updates = jax.tree.map(lambda x: 0.5 * x, params)
  s = _f32([400.0, 1.0, 1.0, 1.0])
  out, state = _run(oc.qk_clip(TAU, log_only=True), updates, params, {"attn": s})
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(updates), strict=True):
    assert _bits_equal(a, b)
  assert int(state.qk_num_clipped_heads) == 1
  np.testing.assert_allclose(state.qk_gamma.values[0], 0.025)


def test_bfloat16_params_float32_statistics():
  rng = _rng(9)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _mha(rng))
  updates = jax.tree.map(jnp.zeros_like, params)
  s = _f32([40.0, 1.0, 1.0, 1.0])
  out, state = _run(oc.qk_clip(TAU), updates, params, {"attn": s})
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(out))
  assert state.qk_max_logits.dtype == jnp.float32
  new = _new(params, out)["attn"]["query"]["kernel"]
  want, _ = reference.qk_clip_heads(
    np.asarray(params["attn"]["query"]["kernel"], np.float64),
    np.asarray(params["attn"]["key"]["kernel"], np.float64), np.asarray(s), TAU)
  np.testing.assert_allclose(new, want, rtol=1e-2, atol=1e-2)


def test_inject_hyperparams_schedule_compiles_once():
  params = _mha(_rng(10))
  updates = jax.tree.map(jnp.zeros_like, params)
  tx = optax.inject_hyperparams(oc.qk_clip)(
    threshold=optax.linear_schedule(100.0, 10.0, 4)
  )
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(u, s, p, m):
    traces.append(1)
    return tx.update(u, s, p, max_logits=m)

  s = {"attn": _f32([50.0, 1.0, 1.0, 1.0])}
  counts = []
  for _ in range(6):
    _, state = step(updates, state, params, s)
    counts.append(int(state.inner_state.qk_num_clipped_heads))
  assert len(traces) == 1
  assert counts[0] == 0 and counts[-1] == 1
  assert "qk_clip/threshold" in oc.clip_stats(state)


def test_axis_name_takes_the_maximum_over_devices():
  params = _mha(_rng(11))
  updates = jax.tree.map(jnp.zeros_like, params)
  tx = oc.qk_clip(TAU, axis_name="data")
  state = tx.init(params)
  local = _f32([[40.0, 1.0, 1.0, 1.0], [1.0, 1.0, 20.0, 1.0]])

  def step(m):
    return tx.update(updates, state, params, max_logits={"attn": m})

  out, states = jax.vmap(step, axis_name="data")(local)
  np.testing.assert_array_equal(states.qk_max_logits.values[0], [40, 1, 20, 1])
  np.testing.assert_array_equal(
    out["attn"]["query"]["kernel"][0], out["attn"]["query"]["kernel"][1]
  )


def test_state_none_and_grad_are_finite():
  params = _mha(_rng(12))
  tx = oc.qk_clip(TAU)
  s = {"attn": _f32([10.0, 11.0, np.nan, -3.0])}

  def loss(u):
    out, _ = tx.update(u, None, params, max_logits=s)
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(out))

  grads = jax.grad(loss)(jax.tree.map(jnp.zeros_like, params))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_several_sow_entries_combine_by_maximum():
  params = _mha(_rng(13))
  updates = jax.tree.map(jnp.zeros_like, params)
  entries = {"attn": {"max_logits": (_f32([20.0, 1, 1, 1]), _f32([1.0, 40, 1, 1]))}}
  _, state = _run(oc.qk_clip(TAU), updates, params, entries)
  np.testing.assert_array_equal(state.qk_max_logits.values, [20, 40, 1, 1])


# --------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("threshold", [0.0, -1.0, math.inf, math.nan])
def test_threshold_must_be_positive_and_finite(threshold):
  with pytest.raises(ValueError, match="qk_clip: threshold"):
    oc.qk_clip(threshold)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"layout": "jax"}, ValueError, "layout"),
    ({"layout": "dense"}, ValueError, "head_dim"),
    ({"query": 3}, TypeError, "query"),
    ({"qk_nope_head_dim": 2, "layout": "torch", "head_dim": 2}, ValueError,
     "MLA"),
    ({"log_only": 1}, TypeError, "log_only"),
    ({"head_dim": jnp.asarray(2), "layout": "dense"}, TypeError,
     "static_args"),
  ],
)
def test_construction_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    oc.qk_clip(TAU, **kwargs)


def test_update_errors_name_what_is_missing():
  params = _mha(_rng(14))
  tx = oc.qk_clip(TAU)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state, None, max_logits={"attn": jnp.ones(4)})
  with pytest.raises(ValueError, match="max_logits"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match=r"expected \(4,\)"):
    tx.update(params, state, params, max_logits={"attn": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"not \(below\) any attention"):
    tx.update(params, state, params, max_logits={"mlp": jnp.ones(4)})
  other = oc.qk_clip(TAU).init(_mha(_rng(15), heads=2, kv_heads=2))
  with pytest.raises(
    ValueError,
    match=r"initialised with the attention layers \['attn\[2\]'\], but the"
    r" params fall into the attention layers \['attn\[4\]'\]",
  ):
    tx.update(params, other, params, max_logits={"attn": jnp.ones(4)})
  with pytest.raises(ValueError, match="no query/key projection"):
    oc.qk_clip(TAU, query="wq", key="wk").init(params)
  with pytest.raises(ValueError, match="no key projection"):
    oc.qk_clip(TAU, key="nothing").init(params)


def test_modules_whose_paths_print_alike_are_an_error_not_merged():
  """``{"x/attn": ..., "x": {"attn": ...}}`` holds two attention modules
  that print as one path: their heads would share one entry of max_logits
  and one gamma, so both init and update name the clashing leaves."""
  one, two = _mha(_rng(16))["attn"], _mha(_rng(17))["attn"]
  params = {"x/attn": one, "x": {"attn": two}}
  tx = oc.qk_clip(TAU)
  clash = r"\['x'\]\['attn'\].*\['x/attn'\].*both have the path 'x/attn/"
  with pytest.raises(ValueError, match=clash):
    tx.init(params)
  state = tx.init({"x": {"attn": two}})
  with pytest.raises(ValueError, match=clash):
    tx.update(params, state, params, max_logits={"x/attn": jnp.ones(4)})


# --------------------------------------------------------------------------
# max_attention_logits.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_attention_logits_matches_loops(dtype):
  rng = _rng(15)
  q = rng.standard_normal((2, 4, 4, 3))
  k = rng.standard_normal((2, 5, 2, 3))
  mask = rng.random((2, 4, 4, 5)) < 0.6
  q_in, k_in = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  got = oc.max_attention_logits(q_in, k_in, mask=mask, is_causal=True)
  assert got.dtype == jnp.float32 and got.shape == (4,)
  want = reference.attention_max_logits(
    np.asarray(q_in, np.float64), np.asarray(k_in, np.float64), causal=True,
    mask=mask,
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  plain = oc.max_attention_logits(q_in, k_in, scale=1.0)
  want = reference.attention_max_logits(
    np.asarray(q_in, np.float64), np.asarray(k_in, np.float64), scale=1.0
  )
  np.testing.assert_allclose(plain, want, rtol=1e-5)


def test_max_attention_logits_fully_masked_head_is_minus_inf():
  q = jnp.ones((1, 2, 2, 2))
  mask = np.ones((1, 2, 2, 2), bool)
  mask[:, 1] = False
  got = oc.max_attention_logits(q, q, mask=mask)
  assert got[1] == -np.inf and np.isfinite(got[0])


def test_max_attention_logits_bad_shapes():
  with pytest.raises(ValueError, match="divide"):
    oc.max_attention_logits(jnp.ones((1, 2, 3, 2)), jnp.ones((1, 2, 2, 2)))


# --------------------------------------------------------------------------
# The documented example.


@pytest.mark.usefixtures("standard_promotion")  # optax.adamw in the example
@pytest.mark.skipif(helpers.flax_version() < (0, 11), reason="nnx API")
def test_nnx_char_lm_example_trains_with_its_logits_held_near_tau():
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parent.parent / "examples"
  spec = importlib.util.spec_from_file_location(
    "optaxclip_example_qk_clip_nnx", path / "qk_clip_nnx.py"
  )
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  history = example.main(steps=25, threshold=TAU, verbose=False)
  losses = np.array(history["loss"])
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
  assert sum(history["clipped"]) > 0
  # A step's maximum is measured before its clip: it may pass tau by one
  # step's growth, never run away.
  assert max(history["max_logit"]) < 1.5 * TAU


def test_linen_multi_head_dot_product_attention():
  nn = pytest.importorskip("flax.linen")
  mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  x = jax.random.normal(jax.random.key(4), (2, 5, 8))
  params = mha.init(jax.random.key(5), x)["params"]
  params = jax.tree.map(lambda w: 5 * w + 0.5, params)

  def max_logits(p):  # the projections as linen's DenseGeneral computes them
    def project(w):
      return jnp.einsum("btd,dhk->bthk", x, w["kernel"]) + w["bias"][None, None]

    return oc.max_attention_logits(project(p["query"]), project(p["key"]))

  s = max_logits(params)
  tx = optax.chain(optax.sgd(0.0), oc.qk_clip(TAU))
  out, _ = _run(tx, params, params, s)  # one attention module: a bare array
  assert float(jnp.max(s)) > TAU
  np.testing.assert_allclose(
    np.minimum(s, TAU), max_logits(optax.apply_updates(params, out)),
    rtol=1e-5,
  )


@pytest.mark.usefixtures("standard_promotion")  # optax.adamw
@pytest.mark.skipif(helpers.flax_version() < (0, 12), reason="nnx.capture")
def test_negative_maxima_at_a_large_learning_rate_stay_finite():
  """AdamW at lr 0.3 drives heads of the example's char LM to all-negative
  logits within three steps; the bare rule sqrt(min(1, tau / S)) turns them
  into NaN weights there, this transform leaves them alone."""
  import importlib.util
  import pathlib

  from flax import nnx

  path = pathlib.Path(__file__).resolve().parent.parent / "examples"
  spec = importlib.util.spec_from_file_location(
    "optaxclip_example_qk_clip_nnx_lr", path / "qk_clip_nnx.py"
  )
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  model = example.CharLM(len(set(example.TEXT)), rngs=nnx.Rngs(0))
  tx = optax.chain(optax.adamw(0.3), oc.qk_clip(100.0, query="wq", key="wk"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens, targets):
    def loss_fn(model):
      logits, maxima = nnx.capture(model, nnx.Intermediate)(tokens)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return loss.mean(), maxima

    (loss, maxima), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, max_logits=maxima)
    return loss, maxima

  batches = example._batches(0, batch=16, length=32)
  smallest, losses = np.inf, []
  for _ in range(5):
    loss, maxima = step(model, optimizer, *next(batches))
    losses.append(float(loss))
    smallest = min(smallest, min(float(jnp.min(m)) for m in jax.tree.leaves(maxima)))
  assert smallest < 0  # the case the bare rule turns into NaN
  assert np.isfinite(losses).all()
  params = nnx.state(model, nnx.Param)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.skipif(helpers.flax_version() < (0, 11), reason="nnx API")
def test_nnx_scanned_blocks_return_their_maxima():
  """Blocks made by nnx.vmap and run by nnx.scan: every parameter has a
  leading layer axis and the scan returns (layers, heads) maxima."""
  from flax import nnx

  layers, d, heads = 3, 8, 2

  class Block(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.normal(2.0)
      self.wq = nnx.Param(init(rngs.params(), (d, heads, d // heads)))
      self.wk = nnx.Param(init(rngs.params(), (d, heads, d // heads)))

    def __call__(self, x):
      q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
      k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
      out = jax.nn.dot_product_attention(q, k, q, is_causal=True)
      return x + out.reshape(x.shape), oc.max_attention_logits(
        q, k, is_causal=True
      )

  class Model(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)

      self.blocks = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
      def run(x, block):
        return block(x)

      x, maxima = run(x, self.blocks)
      return x.sum(), maxima

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(6), (2, 5, d))
  tx = optax.chain(
    optax.sgd(0.0),
    oc.qk_clip(
      TAU, query="wq", key="wk", stacked=oc.stacked_by_path({"blocks": 1})
    ),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  (_, before), grads = nnx.value_and_grad(lambda m: m(x), has_aux=True)(model)
  assert before.shape == (layers, heads) and float(jnp.max(before)) > TAU
  optimizer.update(model, grads, max_logits={"blocks": before})
  # Layer 0 sees the same input, so its heads land exactly on min(S, tau).
  _, after = model(x)
  np.testing.assert_allclose(after[0], np.minimum(before[0], TAU), rtol=1e-5)
  gamma = oc.clip_stats(optimizer.opt_state)["qk_clip/qk_gamma/blocks"]
  np.testing.assert_allclose(gamma, reference.qk_gamma(before, TAU), rtol=1e-6)


def test_a_model_that_is_one_attention_module_is_keyed_root():
  params = _mha(_rng(16))["attn"]
  _, state = _run(oc.qk_clip(TAU), params, params, _f32([20.0, 1, 1, 1]))
  stats = oc.clip_stats(state)
  np.testing.assert_allclose(stats["qk_clip/qk_gamma/<root>"], [0.5, 1, 1, 1])
