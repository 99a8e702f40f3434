"""Test configuration: 8 fake CPU devices, set before jax starts."""

import os

# Must run before jax initialises its backends: every test sees 8 CPU devices so that the
# sharded code paths (data parallel, host matching per device) are exercised on one machine.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _check_devices():
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
