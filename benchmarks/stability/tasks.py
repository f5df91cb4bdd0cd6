"""The four tasks of the stability study, as pure functions of arrays.

Every task is a :class:`Task`: ``init(key) -> params``, ``grads(params, key,
step) -> (loss, grads)`` (per-example gradients for the DP task), ``evaluate(
params) -> (held_out_loss, metric)``, and the base optimizer (without its
learning rate, which the runner multiplies in, so one compiled program serves
every learning rate). Data lives on the device as arrays and batches are
drawn inside the jitted training loop from a PRNG key, so a whole training
run is one ``lax.scan``.

* ``lm``: a char-level Flax NNX transformer language model on Python stdlib
  source text (files that ship with every CPython), held-out cross-entropy.
* ``digits``: an MLP on scikit-learn's ``digits`` (8x8 images, 10 classes),
  test accuracy.
* ``adding``: a vanilla tanh RNN on the adding problem (Hochreiter &
  Schmidhuber 1997; Pascanu et al. 2013) at T = 100, held-out MSE.
* ``dp_digits``: DP-SGD (Abadi et al. 2016) on ``digits``: per-example
  gradients clipped by ``optaxclip.clip_per_example`` with Gaussian noise at a
  fixed noise multiplier, test accuracy.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the study (see the module docstring)."""

  name: str
  metric: str  # name of the reported metric
  higher_is_better: bool
  init: Callable[[jax.Array], Any]
  grads: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
  evaluate: Callable[[Any], tuple[jax.Array, jax.Array]]
  base_optimizer: Callable[[], optax.GradientTransformation]
  base_name: str
  learning_rates: tuple[float, ...]
  steps: int
  per_example: bool = False
  # The optimizer is `base` then `-lr * u`; the reference learning rate is
  # where thresholds are tuned (the middle of the grid).
  chance: float = 0.0  # the metric of a trivial predictor (for the report)


# ---------------------------------------------------------------------------
# Char-level transformer LM on stdlib source.

# Files of the CPython standard library that exist in every 3.11+ install.
_STDLIB_FILES = ("textwrap.py", "string.py", "difflib.py", "fractions.py",
                 "heapq.py", "bisect.py", "shlex.py", "glob.py")
_SEQ = 32
_VOCAB = 96  # printable ASCII 32..126 -> 1..95, everything else -> 0


def stdlib_text() -> np.ndarray:
  """Concatenated stdlib source as token ids (see ``_STDLIB_FILES``)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text = "".join((root / name).read_text(encoding="utf-8")
                 for name in _STDLIB_FILES)
  codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
  ids = np.where((codes >= 32) & (codes < 127), codes - 31, 0)
  return ids.astype(np.int32)


class _Block(nnx.Module):

  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class CharLM(nnx.Module):
  """A small pre-LayerNorm decoder-only transformer."""

  def __init__(self, rngs: nnx.Rngs, d: int = 64, heads: int = 4,
               layers: int = 2):
    self.embed = nnx.Embed(_VOCAB, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (_SEQ, d)))
    self.blocks = nnx.List([_Block(d, heads, rngs) for _ in range(layers)]) \
        if hasattr(nnx, "List") else [_Block(d, heads, rngs)
                                      for _ in range(layers)]
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, _VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[-1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


def lm_task(*, steps: int = 200, batch: int = 16) -> Task:
  ids = stdlib_text()
  split = int(0.9 * ids.size)
  train = jnp.asarray(ids[:split])
  held = ids[split:]
  n_eval = min(64, (held.size - 1) // (_SEQ + 1))
  held_batch = jnp.asarray(
      held[: n_eval * (_SEQ + 1)].reshape(n_eval, _SEQ + 1))
  graphdef, _ = nnx.split(CharLM(nnx.Rngs(0)))

  def init(key):
    return nnx.split(CharLM(nnx.Rngs(params=key)))[1]

  def loss(state, windows):
    logits = nnx.merge(graphdef, state)(windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), windows[:, 1:]).mean()

  def grads(state, key):
    starts = jax.random.randint(key, (batch,), 0, train.size - _SEQ - 1)
    windows = jax.vmap(
        lambda s: jax.lax.dynamic_slice(train, (s,), (_SEQ + 1,)))(starts)
    return jax.value_and_grad(loss)(state, windows)

  def evaluate(state):
    value = loss(state, held_batch)
    return value, value

  return Task(
      name="lm", metric="held-out loss (nats/char)", higher_is_better=False,
      init=init, grads=grads, evaluate=evaluate,
      base_optimizer=optax.scale_by_adam, base_name="Adam",
      learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), steps=steps,
      chance=float(np.log(_VOCAB)))


# ---------------------------------------------------------------------------
# digits: an MLP, plain and with DP-SGD.


def _digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  n_train = int(0.8 * len(y))
  mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-3
  x = (x - mean) / std
  return (jnp.asarray(x[:n_train]), jnp.asarray(y[:n_train]),
          jnp.asarray(x[n_train:]), jnp.asarray(y[n_train:]))


def _mlp_init(key, sizes=(64, 128, 10)):
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
        "kernel": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
        "bias": jnp.zeros((fan_out,)),
    }
  return params


def _mlp_apply(params, x):
  h = jnp.tanh(x @ params["dense0"]["kernel"] + params["dense0"]["bias"])
  return h @ params["dense1"]["kernel"] + params["dense1"]["bias"]


def _xent(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      _mlp_apply(params, x), y).mean()


def digits_task(*, steps: int = 300, batch: int = 64,
                per_example: bool = False) -> Task:
  x_train, y_train, x_test, y_test = _digits()

  def evaluate(params):
    logits = _mlp_apply(params, x_test)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
    return _xent(params, x_test, y_test), accuracy

  def grads(params, key):
    idx = jax.random.randint(key, (batch,), 0, y_train.shape[0])
    x, y = x_train[idx], y_train[idx]
    if not per_example:
      return jax.value_and_grad(_xent)(params, x, y)
    one = lambda p, xi, yi: _xent(p, xi[None], yi[None])
    losses, per = jax.vmap(jax.value_and_grad(one), (None, 0, 0))(
        params, x, y)
    return losses.mean(), per

  momentum = lambda: optax.trace(decay=0.9)
  return Task(
      name="dp_digits" if per_example else "digits",
      metric="test accuracy", higher_is_better=True,
      init=_mlp_init, grads=grads, evaluate=evaluate,
      base_optimizer=(optax.identity if per_example else momentum),
      base_name="SGD" if per_example else "SGD + momentum 0.9",
      learning_rates=((0.03, 0.1, 0.3, 1.0, 3.0, 10.0) if per_example
                      else (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)),
      steps=steps, per_example=per_example, chance=0.1)


# ---------------------------------------------------------------------------
# The adding problem with a vanilla tanh RNN.


def adding_batch(key, batch: int, length: int):
  """Inputs (batch, T, 2): a uniform value and a 2-hot marker; target: the
  sum of the two marked values (one in each half of the sequence)."""
  k1, k2, k3 = jax.random.split(key, 3)
  values = jax.random.uniform(k1, (batch, length))
  first = jax.random.randint(k2, (batch,), 0, length // 2)
  second = jax.random.randint(k3, (batch,), length // 2, length)
  marks = (jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length))
  x = jnp.stack([values, marks], -1)
  return x, jnp.sum(values * marks, -1)


def _rnn_init(key, hidden: int = 32):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "w_in": jax.random.normal(k1, (2, hidden)) / np.sqrt(2.0),
      "w_rec": jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden),
      "b": jnp.zeros((hidden,)),
      "w_out": jax.random.normal(k3, (hidden, 1)) / np.sqrt(hidden),
      "b_out": jnp.zeros((1,)),
  }


def _rnn_mse(params, x, y):
  def cell(h, x_t):
    return jnp.tanh(x_t @ params["w_in"] + h @ params["w_rec"]
                    + params["b"]), None
  h0 = jnp.zeros((x.shape[0], params["b"].shape[0]))
  h, _ = jax.lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
  pred = (h @ params["w_out"] + params["b_out"])[:, 0]
  return jnp.mean((pred - y) ** 2)


def adding_task(*, steps: int = 600, batch: int = 32,
                length: int = 100) -> Task:
  x_test, y_test = adding_batch(jax.random.key(12345), 512, length)

  def grads(params, key):
    x, y = adding_batch(key, batch, length)
    return jax.value_and_grad(_rnn_mse)(params, x, y)

  def evaluate(params):
    value = _rnn_mse(params, x_test, y_test)
    return value, value

  return Task(
      name="adding", metric="held-out MSE", higher_is_better=False,
      init=_rnn_init, grads=grads, evaluate=evaluate,
      base_optimizer=lambda: optax.trace(decay=0.9),
      base_name="SGD + momentum 0.9",
      learning_rates=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), steps=steps,
      chance=float(jnp.var(y_test)))


TASKS = {
    "lm": lm_task,
    "digits": digits_task,
    "adding": adding_task,
    "dp_digits": lambda **kw: digits_task(per_example=True, **kw),
}
