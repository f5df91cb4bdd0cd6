"""Multi-device tests: 8 simulated CPU devices, in their own pytest process.

``make test`` runs this directory as
``XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/multidevice``.
The flag is also set here, before jax is imported, so running this directory
alone works; running it in the same process as the other tests does not
(jax would already be initialised with one device), and fails loudly.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_collection_modifyitems(config, items):
  del config, items
  if jax.device_count() < 8:
    raise pytest.UsageError(
        "tests/multidevice needs 8 devices: run it in its own process with"
        " XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test does).")
