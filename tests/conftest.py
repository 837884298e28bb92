"""Test set-up: 8 virtual CPU devices (for sharding tests), set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  platform = jax.default_backend()
  for item in items:
    for marker, needed in (("gpu_only", "gpu"), ("tpu_only", "tpu")):
      if item.get_closest_marker(marker) and platform != needed:
        item.add_marker(pytest.mark.skip(reason=f"needs a {needed.upper()}; "
                                                f"backend is {platform}"))
