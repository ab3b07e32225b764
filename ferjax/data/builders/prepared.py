"""Opening a prepared dataset (`Prepared`) and what is read from it without loading images:
`available_splits`, `split_sizes`, `fold_summary`, `prepared_source`.

Opening checks that every shard is there with the byte size `prepare` recorded in the version
dir's `ferjax_files.json`, so damaged data (a truncated copy, a deleted shard, a garbled JSON
file) is one error naming the file and the command that prepares it again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from ferjax.data import reading
from ferjax.data.builders.locate import (MANIFEST, SOURCE, builder_cls, builder_module, damaged,
                                         dataset_spec, not_prepared, prepared_config, prepared_dir,
                                         resolve_data_dir, variant_dir)
from ferjax.errors import UserError

READ_CHUNK = 1024  # Records decoded per step when loading: bounds memory beyond the result.


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


class Prepared:
  """A prepared dataset opened for random access (TFDS array_record data sources).

  Opening checks what is cheap to check (both JSON files parse, every shard is a regular file
  of the size `prepare` recorded); an error while reading records later names the damaged
  shard too. Both are a UserError saying how to prepare the dataset again.
  """

  def __init__(self, name: str, data_dir: Path, image_size=None):
    prepared, config = prepared_config(name, data_dir, image_size)
    if not prepared:
      raise not_prepared(name, data_dir)
    import tensorflow_datasets as tfds
    self.name = name
    self.data_dir = data_dir
    self.spec = dataset_spec(name)
    self.cls = builder_cls(name)
    self.dir = variant_dir(self.cls, data_dir, config)
    for meta in ("dataset_info.json", "features.json", MANIFEST):
      self._check_json(self.dir / meta, required=meta != MANIFEST)
    try:
      self.builder = self.cls(data_dir=str(data_dir), file_format="array_record",
                              config=self.cls.config_named(config) if config else None)
      self.stored_splits = tuple(self.builder.info.splits.keys())
      self.shape = tuple(self.builder.info.features["image"].shape)
    except UserError:
      raise
    except Exception as e:  # TFDS' many ways of failing on a malformed dataset_info.json.
      raise self.damaged(self.dir / "dataset_info.json",
                         f"cannot be read ({_reason(e)})") from None
    if not self.stored_splits:
      raise self.damaged(self.dir / "dataset_info.json", "records no splits")
    self._check_shards()
    decoders = {"image": tfds.decode.SkipDecoding()} if self.cls.STORAGE != "raw" else None
    self._decoders = decoders
    self._sources = {}
    self._scalars = {}

  # -- integrity -------------------------------------------------------------------------------

  def damaged(self, path: Path, problem: str) -> UserError:
    return damaged(self.name, self.data_dir, path, problem)

  def _check_json(self, path: Path, required: bool) -> None:
    if not required and not path.exists():
      return  # Prepared before ferjax recorded shard sizes.
    try:
      json.loads(path.read_bytes())
    except OSError as e:
      raise self.damaged(path, f"cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # Also UnicodeDecodeError.
      raise self.damaged(path, f"is not valid JSON ({str(e).splitlines()[0]})") from None

  def _shards(self, split: str) -> list[tuple[Path, int]]:
    info = self.builder.info.splits[split]
    return [(Path(os.fspath(p)), int(n)) for p, n in zip(info.filepaths, info.shard_lengths)]

  def _check_shards(self) -> None:
    """Every shard exists, is a regular file and, when recorded, has the size it was written
    with (a stat per shard: cheap enough for every open)."""
    manifest = self.dir / MANIFEST
    sizes = json.loads(manifest.read_bytes()) if manifest.exists() else {"files": {}}
    sizes = sizes.get("files") if isinstance(sizes, dict) else None
    if not isinstance(sizes, dict):
      raise self.damaged(manifest, "does not map shard files to sizes")
    for split in self.stored_splits:
      for path, _ in self._shards(split):
        if not reading.is_regular(path):
          raise self.damaged(path, "is missing" if not path.exists() else "is not a regular file")
        size, recorded = path.stat().st_size, sizes.get(path.name)
        if recorded is not None and size != recorded:
          raise self.damaged(path, f"has {size} bytes but {recorded} were written (truncated or "
                                   f"overwritten)")

  def _read_error(self, split: str, error: Exception) -> UserError:
    """The UserError for `error` raised while reading split `split`, naming the first shard
    that does not open with the number of records it was written with."""
    from array_record.python import array_record_module
    for path, length in self._shards(split):
      try:
        reader = array_record_module.ArrayRecordReader(str(path))
        count = reader.num_records()
        reader.close()
      except Exception as e:  # The reader's own (C++) errors: RuntimeError, ValueError, ...
        return self.damaged(path, f"cannot be read ({_reason(e)})")
      if count != length:
        return self.damaged(path, f"holds {count} records but {length} were written")
    return self.damaged(self.dir, f"split {split!r} cannot be read ({_reason(error)})")

  @contextlib.contextmanager
  def _reading(self, split: str):
    """Turns a failure to read or decode records of `split` into the damaged-data error."""
    try:
      yield
    except UserError:
      raise
    except Exception as e:
      raise self._read_error(split, e) from None

  # -- reading ---------------------------------------------------------------------------------

  def source(self, split: str):
    if split not in self._sources:
      with self._reading(split):
        self._sources[split] = self.builder.as_data_source(split, decoders=self._decoders)
    return self._sources[split]

  def public_splits(self) -> tuple[str, ...]:
    return self.cls.public_splits(self.name, self.stored_splits)

  def indices(self, split: str) -> tuple[str, np.ndarray]:
    """(stored split, record indices) making up public split `split`."""
    stored, selector = self.cls.select(self.name, split, self.stored_splits)
    with self._reading(stored):
      n = len(self.source(stored))
    if selector is None:
      return stored, np.arange(n, dtype=np.int64)
    indices = np.flatnonzero(selector(self.scalars(stored))).astype(np.int64)
    if indices.size == 0:
      raise UserError(f"split {split!r} of dataset {self.name!r} is empty in this preparation")
    return stored, indices

  def scalars(self, stored: str) -> dict[str, np.ndarray]:
    """Every non-image feature of split `stored` as arrays (images left undecoded), read once
    per split (selecting a split and reading its labels share one pass)."""
    if stored not in self._scalars:
      self._scalars[stored] = self._read_scalars(stored)
    return dict(self._scalars[stored])

  def _read_scalars(self, stored: str) -> dict[str, np.ndarray]:
    src = self.source(stored)
    out: dict[str, list] = {}
    with self._reading(stored):
      for start in range(0, len(src), READ_CHUNK):
        for record in src.__getitems__(list(range(start, min(start + READ_CHUNK, len(src))))):
          for key, value in record.items():
            if key != "image":
              out.setdefault(key, []).append(value)
    return {k: np.asarray(v) for k, v in out.items()}

  def read(self, stored: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, H, W, C] and int32 labels [n] of `indices`, READ_CHUNK at a time."""
    return self._read(stored, indices, extras=False)[:2]

  def read_with_extras(self, stored: str, indices: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`read` plus {feature: array [n]} of every other non-image feature (CK+: subject, fold)."""
    return self._read(stored, indices, extras=True)

  def _read(self, stored: str, indices: np.ndarray, extras: bool):
    from ferjax.data.builders import common
    src = self.source(stored)
    n = len(indices)
    images = np.empty((n, *self.shape), np.uint8)
    labels = np.empty((n,), np.int32)
    others: dict[str, list] = {}
    channels = self.shape[-1]
    with self._reading(stored):
      for start in range(0, n, READ_CHUNK):
        keys = [int(i) for i in indices[start:start + READ_CHUNK]]
        for j, record in enumerate(src.__getitems__(keys)):
          images[start + j] = common.decode_stored(record["image"], channels)
          labels[start + j] = record["label"]
          if extras:
            for key, value in record.items():
              if key not in ("image", "label"):
                others.setdefault(key, []).append(value)
    return images, labels, {k: np.asarray(v) for k, v in others.items()}


def available_splits(name: str, data_dir=None, *, folds: bool = False) -> tuple[str, ...]:
  """Splits of prepared dataset `name` that `load_prepared` accepts.

  A `UserError` naming the `ferjax data prepare` command when not prepared (`is_prepared`
  asks without raising). CK+ also accepts the per-fold splits `fold<k>_train` /
  `fold<k>_test`, listed after the others only with `folds`.
  """
  public = Prepared(name, resolve_data_dir(data_dir)).public_splits()
  if not folds or not public:
    return public
  return public + tuple(f"fold{k}_{side}" for k in range(_num_folds(name))
                        for side in ("train", "test"))


def _num_folds(name: str) -> int:
  """How many subject-disjoint folds dataset `name` has (CK+: 10; others: 0)."""
  return int(getattr(builder_module(name), "NUM_FOLDS", 0))


def fold_summary(name: str, data_dir=None) -> list[dict] | None:
  """Per fold of a dataset with subject-disjoint folds (CK+), from its prepared data:
  [{"fold", "subjects" (count), "images", "subject_ids"}] for every fold; None for others."""
  if not _num_folds(name):
    return None
  ds = Prepared(name, resolve_data_dir(data_dir))
  if not {"fold", "subject"} <= set(ds.builder.info.features.keys()):
    return None
  scalars = ds.scalars(ds.cls.select(name, "all", ds.stored_splits)[0])
  summary = []
  for k in range(_num_folds(name)):
    members = scalars["fold"] == k
    subjects = sorted({int(s) for s in scalars["subject"][members]})
    summary.append({"fold": k, "subjects": len(subjects), "images": int(members.sum()),
                    "subject_ids": subjects})
  return summary


def split_sizes(name: str, data_dir=None) -> dict[str, int]:
  """{split: number of examples} for every split `available_splits` lists."""
  data_dir = resolve_data_dir(data_dir)
  ds = Prepared(name, data_dir)
  sizes = {}
  for split in ds.public_splits():
    sizes[split] = int(ds.indices(split)[1].size)
  return sizes


def read_source(name: str, version_dir: Path, data_dir: Path) -> dict | None:
  """The source recorded in `version_dir`; None when prepared before ferjax recorded it."""
  path = version_dir / SOURCE
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_bytes())
  except OSError as e:
    raise damaged(name, data_dir, path, f"cannot be read ({e.strerror or e})") from None
  except ValueError as e:
    raise damaged(name, data_dir, path, f"is not valid JSON ({str(e).splitlines()[0]})") \
        from None
  fields = {"manual_dir": str, "files": int, "fingerprint": str}
  if not isinstance(record, dict) or not all(isinstance(record.get(k), t)
                                             for k, t in fields.items()):
    raise damaged(name, data_dir, path, "does not record manual_dir, files and fingerprint")
  return record


def prepared_source(name: str, data_dir=None, image_size: int | None = None) -> dict | None:
  """What the preparation `prepare` would reuse was made from: {"manual_dir" (resolved),
  "files", "fingerprint"}; None when not prepared, or prepared before ferjax recorded it."""
  final = prepared_dir(name, data_dir, image_size)
  return None if final is None else read_source(name, final, resolve_data_dir(data_dir))
