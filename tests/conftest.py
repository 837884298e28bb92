"""Test set-up, before JAX is imported: 8 virtual CPU devices (for sharding tests) and,
on CPU, no LLVM optimisation of compiled programs: the tests' programs are tiny, and the
optimiser took half of the suite's time (it changes no result the tests check)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
TEST_XLA_FLAGS = "--xla_force_host_platform_device_count=8"
if os.environ["JAX_PLATFORMS"] == "cpu":
  TEST_XLA_FLAGS += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  platform = jax.default_backend()
  for item in items:
    for marker, needed in (("gpu_only", "gpu"), ("tpu_only", "tpu")):
      if item.get_closest_marker(marker) and platform != needed:
        item.add_marker(pytest.mark.skip(reason=f"needs a {needed.upper()}; "
                                                f"backend is {platform}"))


@pytest.fixture(autouse=True)
def _nonfinite_guard_only_where_tested(request):
  """The ops guard every kernel against non-finite inputs with a `lax.cond` whose other
  branch calls the kernel again; interpreted, compiling it doubles the kernel tests'
  time. Tests marked `nonfinite_guard` (tests/ops/test_nonfinite.py) run it as users do;
  the rest, whose inputs are finite, take the kernel alone."""
  if request.node.get_closest_marker("nonfinite_guard"):
    yield
    return
  from attn_jax import ops  # pylint: disable=import-outside-toplevel
  with ops.nonfinite_guard(False):
    yield
