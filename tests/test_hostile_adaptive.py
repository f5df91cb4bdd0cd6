"""Hostile inputs for the adaptive clippers: autoclip, zclip, adagc.

Each test pins a defect an adversarial review found (float32 state under x64,
counters wrapping past int32 max, zero as an absorbing state, raw errors for
a mismatched or empty tree, the int/bool and ``state=None`` policies) against
the float64 loop references in ``reference.py``, jitted and eager.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optaxclip as oc
import reference
from helpers import enable_x64, maybe_jit

INT32_MAX = int(np.iinfo(np.int32).max)


def _direction(dtype=jnp.float32):
  """A two-leaf tree of global L2 norm 1."""
  rng = np.random.default_rng(1)
  tree = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal((3,))}
  total = math.sqrt(sum(float(np.sum(x**2)) for x in tree.values()))
  return {k: jnp.asarray(v / total, dtype) for k, v in tree.items()}


def _with_norm(direction, norm):
  return jax.tree.map(lambda d: d * jnp.asarray(norm, d.dtype), direction)


def _run(tx, norms, use_jit, dtype=jnp.float32, state=None):
  """Steps ``tx`` over trees of the given global norms; (outputs, states)."""
  direction = _direction(dtype)
  if state is None:
    state = tx.init(direction)
  update = maybe_jit(tx.update, use_jit)
  outs, states = [], []
  for n in norms:
    out, state = update(_with_norm(direction, n), state)
    outs.append(out)
    states.append(state)
  return outs, states


def _out_norm(out) -> float:
  return reference.norm([np.asarray(x) for x in jax.tree.leaves(out)])


def _check_zclip(outs, states, want, norms, rtol=1e-5):
  for i, (out, state, (cap, spike, mean, var), n) in enumerate(
    zip(outs, states, want, norms)
  ):
    assert bool(state.zclip_spike) == spike, i
    np.testing.assert_allclose(
      float(state.zclip_threshold), cap, rtol=rtol, atol=1e-12, err_msg=str(i)
    )
    np.testing.assert_allclose(
      _out_norm(out),
      n * reference.clip_scale(n, cap),
      rtol=rtol,
      atol=1e-12,
      err_msg=str(i),
    )
    if mean is not None:
      np.testing.assert_allclose(float(state.zclip_mean), mean, rtol=rtol)
      # The state keeps the EMA variance's root; the reference its square.
      np.testing.assert_allclose(
        float(state.zclip_std), math.sqrt(var), rtol=5 * rtol, atol=0
      )


# 1. Under x64, state follows the accumulation dtype of the params.


def test_autoclip_float64_norms_beyond_float32_range(use_jit):
  norms = [5e100, 1e100, 3e100, 2e101, 4e100]
  with enable_x64():
    tx = oc.autoclip(50.0, history_size=3)
    outs, states = _run(tx, norms, use_jit, jnp.float64)
    want = reference.autoclip(norms, 50.0, 3)
    for out, state, (c, scale), n in zip(outs, states, want, norms):
      assert state.autoclip_history.dtype == jnp.float64
      assert state.autoclip_threshold.dtype == jnp.float64
      np.testing.assert_allclose(float(state.autoclip_norm), n, rtol=1e-13)
      np.testing.assert_allclose(float(state.autoclip_threshold), c, rtol=1e-13)
      np.testing.assert_allclose(_out_norm(out), n * scale, rtol=1e-13)
      chex.assert_trees_all_equal_dtypes(out, _direction(jnp.float64))
    assert bool(states[3].autoclip_clipped)
    # float32 params under x64 keep a float32 state.
    assert oc.autoclip().init(_direction()).autoclip_history.dtype == (
      jnp.float32
    )


@pytest.mark.parametrize(
  "config",
  [
    {"max_norm": None},
    {"max_norm": None, "mode": "percentile", "z_thresh": 1.0},
    {"max_norm": 1e102, "clip_option": "mean"},
  ],
  ids=["zscore", "percentile", "mean"],
)
def test_zclip_float64_norms_beyond_float32_range(config, use_jit):
  rng = np.random.default_rng(0)
  norms = list(1e100 * (1 + 0.1 * rng.standard_normal(12)))
  norms[8] = 9e100  # a spike
  with enable_x64():
    tx = oc.zclip(warmup_steps=4, **config)
    outs, states = _run(tx, norms, use_jit, jnp.float64)
    for field in states[-1]._fields:
      value = getattr(states[-1], field)
      if jnp.issubdtype(value.dtype, jnp.floating):
        assert value.dtype == jnp.float64, field
    want = reference.zclip(norms, warmup_steps=4, **config)
    _check_zclip(outs, states, want, norms, rtol=1e-12)
    assert any(bool(s.zclip_spike) for s in states)
    assert oc.zclip().init(_direction()).zclip_mean.dtype == jnp.float32


def test_adagc_float64_norms_beyond_float32_range(use_jit):
  rng = np.random.default_rng(2)
  seq = [
    [1e150 * rng.standard_normal((3, 2)), 1e-150 * rng.standard_normal(4)]
    for _ in range(8)
  ]
  seq[5][0] = seq[5][0] * 30.0  # a spike after warmup
  config = dict(
    beta=0.9, lambda_rel=1.1, lambda_abs=1e151, warmup_steps=3, eps=0.0
  )
  want = reference.adagc_reference(seq, **config)
  with enable_x64():
    tx = oc.adagc(**config)
    update = maybe_jit(tx.update, use_jit)
    tree = lambda s: {"a": jnp.asarray(s[0]), "b": jnp.asarray(s[1])}
    state = tx.init(tree(seq[0]))
    assert state.adagc_gamma.dtype == jnp.float64
    for t, leaves in enumerate(seq):
      out, state = update(tree(leaves), state)
      for got, exp in zip(jax.tree.leaves(out), want["outputs"][t]):
        np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-12)
      np.testing.assert_allclose(
        state.adagc_gamma, want["gamma"][t], rtol=1e-12
      )
      assert int(state.adagc_num_clipped) == want["num_clipped"][t], t
    assert want["num_clipped"][5] >= 1  # the spike was clipped


# 2. Counters saturate instead of wrapping.


def test_autoclip_count_saturates_and_history_keeps_rolling(use_jit):
  size = 4
  tx = oc.autoclip(25.0, history_size=size)
  first = [1.0, 2.0, 3.0, 4.0, 5.0]
  _, states = _run(tx, first, use_jit)
  state = states[-1]._replace(
    autoclip_count=jnp.asarray(INT32_MAX - 1, jnp.int32)
  )
  later = [0.5, 7.0, 0.25, 6.0, 9.0]
  outs, states = _run(tx, later, use_jit, state=state)
  assert [int(s.autoclip_count) for s in states] == [INT32_MAX] * len(later)
  want = reference.autoclip(first + later, 25.0, size)[len(first) :]
  for out, s, (c, scale), n in zip(outs, states, want, later):
    assert math.isfinite(float(s.autoclip_threshold))
    np.testing.assert_allclose(float(s.autoclip_threshold), c, rtol=1e-6)
    np.testing.assert_allclose(_out_norm(out), n * scale, rtol=1e-6)
  # The history is the last `size` norms, in order.
  np.testing.assert_allclose(states[-1].autoclip_history, later[-size:])


def test_zclip_count_saturates_and_never_reenters_warmup(use_jit):
  config = dict(warmup_steps=3, max_norm=None)
  tx = oc.zclip(**config)
  first = [1.0, 1.2, 0.8, 1.1, 0.9]
  _, states = _run(tx, first, use_jit)
  state = states[-1]._replace(zclip_count=jnp.asarray(INT32_MAX - 1, jnp.int32))
  later = [1.0, 20.0, 1.05, 30.0]
  outs, states = _run(tx, later, use_jit, state=state)
  assert [int(s.zclip_count) for s in states] == [INT32_MAX] * len(later)
  want = reference.zclip(first + later, **config)[len(first) :]
  _check_zclip(outs, states, want, later)
  assert bool(states[1].zclip_spike) and bool(states[3].zclip_spike)
  assert float(_out_norm(outs[1])) < 2.0


def test_adagc_count_saturates(use_jit):
  config = dict(
    beta=0.9, lambda_rel=1.5, lambda_abs=10.0, warmup_steps=2, eps=0.0
  )
  rng = np.random.default_rng(3)
  seq = [[rng.standard_normal(3).astype(np.float32)] for _ in range(8)]
  seq[6][0] = seq[6][0] * 40  # a spike after warmup
  tx = oc.adagc(**config)
  update = maybe_jit(tx.update, use_jit)
  tree = lambda s: {"a": jnp.asarray(s[0])}
  state = tx.init(tree(seq[0]))
  for leaves in seq[:4]:
    _, state = update(tree(leaves), state)
  state = state._replace(adagc_count=jnp.asarray(INT32_MAX - 1, jnp.int32))
  want = reference.adagc_reference(seq, **config)
  for t in range(4, 8):
    out, state = update(tree(seq[t]), state)
    np.testing.assert_allclose(
      np.asarray(out["a"]), want["outputs"][t][0], rtol=1e-5
    )
    np.testing.assert_allclose(state.adagc_gamma, want["gamma"][t], rtol=1e-5)
  assert int(state.adagc_count) == INT32_MAX


# 3. Zero is not an absorbing state.


@pytest.mark.parametrize(
  "config",
  [
    {"max_norm": None},
    {"max_norm": None, "clip_option": "mean"},
    {"max_norm": None, "mode": "percentile"},
    {},  # the default fixed cap of 1
    {"max_norm": None, "skip_update_on_spike": True},
  ],
  ids=["zscore", "mean", "percentile", "max_norm", "skip"],
)
def test_zclip_all_zero_warmup_does_not_zero_later_updates(config, use_jit):
  norms = [0.0] * 6 + [0.5, 0.6, 0.4, 0.55, 0.45, 0.5, 0.52, 5.0, 0.5]
  tx = oc.zclip(warmup_steps=3, **config)
  outs, states = _run(tx, norms, use_jit)
  want = reference.zclip(norms, warmup_steps=3, **config)
  _check_zclip(outs, states, want, norms)
  # Warmup ends after three nonzero norms; later updates are not zeroed.
  assert int(states[5].zclip_count) == 0 and int(states[-1].zclip_count) == 9
  for out, n in zip(outs[6:], norms[6:]):
    if n < 1.0:
      np.testing.assert_allclose(_out_norm(out), n, rtol=1e-6)
  assert bool(states[-2].zclip_spike) and _out_norm(outs[-2]) > 0.4


def test_zclip_long_zero_run_after_warmup_does_not_absorb():
  """Thousands of zero steps after warmup (a frozen group) leave the EMA."""
  tx = oc.zclip(warmup_steps=5, max_norm=None)
  direction = _direction()

  def step(state, norm):
    out, state = tx.update(_with_norm(direction, norm), state)
    return state, (oc.global_norm(out), state.zclip_mean)

  norms = jnp.concatenate(
    [
      jnp.asarray([1.0, 1.1, 0.9, 1.05, 0.95]),
      jnp.zeros(5000),
      jnp.asarray([1.0, 1.02, 0.98]),
    ]
  ).astype(jnp.float32)
  _, (out_norms, means) = jax.lax.scan(step, tx.init(direction), norms)
  np.testing.assert_allclose(out_norms[-3:], norms[-3:], rtol=1e-6)
  np.testing.assert_allclose(means[-4], 1.0, rtol=1e-6)  # unchanged by zeros


def test_zclip_recovers_from_a_state_with_zero_statistics(use_jit):
  """A state saved when zeros were fed (mean = var = 0) is not absorbing."""
  tx = oc.zclip(warmup_steps=2, max_norm=None)
  state = tx.init(_direction())._replace(zclip_count=jnp.asarray(2, jnp.int32))
  outs, states = _run(tx, [0.7, 0.8, 0.75], use_jit, state=state)
  np.testing.assert_allclose(_out_norm(outs[0]), 0.7, rtol=1e-6)
  assert not bool(states[0].zclip_spike)
  assert float(states[-1].zclip_mean) > 0
  assert all(_out_norm(o) > 0.1 for o in outs)


def test_zclip_zero_spike_threshold_is_not_fed_to_the_statistics(use_jit):
  norms = [1.0, 1.1, 0.9] + [1.0, 9.0, 1.05, 12.0, 0.95, 15.0, 1.0]
  config = dict(warmup_steps=3, max_norm=None, clip_factor=0.0)
  outs, states = _run(oc.zclip(**config), norms, use_jit)
  want = reference.zclip(norms, **config)
  _check_zclip(outs, states, want, norms)
  assert _out_norm(outs[4]) == 0.0  # clip_factor = 0 zeroes the spike ...
  assert float(states[-1].zclip_mean) > 0.9  # ... but not the statistics


def _lora_sequence(num_steps, zero_steps, seed=0):
  """Leaf 0 ("a", LoRA's A) is zero for its first ``zero_steps`` steps."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(num_steps):
    a = rng.standard_normal((4, 2)).astype(np.float32) * 0.3
    b = rng.standard_normal((2, 4)).astype(np.float32) * 0.3
    if t < zero_steps:
      a = np.zeros_like(a)
    seq.append([a, b])
  return seq


@pytest.mark.parametrize(
  "zero_steps", [1, 5, 12], ids=["step1", "warmup", "past_warmup"]
)
def test_adagc_tensor_with_zero_first_gradients_is_not_frozen(
  zero_steps, use_jit
):
  config = dict(
    beta=0.98, lambda_rel=1.05, lambda_abs=10.0, warmup_steps=5, eps=1e-8
  )
  seq = _lora_sequence(60, zero_steps)
  seq[40][0] = seq[40][0] * 100.0  # a later spike on "a" is still clipped
  want = reference.adagc_reference(seq, **config)
  tx = oc.adagc(**config)
  update = maybe_jit(tx.update, use_jit)
  tree = lambda s: {"a": jnp.asarray(s[0]), "b": jnp.asarray(s[1])}
  state = tx.init(tree(seq[0]))
  for t, leaves in enumerate(seq):
    out, state = update(tree(leaves), state)
    for got, exp in zip(jax.tree.leaves(out), want["outputs"][t]):
      np.testing.assert_allclose(
        np.asarray(got), exp, rtol=1e-4, atol=1e-7, err_msg=str(t)
      )
    np.testing.assert_allclose(
      state.adagc_gamma, want["gamma"][t], rtol=1e-4, err_msg=str(t)
    )
    if t < zero_steps:
      assert float(state.adagc_gamma[0]) == math.inf
    if t == zero_steps:  # the first nonzero norm initialises gamma
      np.testing.assert_allclose(
        float(state.adagc_gamma[0]), reference.norm([leaves[0]]), rtol=1e-6
      )
    if t == 40:
      assert float(jnp.linalg.norm(out["a"])) < 0.1 * reference.norm(
        [leaves[0]]
      )
  # "a" moves with (almost) its whole gradient, not 1e-8 of it.
  ratio = float(jnp.linalg.norm(out["a"])) / reference.norm([seq[-1][0]])
  assert ratio > 0.5


def test_adagc_zero_tensor_later_leaves_gamma_unchanged(use_jit):
  config = dict(
    beta=0.9, lambda_rel=1.05, lambda_abs=10.0, warmup_steps=3, eps=0.0
  )
  seq = _lora_sequence(30, 0, seed=4)
  for t in (1, 2, 10, 11, 12):  # zero inside warmup and after it
    seq[t][0] = np.zeros_like(seq[t][0])
  want = reference.adagc_reference(seq, **config)
  tx = oc.adagc(**config)
  update = maybe_jit(tx.update, use_jit)
  tree = lambda s: {"a": jnp.asarray(s[0]), "b": jnp.asarray(s[1])}
  state = tx.init(tree(seq[0]))
  gammas = []
  for t, leaves in enumerate(seq):
    out, state = update(tree(leaves), state)
    gammas.append(float(state.adagc_gamma[0]))
    for got, exp in zip(jax.tree.leaves(out), want["outputs"][t]):
      np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-5, atol=1e-7)
  assert gammas[0] == gammas[1] == gammas[2] > 0
  assert gammas[9] == gammas[10] == gammas[11] == gammas[12] > 0
  assert float(jnp.linalg.norm(out["a"])) > 0.1


# 4. Clear errors; a non-empty placeholder for an empty tree.


def test_adagc_state_from_a_different_tree_is_a_clear_error(use_jit):
  tx = oc.adagc()
  state = tx.init({"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)})
  update = maybe_jit(tx.update, use_jit)
  with pytest.raises(
    ValueError,
    match=(
      r"^adagc: the state holds thresholds for 3 tensors, but the updates"
      r" have 2 leaves.*call init on the same tree"
    ),
  ):
    update({"a": jnp.ones(2), "b": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match=r"^adagc: .* 3 tensors.* 0 leaves"):
    update({}, state)


@pytest.mark.usefixtures("standard_promotion")  # optax.adam's counters
def test_adagc_empty_group_checkpoints_with_orbax(tmp_path):
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  labels = {"w": "main", "b": "main"}
  tx = optax.multi_transform(
    {
      "main": optax.chain(oc.adagc(warmup_steps=2), optax.adam(1e-2)),
      "empty": optax.chain(oc.adagc(warmup_steps=2), optax.adam(1e-2)),
    },
    labels,
  )
  state = tx.init(params)
  step = jax.jit(tx.update)
  for scale in (1.0, 2.0, 0.5, 8.0):
    grads = jax.tree.map(lambda p, s=scale: jnp.full_like(p, s), params)
    _, state = step(grads, state, params)
  empty = state.inner_states["empty"].inner_state[0]
  assert empty.adagc_gamma.shape == (1,) and int(empty.adagc_count) == 4
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
    tmp_path / "state", jax.tree.map(jnp.zeros_like, state)
  )
  chex.assert_trees_all_equal(restored, state)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  chex.assert_trees_all_equal(
    step(grads, restored, params), step(grads, state, params)
  )


def test_adagc_empty_tree_placeholder(use_jit):
  tx = oc.adagc(warmup_steps=1)
  state = tx.init({})
  assert all(np.asarray(x).size > 0 for x in jax.tree.leaves(state))
  assert float(state.adagc_gamma[0]) == math.inf
  update = maybe_jit(tx.update, use_jit)
  for _ in range(3):
    out, state = update({}, state)
  assert out == {}
  assert int(state.adagc_count) == 3 and int(state.adagc_num_clipped) == 0
  assert float(state.adagc_global_norm) == 0.0
  assert float(state.adagc_gamma[0]) == math.inf


# 5. Library-wide policies.

FACTORIES = {
  "autoclip": lambda: oc.autoclip(),
  "zclip": lambda: oc.zclip(),
  "adagc": lambda: oc.adagc(),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_], ids=["int", "bool"])
def test_integer_and_bool_leaves_are_a_type_error(name, dtype, use_jit):
  tx = FACTORIES[name]()
  grads = {"w": jnp.ones(3), "opt": {"step": jnp.zeros((), dtype)}}
  state = tx.init({"w": jnp.ones(3), "opt": {"step": jnp.zeros(())}})
  with pytest.raises(
    TypeError,
    match=(rf"^{name}: .*'opt/step' has dtype {np.dtype(dtype).name}"),
  ):
    maybe_jit(tx.update, use_jit)(grads, state)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_none_says_call_init(name, use_jit):
  tx = FACTORIES[name]()
  update = maybe_jit(lambda g: tx.update(g, None), use_jit)
  with pytest.raises(ValueError, match=rf"^{name}: .*state=None.*tx\.init"):
    update({"w": jnp.ones(3)})
