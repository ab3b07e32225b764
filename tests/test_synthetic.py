"""Tests for the procedurally generated synthetic FER dataset."""

import hashlib
import math
import time

import numpy as np
import pytest

from ferjax.data import synthetic
from ferjax.errors import UserError

K = len(synthetic.CLASS_NAMES)


def _hashes(ds):
  return {hashlib.sha1(im.tobytes()).hexdigest() for im in ds.images}


def test_class_names_follow_fer2013_folders():
  assert synthetic.CLASS_NAMES == ("angry", "disgust", "fear", "happy", "neutral", "sad",
                                   "surprise")
  ds = synthetic.load("test", num_examples=14)
  assert ds.class_names == synthetic.CLASS_NAMES
  assert (ds.name, ds.split) == ("synthetic", "test")


def test_same_seed_same_bytes_other_seed_other_images():
  a = synthetic.load("train", num_examples=70, seed=3)
  b = synthetic.load("train", num_examples=70, seed=3)
  c = synthetic.load("train", num_examples=70, seed=4)
  assert a.images.tobytes() == b.images.tobytes()
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not _hashes(a) & _hashes(c)


def test_splits_are_independent_draws():
  hashes = [_hashes(synthetic.load(split, num_examples=140)) for split in synthetic.SPLITS]
  assert all(len(h) == 140 for h in hashes)  # no repeats inside a split either
  assert not hashes[0] & hashes[1] and not hashes[0] & hashes[2] and not hashes[1] & hashes[2]


def test_default_sizes_and_balanced_eval_splits():
  np.testing.assert_array_equal(synthetic.class_counts("validation"), [150] * K)
  np.testing.assert_array_equal(synthetic.class_counts("test"), [300] * K)
  assert synthetic.class_counts("train").sum() == 7000
  # Not a multiple of K: as balanced as integers allow; imbalance_ratio is a train option.
  counts = synthetic.class_counts("test", 100, imbalance_ratio=10)
  assert counts.sum() == 100 and counts.max() - counts.min() == 1
  ds = synthetic.load("validation", num_examples=70)
  np.testing.assert_array_equal(ds.class_counts(), [10] * K)


def test_train_follows_rafdb_proportions():
  raf = np.array([synthetic.RAFDB_TRAIN_COUNTS[c] for c in synthetic.CLASS_NAMES], float)
  for n in (7000, 1000, 12345):
    counts = synthetic.class_counts("train", n)
    assert counts.sum() == n
    assert np.all(np.abs(counts - raf / raf.sum() * n) < 1)
  counts = synthetic.class_counts("train")
  assert counts.max() / counts.min() == pytest.approx(4772 / 281, rel=0.01)
  assert synthetic.CLASS_NAMES[np.argmax(counts)] == "happy"
  assert synthetic.CLASS_NAMES[np.argmin(counts)] == "fear"
  ds = synthetic.load("train", num_examples=300)
  np.testing.assert_array_equal(ds.class_counts(), synthetic.class_counts("train", 300))


@pytest.mark.parametrize("ratio", [1, 5, 10.0, 50])
def test_imbalance_ratio_gives_geometric_profile(ratio):
  counts = synthetic.class_counts("train", 7000, imbalance_ratio=ratio)
  assert counts.sum() == 7000
  assert counts.max() / counts.min() == pytest.approx(ratio, rel=0.03)
  by_frequency = [counts[synthetic.CLASS_NAMES.index(c)] for c in synthetic.FREQUENCY_ORDER]
  assert by_frequency == sorted(by_frequency, reverse=True)


def test_every_class_keeps_an_example():
  counts = synthetic.class_counts("train", K, imbalance_ratio=1000)
  np.testing.assert_array_equal(counts, [1] * K)
  assert synthetic.class_counts("train", 10).min() >= 1


def test_label_noise_flips_that_fraction_of_train_labels_only():
  clean = synthetic.load("train", num_examples=1000, seed=1)
  noisy = synthetic.load("train", num_examples=1000, seed=1, label_noise=0.2)
  assert clean.images.tobytes() == noisy.images.tobytes()  # images keep their expression
  assert np.mean(clean.labels != noisy.labels) == pytest.approx(0.2, abs=0.01)
  again = synthetic.load("train", num_examples=1000, seed=1, label_noise=0.2)
  np.testing.assert_array_equal(noisy.labels, again.labels)
  for split in ("validation", "test"):
    a = synthetic.load(split, num_examples=70, seed=1)
    b = synthetic.load(split, num_examples=70, seed=1, label_noise=0.5)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("size", [32, 48, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(size, channels):
  ds = synthetic.load("test", image_size=size, channels=channels, num_examples=14)
  assert ds.images.shape == (14, size, size, channels) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (14,) and ds.labels.dtype == np.int32


def test_gray_is_luma_of_colour():
  gray = synthetic.load("test", channels=1, num_examples=14).images[..., 0].astype(float)
  rgb = synthetic.load("test", channels=3, num_examples=14).images.astype(float)
  luma = rgb @ [0.299, 0.587, 0.114]
  unclipped = ((rgb > 0) & (rgb < 255)).all(-1)  # clipping happens per channel
  assert unclipped.mean() > 0.5
  assert np.abs(gray - luma)[unclipped].max() <= 1.5  # both rounded to uint8
  assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 5  # colour is not gray repeated


def test_images_have_content():
  ds = synthetic.load("test", num_examples=700, seed=2)
  images = ds.images[..., 0].astype(np.float32)
  assert images.std(axis=(1, 2)).min() > 3  # no blank images
  assert len(np.unique(images.mean(axis=(1, 2)))) > 600  # backgrounds and lighting vary


def _one_identity(labels, seed=0):
  """Expression parameters for `labels`, all on the same upright, unoccluded face."""
  rng = np.random.default_rng(seed)
  params = synthetic.sample_expression_params(labels, rng)
  face = synthetic.sample_nuisance_params(1, rng)
  face.update(angle=np.zeros(1, np.float32), occluded=np.zeros(1, bool))
  params.update({k: np.repeat(v, len(labels), 0) for k, v in face.items()})
  return params


def test_per_class_mean_faces_differ_most_between_distinct_expressions():
  # Nuisances (lighting, pose, background) dominate raw per-class means of a split, so
  # compare classes on one identity: only the expression features vary.
  labels = np.repeat(np.arange(K), 100)
  images = synthetic.render_faces(_one_identity(labels), 48, 1)[..., 0].astype(np.float32)
  means = np.stack([images[labels == k].mean(0) for k in range(K)])
  halves = [np.abs(images[labels == k][:50].mean(0) - images[labels == k][50:].mean(0)).mean()
            for k in range(K)]
  name = {c: i for i, c in enumerate(synthetic.CLASS_NAMES)}
  diff = lambda a, b: np.abs(means[name[a]] - means[name[b]]).mean()
  pairs = [diff(a, b) for a in name for b in name if a < b]
  assert min(pairs) > max(halves)  # every class has its own mean face
  # The confusable pairs are closer than clearly different expressions.
  assert diff("neutral", "sad") < diff("happy", "surprise")
  assert diff("angry", "disgust") < diff("angry", "surprise")
  assert diff("fear", "surprise") < diff("fear", "angry")


@pytest.mark.parametrize("options, field", [
    (dict(split="val"), "split"),
    (dict(image_size=8), "image_size"),
    (dict(image_size=48.5), "image_size"),
    (dict(channels=2), "channels"),
    (dict(num_examples=3), "num_examples"),
    (dict(num_examples="100"), "num_examples"),
    (dict(seed=-1), "seed"),
    (dict(imbalance_ratio=0.5), "imbalance_ratio"),
    (dict(imbalance_ratio=float("nan")), "imbalance_ratio"),
    (dict(label_noise=1.0), "label_noise"),
    (dict(label_noise=-0.1), "label_noise"),
    (dict(labelnoise=0.1), "labelnoise"),
])
def test_bad_options_raise_one_line_user_error(options, field):
  options = {"split": "train", "num_examples": 14, **options}
  with pytest.raises(UserError) as info:
    synthetic.load(options.pop("split"), **options)
  message = str(info.value)
  assert field in message and "\n" not in message


def test_class_counts_validates_too():
  with pytest.raises(UserError, match="split"):
    synthetic.class_counts("dev")
  with pytest.raises(UserError, match="imbalance_ratio"):
    synthetic.class_counts("train", imbalance_ratio=0)


def test_through_ferjax_data_load():
  from ferjax.data import load
  ds = load("synthetic", "train", image_size=32, channels=3, num_examples=21, seed=5)
  assert ds.images.shape == (21, 32, 32, 3)
  direct = synthetic.load("train", image_size=32, channels=3, num_examples=21, seed=5)
  assert ds.images.tobytes() == direct.images.tobytes()


def test_generation_over_several_chunks_is_exact_and_deterministic():
  """Rendering works in chunks of images: a split spanning several (the last one partial) has
  every image, the same bytes again, and each face independent of the chunk that drew it.
  Speed is measured by benchmarks, not asserted here; the rate printed is for information."""
  n = 150  # about 2.3 chunks at 48x48
  start = time.perf_counter()
  ds = synthetic.load("train", num_examples=n, seed=7)
  rate = n / (time.perf_counter() - start)
  assert math.isfinite(rate) and rate > 0
  print(f"synthetic: {rate:.0f} images/s (48x48 gray)")
  assert ds.images.shape == (n, 48, 48, 1) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (n,) and len(_hashes(ds)) == n
  assert ds.images.tobytes() == synthetic.load("train", num_examples=n, seed=7).images.tobytes()

  rng = np.random.default_rng(0)
  params = synthetic.sample_expression_params(np.arange(n) % K, rng)
  params.update(synthetic.sample_nuisance_params(n, rng))
  whole = synthetic.render_faces(params, 48, 1)
  parts = [synthetic.render_faces({k: v[i:i + 50] for k, v in params.items()}, 48, 1)
           for i in range(0, n, 50)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))
