"""CK+ (Extended Cohn-Kanade, Lucey et al. 2010) in its common CK+48 form: 48x48 gray faces.

Manual dir: `<class>/S<subject>_<sequence>_<frame>.png` with classes anger, contempt, disgust,
fear, happy, sadness, surprise (or those folders inside a single `CK+48/` folder).

CK+ has no official split. ferjax stores one TFDS split `images` (TFDS reserves `all`) holding
each image's subject and a subject-disjoint fold: the subjects, sorted by number, go round-robin
to 10 folds (the i-th subject -> fold i % 10), so no subject is on both sides. Splits:
* `fold<k>_test`: the images of fold k (k = 0..9); `fold<k>_train`: all the others;
* `train` / `test`: fold 0 (`fold0_train` / `fold0_test`);
* `all`: every image.
Stored as raw uint8 48x48x1 (other sizes are resized, colour converted to luma).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ferjax.data.builders import common
from ferjax.errors import UserError

CLASS_NAMES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
SIZE = 48
NUM_FOLDS = 10
NAME_RE = re.compile(r"^S(\d+)_(\d+)_(\d+)$", re.IGNORECASE)
FOLD_SPLIT_RE = re.compile(r"^fold(\d+)_(train|test)$")
STORED = "images"  # The one stored split; public `all`, `train`, `test`, folds select from it.

SPEC = common.DatasetSpec(
    name="ckplus",
    class_names=CLASS_NAMES,
    image_shape=(SIZE, SIZE, 1),
    splits=("all", "train", "test"),
    source=("the CK+ authors (jeffcohn.net/resources, by request), or the CK+48 crops shared "
            "on Kaggle"),
    layout=("<class>/S<subject>_<sequence>_<frame>.png with classes anger contempt disgust "
            "fear happy sadness surprise"),
    description="CK+48: 48x48 grayscale faces (last frames of posed sequences), 7 classes.",
    notes=(f"No official split: {NUM_FOLDS} subject-disjoint folds; splits fold<k>_train / "
           "fold<k>_test (k = 0..9), train/test = fold 0, all."),
)


class CkPlus(common.FerBuilder, skip_registration=True):
  """CK+48 with subject-disjoint folds (see the module docstring)."""

  name = "ckplus"
  SPEC = SPEC
  STORAGE = "raw"
  LABEL_INDEX = 2
  MANUAL_DOWNLOAD_INSTRUCTIONS = SPEC.instructions

  def _extra_features(self):
    return {"subject": tfds.features.Tensor(shape=(), dtype=np.int32),
            "fold": tfds.features.Tensor(shape=(), dtype=np.int32)}

  @classmethod
  def select(cls, name, split, stored):
    match = FOLD_SPLIT_RE.match(split)
    if split in ("train", "test"):
      fold, side = 0, split
    elif match:
      fold, side = int(match.group(1)), match.group(2)
      if fold >= NUM_FOLDS:
        raise UserError(f"ckplus: split {split!r}: folds are numbered 0..{NUM_FOLDS - 1}")
    elif split == "all":
      return STORED, None
    else:
      raise UserError(f"dataset 'ckplus' has no split {split!r}: expected all, train, test, "
                      f"or fold<k>_train / fold<k>_test with k in 0..{NUM_FOLDS - 1}")
    if side == "test":
      return STORED, lambda scalars: scalars["fold"] == fold
    return STORED, lambda scalars: scalars["fold"] != fold

  @classmethod
  def public_splits(cls, name, stored):
    return ("all", "train", "test") if STORED in stored else ()

  @classmethod
  def scan(cls, manual_dir: Path) -> common.Plan:
    spec = cls.SPEC
    manual_dir = common.require_dir(manual_dir, spec)
    root = manual_dir
    entries = common.visible_entries(manual_dir)
    if len(entries) == 1 and entries[0].is_dir() and \
        entries[0].name.lower() not in CLASS_NAMES:
      root = entries[0]  # e.g. CK+48/<class>/...
    # Small CK+ subsets lack some classes: prepare warns about them instead of refusing.
    found = common.scan_class_folders(root, CLASS_NAMES, spec=spec, manual_dir=manual_dir,
                                      require_all=False)
    if not found:
      raise UserError(f"ckplus: {root} holds no images: expected {spec.layout}")
    items = []
    for path, label in found:
      match = NAME_RE.match(path.stem)
      if not match:
        raise UserError(f"ckplus: {common.rel(path, manual_dir)}: expected a file name "
                        f"S<subject>_<sequence>_<frame>.png (e.g. S005_001_00000011.png)")
      items.append((path, manual_dir, label, int(match.group(1))))
    subjects = sorted({subject for *_, subject in items})
    fold_of = {subject: i % NUM_FOLDS for i, subject in enumerate(subjects)}
    return {STORED: [(*item, fold_of[item[3]]) for item in items]}

  def _generate_examples(self, items):
    for path, root, label, subject, fold in items:
      name = common.rel(path, root)
      img = common.open_image(path, name=name, spec_name=self.SPEC.name)
      yield name, {"image": common.to_array(img, SIZE, 1), "label": label,
                   "subject": subject, "fold": fold}


BUILDER = CkPlus
