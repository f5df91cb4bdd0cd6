"""Multi-host, for real: two processes on localhost (docs/design.md#scale-out).

Two children (``_worker.py``) join one ``jax.distributed`` runtime with gloo
CPU collectives, 4 CPU devices each, so 8 global devices. Each builds the same
NumPy gradients from fixed seeds, lays them out on a (2, 4) mesh whose first
axis is the process (leaves split across processes by rows, by columns, on
both mesh axes at once, and replicated), and runs a few jitted steps of every
public optaxclip transform; next to each step the same transform runs, jitted,
on one local device from host copies of the same data. The children write
everything to a tmp dir and exit; this module launches them once and checks:

* every output (updates and state, every step, plus the initial state) equals
  the single-process result, to float32 rounding of a different reduction
  order; integer/bool/key leaves exactly;
* both processes hold the same values, bit for bit: the gathered arrays, and
  every replica of every block on all 8 devices. This covers skip_step's
  decisions (a NaN sits in a block only process 1 holds), autoclip's and
  zclip's thresholds, adagc's gammas and clip_per_example's noise and PRNG key;
* each update keeps its input's sharding;
* the scenario exercises what it claims (some steps clip, some don't, a step
  is skipped...), so a green run is not vacuous.

Run it in its own pytest invocation (``make test`` does:
``pytest -q tests/multiprocess``); the parent process itself never starts a
distributed runtime, so it would also work alongside other tests.

The coordinator port comes from the OS: a socket is bound to port 0 on
127.0.0.1, its port read and the socket closed before process 0's coordinator
binds it. Another program may take the port in between (a small race); the
launch is then retried once on a fresh port.

Both children get 300 s; if one fails, the other is killed 10 s later
(rather than left waiting for its peer) and every test errors with both
children's exit codes and stderr. On a jax without gloo CPU collectives,
``jax.make_array_from_callback`` or ``multihost_utils.process_allgather`` the
tests are skipped with the reason.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pathlib
import pickle
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import registry

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "_worker.py"
TIMEOUT_S = 300.0
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _load_worker():
  """The worker module, for its constants (importing it starts nothing)."""
  spec = importlib.util.spec_from_file_location("_optaxclip_mp_worker",
                                                WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


W = _load_worker()
ROW_CONFIGS = W.registry_configs(registry.ROWS)
CONFIG_NAMES = list(W.CONFIGS) + ROW_CONFIGS + ["global_norm"]


def _skip_reason() -> str | None:
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    return (f"jax {jax.__version__} has no jax_cpu_collectives_implementation"
            " option (gloo CPU collectives)")
  if not hasattr(jax, "make_array_from_callback"):
    return f"jax {jax.__version__} has no jax.make_array_from_callback"
  try:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    return f"jax {jax.__version__} has no jax.experimental.multihost_utils"
  if not hasattr(multihost_utils, "process_allgather"):
    return f"jax {jax.__version__} has no multihost_utils.process_allgather"
  return None


# ---------------------------------------------------------------- launch ---


def _free_port() -> int:
  """A port the OS says is free now (racy: see the module docstring)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  # Exactly 4 devices per process, whatever the caller's XLA_FLAGS say (e.g.
  # the 8 of the multidevice suite).
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(_DEVICE_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={W.LOCAL_DEVICES}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def _tail(path: pathlib.Path, limit: int = 6000) -> str:
  text = path.read_text(errors="replace") if path.exists() else "<none>"
  return text if len(text) <= limit else "...\n" + text[-limit:]


def _run_children(out_dir: pathlib.Path) -> tuple[list[int | None], str]:
  """Runs both workers; returns their exit codes (None: killed) and a report.

  When one child fails, the other is killed after a short grace period
  rather than left waiting for a peer that will never come.
  """
  port = _free_port()
  env = _child_env()
  procs, logs = [], []
  for i in range(W.NUM_PROCESSES):
    out = open(out_dir / f"stdout_{i}.txt", "wb")  # pylint: disable=consider-using-with
    err = open(out_dir / f"stderr_{i}.txt", "wb")  # pylint: disable=consider-using-with
    logs += [out, err]
    procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, str(WORKER), str(i), str(port), str(out_dir)],
        cwd=str(REPO), env=env, stdout=out, stderr=err))
  start = time.monotonic()
  deadline = start + TIMEOUT_S
  failed_at = None
  timed_out = False
  try:
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = now
      if now > deadline or (failed_at is not None and now > failed_at + 10):
        timed_out = now > deadline
        break
      time.sleep(0.2)
  finally:
    for p in procs:  # Only our own children, by handle.
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()
  codes = [p.returncode for p in procs]
  report = [f"port {port}, {time.monotonic() - start:.1f} s"
            + (f", TIMED OUT after {TIMEOUT_S:.0f} s" if timed_out else "")]
  for i, code in enumerate(codes):
    report.append(f"--- process {i}: exit code {code}; stderr:\n"
                  + _tail(out_dir / f"stderr_{i}.txt"))
  return codes, "\n".join(report)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
  """Both children's results, ``[process_0, process_1]``."""
  reason = _skip_reason()
  if reason:
    pytest.skip(reason)
  for attempt in range(2):
    out_dir = tmp_path_factory.mktemp(f"multiprocess_{attempt}")
    codes, report = _run_children(out_dir)
    if codes == [0] * W.NUM_PROCESSES:
      break
    # The port may have been taken between _free_port() and the bind.
    if attempt == 0 and re.search(r"address already in use", report, re.I):
      continue
    raise AssertionError(f"a worker process failed:\n{report}")
  out = []
  for i in range(W.NUM_PROCESSES):
    with open(out_dir / f"process_{i}.pkl", "rb") as f:
      out.append(pickle.load(f))
  return out


# ----------------------------------------------------------------- checks ---


def _eps_tol(ref: np.ndarray) -> float:
  """Absolute tolerance: a few float32 ulps of the leaf's largest value.

  The sharded and single-device runs reduce in a different order (partial
  sums per device, then an all-reduce), so sums of 8-ish terms can differ in
  their last bits relative to the largest term.
  """
  finite = np.abs(ref[np.isfinite(ref)]) if ref.size else ref
  scale = float(np.max(finite)) if finite.size else 0.0
  return 8 * float(np.finfo(np.float32).eps) * max(scale, 1e-30)


def _assert_matches(actual: np.ndarray, ref: np.ndarray, where: str):
  assert actual.shape == ref.shape and actual.dtype == ref.dtype, (
      where, actual.shape, actual.dtype, ref.shape, ref.dtype)
  if np.issubdtype(ref.dtype, np.inexact):
    np.testing.assert_allclose(actual, ref, rtol=1e-6, atol=_eps_tol(ref),
                               equal_nan=True, err_msg=where)
  else:  # counts, flags, PRNG keys: exactly.
    np.testing.assert_array_equal(actual, ref, err_msg=where)


def _assert_bitwise(a: np.ndarray, b: np.ndarray, where: str):
  assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
  assert a.tobytes() == b.tobytes(), f"{where}:\n{a!r}\n!=\n{b!r}"


def test_runtime(results):
  for i, r in enumerate(results):
    meta = r["meta"]
    assert meta["process_index"] == i, meta
    assert meta["process_count"] == W.NUM_PROCESSES, meta
    assert meta["device_count"] == W.NUM_PROCESSES * W.LOCAL_DEVICES, meta
    assert meta["local_device_count"] == W.LOCAL_DEVICES, meta
    assert meta["collectives"] == "gloo", meta
    assert meta["jax_version"] == jax.__version__, meta
    assert meta["device_ids"] == results[0]["meta"]["device_ids"], meta
  assert set(results[0]["configs"]) == set(CONFIG_NAMES)


def test_covers_every_registry_row_factory():
  """Each transform runs in a scenario above or as its registry row (the
  registry's own test checks that it lists every public transform)."""
  covered = set(W.CONFIGS.values()) | {
      registry.by_name(n[len(W.ROW_PREFIX):]).factory.__name__
      for n in ROW_CONFIGS}
  assert {r.factory.__name__ for r in registry.ROWS} <= covered


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_matches_single_process(results, name):
  """Every process's gathered result equals the one-device run."""
  for proc, r in enumerate(results):
    for step, rec in enumerate(r["configs"][name]):
      assert rec["treedef_equal"], (name, step)
      assert len(rec["glob"]) == len(rec["ref"]) == len(rec["paths"])
      for path, glob, ref in zip(rec["paths"], rec["glob"], rec["ref"],
                                 strict=True):
        _assert_matches(glob, ref, f"{name} process {proc} step {step}"
                        f" (0 = init) leaf {path}")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_identical_across_processes(results, name):
  """Both processes hold the same bits, in every replica of every block."""
  steps0, steps1 = (r["configs"][name] for r in results)
  assert len(steps0) == len(steps1)
  all_devices = results[0]["meta"]["device_ids"]
  assert len(all_devices) == W.NUM_PROCESSES * W.LOCAL_DEVICES
  for step, (rec0, rec1) in enumerate(zip(steps0, steps1, strict=True)):
    assert rec0["paths"] == rec1["paths"]
    for leaf, path in enumerate(rec0["paths"]):
      where = f"{name} step {step} (0 = init) leaf {path}"
      # What each process gathered to host (for a replicated array: its
      # own copy).
      _assert_bitwise(rec0["glob"][leaf], rec1["glob"][leaf], where)
      # Every device's block: copies of the same block agree everywhere.
      blocks = collections.defaultdict(list)
      devices = []
      for proc, rec in enumerate((rec0, rec1)):
        for index, device, data in rec["shards"][leaf]:
          blocks[index].append((proc, device, data))
          devices.append(device)
      # Every output is a global array: one block on each of the 8 devices.
      assert sorted(devices) == all_devices, (where, devices)
      for index, copies in blocks.items():
        for proc, device, data in copies[1:]:
          _assert_bitwise(copies[0][2], data,
                          f"{where} block {index}: device {copies[0][1]}"
                          f" (process {copies[0][0]}) vs device {device}"
                          f" (process {proc})")


@pytest.mark.parametrize(
    "name", [n for n in W.CONFIGS if n not in W.PER_EXAMPLE]
    + [n for n in ROW_CONFIGS
       if not registry.by_name(n[len(W.ROW_PREFIX):]).per_example])
def test_updates_keep_sharding(results, name):
  for proc, r in enumerate(results):
    for step, rec in enumerate(r["configs"][name][1:], start=1):
      assert all(rec["same_sharding"].values()), (
          name, proc, step, rec["same_sharding"])


def _series(results, name: str, path: str) -> list[np.ndarray]:
  """A leaf's reference value at steps 1..NUM_STEPS (process 0)."""
  steps = results[0]["configs"][name][1:]
  return [rec["ref"][rec["paths"].index(path)] for rec in steps]


def _series_under(results, name: str, prefix: str) -> list[np.ndarray]:
  """``_series`` of the one leaf whose path starts with ``prefix``."""
  paths = [p for p in results[0]["configs"][name][1]["paths"]
           if p.startswith(prefix)]
  assert len(paths) == 1, (name, prefix, paths)
  return _series(results, name, paths[0])


def _mixed(values) -> bool:
  values = [bool(v) for v in values]
  return any(values) and not all(values)


def test_scenario_is_not_vacuous(results):
  """The data make the decisions under test go both ways."""
  for name in W.CONFIGS:
    if name.startswith("clip_by_global_norm") and "groups" not in name:
      assert _mixed(_series(results, name, "[1].global_norm_clipped")), name
  group_clipped = _series_under(results, "clip_by_global_norm_groups",
                                "[1].group_clipped")
  # A group that clips on some steps only, and a step where one group
  # clips and the other does not.
  assert any(_mixed([v[i] for v in group_clipped])
             for i in range(len(group_clipped[0]))), group_clipped
  assert any(v.any() and not v.all() for v in group_clipped), group_clipped
  assert _mixed(_series(results, "clip_norm_growth",
                        "[1].norm_growth_clipped"))
  for name, prefix in (("spam_clip", "[1].spam_clip_num_clipped"),
                       ("adaclip", "[1].adaclip_num_clipped"),
                       ("adaclip_global", "[1].adaclip_num_clipped")):
    counts = [int(np.sum(v)) for v in _series_under(results, name, prefix)]
    assert min(counts) < max(counts), (name, counts)
  scales = _series_under(results, "adagn", "[1].adagn_scale")
  assert len({np.asarray(v).tobytes() for v in scales}) > 2, scales
  resets = _series(results, "momentum_reset", "[1].momentum_reset_num_resets")
  assert int(resets[0]) == 0 and int(resets[-1]) == 2, resets
  assert _mixed(_series(results, "skip_step_loss", "[1].loss_skipped"))
  for name in ("autoclip", "autoclip_history"):
    assert _mixed(_series(results, name, "[1].autoclip_clipped")), name
    assert len({float(t) for t in
                _series(results, name, "[1].autoclip_threshold")}) > 2, name
  for name in ("zclip", "zclip_skip"):
    assert _mixed(_series(results, name, "[1].zclip_spike")), name
    thresholds = _series(results, name, "[1].zclip_threshold")
    assert len({float(t) for t in thresholds if np.isfinite(t)}) > 2, name
  skipped = _series(results, "skip_step", "[1].step_skipped")
  assert bool(skipped[W.NAN_STEP]) and _mixed(skipped), skipped
  assert np.isnan(_series(results, "skip_step", "[1].skip_norm")[W.NAN_STEP])
  clipped = [int(n) for n in
             _series(results, "clip_by_norm", "[1].num_clipped_leaves")]
  assert min(clipped) < max(clipped), clipped
  for name in W.PER_EXAMPLE:
    keys = [k.tobytes() for k in
            _series(results, name, "[1].per_example_rng")]
    assert len(set(keys)) == len(keys), name  # A fresh key every step.
  adapted = _series(results, "clip_per_example_sum_quantile",
                    "[1].per_example_max_norm")
  assert len({float(c) for c in adapted}) == len(adapted), adapted


@pytest.mark.parametrize("name", W.PER_EXAMPLE)
def test_per_example_noise_is_there(results, name):
  """The update minus the noise-free clipped sum (float64, from the same
  host data) is Gaussian noise of std sigma * C (/ B for the mean): the
  noise both processes agreed on is real noise, not zeros."""
  args = W.PER_EXAMPLE_ARGS[name]
  sigma = args["noise_multiplier"]
  records = results[0]["configs"][name]
  ratios = []
  for step in range(W.NUM_STEPS):
    before, after = records[step], records[step + 1]
    c = float(before["ref"][before["paths"].index("[1].per_example_max_norm")]
              if step else args["max_norm"])
    g = {k: x.astype(np.float64)
         for k, x in W.step_gradients(name, step).items()}
    norms = np.sqrt(sum(np.sum(x.reshape(W.BATCH, -1) ** 2, axis=1)
                        for x in g.values()))
    scale = np.minimum(1.0, c / norms)
    divisor = W.BATCH if args.get("reduce", "mean") == "mean" else 1
    noise = []
    for k, x in sorted(g.items()):
      expected = np.tensordot(scale, x, axes=1) / divisor
      update = after["ref"][after["paths"].index(f"[0]['{k}']")]
      noise.append((update - expected).ravel())
    noise = np.concatenate(noise)
    std = sigma * c / divisor
    ratios.append(float(np.std(noise)) / std)
    assert abs(float(np.mean(noise))) < 5 * std / np.sqrt(noise.size), (
        name, step, float(np.mean(noise)), std)
  # 160 noise elements a step: the sample std is within ~6% (1 sigma).
  assert all(0.7 < r < 1.3 for r in ratios), (name, ratios)
