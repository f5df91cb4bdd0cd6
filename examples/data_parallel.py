"""Gradient clipping on a sharded Flax NNX model: data + model parallelism.

Trains a small MLP (16 -> 32 -> 32 -> 1, ReLU) on a ``("data", "model")``
mesh of 8 simulated CPU devices (2 x 4):

* the batch is split over ``"data"`` (``P("data")``);
* every parameter whose last dimension divides by 4 is split over ``"model"``
  on that dimension (kernels ``P(None, "model")``, biases ``P("model")``);
  the others (the 1-wide output layer) are replicated.

The optimizer is ``optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2))``
inside ``nnx.Optimizer(model, tx, wrt=nnx.Param)``. Under ``nnx.jit`` the
clipper sees global (sharded) arrays and XLA inserts the cross-device
reductions, so no ``axis_name`` is needed (docs/design.md#scale-out).

An unsharded copy of the model (same initial weights) is trained in lockstep
on one device on the same data. Each step prints the loss and the pre-clip
global norm the clipper logged (``oc.clip_stats(optimizer.opt_state)
["clip_by_global_norm/global_norm"]``) for both, and checks they agree.

Run with ``python examples/data_parallel.py [--steps N]``. The 8 CPU devices
come from ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set below
before jax is imported unless the flag is already present.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc
# pylint: enable=g-import-not-at-top,wrong-import-position

MESH_SHAPE = (2, 4)
MESH_AXES = ("data", "model")
BATCH = 64
FEATURES = 16
HIDDEN = 32
MAX_NORM = 1.0
LEARNING_RATE = 1e-2
# The logged norms of the sharded and the single-device run must agree to
# this relative tolerance (float32, different reduction orders).
NORM_RTOL = 1e-4
_NORM_KEY = "clip_by_global_norm/global_norm"


class MLP(nnx.Module):
  """16 -> 32 -> 32 -> 1 with ReLU."""

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.l3 = nnx.Linear(HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.l1(x))
    x = jax.nn.relu(self.l2(x))
    return self.l3(x)


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A fixed batch of a noisy nonlinear regression problem (float32).

  The target is large enough that the raw gradients start well above
  ``MAX_NORM``, so the clipper acts.
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, FEATURES))
  w = rng.normal(size=(FEATURES, 1))
  y = 3.0 * np.tanh(x @ w) + 0.1 * rng.normal(size=(BATCH, 1))
  return x.astype(np.float32), y.astype(np.float32)


def make_mesh() -> jax.sharding.Mesh:
  if jax.device_count() < 8:
    raise RuntimeError(
        f"data_parallel needs 8 devices, found {jax.device_count()}: set"
        " XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is"
        " imported.")
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:  # older jax: meshes are always "auto"
    return jax.make_mesh(MESH_SHAPE, MESH_AXES)
  return jax.make_mesh(MESH_SHAPE, MESH_AXES,
                       axis_types=(axis_type.Auto,) * len(MESH_AXES))


def param_spec(x: jax.Array) -> P:
  """Split the last dimension over "model" when it divides evenly."""
  model_size = MESH_SHAPE[MESH_AXES.index("model")]
  if x.ndim and x.shape[-1] % model_size == 0:
    return P(*([None] * (x.ndim - 1)), "model")
  return P()


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> None:
  """Places the model's parameters on ``mesh`` in place."""
  state = nnx.state(model)
  sharded = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, param_spec(x))), state)
  nnx.update(model, sharded)


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((model(x) - y) ** 2)


def _constrain(node: nnx.Module | nnx.Optimizer, mesh: jax.sharding.Mesh):
  """Pins every array of ``node`` to its ``param_spec`` layout (in a jit)."""
  state = nnx.state(node)
  nnx.update(node, jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(
          a, NamedSharding(mesh, param_spec(a))), state))


def make_train_step(mesh: jax.sharding.Mesh | None = None):
  """A jitted training step; with ``mesh``, the new parameters and optimizer
  state keep the layout of ``param_spec`` (otherwise XLA may pick another
  one for them, e.g. the layout of their gradients)."""

  @nnx.jit
  def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array,
                 y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    if mesh is not None:
      _constrain(model, mesh)
      _constrain(optimizer, mesh)
    return loss

  return train_step


def make_optimizer(model: MLP) -> nnx.Optimizer:
  tx = optax.chain(oc.clip_by_global_norm(MAX_NORM),
                   optax.adamw(LEARNING_RATE))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def main(steps: int = 5, verbose: bool = True) -> dict:
  """Trains the sharded and the single-device model in lockstep.

  Args:
    steps: number of training steps.
    verbose: print one line per step.

  Returns:
    A dict of per-step lists: ``losses`` / ``norms`` (sharded run),
    ``single_losses`` / ``single_norms`` (one device), ``clipped`` (whether
    the sharded step was clipped), and ``param_shardings``: the
    ``PartitionSpec`` of each sharded parameter after training, keyed by its
    path (checked to be the layout it started with).
  """
  mesh = make_mesh()
  x_np, y_np = make_data()

  # The same initial weights twice: one copy sharded, one on a single device.
  model = MLP(nnx.Rngs(0))
  single = MLP(nnx.Rngs(0))
  shard_model(model, mesh)
  nnx.update(single, jax.device_put(nnx.state(single), jax.devices()[0]))

  optimizer = make_optimizer(model)
  single_optimizer = make_optimizer(single)

  batch = NamedSharding(mesh, P("data"))
  x, y = jax.device_put(x_np, batch), jax.device_put(y_np, batch)
  x1, y1 = (jax.device_put(a, jax.devices()[0]) for a in (x_np, y_np))

  sharded_step, single_step = make_train_step(mesh), make_train_step()
  history = {"losses": [], "norms": [], "single_losses": [],
             "single_norms": [], "clipped": []}
  for step in range(steps):
    loss = sharded_step(model, optimizer, x, y)
    single_loss = single_step(single, single_optimizer, x1, y1)
    stats = oc.clip_stats(optimizer.opt_state)
    norm = float(stats[_NORM_KEY])
    single_norm = float(oc.clip_stats(single_optimizer.opt_state)[_NORM_KEY])
    clipped = bool(stats["clip_by_global_norm/global_norm_clipped"])
    history["losses"].append(float(loss))
    history["norms"].append(norm)
    history["single_losses"].append(float(single_loss))
    history["single_norms"].append(single_norm)
    history["clipped"].append(clipped)
    if verbose:
      print(f"step {step:2d}  loss {float(loss):.5f}  pre-clip norm "
            f"{norm:.6f} (1 device: {single_norm:.6f})"
            f"{'  clipped' if clipped else ''}")
    rel = abs(norm - single_norm) / max(abs(single_norm), 1e-12)
    assert rel < NORM_RTOL, (step, norm, single_norm)

  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  history["param_shardings"] = {
      "/".join(str(k) for k in path): v.sharding.spec for path, v in params}
  for path, v in params:  # training kept the layout the params started with
    assert v.sharding.is_equivalent_to(
        NamedSharding(mesh, param_spec(v)), v.ndim), (path, v.sharding)
  if verbose:
    for path, spec in history["param_shardings"].items():
      print(f"  {path}: {spec}")
  return history


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  main(steps=parser.parse_args().steps)
