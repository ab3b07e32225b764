"""The device-side input pipeline (ferjax.data.pipeline): balancing samplers and per-example
augmentations."""

import types

import jax
import jax.numpy as jnp
import numpy as np

from ferjax.data import pipeline
from ferjax.kinds import classifier as classifier_kind


# --- Balancing policies --------------------------------------------------------------------------
COUNTS = np.array([400, 200, 100, 50, 25, 10, 5])
LABELS = np.repeat(np.arange(7), COUNTS).astype(np.int32)


def _class_frequencies(sampler, step=0, num_steps=100, draws=40_000):
  index = pipeline.class_index(jnp.asarray(LABELS), 7)
  sample = jax.jit(lambda key: pipeline.sample_indices(
      key, step, sampler=sampler, index=index, class_counts=index[2], batch_size=draws,
      num_steps=num_steps))
  indices = np.asarray(sample(jax.random.key(0)))
  return np.bincount(LABELS[indices], minlength=7) / draws


def test_instance_sampling_follows_class_frequencies():
  np.testing.assert_allclose(_class_frequencies("instance"), COUNTS / COUNTS.sum(), atol=0.01)


def test_class_balanced_sampling_draws_classes_uniformly():
  np.testing.assert_allclose(_class_frequencies("class_balanced"), np.full(7, 1 / 7), atol=0.01)


def test_square_root_sampling():
  root = np.sqrt(COUNTS)
  np.testing.assert_allclose(_class_frequencies("sqrt"), root / root.sum(), atol=0.01)


def test_progressive_sampling_moves_from_instance_to_balanced():
  np.testing.assert_allclose(_class_frequencies("progressive", step=0), COUNTS / COUNTS.sum(),
                             atol=0.01)
  np.testing.assert_allclose(_class_frequencies("progressive", step=99), np.full(7, 1 / 7),
                             atol=0.01)
  halfway = np.asarray(pipeline.sampler_class_probs("progressive", COUNTS, 0.5))
  np.testing.assert_allclose(halfway, 0.5 * COUNTS / COUNTS.sum() + 0.5 / 7, rtol=1e-5)


def test_sampling_within_a_class_is_uniform():
  index = pipeline.class_index(jnp.asarray(LABELS), 7)
  indices = np.asarray(pipeline.sample_indices(
      jax.random.key(1), 0, sampler="class_balanced", index=index, class_counts=index[2],
      batch_size=70_000, num_steps=1))
  rare = indices[LABELS[indices] == 6]  # the 5 examples of the rarest class
  np.testing.assert_allclose(np.bincount(rare - rare.min(), minlength=5) / len(rare),
                             np.full(5, 0.2), atol=0.02)


def test_random_oversampling_balances_every_epoch_and_keeps_every_example():
  order = pipeline.oversampled_order(LABELS, 7, seed=0)
  assert len(order) == 7 * COUNTS.max()
  np.testing.assert_array_equal(np.bincount(LABELS[order], minlength=7), np.full(7, COUNTS.max()))
  assert set(order.tolist()) == set(range(len(LABELS)))
  # Whole repeats plus a remainder drawn without replacement: counts differ by at most one.
  per_example = np.bincount(order, minlength=len(LABELS))
  for k in range(7):
    members = per_example[LABELS == k]
    assert members.max() - members.min() <= 1
  # Walking epochs batch by batch: one epoch is exactly a permutation of the over-sampled set,
  # and a batch straddling two epochs is computed the same way as any other (resume-exact).
  batch, length = 100, len(order)
  walk = jax.jit(lambda step: pipeline.sample_epochs(jax.random.key(3), jnp.asarray(order), step,
                                                     batch))
  first_epoch = np.concatenate([np.asarray(walk(s)) for s in range(length // batch)])
  np.testing.assert_array_equal(np.sort(first_epoch), np.sort(order))
  np.testing.assert_array_equal(np.asarray(walk(5)), np.asarray(walk(5)))


# --- Augmentation ------------------------------------------------------------------------------
def _image(seed=0, size=16, channels=1):
  return jax.random.uniform(jax.random.key(seed), (size, size, channels), minval=-1, maxval=1)


def test_random_crop_is_a_shifted_window_of_the_reflect_padded_image():
  image = _image()
  np.testing.assert_array_equal(pipeline.random_crop_one(jax.random.key(0), image, 0), image)
  padded = np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0)), mode="reflect")
  windows = [padded[dy:dy + 16, dx:dx + 16] for dy in range(9) for dx in range(9)]
  for seed in range(5):
    crop = np.asarray(pipeline.random_crop_one(jax.random.key(seed), image, 4))
    assert crop.shape == image.shape
    assert any(np.array_equal(crop, w) for w in windows)


def test_rotation_by_a_quarter_turn_is_rot90_and_zero_is_identity():
  image = _image(size=9)
  np.testing.assert_allclose(pipeline.rotate(image, 0.0), image, atol=1e-5)
  np.testing.assert_allclose(pipeline.rotate(image, np.pi / 2), np.rot90(np.asarray(image)),
                             atol=1e-5)
  np.testing.assert_array_equal(pipeline.random_rotation_one(jax.random.key(0), image, 0), image)


def test_resized_crop_of_the_whole_image_is_the_identity():
  image = _image()
  same = pipeline.random_resized_crop_one(jax.random.key(0), image, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(same, image, atol=1e-5)
  crop = pipeline.random_resized_crop_one(jax.random.key(1), image, (0.3, 0.5))
  assert crop.shape == image.shape
  assert float(crop.min()) >= float(image.min()) - 1e-6
  assert float(crop.max()) <= float(image.max()) + 1e-6


def test_random_erasing_sets_one_box_and_leaves_the_rest():
  image = _image(size=32) * 0.5 + 0.5  # strictly positive: the erased value 0 stands out
  np.testing.assert_array_equal(pipeline.random_erasing_one(jax.random.key(0), image, 0.0), image)
  for seed in range(5):
    erased = np.asarray(pipeline.random_erasing_one(jax.random.key(seed), image, 1.0))[..., 0]
    rows, cols = np.nonzero(erased == 0)
    assert len(rows) > 0
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    assert np.all(erased[box] == 0)  # one solid rectangle
    assert 0.02 * 32 * 32 * 0.5 <= len(rows) <= 0.33 * 32 * 32 * 1.5
    outside = np.ones_like(erased, bool)
    outside[box] = False
    np.testing.assert_array_equal(erased[outside], np.asarray(image)[..., 0][outside])


def _mirrored(images, out):
  """Per example: True if `out` is the horizontal mirror of `images`, False if unchanged."""
  images, out = np.asarray(images), np.asarray(out)
  kept = np.all(out == images, axis=(1, 2, 3))
  mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(kept ^ mirrored)  # each output is exactly one of the two
  return mirrored


def test_flip_mirrors_some_examples_and_keeps_the_others():
  images = jax.random.uniform(jax.random.key(0), (32, 8, 8, 3))  # no image is its own mirror
  mirrored = _mirrored(images, pipeline.random_flip(jax.random.key(1), images))
  assert 0 < mirrored.sum() < len(mirrored)
  singles = np.stack([pipeline.flip_one(jax.random.key(seed), image)
                      for seed, image in enumerate(images[:16])])
  mirrored = _mirrored(images[:16], singles)
  assert 0 < mirrored.sum() < 16


def test_augment_batch_flips_only_when_enabled():
  # No crop, rotation or erasing: flipping is the only change augment_batch can make.
  config = types.SimpleNamespace(crop="none", flip=True, rotation_deg=0.0, erasing_prob=0.0)
  images = jax.random.uniform(jax.random.key(0), (32, 8, 8, 1))
  mirrored = _mirrored(images, pipeline.augment_batch(jax.random.key(1), images, config))
  assert 0 < mirrored.sum() < len(mirrored)
  config.flip = False
  out = pipeline.augment_batch(jax.random.key(1), images, config)
  assert not _mirrored(images, out).any()


def test_mixup_is_a_per_example_convex_combination():
  images = jax.random.uniform(jax.random.key(0), (8, 4, 4, 1))
  labels = jnp.arange(8)
  mixed, partner_labels, lam = jax.jit(pipeline.mixup, static_argnums=3)(
      jax.random.key(1), images, labels, 0.4)
  assert mixed.shape == images.shape and lam.shape == (8,)
  assert np.all((lam >= 0) & (lam <= 1))
  partner = np.asarray(partner_labels)  # labels are the example indices here
  expected = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[partner]
  np.testing.assert_allclose(mixed, expected, rtol=1e-5)
  assert sorted(partner.tolist()) == list(range(8))


def test_augment_batch_keeps_shape_dtype_and_range():
  config = classifier_kind.default_config().augment
  config.update(crop="resized", rotation_deg=10.0, erasing_prob=0.5)
  images = jax.random.uniform(jax.random.key(0), (6, 32, 32, 3), minval=-1, maxval=1)
  out = jax.jit(lambda k, x: pipeline.augment_batch(k, x, config))(jax.random.key(1), images)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert float(jnp.abs(out).max()) <= 1.0 + 1e-5
