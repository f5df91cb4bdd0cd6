"""QK-Clip on a small pre-LN Flax NNX character language model.

The attention is written by hand (``einsum`` over query and key weights of
shape ``(d_model, heads, head_dim)``). Each attention layer reports its
per-head maximum logit with ``sow``; the training step pops those
intermediates and passes them to ``optimizer.update(..., max_logits=...)``,
where ``oc.qk_clip`` (last in the chain) rescales the query and key weights
of every head whose logits went above the threshold.

Run: ``python examples/qk_clip_nnx.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

TEXT = (
  "the quick brown fox jumps over the lazy dog. "
  "pack my box with five dozen liquor jugs. "
) * 8


# --8<-- [start:model]
class Attention(nnx.Module):
  def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs):
    head_dim = d_model // heads
    init = nnx.initializers.lecun_normal()
    shape = (d_model, heads, head_dim)
    self.wq = nnx.Param(init(rngs.params(), shape))
    self.wk = nnx.Param(init(rngs.params(), shape))
    self.wv = nnx.Param(init(rngs.params(), shape))
    self.wo = nnx.Param(init(rngs.params(), (heads, head_dim, d_model)))

  def __call__(self, x):
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
    k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
    v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
    # The per-head maximum of q.k/sqrt(d) over the batch and the unmasked
    # positions: what QK-Clip compares with its threshold.
    self.sow(
      nnx.Intermediate,
      "max_logits",
      oc.max_attention_logits(q, k, is_causal=True),
    )
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jnp.einsum("bthk,hkd->btd", out, self.wo[...])


class Block(nnx.Module):
  def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = Attention(d_model, heads, rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CharLM(nnx.Module):
  def __init__(self, vocab, d_model=32, heads=4, layers=2, *, rngs):
    self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))


# --8<-- [end:model]


def _batches(seed: int, batch: int, length: int):
  chars = sorted(set(TEXT))
  ids = np.array([chars.index(c) for c in TEXT], np.int32)
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(ids) - length - 1, batch)
    window = np.stack([ids[s : s + length + 1] for s in starts])
    yield jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


def main(
  steps: int = 60,
  threshold: float = 10.0,
  learning_rate: float = 3e-2,
  verbose: bool = True,
) -> dict:
  vocab = len(set(TEXT))
  model = CharLM(vocab, rngs=nnx.Rngs(0))
  # --8<-- [start:optimizer]
  tx = optax.chain(
    optax.adamw(learning_rate),
    # Last: it sees the final update and the params. The query and key
    # weights are named relative to the module that sows the maxima.
    oc.qk_clip(threshold, query="wq", key="wk"),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens, targets):
    def loss_fn(model):
      # The sown maxima come back keyed by module path:
      # {"blocks": {0: {"attn": {"max_logits": ...}}, 1: ...}}.
      if hasattr(nnx, "capture"):  # flax >= 0.12
        logits, max_logits = nnx.capture(model, nnx.Intermediate)(tokens)
      else:
        logits = model(tokens)
        max_logits = nnx.pop(model, nnx.Intermediate)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return loss.mean(), max_logits

    (loss, max_logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, max_logits=max_logits)
    return loss, oc.clip_stats(optimizer.opt_state)

  # --8<-- [end:optimizer]

  history: dict[str, list] = {"loss": [], "max_logit": [], "clipped": []}
  batches = _batches(0, batch=16, length=32)
  for step in range(steps):
    tokens, targets = next(batches)
    loss, stats = train_step(model, optimizer, tokens, targets)
    history["loss"].append(float(loss))
    history["max_logit"].append(float(stats["qk_clip/qk_max_logit"]))
    history["clipped"].append(int(stats["qk_clip/qk_num_clipped_heads"]))
    if verbose and step % 10 == 0:
      print(
        f"step {step:3d}  loss {float(loss):.3f}  max logit"
        f" {history['max_logit'][-1]:7.2f}  clipped heads"
        f" {history['clipped'][-1]}"
      )
  history["model"] = model
  history["batch"] = next(batches)[0]
  return history


if __name__ == "__main__":
  main()
