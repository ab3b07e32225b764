"""Preparing and reading the real FER datasets (public API of `ferjax.data.builders`).

Layout of a data dir (default `$FERJAX_DATA_DIR`, else `~/.ferjax/datasets`):

    <data_dir>/<builder>/[<config>/]<version>/   one finished TFDS dataset (array_record files,
                                                 dataset_info.json, features.json)
    <data_dir>/.staging-<builder>-<id>/          a preparation in progress (deleted afterwards)
    <data_dir>/.<builder>.lock                   serialises preparations of one builder

Preparation writes into a staging dir and moves the finished version dir into place with one
rename, so a failed or interrupted preparation leaves nothing that looks prepared; the next
`prepare` removes stale staging dirs and starts again.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ferjax.data.dataset import Dataset, LazyImages
from ferjax.errors import UserError

# Public dataset name -> module holding its builder.
_MODULES = {
    "fer2013": "fer2013",
    "ferplus": "ferplus",
    "rafdb": "rafdb",
    "affectnet": "affectnet",
    "affectnet8": "affectnet",
    "ckplus": "ckplus",
}
NAMES = tuple(_MODULES)
DATA_DIR_ENV = "FERJAX_DATA_DIR"
READ_CHUNK = 1024  # Records decoded per step when loading: bounds memory beyond the result.


def default_data_dir() -> Path:
  """`$FERJAX_DATA_DIR` when set, else `~/.ferjax/datasets`."""
  env = os.environ.get(DATA_DIR_ENV)
  return Path(env).expanduser() if env else Path.home() / ".ferjax" / "datasets"


def _data_dir(data_dir) -> Path:
  return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _module(name: str):
  if name not in _MODULES:
    if name == "synthetic":
      raise UserError("dataset 'synthetic' is generated on the fly and needs no preparation")
    raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(NAMES)}")
  return importlib.import_module(f"ferjax.data.builders.{_MODULES[name]}")


def _spec(name: str):
  return _builder_cls(name).spec_for(name)


def _builder_cls(name: str):
  return _module(name).BUILDER


def prepare_command(name: str, manual_dir: str = "DIR") -> str:
  return f"ferjax data prepare {name} --manual-dir {manual_dir}"


def info(name: str) -> dict:
  """What a person needs to know about dataset `name` (no data needed).

  Keys: name, class_names, num_classes, image_shape (stored form), splits, source (where to get
  it), layout (what the manual dir must hold), description, notes, prepare_command.
  """
  d = _spec(name).as_dict()
  d["prepare_command"] = prepare_command(name)
  return d


# ---------------------------------------------------------------------------------------------
# Locating prepared data
# ---------------------------------------------------------------------------------------------


def _variant_dir(cls, data_dir: Path, config: str | None) -> Path:
  parts = [cls.name] + ([config] if config else []) + [str(cls.VERSION)]
  return data_dir.joinpath(*parts)


def _is_complete(variant_dir: Path) -> bool:
  return all((variant_dir / f).is_file() for f in ("dataset_info.json", "features.json"))


def _prepared_config(name: str, data_dir: Path, image_size=None) -> tuple[bool, str | None]:
  """(prepared?, config name) for dataset `name` in `data_dir`.

  Builders without configs use config None. For builders with configs (AffectNet's stored image
  size), prefers the config matching `image_size`, then the default, then any prepared one.
  """
  cls = _builder_cls(name)
  if not hasattr(cls, "config_for"):
    return _is_complete(_variant_dir(cls, data_dir, None)), None
  candidates = [f"{image_size}px"] if image_size is not None else []
  candidates.append(cls.config_for(None).name)
  root = data_dir / cls.name
  if root.is_dir():
    candidates.extend(sorted(p.name for p in root.iterdir() if not p.name.startswith(".")))
  for config in candidates:
    if cls.config_named(config) and _is_complete(_variant_dir(cls, data_dir, config)):
      return True, config
  return False, cls.config_for(None).name


def is_prepared(name: str, data_dir=None) -> bool:
  """Whether dataset `name` has been prepared in `data_dir`."""
  return _prepared_config(name, _data_dir(data_dir))[0]


def _not_prepared(name: str, data_dir: Path) -> UserError:
  spec = _spec(name)
  where = "" if data_dir == default_data_dir() else f" (with {DATA_DIR_ENV}={data_dir})"
  return UserError(f"dataset {name!r} is not prepared in {data_dir}: run "
                   f"`{prepare_command(name)}`{where} where DIR holds {spec.layout} "
                   f"(get it from {spec.source})")


class _Prepared:
  """A prepared dataset opened for random access (TFDS array_record data sources)."""

  def __init__(self, name: str, data_dir: Path, image_size=None):
    prepared, config = _prepared_config(name, data_dir, image_size)
    if not prepared:
      raise _not_prepared(name, data_dir)
    import tensorflow_datasets as tfds
    self.name = name
    self.spec = _spec(name)
    self.cls = _builder_cls(name)
    self.builder = self.cls(data_dir=str(data_dir), file_format="array_record",
                            config=self.cls.config_named(config) if config else None)
    self.stored_splits = tuple(self.builder.info.splits.keys())
    self.shape = tuple(self.builder.info.features["image"].shape)
    decoders = {"image": tfds.decode.SkipDecoding()} if self.cls.STORAGE != "raw" else None
    self._decoders = decoders
    self._sources = {}

  def source(self, split: str):
    if split not in self._sources:
      self._sources[split] = self.builder.as_data_source(split, decoders=self._decoders)
    return self._sources[split]

  def public_splits(self) -> tuple[str, ...]:
    return self.cls.public_splits(self.name, self.stored_splits)

  def indices(self, split: str) -> tuple[str, np.ndarray]:
    """(stored split, record indices) making up public split `split`."""
    stored, selector = self.cls.select(self.name, split, self.stored_splits)
    n = len(self.source(stored))
    if selector is None:
      return stored, np.arange(n, dtype=np.int64)
    indices = np.flatnonzero(selector(self.scalars(stored))).astype(np.int64)
    if indices.size == 0:
      raise UserError(f"split {split!r} of dataset {self.name!r} is empty in this preparation")
    return stored, indices

  def scalars(self, stored: str) -> dict[str, np.ndarray]:
    """Every non-image feature of split `stored` as arrays (images left undecoded)."""
    src = self.source(stored)
    out: dict[str, list] = {}
    for start in range(0, len(src), READ_CHUNK):
      for record in src.__getitems__(list(range(start, min(start + READ_CHUNK, len(src))))):
        for key, value in record.items():
          if key != "image":
            out.setdefault(key, []).append(value)
    return {k: np.asarray(v) for k, v in out.items()}

  def read(self, stored: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, H, W, C] and int32 labels [n] of `indices`, READ_CHUNK at a time."""
    from ferjax.data.builders import common
    src = self.source(stored)
    n = len(indices)
    images = np.empty((n, *self.shape), np.uint8)
    labels = np.empty((n,), np.int32)
    channels = self.shape[-1]
    for start in range(0, n, READ_CHUNK):
      keys = [int(i) for i in indices[start:start + READ_CHUNK]]
      for j, record in enumerate(src.__getitems__(keys)):
        images[start + j] = common.decode_stored(record["image"], channels)
        labels[start + j] = record["label"]
    return images, labels


def available_splits(name: str, data_dir=None) -> tuple[str, ...]:
  """Splits of prepared dataset `name` that `load_prepared` accepts.

  A `UserError` naming the `ferjax data prepare` command when not prepared (`is_prepared`
  asks without raising). CK+ also accepts the per-fold splits `fold<k>_train` /
  `fold<k>_test`, not listed here.
  """
  return _Prepared(name, _data_dir(data_dir)).public_splits()


def split_sizes(name: str, data_dir=None) -> dict[str, int]:
  """{split: number of examples} for every split `available_splits` lists."""
  data_dir = _data_dir(data_dir)
  ds = _Prepared(name, data_dir)
  sizes = {}
  for split in ds.public_splits():
    sizes[split] = int(ds.indices(split)[1].size)
  return sizes


# ---------------------------------------------------------------------------------------------
# Preparing
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path):
  """An exclusive advisory lock on `path` (a no-op where fcntl is missing)."""
  try:
    import fcntl
  except ImportError:  # Windows: no lock, and no removal of other preparations' staging dirs.
    yield False
    return
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, manual_dir, data_dir=None, *, image_size: int | None = None,
            force: bool = False, num_workers: int | None = None) -> dict[str, int]:
  """Prepares dataset `name` from the raw files in `manual_dir`; returns {split: count}.

  The raw layout is validated before anything is written (see `info(name)["layout"]`); every
  problem is a `UserError` naming the file. Already prepared data is reused unless `force`
  (then the new data replaces the old only once complete). `image_size` sets AffectNet's stored
  size (default 112); other datasets have a fixed stored form. `num_workers` threads encode
  AffectNet's images (default: up to 8, one per CPU).
  """
  from ferjax.data.builders import common
  import tensorflow_datasets as tfds

  cls = _builder_cls(name)
  spec = _spec(name)
  if image_size is not None and not hasattr(cls, "config_for"):
    raise UserError(f"dataset {name!r} has a fixed stored image size {spec.image_shape}; "
                    f"image_size applies to affectnet only")
  config = cls.config_for(image_size) if hasattr(cls, "config_for") else None
  data_dir = _data_dir(data_dir)
  manual_dir = Path(manual_dir).expanduser()
  final = _variant_dir(cls, data_dir, config.name if config else None)
  if _is_complete(final) and not force:
    return split_sizes(name, data_dir)
  plan = cls.scan(manual_dir)  # Validates the raw files; writes nothing.
  manual_root = manual_dir.resolve()
  data_dir.mkdir(parents=True, exist_ok=True)

  with _lock(data_dir / f".{cls.name}.lock") as locked:
    if locked:  # No other preparation of this builder runs: leftovers are stale.
      for stale in data_dir.glob(f".staging-{cls.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if _is_complete(final) and not force:  # Prepared meanwhile by another process.
      return split_sizes(name, data_dir)
    staging = data_dir / f".staging-{cls.name}-{uuid.uuid4().hex[:12]}"
    try:
      builder = cls(data_dir=str(staging), config=config, file_format="array_record",
                    plan=plan, manual_root=manual_root,
                    num_workers=num_workers or common.default_num_workers())
      with _small_shuffle_buffer():
        builder.download_and_prepare(
            download_dir=str(staging / "downloads"),
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_root)))
      built = Path(builder.data_path)
      final.parent.mkdir(parents=True, exist_ok=True)
      old = staging / "replaced"
      if final.exists():
        os.replace(final, old)
      try:
        os.replace(built, final)
      except BaseException:
        if old.exists():
          os.replace(old, final)
        raise
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  return split_sizes(name, data_dir)


@contextlib.contextmanager
def _small_shuffle_buffer(limit: int = 256 << 20):
  """Lowers TFDS' in-memory shuffle buffer (1 GB) so big preparations spill to disk sooner."""
  try:
    from tensorflow_datasets.core import shuffle
  except ImportError:
    yield
    return
  old = getattr(shuffle, "MAX_MEM_BUFFER_SIZE", None)
  if old is None:
    yield
    return
  shuffle.MAX_MEM_BUFFER_SIZE = min(old, limit)
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = old


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _open(name: str, split: str, data_dir, manual_dir=None, image_size=None) -> _Prepared:
  cls = _builder_cls(name)
  cls.select(name, split, None)  # Unknown split names fail before any preparation.
  data_dir = _data_dir(data_dir)
  if not _prepared_config(name, data_dir, image_size)[0]:
    if manual_dir is None:
      raise _not_prepared(name, data_dir)
    prepare(name, manual_dir, data_dir)
  return _Prepared(name, data_dir, image_size)


def load_prepared(name: str, split: str, data_dir=None, manual_dir=None, *,
                  lazy: bool = False) -> Dataset:
  """Reads split `split` of prepared dataset `name` into host memory (no TensorFlow).

  When the dataset is not prepared: prepares it from `manual_dir` if given, else raises a
  `UserError` naming the `ferjax data prepare` command to run. Records are decoded
  `READ_CHUNK` at a time into one preallocated array, so peak memory is the result plus a chunk.
  `lazy`: read only the labels now; the images are a `LazyImages` read when rows are sliced.
  """
  ds = _open(name, split, data_dir, manual_dir)
  stored, indices = ds.indices(split)
  if lazy:
    labels = np.asarray(ds.scalars(stored)["label"], np.int32)[indices]
    images = LazyImages(lambda records: ds.read(stored, records)[0], indices, ds.shape)
  else:
    images, labels = ds.read(stored, indices)
  return Dataset(images, labels, ds.spec.class_names, name, split)


def stream(name: str, split: str, data_dir=None, batch_size: int = 256,
           shuffle_seed: int | None = None, image_size: int | None = None,
           drop_remainder: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One pass over a prepared split as (uint8 images [B,H,W,C], int32 labels [B]) batches.

  For sets too big for memory (AffectNet); works for every prepared dataset. `shuffle_seed`
  visits the examples in a seeded random order (None: stored order). `image_size` resizes
  (bilinear, square). The last batch is smaller unless `drop_remainder`. Errors (not prepared,
  unknown split) are raised by this call, not by the first `next`.
  """
  if int(batch_size) < 1:
    raise UserError(f"batch_size: expected a positive integer, got {batch_size!r}")
  batch_size = int(batch_size)
  ds = _open(name, split, data_dir, image_size=image_size)
  stored, indices = ds.indices(split)
  if shuffle_seed is not None:
    indices = np.random.default_rng(shuffle_seed).permutation(indices)
  convert: Callable[[np.ndarray], np.ndarray] = lambda x: x
  if image_size is not None and tuple(ds.shape[:2]) != (image_size, image_size):
    from ferjax.data.images import convert_images
    convert = lambda x: convert_images(x, image_size=int(image_size))

  def batches():
    stop = len(indices) - len(indices) % batch_size if drop_remainder else len(indices)
    for start in range(0, stop, batch_size):
      images, labels = ds.read(stored, indices[start:start + batch_size])
      yield convert(images), labels

  return batches()
