"""RAF-DB basic emotions (Li, Deng & Du, CVPR 2017): aligned 100x100 RGB faces, 7 classes.

Manual dir (as the authors distribute it): `EmoLabel/list_patition_label.txt` with lines
`train_00001.jpg 5` (labels 1..7 = surprise, fear, disgust, happiness, sadness, anger,
neutral) and images `Image/aligned/train_00001_aligned.jpg`. Splits `train` / `test` from the
file name prefix. Stored as JPEG bytes (the original files when they already are 100x100 RGB
JPEGs, else converted and re-encoded).
"""

from __future__ import annotations

from pathlib import Path

from ferjax.data import reading
from ferjax.data.builders import common
from ferjax.errors import UserError

CLASS_NAMES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
SIZE = 100
LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"
IMAGE_DIR = Path("Image") / "aligned"

SPEC = common.DatasetSpec(
    name="rafdb",
    class_names=CLASS_NAMES,
    image_shape=(SIZE, SIZE, 3),
    splits=("train", "test"),
    source="the RAF-DB authors' site (whdeng.cn/RAF), by request for research use",
    layout=("EmoLabel/list_patition_label.txt (lines 'train_00001.jpg 5', labels 1..7) and "
            "Image/aligned/<name>_aligned.jpg"),
    description="RAF-DB basic: 100x100 aligned RGB faces in 7 expression classes.",
)


def image_path(manual_dir: Path, name: str) -> Path:
  stem = Path(name).stem
  return manual_dir / IMAGE_DIR / f"{stem}_aligned{Path(name).suffix or '.jpg'}"


class RafDb(common.FerBuilder, skip_registration=True):
  """RAF-DB basic expressions (see the module docstring)."""

  name = "rafdb"
  SPEC = SPEC
  STORAGE = "jpeg"
  LABEL_INDEX = 2
  MANUAL_DOWNLOAD_INSTRUCTIONS = SPEC.instructions

  @classmethod
  def scan(cls, manual_dir: Path) -> common.Plan:
    spec = cls.SPEC
    manual_dir = common.require_dir(manual_dir, spec)
    label_file = manual_dir / LABEL_FILE
    if not label_file.is_file():
      raise UserError(f"{spec.name}: {manual_dir} has no {LABEL_FILE}: expected {spec.layout}; "
                      f"get it from {spec.source}")
    plan: common.Plan = {"train": [], "test": []}
    for line_no, line in reading.read_lines(label_file):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2:
        raise UserError(f"{spec.name}: {label_file} line {line_no}: expected "
                        f"'<name>.jpg <label 1..7>', got {line.strip()!r}")
      name, label_text = parts
      label = common.parse_int(label_text, what="label", path=label_file, line=line_no,
                               spec=spec, lo=1, hi=7)
      split = name.split("_", 1)[0].lower()
      if split not in plan:
        raise UserError(f"{spec.name}: {label_file} line {line_no}: image name {name!r} must "
                        f"start with train_ or test_")
      plan[split].append((image_path(manual_dir, name), manual_dir, label - 1))
    for split, items in plan.items():
      if not items:
        raise UserError(f"{spec.name}: {label_file} lists no {split}_* images: expected both "
                        f"train_* and test_* lines")
    everything = [item for items in plan.values() for item in items]
    missing = [path for path, _, _ in everything if not reading.is_regular(path)]
    if missing:
      raise common.missing_files_error(spec, label_file, missing, manual_dir, len(everything))
    return plan

  def _generate_examples(self, items):
    for path, root, label in items:
      name = common.rel(path, root)
      data = common.jpeg_for_storage(path, size=SIZE, name=name, spec_name=self.SPEC.name)
      yield name, {"image": data, "label": label}


BUILDER = RafDb
