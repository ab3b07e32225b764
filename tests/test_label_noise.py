"""The noisy-label protocol (`data.label_noise`, ferjax.data.splits): symmetric noise on the
labels that train only, at the given rate, the same flips for every method at one seed, the
validation split (named or held out) clean, the true labels kept in extras["clean_label"]; the
synthetic set keeps its generator's own noise."""

import numpy as np
import pytest

from ferjax.data import folder, splits, synthetic
from ferjax.data.dataset import Dataset
from ferjax.kinds import classifier as classifier_kind

NAMES = ("angry", "happy", "neutral", "sad")
COUNTS = (40, 30, 20, 10)


def data_group(**changes):
  data = classifier_kind.default_config().data
  data.update(image_size=16, channels=1, **changes)
  return data


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
  """A folder dataset: train (COUNTS per class) and validation (5 per class), 16 px gray."""
  root = tmp_path_factory.mktemp("noisy_folder")
  rng = np.random.default_rng(0)
  for split, counts in (("train", COUNTS), ("validation", (5,) * len(NAMES))):
    labels = np.repeat(np.arange(len(NAMES)), counts).astype(np.int32)
    images = rng.integers(0, 256, (len(labels), 16, 16, 1), dtype=np.uint8)
    folder.write(root, split, images, labels, NAMES)
  return root


def folder_data(root, **changes):
  return data_group(name="folder", manual_dir=str(root), **changes)


def flipped(ds) -> np.ndarray:
  return ds.labels != ds.extras["clean_label"]


def test_label_noise_is_symmetric_seeded_and_at_its_rate():
  labels = np.repeat(np.arange(5), [400, 200, 100, 50, 50]).astype(np.int32)
  ds = Dataset(np.zeros((len(labels), 2, 2, 1), np.uint8), labels, tuple("abcde"))
  noisy = splits.label_noise(ds, 0.3, seed=4)
  assert flipped(noisy).sum() == round(0.3 * len(ds))  # The rate, to rounding.
  np.testing.assert_array_equal(noisy.extras["clean_label"], labels)
  assert noisy.labels.dtype == np.int32 and noisy.labels.min() >= 0 and noisy.labels.max() < 5
  # Symmetric: every other class receives flips, from every class in proportion to its size.
  moved = noisy.labels[flipped(noisy)]
  assert set(moved.tolist()) == set(range(5))
  np.testing.assert_array_equal(splits.label_noise(ds, 0.3, seed=4).labels, noisy.labels)
  assert not np.array_equal(splits.label_noise(ds, 0.3, seed=5).labels, noisy.labels)
  assert np.array_equal(splits.label_noise(ds, 0.0, seed=4).labels, labels)
  # Noise on noise keeps the first truth.
  twice = splits.label_noise(noisy, 0.1, seed=9)
  np.testing.assert_array_equal(twice.extras["clean_label"], labels)


def test_folder_dataset_named_validation_stays_clean(folder_root):
  clean_train, clean_val = splits.load_splits(folder_data(folder_root), seed=0)
  train, val = splits.load_splits(folder_data(folder_root, label_noise=0.25), seed=0)
  assert "clean_label" not in clean_train.extras  # No noise asked: nothing added.
  np.testing.assert_array_equal(train.extras["clean_label"], clean_train.labels)
  np.testing.assert_array_equal(train.extras["index"], clean_train.extras["index"])
  assert flipped(train).sum() == round(0.25 * len(train))
  np.testing.assert_array_equal(val.labels, clean_val.labels)  # The named split: untouched.
  assert "clean_label" not in val.extras
  again, _ = splits.load_splits(folder_data(folder_root, label_noise=0.25), seed=0)
  other, _ = splits.load_splits(folder_data(folder_root, label_noise=0.25), seed=1)
  np.testing.assert_array_equal(again.labels, train.labels)  # Every method, one seed: same.
  assert not np.array_equal(other.labels, train.labels)  # Another seed: other flips.


def test_folder_dataset_holdout_is_taken_with_true_labels(folder_root, capsys):
  clean_train, clean_val = splits.load_splits(folder_data(folder_root, val_split=None), seed=2)
  train, val = splits.load_splits(folder_data(folder_root, val_split=None, label_noise=0.4),
                                  seed=2)
  # The same hold-out as without noise, with its true labels, and no held-out example trains.
  np.testing.assert_array_equal(val.extras["index"], clean_val.extras["index"])
  np.testing.assert_array_equal(val.labels, clean_val.labels)
  assert not np.intersect1d(val.extras["index"], train.extras["index"]).size
  np.testing.assert_array_equal(train.extras["clean_label"], clean_train.labels)
  assert flipped(train).sum() == round(0.4 * len(train))
  assert f"{flipped(train).sum()} of {len(train)} train labels flipped" in capsys.readouterr().out


def test_noise_after_class_selection_and_long_tail(folder_root):
  data = folder_data(folder_root, classes="-sad", imbalance_ratio=2.0, label_noise=0.5)
  train, val = splits.load_splits(data, seed=0)
  assert train.num_classes == 3 and train.labels.max() < 3
  assert flipped(train).sum() == round(0.5 * len(train))
  assert val.labels.max() < 3 and "clean_label" not in val.extras


def test_synthetic_set_keeps_its_generator_noise():
  data = data_group(num_examples=300, label_noise=0.2)
  train, val = splits.load_splits(data, seed=0)
  generated = synthetic.load("train", image_size=16, num_examples=300, label_noise=0.2)
  clean = synthetic.load("train", image_size=16, num_examples=300)
  np.testing.assert_array_equal(train.labels, generated.labels)  # The generator's own flips,
  np.testing.assert_array_equal(train.extras["clean_label"], clean.labels)  # its true labels,
  np.testing.assert_array_equal(splits.load_splits(data, seed=5)[0].labels, train.labels)
  np.testing.assert_array_equal(val.labels, synthetic.load("validation", image_size=16).labels)
  # With an imbalance profile too (the true labels are the generator's first stream).
  data = data_group(num_examples=300, imbalance_ratio=10.0, label_noise=0.3)
  train, _ = splits.load_splits(data, seed=0)
  clean = synthetic.load("train", image_size=16, num_examples=300, imbalance_ratio=10.0)
  np.testing.assert_array_equal(train.extras["clean_label"], clean.labels)
  assert flipped(train).sum() == round(0.3 * 300)


def test_synthetic_holdout_is_clean_and_classes_renumber_the_truth():
  data = data_group(num_examples=280, label_noise=0.3, val_split=None)
  train, val = splits.load_splits(data, seed=0)
  np.testing.assert_array_equal(val.labels, val.extras["clean_label"])
  assert flipped(train).any()
  data = data_group(num_examples=280, label_noise=0.3, classes="-disgust")
  train, _ = splits.load_splits(data, seed=0)
  truth = train.extras["clean_label"]
  assert train.num_classes == 6 and truth.max() < 6 and truth.min() >= -1
  kept = truth >= 0  # -1: a true disgust face kept for its noisy label.
  assert np.mean(train.labels[kept] != truth[kept]) > 0.2
  data = data_group(num_examples=280, label_noise=0.3, val_split=None, classes="-disgust")
  train, val = splits.load_splits(data, seed=0)
  assert val.labels.min() >= 0 and np.array_equal(val.labels, val.extras["clean_label"])
  assert (train.extras["clean_label"] < 0).any()  # Dropped-class truths stay in train.


def test_joint_run_carries_each_members_truth(folder_root):
  data = folder_data(folder_root, label_noise=0.2, num_examples=140)
  data.update(name="joint", datasets="folder,synthetic")
  joint, vals = splits.load_splits(data, seed=0)
  truth = joint.extras["clean_label"]
  assert truth.shape == joint.labels.shape and truth.min() >= 0
  for name in ("folder", "synthetic"):
    rows = joint.extras["dataset"] == name
    assert 0 < np.sum(joint.labels[rows] != truth[rows]) <= round(0.2 * rows.sum()) + 1
  assert all("clean_label" not in v.extras for v in vals)


# --- data.label_fraction: the semi-supervised protocol's labelled subset ------------------------
def test_labelled_subset_is_stratified_seeded_and_keeps_one_per_class():
  labels = np.repeat(np.arange(4), (100, 40, 10, 1))
  labelled, pool = splits.labelled_subset(labels, 0.1, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[labelled], minlength=4), [10, 4, 1, 1])
  assert np.intersect1d(labelled, pool).size == 0 and len(labelled) + len(pool) == len(labels)
  again, _ = splits.labelled_subset(labels, 0.1, seed=3)
  other, _ = splits.labelled_subset(labels, 0.1, seed=4)
  np.testing.assert_array_equal(labelled, again)
  assert not np.array_equal(labelled, other)


def test_label_fraction_cuts_train_after_the_hold_out_and_leaves_validation_whole(folder_root):
  full_train, full_val = splits.load_splits(folder_data(folder_root, val_split=None), seed=0)
  train, val = splits.load_splits(folder_data(folder_root, val_split=None, label_fraction=0.25),
                                  seed=0)
  np.testing.assert_array_equal(val.extras["index"], full_val.extras["index"])  # Same hold-out.
  counts = np.bincount(full_train.labels, minlength=len(NAMES))
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=len(NAMES)),
                                np.maximum(1, np.round(0.25 * counts)))
  assert set(train.extras["index"]) <= set(full_train.extras["index"])
  again, _ = splits.load_splits(folder_data(folder_root, val_split=None, label_fraction=0.25),
                                seed=0)
  np.testing.assert_array_equal(again.extras["index"], train.extras["index"])


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_label_fraction_outside_0_1_is_refused(value):
  from ferjax import configs
  from ferjax.errors import UserError
  config = classifier_kind.default_config()
  config.data.label_fraction = value
  with pytest.raises(UserError, match="data.label_fraction"):
    configs.check_spec(config, classifier_kind.SPEC)
