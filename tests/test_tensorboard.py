"""The TensorBoard example writes exactly the numbers clip_stats returned.

The event file is read back with tensorboard's own reader (no TensorFlow),
and every logged scalar is compared with the row the example computed from
``oc.clip_stats``, step by step.
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

import helpers

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip(
  "tensorboard.backend.event_processing.event_accumulator")

_EXAMPLE = (pathlib.Path(__file__).resolve().parent.parent / "examples"
            / "tensorboard_logging.py")


@pytest.mark.skipif(helpers.flax_version() < (0, 11),
                    reason="examples use the flax >= 0.11 nnx.Optimizer API")
def test_event_file_holds_the_clip_stats_values(tmp_path, standard_promotion):
  spec = importlib.util.spec_from_file_location("tb_example", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  logdir, rows = module.main(steps=30, out=str(tmp_path / "tb"))

  acc = event_accumulator.EventAccumulator(
    logdir, size_guidance={event_accumulator.SCALARS: 0,
                           event_accumulator.HISTOGRAMS: 0})
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  # Pre- and post-clip per-layer norms, the global norm and the loss.
  for key in ("record_norms/hidden/kernel", "record_norms/out/bias",
              "record_norms_1/hidden/kernel", "clip_by_global_norm/global_norm",
              "clip_by_global_norm/global_norm_clipped", "loss"):
    assert key in tags, (key, sorted(tags))
  assert tags == set(rows[0])
  for key in tags:
    events = acc.Scalars(key)
    assert [e.step for e in events] == list(range(30))
    # TensorBoard stores float32 scalars.
    np.testing.assert_allclose([e.value for e in events],
                               [row[key] for row in rows], rtol=1e-6)
  # The spike at step 24 shows in the pre-clip norms and is clipped after.
  pre = [r["record_norms/hidden/kernel"] for r in rows]
  post = [r["record_norms_1/hidden/kernel"] for r in rows]
  assert pre[24] > 20 * np.median(pre)
  assert post[24] <= 1.0 + 1e-5
  assert rows[24]["clip_by_global_norm/global_norm_clipped"] == 1.0
  total = math.sqrt(sum(r ** 2 for k, r in rows[24].items()
                        if k.startswith("record_norms/")))
  np.testing.assert_allclose(total, rows[24]["clip_by_global_norm/global_norm"],
                             rtol=1e-5)
  hist_tags = set(acc.Tags()["histograms"])
  assert hist_tags == {"grad/hidden/bias", "grad/hidden/kernel",
                       "grad/out/bias", "grad/out/kernel"}
