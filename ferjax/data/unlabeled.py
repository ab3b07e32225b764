"""Unlabeled face images for pre-training: the `data.sources` of a `ferjax pretrain` run.

    synthetic                      the synthetic train split's faces (data.num_examples of them)
    fer2013                        every image of a prepared dataset (any name `ferjax.data.load`
                                   knows but `folder`), labels ignored; its test split only with
                                   data.include_test, its validation split unless
                                   data.include_validation is False
    folder:/data/faces             every image file under a folder, searched recursively
    fer2013,folder:/data/faces:2   several sources joined by commas, each with an optional
                                   ":weight" (default 1)

A weight is the text after an entry's last colon when that text is a number, so a folder whose
own name ends in ":<number>" needs an explicit weight (`folder:/a/b:3:1`); paths may not hold
commas. A source of weight w has each of its images drawn w times as often as a weight-1 image
(whole copies, then a seeded random part for the fraction, as joint classifier training:
`splits.weighted_rows`).

Every image is converted to the run's size and channels: a folder's files (any format Pillow
opens, any size) are centre-cropped to a square, resized bilinearly and converted to gray or RGB;
hidden files and folders (a leading '.') are left out. Values are read by the one rule of
`ferjax.data.images.to_uint8` (16-bit scaled, floats in 0..1 or 0..255). A file that cannot be
decoded, or whose values that rule refuses (NaN, negative, floats over 255), is skipped: the
skipped files of a folder are counted in one `ferjax: warning:` line. A folder without a
single readable image is a one-line UserError naming it.

Validation: a seeded `data.val_fraction` of each source's distinct images (before weighting) is
held out, so the validation images never appear in training.
"""

import dataclasses
import math
import os
import pathlib

import jax
import numpy as np
from PIL import Image

from ferjax.data import reading, splits
from ferjax.data.images import to_8bit
from ferjax.data.loading import DATASET_NAMES, load
from ferjax.errors import UserError

FOLDER_PREFIX = "folder:"
DATASETS = tuple(n for n in DATASET_NAMES if n != "folder")  # synthetic and the prepared ones.
EXPECTED = (f"comma-separated sources, each one of {', '.join(DATASETS)} or folder:PATH, with an "
            "optional :weight (e.g. 'fer2013,folder:/data/faces:2')")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str  # a dataset name, or "folder"
  weight: float
  path: str | None = None  # folder sources only

  def __str__(self):
    return f"folder:{self.path}" if self.name == "folder" else self.name


def _split_weight(entry: str) -> tuple[str, str | None]:
  """(source text, weight text or None): the text after the last colon, when it is a number."""
  head, colon, tail = entry.rpartition(":")
  if not colon or not head.strip() or head.strip() == "folder":
    return entry, None
  try:
    float(tail)
  except ValueError:
    return entry, None
  return head.strip(), tail.strip()


def parse_sources(spec, field: str = "data.sources") -> list[Source]:
  """The sources of a `data.sources` text (module docstring); a UserError names `field`."""
  if not isinstance(spec, str) or not spec.strip():
    raise UserError(f"config field {field!r}: expected {EXPECTED}, got {spec!r}")
  sources = []
  for entry in (e.strip() for e in spec.split(",") if e.strip()):
    text, weight_text = _split_weight(entry)
    weight = float(weight_text) if weight_text is not None else 1.0
    if not (math.isfinite(weight) and weight > 0):
      raise UserError(f"config field {field!r}: weight of {text!r} in {spec!r}: expected a "
                      f"number > 0, got {weight_text!r}")
    if text.startswith(FOLDER_PREFIX):
      path = text[len(FOLDER_PREFIX):].strip()
      if not path:
        raise UserError(f"config field {field!r}: {entry!r} names no folder: expected "
                        "folder:PATH")
      source = Source("folder", weight, path)
    elif text in DATASETS:
      source = Source(text, weight)
    else:
      raise UserError(f"config field {field!r}: unknown source {text!r} in {spec!r}: expected "
                      f"{EXPECTED}")
    if any(str(s) == str(source) for s in sources):
      raise UserError(f"config field {field!r}: source {str(source)!r} is named twice in "
                      f"{spec!r}")
    sources.append(source)
  if not sources:
    raise UserError(f"config field {field!r}: expected {EXPECTED}, got {spec!r}")
  return sources


# --- Reading one source ---------------------------------------------------------------------------
def read_folder(path, *, image_size: int, channels: int) -> np.ndarray:
  """uint8 [N, image_size, image_size, channels]: every readable image file under `path`."""
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise UserError(f"data.sources folder {reading.shown(root)}: no such folder")

  def refuse(error: OSError):
    raise reading.io_error(error, "read folder", "data.sources names it") from None

  candidates = []
  for folder, subfolders, names in os.walk(root, onerror=refuse):
    subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    candidates += [pathlib.Path(folder) / n for n in sorted(names) if not n.startswith(".")]
  images, skipped = [], 0
  with reading.strict_images():
    for candidate in candidates:
      image = _read_face(candidate, image_size, channels) if reading.is_regular(candidate) else None
      if image is None:
        skipped += 1
      else:
        images.append(image)
  if not images:
    raise UserError(f"data.sources folder {reading.shown(root)}: no readable image in it or below "
                    f"({len(candidates)} file(s) tried; expected files Pillow can open)")
  if skipped:
    reading.warn(f"data.sources folder {root}: skipped {skipped} of {len(candidates)} file(s) "
               "that are not readable images")
  return np.stack(images)


def _read_face(path: pathlib.Path, image_size: int, channels: int) -> np.ndarray | None:
  """One file as uint8 [S, S, C] (centre square, resized), or None when it cannot be decoded."""
  try:
    with Image.open(path) as img:
      img = to_8bit(img).convert("L" if channels == 1 else "RGB")
      w, h = img.size
      side = min(w, h)
      left, top = (w - side) // 2, (h - side) // 2
      img = img.crop((left, top, left + side, top + side))
      img = img.resize((image_size, image_size), Image.BILINEAR)
      array = np.asarray(img, np.uint8)
  except reading.IMAGE_ERRORS:
    return None
  return array.reshape(image_size, image_size, channels)


def read_source(source: Source, data) -> np.ndarray:
  """The images of one source at data.image_size x data.channels, labels dropped."""
  size, channels = data.image_size, data.channels
  if source.name == "folder":
    return read_folder(source.path, image_size=size, channels=channels)
  if source.name == "synthetic":
    options = {} if data.num_examples is None else {"num_examples": data.num_examples}
    return load("synthetic", "train", image_size=size, channels=channels, **options).images
  from ferjax.data import builders
  read = lambda split: np.asarray(load(source.name, split, data_dir=data.data_dir,
                                       manual_dir=data.manual_dir, image_size=size,
                                       channels=channels, lazy=False).images)
  if not builders.is_prepared(source.name, data.data_dir):
    read("train")  # Prepares it from data.manual_dir, or names the command that would.
  left_out = {"test"} if not data.include_test else set()
  if not data.include_validation:
    left_out.add("validation")
  names = [s for s in builders.available_splits(source.name, data.data_dir) if s not in left_out]
  if not names:
    raise UserError(f"data.sources: {source.name} has no split left to pre-train on "
                    f"(it has {', '.join(builders.available_splits(source.name, data.data_dir))};"
                    " data.include_test / data.include_validation leave them out)")
  return np.concatenate([read(split) for split in names])


# --- The pool: every source, held out and weighted ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pool:
  train: np.ndarray  # uint8 [N, S, S, C], weighted (a weight-2 source's images twice)
  val: np.ndarray | None  # uint8 [M, S, S, C], distinct images held out of every source
  counts: dict  # str(source) -> (distinct train images, held-out images)


def load_pool(data, seed: int) -> Pool:
  """The train and validation images of a pretrain config's data group (module docstring)."""
  trains, vals, counts = [], [], {}
  for i, source in enumerate(parse_sources(data.sources)):
    images = read_source(source, data)
    n = len(images)
    held = min(n - 1, int(round(data.val_fraction * n)))
    order = np.random.default_rng([seed, 7, i]).permutation(n)
    train = images[np.sort(order[held:])]
    rows = splits.weighted_rows(len(train), source.weight, seed)
    trains.append(train[rows])
    vals.append(images[np.sort(order[:held])])
    counts[str(source)] = (len(train), held)
  val = np.concatenate(vals)
  pool = Pool(np.concatenate(trains), val if len(val) else None, counts)
  if jax.process_index() == 0:
    print(f"pretrain data: {len(pool.train)} train rows, "
          f"{0 if pool.val is None else len(pool.val)} held out; " + ", ".join(
              f"{name} {n} (+{held} held out)" for name, (n, held) in counts.items()))
  return pool
