"""The orbax wrapper: last-k, best-by-metric, shape mismatches named, atomic saves."""

import warnings

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from ferjax.errors import UserError
from ferjax.core.checkpoint import Checkpoints


def _state(width=4):
  params = {"dense": {"kernel": jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width),
                      "bias": jnp.zeros(width)}}
  return {"params": params, "opt": optax.adam(1e-3).init(params), "step": jnp.array(0, jnp.int32),
          "key": jax.random.PRNGKey(0)}


def test_round_trip_last_k_and_best(tmp_path):
  ckpt = Checkpoints(tmp_path, max_to_keep=2, best_metric="acc")
  state = _state()
  for step, acc in [(10, 0.5), (20, 0.7), (30, 0.6)]:
    state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
    ckpt.save(step, state, metrics={"acc": acc})
  assert ckpt.steps() == [20, 30]
  assert ckpt.best_step() == 20
  restored, meta = ckpt.restore(_state(), "latest")
  chex.assert_trees_all_equal(restored, state)
  _, meta = ckpt.restore(_state(), "best")
  assert meta["step"] == 20 and meta["metrics"]["acc"] == pytest.approx(0.7)
  # A reopened manager remembers the best value, so a worse step does not replace it.
  again = Checkpoints(tmp_path, max_to_keep=2, best_metric="acc")
  again.save(40, state, metrics={"acc": 0.65})
  assert again.best_step() == 20
  with pytest.raises(UserError, match="no checkpoint at step 10"):
    again.restore(_state(), 10)


def test_shape_mismatch_names_the_parameter(tmp_path):
  ckpt = Checkpoints(tmp_path)
  ckpt.save(1, _state(width=4))
  with pytest.raises(UserError,
                     match=r"parameter 'params/dense/bias' has shape \(4,\).*expects \(5,\)"):
    ckpt.restore(_state(width=5))


def test_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match="no checkpoint found"):
    Checkpoints(tmp_path / "none").restore(_state())


def test_incomplete_save_is_ignored(tmp_path):
  """A save killed midway leaves only a temporary folder, which restore skips."""
  ckpt = Checkpoints(tmp_path)
  ckpt.save(1, _state())
  # What orbax leaves when killed mid-write: a tmp folder with partial contents.
  partial = tmp_path / "last" / "2.orbax-checkpoint-tmp-123"
  partial.mkdir()
  (partial / "state").mkdir()
  reopened = Checkpoints(tmp_path)
  assert reopened.latest_step() == 1
  restored, meta = reopened.restore(_state())
  assert meta["step"] == 1


def test_context_manager_and_no_deprecation_warnings(tmp_path):
  """Saving, reopening and restoring through the current orbax API warns about nothing."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with Checkpoints(tmp_path, max_to_keep=1, best_metric="acc") as ckpt:
      ckpt.save(1, _state(), metrics={"acc": 0.5})
      ckpt.save(2, _state(), metrics={"acc": 0.4})
    with Checkpoints(tmp_path, max_to_keep=1, best_metric="acc") as reopened:
      assert reopened.steps() == [2] and reopened.best_step() == 1
      _, meta = reopened.restore(_state(), "best")
      assert meta["metrics"]["acc"] == pytest.approx(0.5)
  assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
