"""Semantic augmentation: balancing plans and latent perturbations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax.augment import semantic
from ferjax.errors import UserError

COUNTS = np.array([705, 717, 281, 4772, 2524, 1982, 1290])  # RAF-DB train, FER-2013 class order


def test_largest_target_fills_every_gap():
  plan = semantic.plan_batches(COUNTS, batch_size=256, target="largest", fill=1.0)
  np.testing.assert_allclose(plan.real_counts + plan.synthetic_counts, 4772)
  assert plan.synthetic_counts[3] == 0  # the largest class needs nothing
  # Fear has the largest gap, so it gets the largest share of the synthetic slots.
  assert plan.synth_probs.argmax() == 2
  expected = 256 * plan.synthetic_counts.sum() / (7 * 4772)
  assert abs(plan.num_synthetic - expected) <= 0.5


def test_fill_zero_is_plain_resampling():
  plan = semantic.plan_batches(COUNTS, batch_size=128, target="largest", fill=0.0)
  assert plan.num_synthetic == 0
  np.testing.assert_allclose(plan.real_probs, COUNTS / COUNTS.sum())


def test_uniform_and_sqrt_targets_keep_the_total():
  for target in ("uniform", "sqrt"):
    t = semantic.target_counts(COUNTS, target)
    assert t.sum() == pytest.approx(COUNTS.sum())
  uniform = semantic.plan_batches(COUNTS, batch_size=64, target="uniform", fill=1.0)
  # Head classes are under-sampled to the target, tail classes are topped up synthetically.
  np.testing.assert_allclose(uniform.real_counts + uniform.synthetic_counts, COUNTS.sum() / 7)
  sqrt = semantic.target_counts(COUNTS, "sqrt")
  assert sqrt[2] / sqrt[3] == pytest.approx(np.sqrt(281 / 4772))


def test_half_fill_and_explicit_counts():
  half = semantic.plan_batches(COUNTS, batch_size=64, target="largest", fill=0.5)
  np.testing.assert_allclose(half.synthetic_counts, 0.5 * (4772 - COUNTS))
  explicit = semantic.plan_batches(COUNTS, batch_size=64, target="explicit",
                                   explicit=[1000] * 7, fill=1.0)
  np.testing.assert_allclose(explicit.real_counts + explicit.synthetic_counts, 1000)


def test_bad_policy_values():
  with pytest.raises(UserError, match="augment.fill"):
    semantic.plan_batches(COUNTS, batch_size=8, fill=1.5)
  with pytest.raises(UserError, match="augment.target"):
    semantic.plan_batches(COUNTS, batch_size=8, target="median")
  with pytest.raises(UserError, match="augment.target_counts"):
    semantic.plan_batches(COUNTS, batch_size=8, target="explicit", explicit=[1, 2])


def test_perturbations():
  key = jax.random.PRNGKey(0)
  mu = jnp.arange(12.0).reshape(3, 4)
  logvar = jnp.full((3, 4), -2.0)
  classes = jnp.array([0, 1, 0])
  stats = (jnp.zeros((2, 4)), jnp.ones((2, 4)))
  # alpha = 0 is the plain reconstruction of the seed's mean.
  z0 = semantic.perturb_latents(key, "posterior", 0.0, mu, logvar, None, classes, stats)
  np.testing.assert_array_equal(z0, mu)
  z1 = semantic.perturb_latents(key, "posterior", 1.0, mu, logvar, None, classes, stats)
  z3 = semantic.perturb_latents(key, "posterior", 3.0, mu, logvar, None, classes, stats)
  np.testing.assert_allclose(z3 - mu, 3 * (z1 - mu), rtol=1e-5)  # alpha scales the step
  partner = mu[::-1]
  zi = semantic.perturb_latents(key, "interpolate", 1.0, mu, logvar, partner, classes, stats)
  lo, hi = jnp.minimum(mu, partner), jnp.maximum(mu, partner)
  assert bool(jnp.all((zi >= lo - 1e-6) & (zi <= hi + 1e-6)))  # on the segment
  zg = semantic.perturb_latents(key, "class_gaussian", 1.0, mu, logvar, None, classes, stats)
  assert zg.shape == mu.shape and not np.allclose(zg, mu)
  with pytest.raises(UserError, match="augment.mode"):
    semantic.perturb_latents(key, "dream", 1.0, mu, logvar, None, classes, stats)
