"""Each long-tail loss against its defining formula."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ferjax import losses

COUNTS = np.array([1000, 500, 100, 20, 5], np.int64)
PRIOR = COUNTS / COUNTS.sum()


def _batch(seed=0, batch=16, k=5):
  key_l, key_y = jax.random.split(jax.random.key(seed))
  logits = jax.random.normal(key_l, (batch, k)) * 2.0
  labels = jax.random.randint(key_y, (batch,), 0, k)
  return logits, labels


def _loss_config(**overrides):
  config = dict(name="ce", label_smoothing=0.0, class_weights="none", beta=0.9999,
                drw_start_step=None, weight_average="mean", focal_gamma=2.0, ldam_max_margin=0.5,
                ldam_scale=1.0, tau=1.0)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def test_cross_entropy_matches_optax_with_and_without_smoothing():
  logits, labels = _batch()
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                             rtol=1e-6)
  smoothed = optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.1)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, 0.1),
                             optax.softmax_cross_entropy(logits, smoothed), rtol=1e-6)


def test_focal_loss_is_ce_at_gamma_0_and_downweights_easy_examples():
  logits, labels = _batch()
  ce = losses.cross_entropy(logits, labels)
  np.testing.assert_allclose(losses.focal_loss(logits, labels, 0.0), ce, rtol=1e-6)
  focal = losses.focal_loss(logits, labels, 2.0)
  p = jnp.exp(-ce)  # probability of the true class
  np.testing.assert_allclose(focal, (1 - p) ** 2 * ce, rtol=1e-5)
  assert np.all(focal <= ce + 1e-7)


def test_ldam_margins_scale_as_n_to_the_minus_quarter():
  margins = losses.ldam_margins(COUNTS, max_margin=0.5)
  np.testing.assert_allclose(margins * COUNTS ** 0.25, margins[0] * COUNTS[0] ** 0.25, rtol=1e-5)
  assert margins.argmax() == COUNTS.argmin() and np.isclose(margins.max(), 0.5)


def test_ldam_subtracts_the_margin_from_the_true_logit_only():
  logits, labels = _batch()
  margins = losses.ldam_margins(COUNTS, 0.5)
  expected_logits = 3.0 * (logits - jax.nn.one_hot(labels, 5) * margins[labels][:, None])
  np.testing.assert_allclose(losses.ldam_loss(logits, labels, margins, scale=3.0),
                             losses.cross_entropy(expected_logits, labels), rtol=1e-6)
  # Zero margins and scale 1: plain cross-entropy.
  np.testing.assert_allclose(losses.ldam_loss(logits, labels, np.zeros(5), 1.0),
                             losses.cross_entropy(logits, labels), rtol=1e-6)


def test_ldam_drw_as_published_on_cosine_logits():
  """LDAM-DRW's reference (github.com/kaidic/LDAM-DRW, losses.py + cifar_train.py): m_j =
  0.5 * n_j^(-1/4) / max, F.cross_entropy(30 * where(onehot, cos - m_y, cos), weight=w) with the
  effective-number weights (beta 0.9999) from the DRW step on: the per-example losses times w_y,
  averaged by sum_i w_i (loss.weight_average=normalized)."""
  logits, labels = _batch()
  cosines = jnp.tanh(logits)  # In [-1, 1], as the cosine head's.
  config = _loss_config(name="ldam", ldam_scale=30.0, ldam_max_margin=0.5,
                        class_weights="effective", drw_start_step=10,
                        weight_average="normalized")
  loss_fn = losses.make_loss(config, COUNTS)
  m = 1.0 / np.sqrt(np.sqrt(COUNTS))
  m = m * 0.5 / m.max()
  one_hot = np.eye(5)[np.asarray(labels)]
  z = 30.0 * np.where(one_hot > 0, np.asarray(cosines) - m[np.asarray(labels)][:, None],
                      np.asarray(cosines))
  log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(
      1, keepdims=True)
  ce = -np.sum(one_hot * log_p, axis=1)
  w = (1 - 0.9999) / (1 - 0.9999 ** COUNTS.astype(np.float64))
  w = w / w.sum() * 5
  wy = w[np.asarray(labels)]
  for step, weights in ((9, np.ones_like(wy)), (10, wy)):
    per_example = loss_fn(cosines, labels, step)
    np.testing.assert_allclose(per_example, ce * weights, rtol=1e-4)
    batch = losses.weighted_average(per_example, weights, "normalized")
    assert float(batch) == pytest.approx(np.sum(ce * weights) / np.sum(weights), rel=1e-4)


def test_balanced_softmax_is_ce_on_logits_plus_log_prior():
  logits, labels = _batch()
  log_prior = losses.log_prior(COUNTS)
  np.testing.assert_allclose(log_prior, np.log(PRIOR), rtol=1e-5)
  got = losses.balanced_softmax_loss(logits, labels, log_prior)
  # -log( n_y e^{z_y} / sum_j n_j e^{z_j} ), written out.
  weighted = COUNTS[None, :] * np.exp(np.asarray(logits, np.float64))
  expected = -np.log(weighted[np.arange(16), labels] / weighted.sum(1))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_logit_adjusted_loss_with_tau():
  logits, labels = _batch()
  log_prior = losses.log_prior(COUNTS)
  for tau in (0.0, 0.5, 1.0, 2.0):
    np.testing.assert_allclose(losses.logit_adjusted_loss(logits, labels, log_prior, tau),
                               losses.cross_entropy(logits + tau * log_prior, labels), rtol=1e-6)
  np.testing.assert_allclose(losses.logit_adjusted_loss(logits, labels, log_prior, 1.0),
                             losses.balanced_softmax_loss(logits, labels, log_prior), rtol=1e-6)


def test_effective_number_weights_formula():
  beta = 0.999
  weights = losses.class_weights(COUNTS, "effective", beta)
  raw = (1 - beta) / (1 - beta ** COUNTS.astype(np.float64))
  np.testing.assert_allclose(weights, raw / raw.sum() * len(COUNTS), rtol=1e-5)
  assert np.isclose(weights.sum(), len(COUNTS))
  # beta -> 0: every class counts as one sample (no re-weighting); beta -> 1: inverse frequency.
  np.testing.assert_allclose(losses.class_weights(COUNTS, "effective", 1e-8), np.ones(5), rtol=1e-5)
  np.testing.assert_allclose(losses.class_weights(COUNTS, "effective", 1 - 1e-9),
                             losses.class_weights(COUNTS, "inverse"), rtol=1e-3)


def test_inverse_frequency_weights():
  weights = losses.class_weights(COUNTS, "inverse")
  np.testing.assert_allclose(weights * COUNTS, weights[0] * COUNTS[0], rtol=1e-5)
  assert np.isclose(weights.sum(), len(COUNTS))
  np.testing.assert_allclose(losses.class_weights(COUNTS, "none"), np.ones(5))


def test_drw_switches_class_weights_on_at_the_step():
  logits, labels = _batch()
  config = _loss_config(name="ldam", class_weights="effective", drw_start_step=5)
  loss_fn = losses.make_loss(config, COUNTS)
  margins = losses.ldam_margins(COUNTS, 0.5)
  unweighted = losses.ldam_loss(logits, labels, margins)
  weights = losses.class_weights(COUNTS, "effective", 0.9999)
  np.testing.assert_allclose(loss_fn(logits, labels, 0), unweighted, rtol=1e-6)
  np.testing.assert_allclose(loss_fn(logits, labels, jnp.int32(4)), unweighted, rtol=1e-6)
  np.testing.assert_allclose(loss_fn(logits, labels, jnp.int32(5)), unweighted * weights[labels],
                             rtol=1e-6)
  # Under jit the switch is data-dependent on the step, not baked in at trace time.
  jitted = jax.jit(loss_fn)
  np.testing.assert_allclose(jitted(logits, labels, 4), unweighted, rtol=1e-5)
  np.testing.assert_allclose(jitted(logits, labels, 9), unweighted * weights[labels], rtol=1e-5)


def test_class_weights_without_drw_apply_from_the_start():
  logits, labels = _batch()
  loss_fn = losses.make_loss(_loss_config(class_weights="inverse"), COUNTS)
  weights = losses.class_weights(COUNTS, "inverse")
  np.testing.assert_allclose(loss_fn(logits, labels, 0),
                             losses.cross_entropy(logits, labels) * weights[labels], rtol=1e-6)


def test_posthoc_adjustment_subtracts_tau_log_prior():
  log_prior = losses.log_prior(COUNTS)
  logits = jnp.zeros((1, 5))
  np.testing.assert_allclose(losses.posthoc_adjust(logits, log_prior, 0.7), -0.7 * log_prior[None])
  # Equal logits: the adjusted prediction is the rarest class.
  assert int(jnp.argmax(losses.posthoc_adjust(logits, log_prior, 1.0))) == COUNTS.argmin()


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_every_loss_from_the_config_has_finite_gradients(name):
  logits, labels = _batch()
  loss_fn = losses.make_loss(_loss_config(name=name, label_smoothing=0.1), COUNTS, num_steps=10)
  value, grad = jax.value_and_grad(lambda z: loss_fn(z, labels, 0).mean())(logits)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_empty_classes_keep_priors_finite():
  counts = np.array([10, 0, 5])
  assert np.all(np.isfinite(losses.log_prior(counts)))
  assert np.all(np.isfinite(losses.class_weights(counts, "effective")))
  assert np.all(np.isfinite(losses.ldam_margins(counts)))


def test_weighted_average_mean_and_normalized_against_the_direct_formulas():
  """mean: sum(e w L) / B (Cui et al.); normalized: sum(e w L) / sum(w), PyTorch's
  F.cross_entropy(logits, y, weight=w) of the LDAM-DRW reference when e = 1."""
  logits, labels = _batch(batch=32)
  config = _loss_config(class_weights="effective", beta=0.999)
  loss_fn = losses.make_loss(config, COUNTS)
  weight_fn = losses.make_class_weight(config, COUNTS)
  w = losses.class_weights(COUNTS, "effective", 0.999)[np.asarray(labels)]
  np.testing.assert_allclose(weight_fn(labels, 0), w, rtol=1e-6)
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  e = np.linspace(0.25, 1.0, 32).astype(np.float32)  # example weights (synthetic samples)
  weighted = e * loss_fn(logits, labels, 0)
  assert losses.weighted_average(weighted, w, "mean") == pytest.approx(
      np.sum(e * w * ce) / 32, rel=1e-5)
  assert losses.weighted_average(weighted, w, "normalized") == pytest.approx(
      np.sum(e * w * ce) / np.sum(w), rel=1e-5)
  # With e = 1, normalized is the weighted CE of PyTorch: sum_i w_i ce_i / sum_i w_i.
  assert losses.weighted_average(loss_fn(logits, labels, 0), w, "normalized") == pytest.approx(
      np.average(ce, weights=w), rel=1e-5)


def test_weighted_average_modes_agree_without_class_weights_and_before_drw():
  logits, labels = _batch()
  e = np.linspace(0.5, 1.0, 16).astype(np.float32)
  for config in (_loss_config(), _loss_config(class_weights="inverse", drw_start_step=10)):
    weighted = e * losses.make_loss(config, COUNTS)(logits, labels, 3)
    w = losses.make_class_weight(config, COUNTS)(labels, 3)
    np.testing.assert_array_equal(w, np.ones(16))
    assert float(losses.weighted_average(weighted, w, "normalized")) == pytest.approx(
        float(losses.weighted_average(weighted, w, "mean")), rel=1e-6)
  with pytest.raises(ValueError, match="weight average"):
    losses.weighted_average(weighted, w, "median")
