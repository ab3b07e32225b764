"""Code shared by the ferjax dataset builders (one TFDS builder per dataset).

Every builder is a `tfds.core.GeneratorBasedBuilder` written as `array_record` and prepared from
Python, so neither building nor reading needs TensorFlow. Images are stored in one of two ways:

* ``raw``: a `tfds.features.Tensor` of uint8 [H, W, C] with `Encoding.BYTES` (the array's bytes,
  no proto int64 list). Used for small fixed-size grayscale sets (FER-2013, FERPlus, CK+ at
  48x48): decoding is `np.frombuffer`.
* ``jpeg``: a `tfds.features.Image` given encoded JPEG bytes (PIL produced them, or they are the
  original file's bytes when those already have the stored size and mode). Used for RGB sets
  (RAF-DB, AffectNet). Readers skip TFDS' image decoding (`tfds.decode.SkipDecoding`) and decode
  with PIL themselves.

Preparation is split in two phases: `scan` (a classmethod) reads only the layout, label files and
CSVs and raises `UserError` for every problem it can find before anything is written; the TFDS
generators then decode the images and raise `UserError` naming the file for undecodable ones.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ferjax.data import reading
from ferjax.data.images import to_8bit
from ferjax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Files a download or an OS leaves next to images; never treated as images or class folders.
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a person needs to know about a dataset before preparing it (`builders.info`)."""
  name: str
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  splits: tuple[str, ...]
  source: str
  layout: str
  description: str
  notes: str = ""

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["num_classes"] = len(self.class_names)
    return d

  @property
  def instructions(self) -> str:
    return (f"Get {self.name} from {self.source}. Point --manual-dir at a folder holding "
            f"{self.layout}.")


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------


def visible_entries(folder: Path) -> list[Path]:
  """Entries of `folder`, sorted, without hidden files and OS droppings; an unreadable folder is
  a UserError naming it."""
  return [p for p in reading.list_dir(folder)
          if not p.name.startswith(".") and p.name.lower() not in IGNORED_NAMES]


def is_image_file(path: Path) -> bool:
  """A regular file with an image extension (a FIFO named x.png would block its reader)."""
  return path.suffix.lower() in IMAGE_EXTENSIONS and reading.is_regular(path)


def require_dir(manual_dir: Path, spec: DatasetSpec) -> Path:
  """The manual dir, resolved; UserError when it is missing, not a folder, or empty."""
  manual_dir = Path(manual_dir).expanduser()
  if not manual_dir.is_dir():
    what = "is not a folder" if manual_dir.exists() else "does not exist"
    raise UserError(f"{spec.name}: manual dir {reading.shown(manual_dir)} {what}: expected "
                    f"{spec.layout}; get the data from {spec.source}")
  if not visible_entries(manual_dir):
    raise UserError(f"{spec.name}: manual dir {reading.shown(manual_dir)} is empty: expected {spec.layout}; "
                    f"get the data from {spec.source}")
  return manual_dir.resolve()


def scan_class_folders(split_dir: Path, class_names: Sequence[str], *, spec: DatasetSpec,
                       manual_dir: Path, require_all: bool = True) -> list[tuple[Path, int]]:
  """(image path, label) for `split_dir/<class>/*.<image ext>`, sorted by class then name.

  Class folders match `class_names` case-insensitively. An unknown folder is a UserError, and so
  is a missing one when `require_all` (an empty one is allowed: `prepare` warns about classes
  without images). Files other than images inside class folders are ignored, and so are loose
  files next to the class folders; entries named like images that are not regular files (FIFOs,
  sockets, folders) are skipped with one warning line. An empty result is the caller's to judge.
  """
  lookup = {c.lower(): i for i, c in enumerate(class_names)}
  items, found, skipped = [], set(), 0
  for entry in visible_entries(split_dir):
    if not entry.is_dir():
      continue
    label = lookup.get(entry.name.lower())
    if label is None:
      raise UserError(f"{spec.name}: unknown class folder {rel(entry, manual_dir)}: expected "
                      f"folders named {', '.join(class_names)}")
    found.add(label)
    for p in visible_entries(entry):
      if is_image_file(p):
        items.append((p, label))
      elif p.suffix.lower() in IMAGE_EXTENSIONS:
        skipped += 1
  missing = [c for i, c in enumerate(class_names) if i not in found]
  if missing and require_all:
    folders = ", ".join(f"{rel(split_dir / c, manual_dir)}/" for c in missing)
    raise UserError(f"{spec.name}: missing class folder(s) {folders}: expected one folder per "
                    f"class ({', '.join(class_names)}; an empty one is allowed)")
  reading.skipped_warning(skipped, split_dir)
  return items


def rel(path: Path, root: Path) -> str:
  """`path` relative to `root` when inside it (shorter messages), else the full path; printable
  (non-UTF-8 bytes of a file name as `\\xNN`, see `reading.shown`)."""
  try:
    return reading.shown(Path(path).relative_to(root))
  except ValueError:
    return reading.shown(path)


def open_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
  """(line number, row) for every non-empty row of a CSV file, header included: UTF-8 (or
  UTF-16 with a byte-order mark); other encodings are a UserError naming the line."""
  return reading.read_csv(path)


def header_index(header: Sequence[str], wanted: Sequence[str], *, path: Path,
                 spec: DatasetSpec) -> list[int]:
  """Column indexes of `wanted` in `header` (case- and space-insensitive)."""
  norm = [h.strip().lower() for h in header]
  missing = [w for w in wanted if w.lower() not in norm]
  if missing:
    raise UserError(f"{spec.name}: {path} line 1: missing column(s) {', '.join(missing)}; "
                    f"expected a header with {','.join(wanted)}")
  return [norm.index(w.lower()) for w in wanted]


def parse_int(text: str, *, what: str, path: Path, line: int, spec: DatasetSpec,
              lo: int | None = None, hi: int | None = None) -> int:
  try:
    value = int(text.strip())
  except ValueError:
    value = None
  if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
    bounds = f" in {lo}..{hi}" if lo is not None and hi is not None else ""
    raise UserError(f"{spec.name}: {path} line {line}: {what} must be an integer{bounds}, "
                    f"got {text.strip()!r}")
  return value


def parse_pixels(text: str, *, size: int, path: Path, line: int,
                 spec: DatasetSpec) -> np.ndarray:
  """Space-separated ints 0..255 -> uint8 [size, size, 1]."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    try:
      values = np.fromstring(text, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
      values = None
  if values is None or values.size != size * size:
    got = "unparseable values" if values is None else f"{values.size} values"
    raise UserError(f"{spec.name}: {path} line {line}: expected {size * size} pixel values "
                    f"0..255 ({size}x{size}), got {got}")
  if values.min() < 0 or values.max() > 255:
    raise UserError(f"{spec.name}: {path} line {line}: pixel values must be in 0..255, got "
                    f"{values.min()}..{values.max()}")
  return values.astype(np.uint8).reshape(size, size, 1)


def missing_files_error(spec: DatasetSpec, label_file: Path, missing: Sequence[Path],
                        manual_dir: Path, total: int) -> UserError:
  odd = " (not a regular file)" if missing[0].exists() else ""
  return UserError(f"{spec.name}: {label_file} references {len(missing)} of {total} images that "
                   f"do not exist, first {rel(missing[0], manual_dir)}{odd}")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def open_image(source: Path | bytes, *, name: str, spec_name: str) -> Image.Image:
  """A loaded PIL image; UserError naming `name` when it cannot be read or decoded (Pillow's
  decompression-bomb guard included)."""
  try:
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
    return img
  except reading.IMAGE_ERRORS as e:
    raise decode_error(spec_name, name, e) from None


def read_file(path: Path, *, name: str, spec_name: str) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise decode_error(spec_name, name, e) from None


def decode_error(spec_name: str, name: str, error: BaseException) -> UserError:
  verb = "read" if isinstance(error, OSError) and error.errno else "decode"
  return UserError(f"{spec_name}: cannot {verb} image {reading.shown(name)}: "
                   f"{reading.image_reason(error)}")


def to_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
  """PIL image of any bit depth -> uint8 [size, size, channels] (converted, resized bilinear
  when needed)."""
  img = to_8bit(img).convert("L" if channels == 1 else "RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def jpeg_for_storage(path: Path, *, size: int, name: str, spec_name: str) -> bytes:
  """JPEG bytes of an RGB `size`x`size` image: the file itself when it already is one."""
  data = read_file(path, name=name, spec_name=spec_name)
  img = open_image(data, name=name, spec_name=spec_name)
  if img.format == "JPEG" and img.mode == "RGB" and img.size == (size, size):
    return data
  img = to_8bit(img).convert("RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return encode_jpeg(img)


def decode_stored(value: Any, channels: int) -> np.ndarray:
  """A stored image (raw array or encoded bytes) -> uint8 [H, W, C]."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    return value
  if isinstance(value, np.ndarray):  # A 0-d object array holding bytes.
    value = value.item()
  with Image.open(io.BytesIO(value)) as img:
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
  return arr.reshape(arr.shape[0], arr.shape[1], channels)


# ---------------------------------------------------------------------------------------------
# Parallel encoding: threads, since PIL releases the GIL while it decodes, resizes and encodes
# (processes would need the caller's script to be import-safe, or fork a multithreaded JAX).
# ---------------------------------------------------------------------------------------------


def default_num_workers() -> int:
  return max(1, min(8, (os.cpu_count() or 1)))


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int,
                 window: int = 1024) -> Iterator[Any]:
  """`map(fn, items)` in order, over `num_workers` threads, `window` items at a time.

  Memory stays bounded by one window of results. Small inputs run in this thread.
  """
  if num_workers <= 1 or len(items) <= window:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for start in range(0, len(items), window):
      yield from pool.map(fn, items[start:start + window])


# ---------------------------------------------------------------------------------------------
# The builder base class
# ---------------------------------------------------------------------------------------------

Plan = dict[str, list[Any]]


class FerBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the ferjax builders: features, manual-dir scan, and per-split generation.

  `on_example`, when given, is called once per generated example (a progress bar's update).

  Subclasses set `SPEC`, `STORAGE` ("raw" or "jpeg"), `LABEL_INDEX`,
  `MANUAL_DOWNLOAD_INSTRUCTIONS`, and
  implement `scan(manual_dir) -> {split: items}` (validation only, nothing decoded or written)
  and `_generate_examples(items)` yielding `(key, example)`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First ferjax release."}
  SPEC: ClassVar[DatasetSpec]
  STORAGE: ClassVar[str] = "raw"
  LABEL_INDEX: ClassVar[int]  # Where the label sits in a plan item (the empty-class check).

  def __init__(self, *, plan: Plan | None = None, manual_root: Path | None = None,
               num_workers: int = 1, on_example: Callable[[], object] | None = None,
               **kwargs):
    self._plan = plan
    self._on_example = on_example
    self._manual_root = manual_root
    self._num_workers = num_workers
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' own lookup needs the `importlib_resources` backport for builders that live in a
    # package; the file of the class is all it needs (for a checksums file we do not have).
    return epath.Path(inspect.getfile(cls))

  # TFDS prints where it prepares (our staging dir, renamed afterwards): the caller reports the
  # final location instead. TFDS' progress bars are turned off by the caller, which shows its
  # own through `on_example`.
  def _log_download_bytes(self) -> None:
    """Silenced (see above)."""

  def _log_download_done(self) -> None:
    """Silenced (see above)."""

  # -- what a subclass provides ----------------------------------------------------------------

  @classmethod
  def scan(cls, manual_dir: Path) -> Plan:
    raise TypeError(f"{cls.__name__} must define scan(manual_dir): each dataset's builder does")

  def _generate_examples(self, items):
    raise TypeError(f"{type(self).__name__} must define _generate_examples(items)")

  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {}

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.SPEC.image_shape

  # -- public split names -> stored splits (overridden for derived splits) -------------------

  @classmethod
  def spec_for(cls, name: str) -> DatasetSpec:
    return cls.SPEC

  @classmethod
  def select(cls, name: str, split: str, stored: Sequence[str] | None
             ) -> tuple[str, Callable[[dict[str, np.ndarray]], np.ndarray] | None]:
    """(stored split, selector or None) for public split `split` of dataset `name`.

    A selector maps the split's non-image features (arrays) to a boolean mask of the examples
    that belong to `split`. `stored` = the prepared splits, or None to check the name only.
    """
    spec = cls.spec_for(name)
    if split not in spec.splits:
      raise UserError(f"dataset {name!r} has no split {split!r}: expected one of "
                      f"{', '.join(spec.splits)}")
    if stored is not None and split not in stored:
      raise UserError(f"dataset {name!r} was prepared without a {split!r} split (its raw files "
                      f"had none); available: {', '.join(cls.public_splits(name, stored))}")
    return split, None

  @classmethod
  def public_splits(cls, name: str, stored: Sequence[str]) -> tuple[str, ...]:
    return tuple(s for s in cls.spec_for(name).splits if s in stored)

  # -- TFDS hooks -----------------------------------------------------------------------------

  def _info(self) -> tfds.core.DatasetInfo:
    shape = self.image_shape
    if self.STORAGE == "raw":
      image = tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                   encoding=tfds.features.Encoding.BYTES)
    else:
      image = tfds.features.Image(shape=shape, encoding_format="jpeg")
    features = {
        "image": image,
        "label": tfds.features.ClassLabel(names=list(self.SPEC.class_names)),
        **self._extra_features(),
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.SPEC.description,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    plan = self._plan
    if plan is None:
      plan = self.scan(self._manual_root or Path(dl_manager.manual_dir))
    return {split: self._examples(items) for split, items in plan.items()}

  def _examples(self, items):
    """`_generate_examples(items)`, calling `on_example` (when given) after each example."""
    if self._on_example is None:
      yield from self._generate_examples(items)
      return
    for example in self._generate_examples(items):
      yield example
      self._on_example()

