"""Recipes for real models: each function is one section of the docs' "Real
models" page (included from here, so the page shows code that the test suite
runs: ``tests/test_real_models.py``).

* ``nnx_scanned_blocks``: Flax NNX with blocks built by ``nnx.vmap`` and run
  by ``nnx.scan`` (stacked parameters), per-layer clipping and monitoring.
* ``equinox_mlp``: Equinox, ``eqx.is_inexact_array`` filtering, AGC with
  ``layout="torch"``.
* ``bf16_gradients``: bfloat16 gradients with float32 norms.
* ``multisteps_nan_micro_batch``: ``optax.MultiSteps`` gradient accumulation,
  what the clipper sees, and the NaN-accumulator pitfall.
* ``frozen_parameters``: keeping frozen parameters out of the global norm.

Run: ``python examples/real_models.py`` (every recipe, a few steps each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc


def _data(seed: int = 0, n: int = 128, d: int = 8):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  y = jnp.asarray(np.sin(x @ rng.standard_normal((d, 1))), jnp.float32)
  return x, y


# --8<-- [start:nnx_scan]
def nnx_scanned_blocks(steps: int = 30, layers: int = 4):
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.norm = nnx.LayerNorm(8, rngs=rngs)
      self.fc = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
      return x + jax.nn.gelu(self.fc(self.norm(x)))

  class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      # nnx.vmap creates `layers` blocks at once: every parameter under
      # "blocks" has a leading layer axis, e.g. fc/kernel is (layers, 8, 8).
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return Block(rngs)

      self.blocks = make_blocks(rngs)
      self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x, block):
        return block(x)

      return self.head(run(x, self.blocks))

  # One leading stack axis for everything under "blocks". Without it, AGC's
  # rank rule would read fc/kernel (layers, 8, 8) as a 3-D kernel and reduce
  # over the *layer* axis, and clip_by_norm would clip the whole stack by one
  # norm.
  stacked = oc.stacked_by_path({"blocks": 1})
  tx = optax.chain(
    oc.record_norms(stacked=stacked),  # per-layer pre-clip norms
    oc.adaptive_grad_clip(0.05, stacked=stacked),
    oc.clip_by_norm(1.0, stacked=stacked),  # each layer's tensor separately
    optax.adam(3e-3),
  )
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(
      lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, oc.clip_stats(optimizer.opt_state)

  losses = []
  for _ in range(steps):
    loss, stats = train_step(model, optimizer)
    losses.append(float(loss))
  # stats["record_norms/blocks/fc/kernel"] is a (layers,) vector: log it per
  # layer; stats["clip_by_norm/leaf_norms/blocks/fc/kernel"] likewise.
  return losses, stats
# --8<-- [end:nnx_scan]


# --8<-- [start:equinox]
def equinox_mlp(steps: int = 30):
  import equinox as eqx

  model = eqx.nn.MLP(8, 1, 32, 2, key=jax.random.PRNGKey(0))
  # Equinox Linear weights are (out, in), as in PyTorch: AGC's units are
  # rows, so say layout="torch" (the default "flax" takes (in, out) columns).
  tx = optax.chain(oc.adaptive_grad_clip(0.05, layout="torch"),
                   optax.adam(3e-3))
  # Only the inexact arrays are parameters; activation functions and other
  # static fields stay in the model.
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  x, y = _data()

  @eqx.filter_jit
  def train_step(model, opt_state):
    def loss_fn(model):
      return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    model, opt_state, loss = train_step(model, opt_state)
    losses.append(float(loss))
  return losses, oc.clip_stats(opt_state)
# --8<-- [end:equinox]


# --8<-- [start:bf16]
def bf16_gradients():
  # Mixed precision: float32 master parameters, bfloat16 gradients. The norm
  # is accumulated in float32 (a 1000-leaf bf16 tree summed in bf16 comes out
  # ~29% low); each clipped update keeps its bf16 dtype.
  rng = np.random.default_rng(0)
  grads = {f"w{i}": jnp.asarray(rng.standard_normal(64), jnp.bfloat16)
           for i in range(1000)}
  tx = oc.clip_by_global_norm(1.0)
  updates, state = tx.update(grads, tx.init(grads))
  exact = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                      for g in grads.values()))
  return updates, float(state.global_norm), exact
# --8<-- [end:bf16]


# --8<-- [start:multisteps]
def multisteps_nan_micro_batch(guard: bool):
  # optax.MultiSteps averages k micro-batch gradients and calls the inner
  # optimizer once per k steps: the clipper sees the *accumulated mean*
  # gradient, once every k calls (in between, updates are zero and the
  # clipper's state is untouched).
  inner = oc.skip_step(optax.chain(oc.clip_by_global_norm(1.0),
                                   optax.sgd(0.1)), max_norm=100.0)
  # Pitfall: one NaN micro-batch makes the accumulator NaN *forever* (NaN +
  # anything is NaN and MultiSteps never resets it), so skip_step then skips
  # every later step. should_skip_update_fn=optax.skip_not_finite drops the
  # bad micro-batch before it is accumulated.
  tx = optax.MultiSteps(
    inner, every_k_schedule=2,
    should_skip_update_fn=optax.skip_not_finite if guard else None)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  skipped = []
  for step in range(8):
    grad = {"w": jnp.full(3, jnp.nan if step == 1 else 0.5)}
    _, state = tx.update(grad, state, params)
    if step % 2 == 1:  # an inner step happened
      skipped.append(bool(oc.clip_stats(state)["skip_step/step_skipped"]))
  return skipped
# --8<-- [end:multisteps]


# --8<-- [start:frozen]
def frozen_parameters():
  # Frozen parameters (an embedding you do not train, a LoRA base) must not
  # inflate the global norm. Label them and send them to set_to_zero: only
  # the trainable group's gradients enter clip_by_global_norm.
  params = {"embed": jnp.ones((100, 8)), "lora": {"a": jnp.ones((8, 2)),
                                                  "b": jnp.ones((2, 8))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  labels = {"embed": "frozen", "lora": {"a": "train", "b": "train"}}
  tx = optax.multi_transform(
    {"train": optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)),
     "frozen": optax.set_to_zero()},
    labels)
  updates, state = tx.update(grads, tx.init(params), params)
  return updates, float(oc.clip_stats(state)["clip_by_global_norm/global_norm"])
# --8<-- [end:frozen]


if __name__ == "__main__":
  losses, stats = nnx_scanned_blocks()
  print(f"nnx scanned blocks: loss {losses[0]:.4f} -> {losses[-1]:.4f};"
        " per-layer fc/kernel norms",
        np.round(np.asarray(stats["record_norms/blocks/fc/kernel"]), 4))
  losses, _ = equinox_mlp()
  print(f"equinox MLP (layout='torch'): loss {losses[0]:.4f} ->"
        f" {losses[-1]:.4f}")
  _, norm, exact = bf16_gradients()
  print(f"bf16 global norm {norm:.4f} (float64 {exact:.4f})")
  print("MultiSteps, NaN micro-batch, unguarded: skipped",
        multisteps_nan_micro_batch(False))
  print("MultiSteps, NaN micro-batch, guarded:   skipped",
        multisteps_nan_micro_batch(True))
  _, norm = frozen_parameters()
  print(f"frozen embed excluded: global norm {norm:.4f} (LoRA only: 2.8284;"
        " with the embedding it would be 14.4222)")
