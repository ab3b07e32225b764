"""Test setup: 8 fake CPU devices (for the 1-vs-8 device tests) and the real-data locator."""

import os
import pathlib

# Must be set before jax is imported anywhere: tests then see 8 CPU devices. Trainers default to
# all devices, so single-device tests pass num_devices=1 explicitly.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_FER2013 = REPO.parent / "shared" / "data" / "fer2013"


@pytest.fixture
def shared_fer2013():
  """The real FER-2013 folders beside the checkout; skips when absent (users' machines, CI forks)."""
  if not (SHARED_FER2013 / "train").is_dir():
    pytest.skip(f"real FER-2013 data not found at {SHARED_FER2013}")
  return SHARED_FER2013
