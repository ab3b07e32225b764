"""The long-tail toolbox in the trainer: how the class-weighted batch loss is averaged
(loss.weight_average, ferjax.losses.weighted_average) inside the classifier's train step."""

import jax
import numpy as np
import pytest

from ferjax import losses
from ferjax.core import parallel
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.models import resnet
from ferjax.train import classifier

COUNTS = np.array([120, 80, 50, 30, 20, 12, 8])


def _config(weight_average):
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.image_size = 24
  config.model.stem = "small"
  config.optim.warmup_steps = 0
  config.train.update(num_steps=4, batch_size=16, num_devices=1)
  config.loss.update(class_weights="effective", beta=0.99, weight_average=weight_average)
  config.augment.mixup_alpha = 0.4
  return config


def test_the_default_is_mean_and_a_wrong_value_is_one_line():
  assert classifier_kind.default_config().loss.weight_average == "mean"
  config = _config("sum")
  with pytest.raises(UserError, match="loss.weight_average"):
    classifier_kind.validate_config(config)


def test_train_step_normalizes_by_the_mixed_class_weights_of_the_batch():
  """normalized = sum_i e_i [lam_i w(y_i) L_i + (1 - lam_i) w(y'_i) L'_i] / sum_i [lam_i w(y_i)
  + (1 - lam_i) w(y'_i)]; mean divides the same sum by B. Same state, same batch: their ratio is
  B over the mixed class weights of the batch's labels and mixup partners."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(7), COUNTS).astype(np.int32)
  images = rng.integers(0, 256, (len(labels), 24, 24, 1), dtype=np.uint8)
  mesh = parallel.make_mesh(1)
  loss = {}
  for mode in ("mean", "normalized"):
    config = _config(mode)
    classifier_kind.validate_config(config)
    model = resnet.model_from_config(config.model, 7)
    tx, _ = classifier_kind.make_optimizer(config, 4)
    state = classifier_kind.init_state(config, model, tx, mesh)
    data = classifier.device_data(config, images, labels, 7, mesh)
    step = classifier.make_train_step(config, model, tx, COUNTS, 4, mesh, jit=False)
    loss[mode] = float(jax.jit(step)(state, data)[1]["loss"])
    # The batch and the mixup draws of step 0, as the train step makes them.
    batch_key, mixup_key = jax.random.split(
        jax.random.fold_in(classifier_kind.rng_streams(config.seed).train, 0))
    batch_images, batch_labels, _ = jax.jit(
        classifier.batch_maker(config, data, num_steps=4, mesh=mesh))(batch_key, 0)
    _, partners, lam = pipeline.mixup(mixup_key, batch_images, batch_labels, 0.4)
  w = losses.class_weights(COUNTS, "effective", 0.99)
  lam = np.asarray(lam, np.float64)
  mixed = np.sum(lam * w[np.asarray(batch_labels)] + (1 - lam) * w[np.asarray(partners)])
  assert not np.isclose(mixed, 16)  # The test tells the two apart.
  assert loss["normalized"] == pytest.approx(loss["mean"] * 16 / mixed, rel=1e-4)
