"""One process of the two-process test (``test_multiprocess.py`` runs it).

Usage: ``python _worker.py PROCESS_ID COORDINATOR_PORT OUT_DIR``.

The two processes join one jax distributed runtime on localhost (4 CPU
devices each, gloo collectives), build the same NumPy gradients from fixed
seeds, put them on a mesh of all 8 devices (so every sharded leaf spans both
processes), and run a few jitted steps of every public optaxclip transform
(and of ``optaxclip.global_norm``).
Next to each sharded step the same transform runs, jitted, on one local
device, from host NumPy copies of the same data: the single-process
reference.

jax itself is imported only in ``main``, after ``XLA_FLAGS`` is set, so the
parent test can import this module for its constants. Nothing is asserted
here. Everything the parent test compares is pickled to
``OUT_DIR/process_<i>.pkl``:

* ``ref``: the reference updates and state leaves (host NumPy);
* ``glob``: the sharded run's updates and state, gathered to host with
  ``multihost_utils.process_allgather`` (a replicated array comes back as
  this process's own copy, so comparing it across processes is meaningful);
* ``shards``: every addressable shard of every output leaf, keyed by its
  global index, so the parent can check that every replica of every block
  agrees bit for bit on all 8 devices of both processes;
* ``same_sharding``: whether each update leaf kept its input's sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import sys
import time
import traceback

import numpy as np

LOCAL_DEVICES = 4
NUM_PROCESSES = 2
NUM_STEPS = 6
# Step s scales the gradients by SCALES[s]: small steps pass, large ones clip
# (and, for the adaptive clippers, steps 2 and 4 are spikes after a short
# history).
SCALES = (0.5, 1.0, 2.0, 1.0, 5.0, 0.8)
# skip_step also gets a NaN at this step, in a block held by process 1 only:
# both processes must still agree to skip it.
NAN_STEP = 3
NAN_AT = ("w", (6, 13))
BATCH = 8  # clip_per_example's batch axis.
GLOBAL_NORM_ORDS = (2, 1, "inf")

# Every configuration run, and the public factory it exercises. The parent
# test checks that this covers every transform optaxclip exports.
CONFIGS = {
    "clip_by_value": "clip_by_value",
    "clip_by_value_min": "clip_by_value",
    "clip": "clip",
    "clip_by_norm": "clip_by_norm",
    "clip_by_norm_inf": "clip_by_norm",
    "clip_by_norm_stacked": "clip_by_norm",
    "record_norms": "record_norms",
    "clip_by_global_norm_l2": "clip_by_global_norm",
    "clip_by_global_norm_l1": "clip_by_global_norm",
    "clip_by_global_norm_inf": "clip_by_global_norm",
    "clip_by_block_rms": "clip_by_block_rms",
    "adaptive_grad_clip": "adaptive_grad_clip",
    "autoclip": "autoclip",
    "autoclip_history": "autoclip",
    "zclip": "zclip",
    "zclip_skip": "zclip",
    "adagc": "adagc",
    "skip_step": "skip_step",
    "skip_step_loss": "skip_step",
    "clip_by_global_norm_groups": "clip_by_global_norm",
    "clip_norm_growth": "clip_norm_growth",
    "spam_clip": "spam_clip",
    "momentum_reset": "momentum_reset",
    "adaclip": "adaclip",
    "adaclip_global": "adaclip",
    "adagn": "adagn",
    "clip_per_example_noise": "clip_per_example",
    "clip_per_example_sum_quantile": "clip_per_example",
}
# clip_per_example's arguments (the parent test recomputes the noise-free
# result from them to check that the noise is there).
PER_EXAMPLE_ARGS = {
    "clip_per_example_noise": {"max_norm": 6.3, "noise_multiplier": 0.7,
                               "seed": 11},
    "clip_per_example_sum_quantile": {"max_norm": 6.3, "reduce": "sum",
                                      "noise_multiplier": 0.3, "seed": 5,
                                      "target_quantile": 0.5},
}
PER_EXAMPLE = tuple(PER_EXAMPLE_ARGS)
SHAPES = {"w": (8, 16), "k": (16, 8), "v": (16,), "b": (16,)}
BATCH_SHAPES = {"w": (BATCH, 8, 16), "k": (BATCH, 4, 4), "b": (BATCH, 16)}

# Every transform in tests/registry.py that no scenario above exercises runs
# as its registry row (named "row:<name>"), on the registry's leaf names with
# shapes that split over the mesh (or on the row's own tree).
ROW_PREFIX = "row:"
ROW_SHAPES = {"kernel": (8, 16), "bias": (16,), "scale": (16,)}


def registry_configs(rows) -> list[str]:
  """The registry rows whose factory no scenario in CONFIGS exercises."""
  covered = set(CONFIGS.values())
  return [ROW_PREFIX + r.name for r in rows
          if r.factory.__name__ not in covered]


def _import_registry():
  tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if tests_dir not in sys.path:
    sys.path.insert(0, tests_dir)
  import registry  # pylint: disable=g-import-not-at-top
  return registry


def row_host_tree(row, seed: int, scale: float = 1.0) -> dict:
  """Host gradients (or params) for a registry row, the same everywhere."""
  import jax  # pylint: disable=g-import-not-at-top
  registry = _import_registry()
  if row.tree is registry.default_tree:
    shapes = {k: ((BATCH, *s) if row.per_example else s)
              for k, s in ROW_SHAPES.items()}
    return host_tree(seed, shapes, scale)
  template = registry.params(row)
  rng = np.random.default_rng(seed)

  def draw(x):
    shape = (BATCH, *x.shape) if row.per_example else x.shape
    return (scale * rng.standard_normal(shape)).astype(np.dtype(x.dtype))
  return jax.tree.map(draw, template)


def _with_loss(tx):
  """``tx`` called with a ``loss`` extra argument computed from the grads."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def update(updates, state, params=None, **extra_args):
    loss = sum(jnp.mean(x * x) for x in jax.tree.leaves(updates))
    return tx.update(updates, state, params, loss=loss, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def host_tree(seed: int, shape_of: dict, scale: float = 1.0) -> dict:
  """float32 standard normal leaves, the same in every process."""
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.standard_normal(s)).astype(np.float32)
          for k, s in sorted(shape_of.items())}


def step_gradients(name: str, step: int) -> dict:
  """The host gradients config ``name`` gets at ``step`` (0-based)."""
  if name.startswith(ROW_PREFIX):
    row = _import_registry().by_name(name[len(ROW_PREFIX):])
    return row_host_tree(row, 100 + step, SCALES[step])
  shape_of = BATCH_SHAPES if name in PER_EXAMPLE else SHAPES
  g = host_tree(100 + step, shape_of, SCALES[step])
  if name == "skip_step" and step == NAN_STEP:
    g[NAN_AT[0]][NAN_AT[1]] = np.nan
  return g


def main(process_id: int, port: int, out_dir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # As in tests/conftest.py: no hidden upcasts or broadcasts.
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=NUM_PROCESSES,
      process_id=process_id,
      local_device_ids=list(range(LOCAL_DEVICES)),
  )
  try:
    results = run(process_id)
  finally:
    # Leave the runtime together so neither process waits for a heartbeat.
    jax.distributed.shutdown()
  path = os.path.join(out_dir, f"process_{process_id}.pkl")
  with open(path + ".tmp", "wb") as f:
    pickle.dump(results, f)
  os.replace(path + ".tmp", path)


def run(process_id: int) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import optaxclip as oc

  meta = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "jax_version": jax.__version__,
      "collectives": jax.config.values["jax_cpu_collectives_implementation"],
      "device_ids": sorted(d.id for d in jax.devices()),
  }
  assert jax.process_index() == process_id, meta

  # Process p holds row p of the mesh: "data" crosses the process boundary,
  # "model" stays inside a process.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(NUM_PROCESSES, LOCAL_DEVICES),
              ("data", "model"))
  local = jax.local_devices()[0]

  # Leaf layouts: split across processes along rows, along columns, along
  # both mesh axes at once, and replicated across processes.
  layout = {
      "w": P("data", "model"),
      "k": P("model", "data"),
      "v": P(("data", "model")),
      "b": P("model"),
  }
  # clip_per_example: a batch of 8 per-example gradients, batch axis split
  # over all 8 devices (or over the processes only).
  batch_layout = {
      "w": P(("data", "model")),
      "k": P("data", None, "model"),
      "b": P(("data", "model")),
  }

  def to_global(tree, spec_of):
    return {k: jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, spec_of[k]), lambda idx, x=x: x[idx])
            for k, x in tree.items()}

  def to_local(tree):
    return jax.device_put(tree, local)

  def leaves_with_paths(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p), x) for p, x in flat]

  def gather(tree):
    return [np.asarray(x) for x in multihost_utils.process_allgather(
        jax.tree.leaves(tree), tiled=True)]

  def shards(tree):
    out = []
    for x in jax.tree.leaves(tree):
      out.append([(repr(s.index), s.device.id, np.asarray(s.data))
                  for s in x.addressable_shards])
    return out

  makers = {
      # With diagnostics: the extremes are reduced across processes.
      "clip_by_value": lambda: oc.clip_by_value(2.0, diagnostics=True),
      "clip_by_value_min": lambda: oc.clip_by_value(2.0, min_value=-1.0,
                                                    diagnostics=True),
      "clip": lambda: oc.clip(2.0),
      "clip_by_norm": lambda: oc.clip_by_norm(6.0),
      "clip_by_norm_inf": lambda: oc.clip_by_norm(2.5, ord="inf"),
      # Every leaf's rows as layer slices: per-slice norms across processes.
      "clip_by_norm_stacked": lambda: oc.clip_by_norm(2.0, stacked=1),
      "record_norms": lambda: oc.record_norms(stacked=1),
      "clip_by_global_norm_l2": lambda: oc.clip_by_global_norm(15.0),
      "clip_by_global_norm_l1": lambda: oc.clip_by_global_norm(250.0, ord=1),
      "clip_by_global_norm_inf": lambda: oc.clip_by_global_norm(3.0,
                                                                ord="inf"),
      "clip_by_block_rms": lambda: oc.clip_by_block_rms(1.2),
      "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.5),
      "autoclip": lambda: oc.autoclip(50.0),
      "autoclip_history": lambda: oc.autoclip(25.0, history_size=3),
      "zclip": lambda: oc.zclip(warmup_steps=2, max_norm=None, z_thresh=2.0),
      "zclip_skip": lambda: oc.zclip(warmup_steps=2, max_norm=20.0,
                                     z_thresh=2.0, skip_update_on_spike=True),
      "adagc": lambda: oc.adagc(warmup_steps=2, lambda_abs=15.0),
      # sgd with momentum: a skipped step must also leave the trace alone.
      "skip_step": lambda: oc.skip_step(
          optax.sgd(0.1, momentum=0.9), max_norm=60.0, spike_sigmas=2.0,
          window=4, warmup_steps=2),
      # The loss rule: the "loss" is a reduction of the sharded gradients,
      # so every process must take the same decision from it.
      "skip_step_loss": lambda: _with_loss(oc.skip_step(
          optax.sgd(0.1, momentum=0.9), loss_spike_sigmas=1.0,
          loss_window=4, loss_warmup_steps=2)),
      "clip_by_global_norm_groups": lambda: oc.clip_by_global_norm(
          6.0, groups={"w": "matrix", "k": "matrix", "v": "vector",
                       "b": None}),
      "clip_norm_growth": lambda: oc.clip_norm_growth(1.05),
      "spam_clip": lambda: oc.spam_clip(2.0, warmup_steps=1),
      "momentum_reset": lambda: oc.momentum_reset(
          optax.sgd(0.1, momentum=0.9), interval=3, warmup_steps=2),
      "adaclip": lambda: oc.adaclip(theta=0.5),
      "adaclip_global": lambda: oc.adaclip(theta=0.5, per_tensor=False),
      "adagn": lambda: oc.adagn(),
      **{name: functools.partial(oc.clip_per_example, **args)
         for name, args in PER_EXAMPLE_ARGS.items()},
  }
  assert set(makers) == set(CONFIGS), (set(makers) ^ set(CONFIGS))
  registry = _import_registry()
  row_names = registry_configs(registry.ROWS)

  def row_spec(path, x, per_example):
    """The registry tree's layout: split across and within processes."""
    key = jax.tree_util.keystr(path[:1]).strip("[]'\"")
    if per_example:  # the batch axis over all 8 devices
      return P(("data", "model"), *([None] * (x.ndim - 1)))
    fixed = {"kernel": P("data", "model"), "bias": P(("data", "model")),
             "scale": P("model")}
    if key in fixed and x.shape == ROW_SHAPES[key]:
      return fixed[key]
    if x.ndim and x.shape[0] % NUM_PROCESSES == 0:
      return P("data")
    return P()

  def row_to_global(tree, per_example=False):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.make_array_from_callback(
            x.shape, NamedSharding(mesh, row_spec(path, x, per_example)),
            lambda idx, x=x: x[idx]), tree)

  def record(out_glob, out_loc, inputs=None):
    rec = {
        "paths": [p for p, _ in leaves_with_paths(out_loc)],
        "ref": [np.asarray(x) for x in jax.tree.leaves(out_loc)],
        "glob": gather(out_glob),
        "shards": shards(out_glob),
        "treedef_equal": (jax.tree.structure(out_glob)
                          == jax.tree.structure(out_loc)),
    }
    if inputs is not None:  # Did each update leaf keep its input's sharding?
      rec["same_sharding"] = {
          k: bool(out_glob[0][k].sharding.is_equivalent_to(
              inputs[k].sharding, inputs[k].ndim)) for k in inputs}
    return rec

  params_host = host_tree(1, SHAPES)
  params_glob = to_global(params_host, layout)
  params_loc = to_local(params_host)

  results = {"meta": meta, "configs": {}}
  timings = {}
  for name in CONFIGS:
    t0 = time.perf_counter()
    tx = makers[name]()
    per_example = name in PER_EXAMPLE
    spec_of, shape_of = ((batch_layout, BATCH_SHAPES) if per_example
                         else (layout, SHAPES))
    # keep_unused: init reads only shapes; without the (global) argument in
    # the computation jax would place the state on one local device.
    init = jax.jit(tx.init, keep_unused=True)
    if per_example:  # init takes the per-example (batch-free) shapes.
      p_host = {k: np.zeros(s[1:], np.float32) for k, s in shape_of.items()}
      p_glob = p_loc = None
      init_glob = init(to_global(
          p_host, {k: P(*spec_of[k][1:]) for k in spec_of}))
      init_loc = init(to_local(p_host))
    else:
      p_glob, p_loc = params_glob, params_loc
      init_glob = init(p_glob)
      init_loc = init(p_loc)
    update = jax.jit(tx.update)
    state_glob, state_loc = init_glob, init_loc
    steps = [record(init_glob, init_loc)]  # steps[0]: the initial state.
    for s in range(NUM_STEPS):
      g_host = step_gradients(name, s)
      g_glob = to_global(g_host, spec_of)
      u_glob, state_glob = update(g_glob, state_glob, p_glob)
      u_loc, state_loc = update(to_local(g_host), state_loc, p_loc)
      steps.append(record((u_glob, state_glob), (u_loc, state_loc),
                          None if per_example else g_glob))
    results["configs"][name] = steps
    timings[name] = time.perf_counter() - t0

  for name in row_names:
    t0 = time.perf_counter()
    row = registry.by_name(name[len(ROW_PREFIX):])
    tx = row.make()
    init = jax.jit(tx.init, keep_unused=True)
    update = jax.jit(registry.update_fn(row, tx))
    # init and params take the per-example (batch-free) shapes.
    p_host = row_host_tree(dataclasses.replace(row, per_example=False), 1)
    p_glob, p_loc = row_to_global(p_host), to_local(p_host)
    state_glob, state_loc = init(p_glob), init(p_loc)
    steps = [record(state_glob, state_loc)]
    for s in range(NUM_STEPS):
      g_host = step_gradients(name, s)
      g_glob = row_to_global(g_host, row.per_example)
      u_glob, state_glob = update(g_glob, state_glob, p_glob)
      u_loc, state_loc = update(to_local(g_host), state_loc, p_loc)
      out_glob, out_loc = (u_glob, state_glob), (u_loc, state_loc)
      rec = record(out_glob, out_loc)
      if not row.per_example:
        rec["same_sharding"] = {
            i: bool(a.sharding.is_equivalent_to(b.sharding, b.ndim))
            for i, (a, b) in enumerate(zip(jax.tree.leaves(u_glob),
                                           jax.tree.leaves(g_glob)))}
      steps.append(rec)
    results["configs"][name] = steps
    timings[name] = time.perf_counter() - t0

  # optaxclip.global_norm, the reduction under the global clippers.
  t0 = time.perf_counter()
  norms = jax.jit(lambda g: tuple(oc.global_norm(g, ord=o)
                                  for o in GLOBAL_NORM_ORDS))
  steps = []
  for s in range(NUM_STEPS):
    g_host = step_gradients("global_norm", s)
    steps.append(record(norms(to_global(g_host, layout)),
                        norms(to_local(g_host))))
  results["configs"]["global_norm"] = steps
  timings["global_norm"] = time.perf_counter() - t0
  results["timings"] = timings
  return results


if __name__ == "__main__":
  # Before jax is imported (by main): 4 CPU devices in this process.
  _FLAG = "--xla_force_host_platform_device_count"
  if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=4"
  try:
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stderr.flush()
    # Do not wait for the other process: exit now, the test reports stderr.
    os._exit(1)  # pylint: disable=protected-access
