"""The TFDS builders: tiny fixtures in each dataset's real layout, prepared and read back without
TensorFlow, every bad-input case, and (when present) the real FER-2013 folders."""

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ferjax
from ferjax.data import builders
from ferjax.data.builders import ckplus as ckplus_module
from ferjax.data.builders import fer2013 as fer2013_module
from ferjax.data.builders import ferplus as ferplus_module
from ferjax.data import splits
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import vaegan as vaegan_kind

FER_CLASSES = fer2013_module.CLASS_NAMES


# ---------------------------------------------------------------------------------------------
# Fixture writers (each dataset's real layout, a few images per class)
# ---------------------------------------------------------------------------------------------


def write_image(path: Path, value: int, size=(48, 48), mode="L", fmt=None):
  """A constant image (value identifies it after a lossless round trip)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  color = value if mode == "L" else (value, 255 - value, (value * 7) % 256)
  Image.new(mode, size, color).save(path, format=fmt)


def make_fer_folders(root: Path, per_class=2, test_prefixes=("PublicTest", "PrivateTest")):
  """Kaggle layout; train PNG (lossless), test JPEG. Returns {(split, label): [values]}."""
  expected = {}
  value = 10
  for label, name in enumerate(FER_CLASSES):
    for i in range(per_class):
      write_image(root / "train" / name / f"Training_{value}.png", value)
      expected.setdefault(("train", label), []).append(value)
      value += 3
    for prefix in test_prefixes:
      write_image(root / "test" / name / f"{prefix}_{value}.jpg", value)
      split = "validation" if prefix == "PublicTest" else "test"
      expected.setdefault((split, label), []).append(value)
      value += 3
  return expected


FER_CSV_HEADER = ["emotion", "pixels", "Usage"]


def write_fer_csv(path: Path, rows):
  """rows: (emotion, pixel value or explicit pixel string, usage)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(FER_CSV_HEADER)
    for emotion, pixels, usage in rows:
      if isinstance(pixels, int):
        pixels = " ".join([str(pixels)] * 2304)
      w.writerow([emotion, pixels, usage])


def fer_csv_rows():
  """Every CSV emotion in every usage; pixel value = 10 * emotion + usage index."""
  usages = ["Training", "PublicTest", "PrivateTest"]
  return [(e, 10 * e + u, usage) for u, usage in enumerate(usages) for e in range(7)
          for _ in range(2 if usage == "Training" else 1)]


def make_rafdb(root: Path, per_class=(2, 1)):
  labels = root / "EmoLabel" / "list_patition_label.txt"
  labels.parent.mkdir(parents=True)
  lines = []
  n = 0
  for split, count in zip(("train", "test"), per_class):
    for label in range(1, 8):
      for _ in range(count):
        n += 1
        name = f"{split}_{n:05d}.jpg"
        write_image(root / "Image" / "aligned" / f"{split}_{n:05d}_aligned.jpg", 20 * label,
                    size=(100, 100), mode="RGB", fmt="JPEG")
        lines.append(f"{name} {label}")
  # One image in another size and format: converted at prepare time.
  write_image(root / "Image" / "aligned" / "train_00001_aligned.jpg", 20, size=(90, 90),
              mode="L", fmt="PNG")
  labels.write_text("\n".join(lines) + "\n")
  return lines


AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal"]


def make_affectnet(root: Path, per_class=(2, 1)):
  """Images 80x60 with a red 40x40 'face' at (20, 10), each a slightly different red;
  expressions 0..10 (8..10 dropped)."""
  for split, csv_name, count in (("train", "training.csv", per_class[0]),
                                 ("validation", "validation.csv", per_class[1])):
    rows = []
    for expression in range(11):
      for i in range(count):
        rel = f"{expression + 1}/{split}_{expression}_{i}.jpg"
        path = root / "Manually_Annotated_Images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (80, 60), (0, 0, 255))
        img.paste((255 - 3 * (expression * count + i), 0, 0), (20, 10, 60, 50))
        img.save(path, quality=95)
        rows.append([rel, 20, 10, 40, 40, "1.0;2.0", expression, 0.1, -0.2])
    with open(root / csv_name, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(AFFECTNET_HEADER)
      w.writerows(rows)


def make_ckplus(root: Path, subjects=12):
  """Subject s has one sequence in class s % 7 with 2 frames. Returns [(subject, label)]."""
  out = []
  for s in range(1, subjects + 1):
    label = s % 7
    for frame in (11, 12):
      write_image(root / ckplus_module.CLASS_NAMES[label] / f"S{s:03d}_001_{frame:08d}.png",
                  s * 10, fmt="PNG")
      out.append((s, label))
  return out


def counts(ds):
  return dict(zip(ds.class_names, ds.class_counts().tolist()))


def assert_clean(data_dir: Path):
  """Nothing half-written: no dataset dirs, no staging dirs (a lock file may stay)."""
  leftovers = [p.name for p in data_dir.iterdir() if not p.name.endswith(".lock")] \
      if data_dir.exists() else []
  assert leftovers == [], leftovers


# ---------------------------------------------------------------------------------------------
# FER-2013
# ---------------------------------------------------------------------------------------------


def test_fer2013_folders_prepare_and_load(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  expected = make_fer_folders(manual)
  sizes = builders.prepare("fer2013", manual, data)
  assert sizes == {"train": 14, "validation": 7, "test": 7}  # Disjoint: Public vs Private.
  assert builders.available_splits("fer2013", data) == ("train", "validation", "test")
  for split in ("train", "validation", "test"):
    ds = builders.load_prepared("fer2013", split, data)
    assert ds.class_names == FER_CLASSES and ds.name == "fer2013" and ds.split == split
    assert ds.images.shape == (sizes[split], 48, 48, 1) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32
    got = sorted((int(l), int(round(float(im.mean())))) for im, l in zip(ds.images, ds.labels))
    want = sorted((l, v) for (s, l), vs in expected.items() if s == split for v in vs)
    assert got == want
    if split == "train":  # PNG: exact pixels, constant images.
      assert all(im.min() == im.max() for im in ds.images)


def test_with_several_processes_the_train_split_stays_on_disk(tmp_path, monkeypatch):
  """A multi-process run reads only its own train rows (LazyImages, then put_rows); the
  hold-out it validates on and the other splits are read into memory, equal to one process's."""
  import jax
  from ferjax.data import LazyImages
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=4)
  builders.prepare("fer2013", manual, data)
  config = classifier_kind.default_config()
  config.data.update(name="fer2013", data_dir=str(data), val_split=None, val_fraction=0.25)
  one_train, one_held = splits.load_splits(config.data, config.seed)
  assert isinstance(one_train.images, np.ndarray)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  train, held = splits.load_splits(config.data, config.seed)
  assert isinstance(train.images, LazyImages) and isinstance(held.images, np.ndarray)
  np.testing.assert_array_equal(np.asarray(train.images), one_train.images)
  np.testing.assert_array_equal(train.labels, one_train.labels)
  np.testing.assert_array_equal(held.images, one_held.images)
  config.data.val_split = "validation"
  assert isinstance(splits.load_splits(config.data, config.seed)[1].images, np.ndarray)
  # The VAE-GAN's train split too, also when cut to data.num_examples.
  vaegan_config = vaegan_kind.default_config()
  vaegan_config.data.update(name="fer2013", data_dir=str(data), image_size=48, channels=1)
  first = splits.load_split(vaegan_config.data, "train", train=True, limit=10).images
  assert isinstance(first, LazyImages) and len(first) == 10
  np.testing.assert_array_equal(np.asarray(first),
                                builders.load_prepared("fer2013", "train", data).images[:10])


def test_fer2013_csv_maps_labels_to_folder_order(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  write_fer_csv(manual / "fer2013.csv", fer_csv_rows())
  assert builders.prepare("fer2013", manual, data) == {"train": 14, "validation": 7, "test": 7}
  ds = builders.load_prepared("fer2013", "train", data)
  assert ds.images.shape == (14, 48, 48, 1)
  for image, label in zip(ds.images, ds.labels):
    emotion = int(image[0, 0, 0]) // 10  # Training rows: pixel value = 10 * emotion.
    assert (image == image[0, 0, 0]).all()
    assert FER_CLASSES[label] == fer2013_module.CSV_EMOTIONS[emotion]
  test = builders.load_prepared("fer2013", "test", data)
  assert sorted(int(i[0, 0, 0]) % 10 for i in test.images) == [2] * 7  # PrivateTest rows
  assert counts(test) == dict.fromkeys(FER_CLASSES, 1)


def test_load_prepared_prepares_when_given_manual_dir(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=1, test_prefixes=("PublicTest",))
  assert not builders.is_prepared("fer2013", data)
  with pytest.raises(UserError, match=r"ferjax data prepare fer2013 --manual-dir DIR"):
    builders.load_prepared("fer2013", "train", data)
  ds = builders.load_prepared("fer2013", "validation", data, manual_dir=manual)
  assert len(ds) == 7 and builders.is_prepared("fer2013", data)
  # Prepared data is reused without reading the raw files again, but another source that
  # does not exist is refused (it used to be reused silently).
  assert len(builders.load_prepared("fer2013", "train", data)) == 7
  with pytest.raises(UserError, match="does not exist"):
    builders.prepare("fer2013", tmp_path / "gone", data)


def test_fer2013_public_test_only_has_no_test_split(tmp_path):
  """The shared development copy: test/ holds only PublicTest files, which are validation."""
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=1, test_prefixes=("PublicTest",))
  assert builders.prepare("fer2013", manual, data) == {"train": 7, "validation": 7}
  with pytest.raises(UserError, match="prepared without a 'test' split .*available: train, "
                                      "validation"):
    builders.load_prepared("fer2013", "test", data)


def test_fer2013_without_public_test_has_no_validation(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=1, test_prefixes=("PrivateTest",))
  assert builders.prepare("fer2013", manual, data) == {"train": 7, "test": 7}
  with pytest.raises(UserError, match="without a 'validation' split"):
    builders.load_prepared("fer2013", "validation", data)


def test_force_replaces_only_when_complete(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=1)
  assert builders.prepare("fer2013", manual, data)["train"] == 7
  write_image(manual / "train" / "happy" / "Training_extra.png", 200)
  with pytest.raises(UserError, match="now holds other files .*add --force"):
    builders.prepare("fer2013", manual, data)  # Its files changed: not silently reused.
  assert builders.prepare("fer2013", manual, data, force=True)["train"] == 8
  (manual / "train" / "sad" / "Training_bad.png").write_bytes(b"not a png")
  with pytest.raises(UserError, match="cannot decode image train/sad/Training_bad.png"):
    builders.prepare("fer2013", manual, data, force=True)
  assert builders.split_sizes("fer2013", data)["train"] == 8  # The old data is intact.
  assert sorted(p.name for p in data.iterdir()) == [".fer2013.lock", "fer2013"]


def test_data_load_reads_prepared_sets(tmp_path):
  from ferjax.data import load
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=1)
  ds = load("fer2013", "validation", data_dir=data, manual_dir=manual, image_size=32,
            channels=3)
  assert ds.images.shape == (7, 32, 32, 3) and ds.class_names == FER_CLASSES


def test_stream_batches_shuffles_and_resizes(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=3)
  full = builders.load_prepared("fer2013", "train", data, manual_dir=manual)
  batches = list(builders.stream("fer2013", "train", data, batch_size=5))
  assert [len(l) for _, l in batches] == [5, 5, 5, 5, 1]
  np.testing.assert_array_equal(np.concatenate([l for _, l in batches]), full.labels)
  np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), full.images)
  a = list(builders.stream("fer2013", "train", data, batch_size=4, shuffle_seed=3,
                           image_size=32, drop_remainder=True))
  b = list(builders.stream("fer2013", "train", data, batch_size=4, shuffle_seed=3,
                           image_size=32, drop_remainder=True))
  assert len(a) == 5 and all(i.shape == (4, 32, 32, 1) for i, _ in a)
  shuffled = np.concatenate([l for _, l in a])
  np.testing.assert_array_equal(shuffled, np.concatenate([l for _, l in b]))
  assert not np.array_equal(shuffled, full.labels[:20])
  # Image and label stay paired under shuffling: the value encodes the class.
  value_to_label = {int(im[0, 0, 0]): int(l) for im, l in zip(full.images, full.labels)}
  for images, labels in builders.stream("fer2013", "train", data, batch_size=6,
                                        shuffle_seed=1):
    assert [value_to_label[int(i[0, 0, 0])] for i in images] == labels.tolist()
  with pytest.raises(UserError, match="batch_size"):
    builders.stream("fer2013", "train", data, batch_size=0)


# ---------------------------------------------------------------------------------------------
# FERPlus, RAF-DB, AffectNet, CK+
# ---------------------------------------------------------------------------------------------


def test_ferplus_majority_vote(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  #          neutral happy surprise sad anger disgust fear contempt unknown NF
  votes = [([6, 2, 0, 0, 0, 0, 0, 0, 1, 1], "Training", 0),    # neutral
           ([0, 0, 0, 0, 0, 0, 0, 7, 3, 0], "Training", 7),    # contempt
           ([0, 1, 0, 0, 0, 9, 0, 0, 0, 0], "Training", 5),    # disgust
           ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], "Training", None),  # tie between emotions
           ([2, 0, 0, 0, 0, 0, 0, 0, 8, 0], "Training", None),  # unknown
           ([0, 0, 3, 0, 0, 0, 0, 0, 0, 3], "Training", None),  # ties with NF
           ([0] * 10, "Training", None),                        # no votes
           ([0, 0, 0, 4, 0, 0, 0, 0, 0, 0], "PublicTest", 3),
           ([0, 0, 0, 0, 10, 0, 0, 0, 0, 0], "PrivateTest", 4)]
  write_fer_csv(manual / "fer2013.csv", [(0, 17 * i, usage) for i, (_, usage, _) in
                                         enumerate(votes)])
  with open(manual / "fer2013new.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Usage", "Image name"] + list(ferplus_module.VOTE_COLUMNS))
    for i, (v, usage, _) in enumerate(votes):
      w.writerow([usage, f"fer{i:07d}.png"] + v)
  assert builders.prepare("ferplus", manual, data) == {"train": 3, "validation": 1, "test": 1}
  ds = builders.load_prepared("ferplus", "train", data)
  assert ds.class_names == ferplus_module.CLASS_NAMES and ds.images.shape == (3, 48, 48, 1)
  got = sorted((int(im[0, 0, 0]) // 17, int(l)) for im, l in zip(ds.images, ds.labels))
  assert got == [(0, 0), (1, 7), (2, 5)]
  assert builders.load_prepared("ferplus", "test", data).labels.tolist() == [4]


def test_ferplus_rejects_misaligned_files(tmp_path):
  manual = tmp_path / "raw"
  write_fer_csv(manual / "fer2013.csv", [(0, 1, "Training"), (1, 2, "Training")])
  with open(manual / "fer2013new.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Usage", "Image name"] + list(ferplus_module.VOTE_COLUMNS))
    w.writerow(["Training", "a.png"] + [10] + [0] * 9)
  with pytest.raises(UserError, match=r"fer2013new.csv has 1 data rows but .* has 2"):
    builders.prepare("ferplus", manual, tmp_path / "data")
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").touch()
  with pytest.raises(UserError, match=r"has no fer2013.csv and fer2013new.csv"):
    builders.prepare("ferplus", other, tmp_path / "data")


def test_rafdb_prepare_and_load(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_rafdb(manual)
  assert builders.prepare("rafdb", manual, data) == {"train": 14, "test": 7}
  ds = builders.load_prepared("rafdb", "train", data)
  assert ds.images.shape == (14, 100, 100, 3) and ds.images.dtype == np.uint8
  assert ds.class_names[0] == "surprise" and ds.class_names[-1] == "neutral"
  assert counts(ds) == dict.fromkeys(ds.class_names, 2)
  # Red channel ~ 20 * label file's class number (1..7) = 20 * (label + 1).
  for image, label in zip(ds.images, ds.labels):
    assert abs(float(image[..., 0].mean()) - 20 * (label + 1)) < 4
  assert counts(builders.load_prepared("rafdb", "test", data)) == dict.fromkeys(ds.class_names, 1)


def test_affectnet_7_and_8_classes_one_preparation(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_affectnet(manual)
  sizes = builders.prepare("affectnet8", manual, data, image_size=32)
  assert sizes == {"train": 16, "validation": 8}
  assert builders.prepare("affectnet", manual, data, image_size=32) == \
      {"train": 14, "validation": 7}
  ds8 = builders.load_prepared("affectnet8", "train", data)
  assert ds8.class_names[-1] == "contempt" and len(ds8.class_names) == 8
  assert ds8.images.shape == (16, 32, 32, 3)
  assert counts(ds8) == dict.fromkeys(ds8.class_names, 2)
  ds7 = builders.load_prepared("affectnet", "validation", data)
  assert len(ds7.class_names) == 7 and "contempt" not in ds7.class_names
  assert counts(ds7) == dict.fromkeys(ds7.class_names, 1)
  # The face box (red) was cropped out of the blue frame.
  mean = ds8.images.reshape(-1, 3).mean(0)
  assert mean[0] > 200 and mean[2] < 50, mean
  batches = list(builders.stream("affectnet", "train", data, batch_size=8, image_size=24))
  assert [b[0].shape for b in batches] == [(8, 24, 24, 3), (6, 24, 24, 3)]
  assert 7 not in np.concatenate([b[1] for b in batches])


@pytest.mark.slow
def test_affectnet_stays_on_disk_until_read_and_trains_row_sharded(tmp_path):
  """AffectNet loads lazily: labels now, images when sliced (resized on the way), a subset reads
  nothing; `put_rows` reads it in chunks onto 8 devices, equal to the eager read; and a
  classifier trains and validates on it end to end."""
  import jax
  import ferjax.data
  from ferjax.data import LazyImages, images
  from ferjax.core import parallel
  from ferjax.train import classifier
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_affectnet(manual, per_class=(6, 2))
  builders.prepare("affectnet", manual, data, image_size=32)
  lazy = ferjax.data.load("affectnet", "train", data_dir=data, image_size=24, channels=1)
  assert isinstance(lazy.images, LazyImages) and lazy.images.shape == (42, 24, 24, 1)
  eager = images.convert(builders.load_prepared("affectnet", "train", data), image_size=24,
                          channels=1)
  assert len(np.unique(eager.images.reshape(42, -1).mean(1))) > 30  # Images differ.
  np.testing.assert_array_equal(lazy.labels, eager.labels)
  np.testing.assert_array_equal(np.asarray(lazy.images), eager.images)
  subset = lazy.images[np.array([40, 3, 3, 17])]
  assert isinstance(subset, LazyImages) and subset.shape == (4, 24, 24, 1)
  np.testing.assert_array_equal(subset[1:3], eager.images[[3, 3]])
  np.testing.assert_array_equal(subset[0], eager.images[40])
  placed = parallel.put_rows(lazy.images, parallel.make_mesh(8), rows_per_read=4)
  assert placed.shape == (48, 24, 24, 1) and len(placed.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(placed)[:42], eager.images)
  assert not np.asarray(placed)[42:].any()

  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.update(name="affectnet", data_dir=str(data), image_size=24, channels=1,
                     val_split="validation")
  config.optim.warmup_steps = 1
  config.train.update(num_steps=2, batch_size=8, log_every=1, eval_every=2, checkpoint_every=2,
                      num_devices=2)
  config.eval.batch_size = 8
  result = classifier.train_and_evaluate(config, tmp_path / "run")
  assert result["step"] == 2 and result["val_split"] == "validation"
  assert sum(result["train_counts"]) == 42 and 0.0 <= result["last"]["accuracy"] <= 1.0
  assert jax.device_count() == 8


def test_ckplus_subject_disjoint_folds(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  items = make_ckplus(manual / "CK+48")
  assert builders.prepare("ckplus", manual, data) == {"all": 24, "train": 20, "test": 4}
  everything = builders.load_prepared("ckplus", "all", data)
  assert everything.images.shape == (24, 48, 48, 1)
  assert everything.class_names == ckplus_module.CLASS_NAMES
  for k in range(10):
    train = builders.load_prepared("ckplus", f"fold{k}_train", data)
    test = builders.load_prepared("ckplus", f"fold{k}_test", data)
    assert len(train) + len(test) == 24
    # Subjects are sorted and dealt round-robin: fold k holds subjects k+1 and k+11.
    test_subjects = {int(v) // 10 for v in test.images[:, 0, 0, 0]}
    train_subjects = {int(v) // 10 for v in train.images[:, 0, 0, 0]}
    assert test_subjects == {s for s in (k + 1, k + 11) if s <= 12}
    assert not test_subjects & train_subjects
    for image, label in zip(test.images, test.labels):
      assert label == (int(image[0, 0, 0]) // 10) % 7
  assert len(builders.load_prepared("ckplus", "test", data)) == 4
  with pytest.raises(UserError, match="folds are numbered 0..9"):
    builders.load_prepared("ckplus", "fold10_test", data)
  assert len(items) == 24


def test_ckplus_few_subjects_and_bad_file_name(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_ckplus(manual, subjects=3)
  assert builders.prepare("ckplus", manual, data) == {"all": 6, "train": 4, "test": 2}
  with pytest.raises(UserError, match="split 'fold5_test' of dataset 'ckplus' is empty"):
    builders.load_prepared("ckplus", "fold5_test", data)
  with pytest.raises(UserError, match="has no split 'fold_3'"):
    builders.load_prepared("ckplus", "fold_3", data)
  write_image(manual / "anger" / "face1.png", 3, fmt="PNG")
  with pytest.raises(UserError, match=r"anger/face1.png: expected a file name S<subject>"):
    builders.prepare("ckplus", manual, tmp_path / "data2")


def test_info_and_names():
  assert set(builders.NAMES) == {"fer2013", "ferplus", "rafdb", "affectnet", "affectnet8",
                                 "ckplus"}
  for name in builders.NAMES:
    meta = builders.info(name)
    assert meta["name"] == name and meta["num_classes"] == len(meta["class_names"])
    assert meta["source"] and meta["layout"] and meta["splits"]
    assert meta["prepare_command"] == f"ferjax data prepare {name} --manual-dir DIR"
  assert builders.info("fer2013")["class_names"] == FER_CLASSES
  assert builders.info("affectnet")["num_classes"] == 7
  with pytest.raises(UserError, match="unknown dataset 'mnist'"):
    builders.info("mnist")


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("FERJAX_DATA_DIR", str(tmp_path / "d"))
  assert builders.default_data_dir() == tmp_path / "d"
  monkeypatch.delenv("FERJAX_DATA_DIR")
  assert builders.default_data_dir() == Path.home() / ".ferjax" / "datasets"


def test_tensorflow_is_never_imported(tmp_path):
  """In a fresh interpreter (other tests may have imported TensorFlow): importing every builder,
  preparing a tiny dataset and reading it back leaves TensorFlow unimported."""
  make_fer_folders(tmp_path / "raw", per_class=1)
  code = textwrap.dedent("""
      import importlib
      import pkgutil
      import sys

      import ferjax
      import ferjax.data
      from ferjax.data import builders
      for m in pkgutil.iter_modules(builders.__path__):
        importlib.import_module(f"ferjax.data.builders.{m.name}")
      raw, data = sys.argv[1:]
      builders.prepare("fer2013", raw, data)
      ds = ferjax.data.load("fer2013", "validation", data_dir=data, image_size=32, channels=1)
      assert ds.images.shape == (7, 32, 32, 1), ds.images.shape
      assert "tensorflow" not in sys.modules, "tensorflow was imported"
      print("NO-TENSORFLOW-OK")
  """)
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "raw"),
                           str(tmp_path / "data")], capture_output=True, text=True,
                          cwd=Path(ferjax.__file__).parents[1], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "NO-TENSORFLOW-OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one clear UserError each, nothing half-written
# ---------------------------------------------------------------------------------------------


def test_missing_or_empty_manual_dir(tmp_path):
  data = tmp_path / "data"
  with pytest.raises(UserError, match=r"does not exist: expected train/<class>/\*\.jpg and "
                     r"test/<class>/\*\.jpg .*or fer2013.csv.*Kaggle 'msambare/fer2013'"):
    builders.prepare("fer2013", tmp_path / "nope", data)
  (tmp_path / "empty").mkdir()
  for name, where in (("fer2013", "ICML 2013"), ("rafdb", "RAF-DB authors"),
                      ("affectnet", "AffectNet authors"), ("ckplus", "CK+"),
                      ("ferplus", "microsoft/FERPlus")):
    with pytest.raises(UserError, match=f"is empty: expected .*{where}") as e:
      builders.prepare(name, tmp_path / "empty", data)
    assert "\n" not in str(e.value)
  assert_clean(data)


def test_unknown_class_folder(tmp_path):
  manual = tmp_path / "raw"
  make_fer_folders(manual, per_class=1)
  write_image(manual / "train" / "contempt" / "x.png", 1)
  with pytest.raises(UserError, match=r"unknown class folder train/contempt: expected folders "
                     r"named angry, disgust, fear, happy, neutral, sad, surprise"):
    builders.prepare("fer2013", manual, tmp_path / "data")
  assert_clean(tmp_path / "data")


def test_empty_split(tmp_path):
  manual = tmp_path / "raw"
  make_fer_folders(manual, per_class=1)
  for image in (manual / "train").rglob("*.png"):
    image.unlink()
  with pytest.raises(UserError, match=r"train/ holds no images"):
    builders.prepare("fer2013", manual, tmp_path / "data")
  rafdb = tmp_path / "rafdb"
  lines = make_rafdb(rafdb)
  (rafdb / "EmoLabel" / "list_patition_label.txt").write_text(
      "\n".join(l for l in lines if l.startswith("train")))
  with pytest.raises(UserError, match=r"lists no test_\* images"):
    builders.prepare("rafdb", rafdb, tmp_path / "data")


def test_undecodable_image_leaves_nothing_and_can_be_retried(tmp_path):
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_fer_folders(manual, per_class=1)
  bad = manual / "test" / "sad" / "PublicTest_bad.jpg"
  bad.write_bytes(b"\xff\xd8 this is not a jpeg")
  # A leftover of an earlier, killed preparation is cleaned up too.
  (data / ".staging-fer2013-deadbeef" / "fer2013").mkdir(parents=True)
  with pytest.raises(UserError, match=r"cannot decode image test/sad/PublicTest_bad.jpg"):
    builders.prepare("fer2013", manual, data)
  assert_clean(data)
  assert not builders.is_prepared("fer2013", data)
  for not_prepared in (lambda: builders.load_prepared("fer2013", "train", data),
                       lambda: builders.available_splits("fer2013", data),
                       lambda: builders.stream("fer2013", "train", data)):
    with pytest.raises(UserError, match="is not prepared .* run `ferjax data prepare fer2013 "):
      not_prepared()
  bad.unlink()
  assert builders.prepare("fer2013", manual, data)["test"] == 7


def test_undecodable_image_rafdb(tmp_path):
  manual = tmp_path / "raw"
  make_rafdb(manual)
  (manual / "Image" / "aligned" / "test_00016_aligned.jpg").write_bytes(b"garbage")
  with pytest.raises(UserError, match=r"cannot decode image Image/aligned/test_00016_aligned"):
    builders.prepare("rafdb", manual, tmp_path / "data")
  assert_clean(tmp_path / "data")


@pytest.mark.parametrize("row, message", [
    ((3, " ".join(["1"] * 2303), "Training"), r"line 3: expected 2304 pixel values 0..255 .* "
                                              r"got 2303 values"),
    ((3, " ".join(["300"] * 2304), "Training"), r"line 3: pixel values must be in 0..255"),
    ((3, "1 2 x", "Training"), r"line 3: expected 2304 pixel values"),
    ((7, 5, "Training"), r"line 3: emotion must be an integer in 0..6, got '7'"),
    ((-1, 5, "Training"), r"line 3: emotion must be an integer in 0..6"),
    ((1, 5, "Validation"), r"line 3: Usage must be Training, PublicTest or PrivateTest"),
])
def test_bad_csv_rows(tmp_path, row, message):
  manual = tmp_path / "raw"
  write_fer_csv(manual / "fer2013.csv", [(0, 5, "Training"), row])
  with pytest.raises(UserError, match=r"fer2013.csv " + message):
    builders.prepare("fer2013", manual, tmp_path / "data")
  assert_clean(tmp_path / "data")


def test_affectnet_bad_rows(tmp_path):
  manual = tmp_path / "raw"
  make_affectnet(manual, per_class=(1, 1))
  with open(manual / "validation.csv", "a", newline="") as f:
    csv.writer(f).writerow(["1/x.jpg", 0, 0, 10, 10, "", 12, 0, 0])
  with pytest.raises(UserError, match=r"validation.csv line 13: expression must be an integer "
                     r"in 0..10, got '12'"):
    builders.prepare("affectnet", manual, tmp_path / "data")


def test_label_file_references_missing_images(tmp_path):
  manual = tmp_path / "raw"
  make_rafdb(manual)
  for n in (3, 5):
    (manual / "Image" / "aligned" / f"train_{n:05d}_aligned.jpg").unlink()
  with pytest.raises(UserError, match=r"list_patition_label.txt references 2 of 21 images that "
                     r"do not exist, first Image/aligned/train_00003_aligned.jpg"):
    builders.prepare("rafdb", manual, tmp_path / "data")
  affectnet = tmp_path / "affectnet"
  make_affectnet(affectnet, per_class=(1, 1))
  (affectnet / "Manually_Annotated_Images" / "2" / "train_1_0.jpg").unlink()
  with pytest.raises(UserError, match=r"training.csv references 1 of 8 images that do not "
                     r"exist, first Manually_Annotated_Images/2/train_1_0.jpg"):
    builders.prepare("affectnet", affectnet, tmp_path / "data")
  assert_clean(tmp_path / "data")


def test_bad_names_and_options(tmp_path):
  with pytest.raises(UserError, match="unknown dataset 'fer2014'"):
    builders.prepare("fer2014", tmp_path, tmp_path / "data")
  with pytest.raises(UserError, match="has no split 'dev': expected one of train, validation"):
    builders.load_prepared("fer2013", "dev", tmp_path / "data")
  with pytest.raises(UserError, match="image_size applies to affectnet only"):
    builders.prepare("fer2013", tmp_path, tmp_path / "data", image_size=64)
  with pytest.raises(UserError, match="image_size must be an integer in 16..1024"):
    builders.prepare("affectnet", tmp_path, tmp_path / "data", image_size=4)


# ---------------------------------------------------------------------------------------------
# The real FER-2013 folders (skipped where absent)
# ---------------------------------------------------------------------------------------------

REAL_TRAIN = {"angry": 3995, "disgust": 436, "fear": 4097, "happy": 7215, "neutral": 4965,
              "sad": 4830, "surprise": 3171}
REAL_TEST = {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "neutral": 607, "sad": 653,
             "surprise": 415}


@pytest.mark.slow
def test_real_fer2013_counts(shared_fer2013, tmp_path):
  data = tmp_path / "data"
  assert builders.prepare("fer2013", shared_fer2013, data) == \
      {"train": 28709, "validation": 3589}  # Only PublicTest is shared: no test split.
  train = builders.load_prepared("fer2013", "train", data)
  assert train.images.shape == (28709, 48, 48, 1) and counts(train) == REAL_TRAIN
  assert counts(builders.load_prepared("fer2013", "validation", data)) == REAL_TEST
  # Pixels are the decoded JPEGs: the first stored example matches one file exactly.
  sample = shared_fer2013 / "train" / "happy" / sorted(
      p.name for p in (shared_fer2013 / "train" / "happy").iterdir())[0]
  pixels = np.asarray(Image.open(sample).convert("L"))
  assert any(np.array_equal(im[..., 0], pixels) for im in train.images[train.labels == 3])


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
  """A 16-bit gray PNG (0..65535) reads as the same picture in 8 bits (it used to come out almost
  white: mean 254.7 instead of 129.6), through the folder loader and the builders' decoder."""
  from ferjax.data import folder
  from ferjax.data.builders import common
  rng = np.random.default_rng(0)
  eight = rng.integers(0, 256, (12, 12), dtype=np.uint16)
  sixteen = eight * 257  # The same values on the 16-bit scale.
  root = tmp_path / "faces"
  (root / "train" / "a").mkdir(parents=True)
  Image.fromarray(sixteen.astype(np.uint16)).save(root / "train" / "a" / "x.png")
  Image.fromarray(eight.astype(np.uint8)).save(root / "train" / "a" / "y.png")
  ds = folder.load(root, "train")
  np.testing.assert_array_equal(ds.images[0, ..., 0], eight)
  np.testing.assert_array_equal(ds.images[1, ..., 0], eight)
  with Image.open(root / "train" / "a" / "x.png") as img:
    assert img.mode.startswith("I")
    np.testing.assert_array_equal(common.to_array(img, 12, 1)[..., 0], eight)
