"""AffectNet, manually annotated part (Mollahosseini et al., 2017): in-the-wild faces.

Manual dir: `training.csv` and `validation.csv` (at the top level or in
`Manually_Annotated_file_lists/`; columns subDirectory_filePath, face_x, face_y, face_width,
face_height, facial_landmarks, expression, valence, arousal) and the images under
`Manually_Annotated_Images/` (or `Manually_Annotated/Manually_Annotated_Images/`).
Expression 0..7 = neutral, happy, sad, surprise, fear, disgust, anger, contempt; rows with 8..10
(none, uncertain, non-face) are dropped. Splits: train (training.csv), validation
(validation.csv, the usual test set).

Two dataset names read one preparation:
* `affectnet`: 7 classes (contempt rows left out at read time);
* `affectnet8`: 8 classes (with contempt).

Each face is cropped to its face box (clipped to the image; the whole image when the box is
empty), converted to RGB, resized (bilinear) to a square stored size and stored as JPEG bytes
(quality 95). The stored size is the builder config: `112px` by default, any other with
`prepare("affectnet", dir, image_size=S)` (config `<S>px`, prepared side by side). A pool of
threads (PIL releases the GIL) encodes the images a window at a time: nothing holds all images
in memory.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image

from ferjax.data import reading
from ferjax.data.builders import common
from ferjax.data.images import to_8bit
from ferjax.errors import UserError

CLASS_NAMES_8 = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
CONTEMPT = CLASS_NAMES_8.index("contempt")
DEFAULT_SIZE = 112
CSV_FILES = {"train": "training.csv", "validation": "validation.csv"}
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
           "expression")
_COMMON = dict(
    image_shape=(DEFAULT_SIZE, DEFAULT_SIZE, 3),
    splits=("train", "validation"),
    source="the AffectNet authors (mohammadmahoor.com/affectnet), by request for research use",
    layout=("training.csv and validation.csv (subDirectory_filePath, face_x, face_y, "
            "face_width, face_height, facial_landmarks, expression, valence, arousal) and "
            "Manually_Annotated_Images/<subDirectory_filePath>"),
    notes=("affectnet and affectnet8 share one preparation; stored size 112 px unless prepared "
           "with image_size."),
)
SPECS = {
    "affectnet": common.DatasetSpec(
        name="affectnet", class_names=CLASS_NAMES_8[:CONTEMPT],
        description="AffectNet (manually annotated), 7 basic expressions.", **_COMMON),
    "affectnet8": common.DatasetSpec(
        name="affectnet8", class_names=CLASS_NAMES_8,
        description="AffectNet (manually annotated), 7 basic expressions plus contempt.",
        **_COMMON),
}
SPEC = SPECS["affectnet8"]


@dataclasses.dataclass
class AffectNetConfig(tfds.core.BuilderConfig):
  image_size: int = DEFAULT_SIZE


def _config(size: int) -> AffectNetConfig:
  return AffectNetConfig(name=f"{size}px", image_size=size,
                         description=f"faces stored at {size}x{size} RGB")


def find_first(manual_dir: Path, candidates) -> Path | None:
  for candidate in candidates:
    path = manual_dir / candidate
    if path.is_dir() or reading.is_regular(path):  # Never a FIFO: opening it would block.
      return path
  return None


def _number(text: str, *, what: str, path: Path, line: int) -> int:
  try:
    return int(round(float(text)))
  except ValueError:
    raise UserError(f"affectnet: {path} line {line}: {what} must be a number, got "
                    f"{text.strip()!r}") from None


def encode_face(task) -> tuple[str, bytes, int]:
  """(key, JPEG bytes, label) for one plan item; runs in worker threads."""
  path, name, box, label, size = task
  try:
    img = Image.open(path)
  except reading.IMAGE_ERRORS as e:
    raise common.decode_error("affectnet", name, e) from None
  x, y, w, h = box
  with img:
    full_w, full_h = img.size
    left, top = max(0, x), max(0, y)
    right, bottom = min(full_w, x + w), min(full_h, y + h)
    if right - left < 2 or bottom - top < 2:
      left, top, right, bottom = 0, 0, full_w, full_h
    if img.format == "JPEG":
      # Decode at a reduced scale when the face stays >= `size` pixels (much faster).
      scale_w = -(-size * full_w // (right - left))
      scale_h = -(-size * full_h // (bottom - top))
      img.draft("RGB", (scale_w, scale_h))
    try:
      img.load()
    except reading.IMAGE_ERRORS as e:
      raise common.decode_error("affectnet", name, e) from None
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    face = to_8bit(img).convert("RGB").crop((int(left * sx), int(top * sy),
                                    max(int(left * sx) + 1, int(right * sx)),
                                    max(int(top * sy) + 1, int(bottom * sy))))
  face = face.resize((size, size), Image.BILINEAR)
  return name, common.encode_jpeg(face), label


class AffectNet(common.FerBuilder, skip_registration=True):
  """AffectNet manually annotated images (see the module docstring)."""

  name = "affectnet"
  SPEC = SPEC
  STORAGE = "jpeg"
  LABEL_INDEX = 3
  MANUAL_DOWNLOAD_INSTRUCTIONS = SPEC.instructions
  BUILDER_CONFIGS = [_config(DEFAULT_SIZE)]

  @classmethod
  def config_for(cls, image_size: int | None) -> AffectNetConfig:
    if image_size is None:
      return cls.BUILDER_CONFIGS[0]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or \
        not 16 <= image_size <= 1024:
      raise UserError(f"affectnet: image_size must be an integer in 16..1024, got "
                      f"{image_size!r}")
    for config in cls.BUILDER_CONFIGS:
      if config.image_size == image_size:
        return config
    return _config(image_size)

  @classmethod
  def config_named(cls, name: str) -> AffectNetConfig | None:
    """The config stored under directory name `name` (`<size>px`), or None."""
    match = re.fullmatch(r"(\d+)px", name)
    return cls.config_for(int(match.group(1))) if match else None

  @classmethod
  def spec_for(cls, name: str) -> common.DatasetSpec:
    return SPECS[name]

  @classmethod
  def select(cls, name, split, stored):
    stored_split, _ = super().select(name, split, stored)
    if name == "affectnet8":
      return stored_split, None
    return stored_split, lambda scalars: scalars["label"] != CONTEMPT

  @property
  def image_shape(self) -> tuple[int, int, int]:
    size = self.builder_config.image_size
    return (size, size, 3)

  @classmethod
  def scan(cls, manual_dir: Path) -> common.Plan:
    spec = SPECS["affectnet8"]
    manual_dir = common.require_dir(manual_dir, spec)
    image_dir = find_first(manual_dir, ("Manually_Annotated_Images",
                                        "Manually_Annotated/Manually_Annotated_Images"))
    csvs = {split: find_first(manual_dir, (f, f"Manually_Annotated_file_lists/{f}"))
            for split, f in CSV_FILES.items()}
    missing = [CSV_FILES[s] for s, p in csvs.items() if p is None]
    if image_dir is None:
      missing.append("Manually_Annotated_Images/")
    if missing:
      raise UserError(f"affectnet: {manual_dir} has no {', '.join(missing)}: expected "
                      f"{spec.layout}; get it from {spec.source}")
    plan: common.Plan = {}
    for split, path in csvs.items():
      rows = common.open_csv(path)
      try:
        _, header = next(rows)
      except StopIteration:
        raise UserError(f"affectnet: {path} is empty: expected a header "
                        f"{','.join(COLUMNS)},...") from None
      cols = common.header_index(header, COLUMNS, path=path, spec=spec)
      items, missing_files = [], []
      for line, row in rows:
        if len(row) < len(header):
          raise UserError(f"affectnet: {path} line {line}: expected {len(header)} columns, got "
                          f"{len(row)}")
        expression = common.parse_int(row[cols[5]], what="expression", path=path, line=line,
                                      spec=spec, lo=0, hi=10)
        if expression > CONTEMPT:  # none, uncertain, non-face
          continue
        box = tuple(_number(row[c], what=header[c].strip(), path=path, line=line)
                    for c in cols[1:5])
        rel_path = row[cols[0]].strip()
        image = image_dir / rel_path
        if not reading.is_regular(image):
          missing_files.append(image)
        items.append((image, common.rel(image, manual_dir), box, expression))
      if missing_files:
        raise common.missing_files_error(spec, path, missing_files, manual_dir, len(items))
      if not items:
        raise UserError(f"affectnet: {path} has no rows with expression 0..7")
      plan[split] = items
    return plan

  def _generate_examples(self, items):
    size = self.builder_config.image_size
    tasks = [(str(image), name, box, label, size) for image, name, box, label in items]
    for key, data, label in common.parallel_map(encode_face, tasks, self._num_workers):
      yield key, {"image": data, "label": label}


BUILDER = AffectNet
