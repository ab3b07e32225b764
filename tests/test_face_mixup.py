"""SSFER's IoU-weighted face mixup (augment.face_mixup_alpha): face boxes moved with each image's
augmentation (ferjax.data.pipeline.augment_one_with_box), their IoU, the loss
(ferjax.losses.face_mixup_loss), a real train step and the config refusals."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp

from ferjax import losses
from ferjax.core import parallel
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.models import resnet
from ferjax.train import classifier
from ferjax.kinds import classifier_batches

FRAME = np.array([0.0, 0.0, 20.0, 20.0], np.float32)  # A 20 x 20 image's whole frame.


def _augment(**fields):
  base = dict(crop="none", crop_padding=4, resized_crop_scale=(0.5, 1.0), flip=False,
              rotation_deg=0.0, erasing_prob=0.0, erasing_scale=(0.02, 0.33))
  return ml_collections.ConfigDict({**base, **fields})


def _iou(a, b):
  return float(pipeline.box_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


# --- Boxes and their IoU, by hand ----------------------------------------------------------------
def test_iou_of_identical_disjoint_and_partly_overlapping_boxes():
  assert _iou([2, 3, 8, 10], [2, 3, 8, 10]) == pytest.approx(1.0)
  assert _iou([0, 0, 5, 5], [5, 0, 10, 5]) == 0.0  # Touching edges: no overlap.
  assert _iou([0, 0, 4, 4], [10, 10, 12, 12]) == 0.0
  assert _iou([0, 0, 4, 4], [2, 0, 6, 4]) == pytest.approx(8 / 24)
  assert _iou([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0  # An empty union is 0, not NaN.


def test_a_horizontal_flip_mirrors_an_off_centre_box():
  flipped = np.asarray(pipeline._flip_box(jnp.asarray([2.0, 3.0, 8.0, 10.0]), 20, True))
  np.testing.assert_allclose(flipped, [12, 3, 18, 10])
  assert _iou(flipped, [2, 3, 8, 10]) == 0.0  # The face moved across: no overlap.
  # [4, 12] on a 20 px row mirrors to [8, 16]: overlap 4 of 8 + 8 - 4 columns.
  assert _iou(pipeline._flip_box(jnp.asarray([4.0, 0.0, 12.0, 10.0]), 20, True),
              [4, 0, 12, 10]) == pytest.approx(1 / 3)
  unflipped = pipeline._flip_box(jnp.asarray([2.0, 3.0, 8.0, 10.0]), 20, False)
  np.testing.assert_allclose(unflipped, [2, 3, 8, 10])


def test_a_pad_crop_shifts_the_frame_and_clips_it():
  # Offset (dy, dx) = (1, 6) in the 4-px padded image: content moves 3 px down, 2 px left.
  box = np.asarray(pipeline._pad_crop_box(jnp.asarray(FRAME), 1, 6, 4, 20, 20))
  np.testing.assert_allclose(box, [0, 3, 18, 20])
  assert _iou(box, FRAME) == pytest.approx(18 * 17 / 400)


def test_a_resized_crop_scales_the_box_about_the_crop():
  # Crop rows 5..15, columns 2..10 of a 20 x 20 image, resized back to 20 x 20 (x2, x2.5).
  box = pipeline._resized_crop_box(jnp.asarray([4.0, 7.0, 8.0, 13.0]), 5.0, 2.0, 10.0, 8.0,
                                   20, 20)
  np.testing.assert_allclose(np.asarray(box), [5, 4, 15, 16], atol=1e-5)
  assert _iou(box, FRAME) == pytest.approx(0.3)
  whole = pipeline._resized_crop_box(jnp.asarray(FRAME), 5.0, 2.0, 10.0, 8.0, 20, 20)
  np.testing.assert_allclose(np.asarray(whole), FRAME)  # The frame overfills: clipped.


def test_a_rotation_gives_the_clipped_bounding_box_of_the_corners():
  # A quarter turn about the centre (10, 10): [4, 6, 8, 12] -> x from y, y from x.
  box = pipeline._rotate_box(jnp.asarray([4.0, 6.0, 8.0, 12.0]), np.pi / 2, 20, 20)
  np.testing.assert_allclose(np.asarray(box), [6, 12, 12, 16], atol=1e-4)
  box = pipeline._rotate_box(jnp.asarray(FRAME), np.pi / 4, 20, 20)
  np.testing.assert_allclose(np.asarray(box), FRAME, atol=1e-4)


# --- The box follows the image's own draws -------------------------------------------------------
@pytest.mark.parametrize("fields,tolerance", [
    (dict(crop="pad", crop_padding=3, flip=True, rotation_deg=20.0), 1.5),
    (dict(crop="resized", flip=True), 1.0),
])
def test_the_box_bounds_the_augmented_face(fields, tolerance):
  """A bright rectangle is the 'face': after augmentation its box is where it went."""
  box = np.array([8.0, 9.0, 15.0, 14.0], np.float32)  # Off-centre, away from the edges.
  image = -np.ones((24, 24, 1), np.float32)
  image[9:14, 8:15] = 1.0
  n = 12
  images = jnp.broadcast_to(image, (n, *image.shape))
  boxes = jnp.broadcast_to(box, (n, 4))
  out, moved = jax.jit(lambda k, x, b: pipeline.augment_batch_with_boxes(
      k, x, b, _augment(**fields)))(jax.random.key(3), images, boxes)
  for face, b in zip(np.asarray(out), np.asarray(moved)):
    rows, cols = np.nonzero(face[..., 0] > 0)
    seen = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    np.testing.assert_allclose(b, seen, atol=tolerance)


@pytest.mark.slow
def test_augment_with_box_draws_the_same_images_as_augment_one():
  configs = [_augment(crop=crop, flip=True, rotation_deg=15.0, erasing_prob=0.5)
             for crop in ("pad", "resized")]
  images = jax.random.uniform(jax.random.key(0), (6, 12, 12, 1), minval=-1, maxval=1)

  @jax.jit  # One compile for both crops.
  def both(key, x):
    return [(pipeline.augment_batch(key, x, c),
             pipeline.augment_batch_with_boxes(key, x, pipeline.frame_boxes(x), c))
            for c in configs]

  for plain, (with_boxes, boxes) in both(jax.random.key(7), images):
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_boxes))
    assert boxes.shape == (6, 4) and np.all(np.asarray(boxes) >= 0)
    assert np.all(np.asarray(boxes)[:, 2:] <= 12)


@pytest.mark.slow
def test_face_mixup_pairs_are_mixup_draws_made_out_of_place():
  images = jax.random.uniform(jax.random.key(0), (5, 4, 4, 1))
  labels = jnp.arange(5)
  boxes = jnp.asarray([[0, 0, 4, 4], [0, 0, 2, 4], [2, 0, 4, 4], [0, 0, 4, 4], [1, 1, 3, 3]],
                      jnp.float32)
  key = jax.random.key(2)
  mixed, partner, lam, iou = jax.jit(pipeline.face_mixup_pairs, static_argnums=3)(
      key, images, boxes, 1.0)
  reference, partner_labels, reference_lam = jax.jit(pipeline.mixup, static_argnums=3)(
      key, images, labels, 1.0)
  np.testing.assert_array_equal(np.asarray(mixed), np.asarray(reference))
  np.testing.assert_array_equal(np.asarray(labels[partner]), np.asarray(partner_labels))
  np.testing.assert_array_equal(np.asarray(lam), np.asarray(reference_lam))
  expected = [_iou(boxes[i], boxes[int(partner[i])]) for i in range(5)]
  np.testing.assert_allclose(np.asarray(iou), expected, rtol=1e-6)


# --- The loss -------------------------------------------------------------------------------------
def test_face_mixup_loss_is_the_published_formula():
  rng = np.random.default_rng(0)
  b, k = 7, 5
  mixed_logits, real_logits = rng.normal(size=(b, k)), rng.normal(size=(b, k))
  labels = rng.integers(0, k, b)
  partner = rng.permutation(b)
  lam, iou = rng.uniform(size=b), rng.uniform(size=b)
  ce = lambda z, y: logsumexp(z, axis=-1) - z[np.arange(len(y)), y]
  mixed_ce = lam * ce(mixed_logits, labels) + (1 - lam) * ce(mixed_logits, labels[partner])
  real_ce = ce(real_logits, labels)
  expected = (mixed_ce.sum() + ((1 - iou) * (real_ce + real_ce[partner])).sum()) / b
  f = lambda z, y: losses.cross_entropy(jnp.asarray(z, jnp.float32), jnp.asarray(y))
  per_example = losses.face_mixup_loss(
      f(mixed_logits, labels), f(mixed_logits, labels[partner]), f(real_logits, labels),
      jnp.asarray(lam, jnp.float32), jnp.asarray(iou, jnp.float32), jnp.asarray(partner))
  assert float(jnp.mean(per_example)) == pytest.approx(expected, rel=1e-5)


# --- The trainer ----------------------------------------------------------------------------------
def _config(**augment):
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.image_size = 24
  config.optim.warmup_steps = 0
  config.train.update(num_steps=2, batch_size=8, num_devices=1)
  config.augment.update(crop="pad", rotation_deg=10.0, face_mixup_alpha=1.0, **augment)
  return config


@pytest.mark.slow
def test_a_train_step_with_face_mixup_is_finite_and_reports_the_iou():
  config = _config()
  classifier_kind.validate_config(config)
  counts = np.array([12, 8, 4])
  labels = np.repeat(np.arange(3), counts).astype(np.int32)
  images = np.random.default_rng(0).integers(0, 256, (len(labels), 24, 24, 1), dtype=np.uint8)
  mesh = parallel.make_mesh(1)
  model = resnet.model_from_config(config.model, 3)
  tx, _ = classifier_kind.make_optimizer(config, 2)
  state = classifier_kind.init_state(config, model, tx, mesh)
  data = classifier_batches.device_data(config, images, labels, 3, mesh)
  step = classifier.make_train_step(config, model, tx, counts, 2, mesh)
  state, metrics = step(state, data)
  assert np.isfinite(float(metrics["loss"]))
  assert 0.0 <= float(metrics["face_mixup_iou"]) <= 1.0
  assert float(metrics["face_mixup_iou"]) < 1.0  # Shifts and rotations move the frames apart.
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))


@pytest.mark.parametrize("fields", [
    dict(augment=dict(mixup_alpha=0.4)),
    dict(model=dict(head="rul")),
    dict(augment=dict(face_mixup_alpha=-1.0)),
])
def test_face_mixup_refusals_are_one_line(fields):
  config = _config()
  for section, values in fields.items():
    config[section].update(values)
  with pytest.raises(UserError, match=r"augment\.face_mixup_alpha") as error:
    classifier_kind.validate_config(config)
  assert "\n" not in str(error.value)


def test_face_mixup_is_off_by_default():
  assert classifier_kind.default_config().augment.face_mixup_alpha == 0.0
