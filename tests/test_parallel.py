"""Shared infrastructure (ferjax.core.parallel): the recompile guard and replicated init."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax.core import parallel


def test_the_tests_run_on_8_fake_cpu_devices():
  """conftest's chex.set_n_cpu_devices(8), in this process and in the environment that the CLI
  processes which tests start inherit."""
  assert jax.default_backend() == "cpu" and jax.device_count() == 8
  assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"].split()


def test_jit_once_compiles_once_and_refuses_a_retrace():
  step = parallel.jit_once(lambda x: x * 2)
  np.testing.assert_array_equal(step(jnp.ones(3)), 2 * np.ones(3))
  step(jnp.zeros(3))  # Same shape and dtype: the compiled program is reused.
  with pytest.raises(AssertionError, match="traced 2 times"):
    step(jnp.ones(4))
  # Each jitted function counts its own traces: a new run's step starts at zero.
  again = parallel.jit_once(lambda x: x * 2)
  again(jnp.ones(4))


def test_init_replicated_places_the_state_on_every_device_and_abstract_matches():
  mesh = parallel.make_mesh(8)
  init = lambda: {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 2)), "step": jnp.zeros(())}
  state = parallel.init_replicated(init, mesh)
  assert state["w"].sharding.is_fully_replicated and len(state["w"].sharding.device_set) == 8
  abstract = parallel.abstract_replicated(init, mesh)
  assert abstract["w"].shape == (3, 2) and abstract["w"].sharding == state["w"].sharding
  # Both builds give finite values of the same shape; a kind of run keeps one forever.
  slow = parallel.init_replicated(init, mesh, fast_compile=False)
  np.testing.assert_allclose(slow["w"], state["w"], rtol=1e-6)
