"""Bad names and values in users' data: split names that are paths, class lists that name a
class twice or leave fewer than two classes, and image values ferjax does not understand.

CLI cases end in one `ferjax: error:` line naming the flag, field or file (tests/badinput.py);
evaluation cases reuse the session's tiny classifier run (conftest's `tiny_runs`), data cases
build tiny folder datasets in tmp_path. Unit tests pin the one rule for image values
(`ferjax.data.images.to_uint8`) on arrays and on real files written by Pillow.
"""

import ml_collections
import numpy as np
import pytest
from PIL import Image

from badinput import copy_run, expect_one_line
from ferjax import evaluate, inference, predict
from ferjax.data import folder, images, labels, loading, reading, splits, unlabeled
from ferjax.data.builders import common
from ferjax.errors import UserError
from test_builders import make_fer_folders

SYNTHETIC_NAMES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def faces(root, counts: dict, classes_txt=None, size=32):
  """<root>/train/<class>/<i>.png with `counts` images per class; `classes_txt`: that file's
  text (None: no classes.txt)."""
  for name, n in counts.items():
    (root / "train" / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
      Image.fromarray(np.full((size, size), 40 + 30 * i, np.uint8)).save(
          root / "train" / name / f"{i}.png")
  if classes_txt is not None:
    (root / "classes.txt").write_text(classes_txt)
  return root


def no_prediction(monkeypatch):
  """Fails the test when anything is predicted: a refusal comes before the work."""
  def predict_logits(*args, **kwargs):
    raise AssertionError("predicted before refusing")
  monkeypatch.setattr(evaluate, "predict_logits", predict_logits)


@pytest.fixture
def run(tiny_runs, tmp_path):
  """A private copy of the tiny classifier run."""
  return copy_run(tiny_runs.classifier, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# 1. Split names are names, not paths
# ---------------------------------------------------------------------------------------------
BAD_SPLITS = ["../other", "train/", "/tmp", "a\\b", "..", ".hidden", "tr ain", "a/../b"]


@pytest.mark.parametrize("split", BAD_SPLITS)
def test_evaluate_split_that_is_a_path_is_one_line(split, run, tmp_path, capsys, monkeypatch):
  no_prediction(monkeypatch)
  (tmp_path / "other" / "train" / "happy").mkdir(parents=True)  # What "../other" would reach.
  data = faces(tmp_path / "d", {"happy": 2, "sad": 2})
  expect_one_line(["evaluate", "--workdir", run, "--dataset", "folder", "--manual-dir", data,
                   "--split", split], ["--split", "split name"], capsys,
                  protect=[run, data, tmp_path / "other"])


def test_evaluate_own_split_with_a_slash_refuses_before_evaluating(run, capsys, monkeypatch):
  no_prediction(monkeypatch)
  expect_one_line(["evaluate", "--workdir", run, "--split", "test/"], "--split", capsys,
                  protect=[run])


def test_features_split_that_is_a_path_is_one_line(run, tmp_path, capsys, monkeypatch):
  no_prediction(monkeypatch)
  data = faces(tmp_path / "d", {"happy": 2, "sad": 2})
  expect_one_line(["features", "--workdir", run, "--dataset", "folder", "--manual-dir", data,
                   "--split", "../d/train", "--out", tmp_path / "f.npz"], "--split", capsys,
                  protect=[run, data])
  assert not (tmp_path / "f.npz").exists()


def test_data_stats_split_that_is_a_path_is_one_line(tmp_path, capsys):
  expect_one_line(["data", "stats", "synthetic", "--split", "../train", "--out",
                   tmp_path / "out"], "../train", capsys)
  assert not (tmp_path / "out").exists()


def test_config_val_split_that_is_a_path_is_one_line(tiny_runs, tmp_path, capsys):
  data = faces(tmp_path / "d", {"happy": 3, "sad": 3})
  (data / "validation").symlink_to(data / "train")
  expect_one_line(["train", "--config", tiny_runs.classifier_config, "--workdir", tmp_path / "w",
                   "--config.data.name=folder", f"--config.data.manual_dir={data}",
                   "--config.data.val_split=../d/validation"], "data.val_split", capsys,
                  protect=[data])


@pytest.mark.parametrize("field", ["split", "val_split"])
def test_vaegan_config_split_that_is_a_path_is_one_line(field, tiny_runs, tmp_path, capsys):
  expect_one_line(["train-vaegan", "--config", tiny_runs.vaegan_config, "--workdir",
                   tmp_path / "w", f"--config.data.{field}=/tmp/x"], f"data.{field}", capsys)


@pytest.mark.parametrize("split", BAD_SPLITS)
def test_loaders_refuse_split_paths(split, tmp_path):
  data = faces(tmp_path / "d", {"happy": 1, "sad": 1})
  with pytest.raises(UserError, match="split"):
    loading.load("folder", split, manual_dir=data)
  with pytest.raises(UserError, match="split"):
    folder.load(data, split)
  with pytest.raises(UserError, match="split"):
    splits.has_split(ml_collections.ConfigDict({"name": "folder", "manual_dir": str(data)}),
                     split)


@pytest.mark.parametrize("split", ["train", "validation", "test", "fold3_train", "all",
                                   "val", "v1.2-b"])
def test_plain_split_names_are_accepted(split):
  assert loading.check_split_name(split, "--split") == split


# ---------------------------------------------------------------------------------------------
# 2. Classes are distinct, and at least two
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes_txt, needle", [
    ("happy\nsad\nhappy\n", ["classes.txt", "'happy'", "twice"]),
    ("happy\nsad\nHappiness\n", ["classes.txt", "'happiness'", "same class"]),
    ("Sad\nhappy\nsad\n", ["classes.txt", "'sad'", "same class"]),
])
def test_classes_txt_naming_a_class_twice_is_one_line(classes_txt, needle, run, tmp_path,
                                                      capsys, monkeypatch):
  no_prediction(monkeypatch)
  data = faces(tmp_path / "d", {"happy": 2, "sad": 2, "Happiness": 1, "Sad": 1},
               classes_txt=classes_txt)
  expect_one_line(["evaluate", "--workdir", run, "--dataset", "folder", "--manual-dir", data,
                   "--split", "train"], needle, capsys, protect=[run, data])


def test_class_folders_of_one_class_are_one_line(run, tmp_path, capsys, monkeypatch):
  no_prediction(monkeypatch)
  data = faces(tmp_path / "d", {"happy": 2, "joy": 2, "sad": 2})
  expect_one_line(["evaluate", "--workdir", run, "--dataset", "folder", "--manual-dir", data,
                   "--split", "train"], ["class folder", "'joy'", "same class"], capsys,
                  protect=[run, data])


@pytest.mark.parametrize("counts, classes_txt, needle", [
    ({"happy": 4}, "happy\n", "only class 'happy'"),
    ({"happy": 4}, None, "only class 'happy'"),
    ({"happy": 4, "sad": 0}, "happy\nsad\n", "none of 'sad'"),
])
def test_training_on_one_class_is_one_line(counts, classes_txt, needle, tiny_runs, tmp_path,
                                           capsys):
  data = faces(tmp_path / "d", counts, classes_txt=classes_txt)
  expect_one_line(["train", "--config", tiny_runs.classifier_config, "--workdir", tmp_path / "w",
                   "--config.data.name=folder", f"--config.data.manual_dir={data}",
                   "--config.data.val_split=None", "--config.data.num_examples=None"],
                  ["'train'", needle, "at least two"], capsys, protect=[data])
  assert not (tmp_path / "w").exists()


ONE_CLASS = ",".join(f"-{n}" for n in SYNTHETIC_NAMES if n != "sad")


@pytest.mark.parametrize("spec, needle", [
    ("everything=" + "+".join(SYNTHETIC_NAMES), "leaves one class"),
    ("happy", "leaves one class"),
    (ONE_CLASS, "leaves one class"),
    ("happy,happy", "named twice"),
    ("happy,happiness", "named twice"),
    ("a=happy+sad,b=sad", "used twice"),
    ("a=happy+happy,sad", "used twice"),
    ("-happy,-happy", "named twice"),
    ("joy=sad+anger,happy", "named twice"),
])
def test_data_classes_that_repeat_or_leave_one_class_are_one_line(spec, needle, tiny_runs,
                                                                  tmp_path, capsys):
  expect_one_line(["train", "--config", tiny_runs.classifier_config, "--workdir", tmp_path / "w",
                   f"--config.data.classes={spec}"], ["data.classes", needle], capsys)


def test_check_distinct_keeps_distinct_names():
  assert labels.check_distinct(["happy", "sad", "Bored"], "x: class") == ("happy", "sad", "Bored")
  with pytest.raises(UserError, match=r"x: class 'angry' and 'anger' are the same class"):
    labels.check_distinct(["anger", "happy", "angry"], "x: class")


def test_a_train_split_of_one_class_is_refused_and_a_test_split_is_not(tmp_path):
  data = faces(tmp_path / "d", {"happy": 2, "sad": 0}, classes_txt="happy\nsad\n")
  assert folder.load(data, "train").class_counts().tolist() == [2, 0]  # Evaluation: fine.
  group = ml_collections.ConfigDict(dict(
      name="folder", manual_dir=str(data), data_dir=None, image_size=None, channels=None))
  with pytest.raises(UserError, match="only class 'happy'"):
    splits.load_split(group, "train", train=True)
  assert len(splits.load_split(group, "train", train=False)) == 2


# ---------------------------------------------------------------------------------------------
# 3. Image values: one rule, never silently black
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("array, expected", [
    (np.full((2, 2), 7, np.uint8), 7),
    (np.full((2, 2), 0.5, np.float32), 128),
    (np.full((2, 2), 1.0, np.float64), 255),
    (np.full((2, 2), 200.4, np.float32), 200),
    (np.full((2, 2), 30000, np.uint16), 117),
    (np.full((2, 2), 65535, np.uint16), 255),
    (np.full((2, 2), 100, np.int32), 100),  # 8-bit values in a wider type.
    (np.full((2, 2), 30000, np.int32), 117),
    (np.ones((2, 2), bool), 255),
])
def test_image_values_rule(array, expected):
  out = images.to_uint8(array)
  assert out.dtype == np.uint8 and out.shape == array.shape
  assert np.all(out == expected)


@pytest.mark.parametrize("array, needle", [
    (np.array([[0.5, np.nan]], np.float32), "NaN"),
    (np.array([[0.5, np.inf]]), "NaN or infinite"),
    (np.array([[-0.5, 0.5]]), "down to -0.5"),
    (np.array([[300.0]], np.float32), "up to 300"),
    (np.array([[-3]], np.int16), "down to -3"),
    (np.array([[70000]], np.int32), "up to 70000"),
    (np.array([[1 + 1j]]), "complex"),
])
def test_image_values_the_rule_refuses_name_the_file(array, needle):
  with pytest.raises(reading.UnsupportedImage, match=needle) as e:
    images.to_uint8(array, "face.tif")
  assert str(e.value).startswith("face.tif: ") and "\n" not in str(e.value)
  assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)


def pillow_file(path, mode: str, value, size=8):
  """A real image file of PIL mode `mode` (F, I;16, I or 1) holding `value` (float images are
  always written as TIFF)."""
  dtype = {"F": np.float32, "I;16": np.uint16, "I": np.int32, "1": bool}[mode]
  img = Image.fromarray(np.full((size, size), value, dtype))
  assert img.mode == mode
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, format="TIFF" if mode == "F" else None)
  return path


FILES = [  # (file name, PIL mode, stored value, uint8 value read)
    ("f01.tif", "F", 0.5, 128),
    ("f255.tif", "F", 200.0, 200),
    ("i16.png", "I;16", 30000, 117),
    ("i16.tif", "I;16", 65535, 255),
    ("i32.tif", "I", 30000, 117),
    ("i32_8bit.tif", "I", 100, 100),
    ("bilevel.png", "1", True, 255),
    ("bilevel0.png", "1", False, 0),
]


@pytest.mark.parametrize("name, mode, value, expected", FILES)
def test_every_reader_scales_pillow_files_by_the_rule(name, mode, value, expected, tmp_path):
  path = pillow_file(tmp_path / "d" / "train" / "happy" / name, mode, value)
  pillow_file(tmp_path / "d" / "train" / "sad" / name, mode, value)
  ds = folder.load(tmp_path / "d", "train")
  assert ds.images.dtype == np.uint8 and np.all(ds.images == expected)
  assert ds.class_counts().tolist() == [1, 1]
  pool = unlabeled.read_folder(tmp_path / "d", image_size=8, channels=1)
  assert len(pool) == 2 and np.all(pool == expected)
  assert np.all(predict.read_image(path) == expected)
  with Image.open(path) as img:
    assert np.all(common.to_array(img, 8, 1) == expected)


@pytest.mark.parametrize("value, needle", [(np.nan, "NaN"), (-1.0, "down to -1"),
                                           (300.0, "up to 300")])
def test_a_float_image_out_of_range_is_one_line_naming_it(value, needle, run, tmp_path, capsys,
                                                          monkeypatch):
  no_prediction(monkeypatch)
  data = faces(tmp_path / "d", {"happy": 2, "sad": 2}, size=8)
  pillow_file(data / "train" / "sad" / "odd.tif", "F", value)
  expect_one_line(["evaluate", "--workdir", run, "--dataset", "folder", "--manual-dir", data,
                   "--split", "train"], ["odd.tif", needle], capsys, protect=[run, data])


def test_preparing_a_dataset_with_an_out_of_range_image_is_one_line(tmp_path, capsys):
  raw = tmp_path / "raw"
  make_fer_folders(raw, per_class=1)
  pillow_file(raw / "train" / "happy" / "odd.png", "F", np.nan, size=48)  # A TIFF named .png.
  expect_one_line(["data", "prepare", "fer2013", "--manual-dir", raw, "--data-dir",
                   tmp_path / "data"], ["odd.png", "NaN"], capsys, protect=[raw])


def test_unlabeled_folders_skip_out_of_range_images_in_the_one_warning(tmp_path, capsys):
  pillow_file(tmp_path / "u" / "ok.tif", "F", 0.5)
  pillow_file(tmp_path / "u" / "nan.tif", "F", np.nan)
  pillow_file(tmp_path / "u" / "big.tif", "F", 1000.0)
  pool = unlabeled.read_folder(tmp_path / "u", image_size=8, channels=1)
  assert len(pool) == 1 and np.all(pool == 128)
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "skipped 2 of 3 file(s)" in err[0], err


def test_predict_reader_raises_a_reader_error_for_out_of_range_images(tmp_path):
  path = pillow_file(tmp_path / "nan.tif", "F", np.nan)
  with pytest.raises(reading.IMAGE_ERRORS) as e:
    predict.read_image(path)
  assert "NaN" in reading.image_reason(e.value)


def test_prepare_crops_follows_the_rule_and_names_the_image():
  crops = inference.prepare_crops([np.full((4, 4, 3), 0.5), np.full((4, 4), 30000, np.uint16),
                                   np.ones((4, 4, 1), bool)], 4, 1)
  assert crops[0].ravel().tolist() == [128] * 16
  assert np.all(crops[1] == 117) and np.all(crops[2] == 255)
  with pytest.raises(ValueError, match=r"image 1: .*down to -1"):
    inference.prepare_crops([np.zeros((4, 4)), np.full((4, 4), -1.0)], 4, 1)
