"""FER-2013 (ICML 2013 representation-learning challenge): 48x48 gray faces, 7 classes.

Two raw forms, detected from the manual dir:

* the original CSV `fer2013.csv` (header `emotion,pixels,Usage`; emotion 0..6 = angry, disgust,
  fear, happy, sad, surprise, neutral; pixels = 2304 space-separated ints; Usage Training /
  PublicTest / PrivateTest -> splits train / validation / test). Found at the manual dir's top
  level or in a `fer2013/` subfolder, also under Kaggle's name `icml_face_data.csv`. When
  present it is used, even if image folders exist too: it holds the exact pixels and all three
  splits.
* the Kaggle image folders (`msambare/fer2013`): `train/<class>/*.jpg|png` and
  `test/<class>/*.jpg|png`. `train` as given; the files of `test/` whose names start with
  `PublicTest_` are the `validation` split and the others (`PrivateTest_*`, or all when none is
  named so) the `test` split, so the two never share an image. A `test/` holding only
  PublicTest files gives no test split: choose checkpoints on a hold-out of train
  (`data.val_split=None`) and report on `validation`. Images that are not 48x48 gray are
  converted (luma) and resized (bilinear).

Both forms use one canonical class order, the folder order: angry, disgust, fear, happy,
neutral, sad, surprise (CSV emotions are remapped). Stored as raw uint8 48x48x1.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from ferjax.data.builders import common
from ferjax.errors import UserError

CLASS_NAMES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
# fer2013.csv emotion index -> canonical label.
CSV_EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
CSV_TO_LABEL = tuple(CLASS_NAMES.index(c) for c in CSV_EMOTIONS)
CSV_USAGE = {"training": "train", "publictest": "validation", "privatetest": "test"}
SIZE = 48

SPEC = common.DatasetSpec(
    name="fer2013",
    class_names=CLASS_NAMES,
    image_shape=(SIZE, SIZE, 1),
    splits=("train", "validation", "test"),
    source=("Kaggle 'msambare/fer2013' (image folders) or the ICML 2013 'Challenges in "
            "Representation Learning: Facial Expression Recognition' challenge (fer2013.csv)"),
    layout=("train/<class>/*.jpg and test/<class>/*.jpg (classes angry disgust fear happy "
            "neutral sad surprise), or fer2013.csv (emotion,pixels,Usage)"),
    description="FER-2013: 48x48 grayscale faces in 7 expression classes.",
    notes=("Folder form: validation = the PublicTest_* files of test/, test = the other files "
           "of test/. CSV form: Training/PublicTest/PrivateTest = train/validation/test."),
)


def find_csv(manual_dir: Path, filename: str = "fer2013.csv") -> Path | None:
  """`filename` in `manual_dir` or `manual_dir/fer2013/`; fer2013.csv may also be named
  icml_face_data.csv (Kaggle's copy of the challenge data, same columns)."""
  names = [filename] + (["icml_face_data.csv"] if filename == "fer2013.csv" else [])
  for name in names:
    for candidate in (manual_dir / name, manual_dir / "fer2013" / name):
      if candidate.is_file():
        return candidate
  return None


def scan_csv(path: Path, spec: common.DatasetSpec, *, check_pixels: bool = True):
  """Validates fer2013.csv; returns [(row index, line, split, label)] for every data row."""
  rows = common.open_csv(path)
  try:
    _, header = next(rows)
  except StopIteration:
    raise UserError(f"{spec.name}: {path} is empty: expected a header emotion,pixels,Usage") \
        from None
  i_emotion, i_pixels, i_usage = common.header_index(header, ("emotion", "pixels", "Usage"),
                                                     path=path, spec=spec)
  out = []
  for index, (line, row) in enumerate(rows):
    if len(row) < len(header):
      raise UserError(f"{spec.name}: {path} line {line}: expected {len(header)} columns "
                      f"({','.join(header)}), got {len(row)}")
    emotion = common.parse_int(row[i_emotion], what="emotion", path=path, line=line, spec=spec,
                               lo=0, hi=6)
    usage = row[i_usage].strip()
    split = CSV_USAGE.get(usage.lower())
    if split is None:
      raise UserError(f"{spec.name}: {path} line {line}: Usage must be Training, PublicTest or "
                      f"PrivateTest, got {usage!r}")
    if check_pixels:
      common.parse_pixels(row[i_pixels], size=SIZE, path=path, line=line, spec=spec)
    out.append((index, line, split, CSV_TO_LABEL[emotion]))
  return out


def iter_csv_pixels(path: Path, wanted: dict[int, object], spec: common.DatasetSpec):
  """(row index, payload, pixels) for the data rows of fer2013.csv whose index is in `wanted`."""
  rows = common.open_csv(path)
  _, header = next(rows)
  (i_pixels,) = common.header_index(header, ("pixels",), path=path, spec=spec)
  for index, (line, row) in enumerate(rows):
    if index in wanted:
      yield index, wanted[index], common.parse_pixels(row[i_pixels], size=SIZE, path=path,
                                                      line=line, spec=spec)


class Fer2013(common.FerBuilder, skip_registration=True):
  """FER-2013 from the Kaggle folders or fer2013.csv (see the module docstring)."""

  name = "fer2013"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First ferjax release.",
                   "1.1.0": "Folder form: test no longer holds the PublicTest (validation) files."}
  SPEC = SPEC
  STORAGE = "raw"
  LABEL_INDEX = 3
  MANUAL_DOWNLOAD_INSTRUCTIONS = SPEC.instructions

  @classmethod
  def scan(cls, manual_dir: Path) -> common.Plan:
    spec = cls.SPEC
    manual_dir = common.require_dir(manual_dir, spec)
    csv_path = find_csv(manual_dir)
    if csv_path is not None:
      plan: common.Plan = {"train": [], "validation": [], "test": []}
      for index, _, split, label in scan_csv(csv_path, spec):
        plan[split].append(("csv", csv_path, index, label))
      plan = {s: items for s, items in plan.items() if items}
      if not plan:
        raise UserError(f"{spec.name}: {csv_path} has a header but no data rows")
      return plan
    train_dir, test_dir = manual_dir / "train", manual_dir / "test"
    if not (train_dir.is_dir() and test_dir.is_dir()):
      found = ", ".join(p.name for p in common.visible_entries(manual_dir)[:8])
      raise UserError(f"{spec.name}: {manual_dir} holds neither fer2013.csv nor train/ and test/ "
                      f"folders (found: {found}): expected {spec.layout}; get it from "
                      f"{spec.source}")
    plan = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
      items = common.scan_class_folders(folder, CLASS_NAMES, spec=spec, manual_dir=manual_dir)
      if not items:
        raise UserError(f"{spec.name}: {split}/ holds no images: expected {split}/<class>/*.jpg "
                        f"with classes {', '.join(CLASS_NAMES)}")
      plan[split] = [("file", path, manual_dir, label) for path, label in items]
    # Disjoint by construction: a checkpoint chosen on validation is never scored on itself.
    public = [item for item in plan["test"] if item[1].name.startswith("PublicTest_")]
    rest = [item for item in plan["test"] if not item[1].name.startswith("PublicTest_")]
    plan = {"train": plan["train"], "validation": public, "test": rest}
    return {split: items for split, items in plan.items() if items}

  def _generate_examples(self, items):
    return generate(items, self.SPEC)


def generate(items, spec: common.DatasetSpec):
  """(key, example) for plan items `("csv", path, row index, label)` or
  `("file", path, root, label)`."""
  if items and items[0][0] == "csv":
    path = items[0][1]
    wanted = {index: label for _, _, index, label in items}
    for index, label, pixels in iter_csv_pixels(path, wanted, spec):
      yield f"row{index:06d}", {"image": pixels, "label": label}
    return
  for _, path, root, label in items:
    name = common.rel(path, root)
    img = common.open_image(path, name=name, spec_name=spec.name)
    yield name, {"image": common.to_array(img, SIZE, 1), "label": label}
BUILDER = Fer2013
