"""Preparing and reading the real FER datasets (public API of `ferjax.data.builders`).

Layout of a data dir (default `$FERJAX_DATA_DIR`, else `~/.ferjax/datasets`):

    <data_dir>/<builder>/[<config>/]<version>/   one finished TFDS dataset (array_record files,
                                                 dataset_info.json, features.json)
    <data_dir>/.staging-<builder>-<id>/          a preparation in progress (deleted afterwards)
    <data_dir>/.<builder>.lock                   serialises preparations of one builder (holds
                                                 "pid N on HOST since TIME" while held)

Preparation writes into a staging dir and moves the finished version dir into place with one
rename, so a failed or interrupted preparation leaves nothing that looks prepared; the next
`prepare` removes stale staging dirs and starts again. A version dir also holds
`ferjax_files.json` (the byte size of every shard as written): opening a prepared dataset checks
that every shard is there with that size, so damaged data (a truncated copy, a deleted shard, a
garbled JSON file) is one error naming the file and the command that prepares it again. It also
holds `ferjax_source.json`: the manual dir it was prepared from (resolved path, number of files,
a fingerprint of their names and sizes). Asking for the dataset again from other raw files
(`prepare` without `force`, or `load_prepared` with another `manual_dir`) is refused instead of
silently reusing the old preparation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ferjax import writing
from ferjax.data import reading
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
MANIFEST = "ferjax_files.json"  # {"files": {shard file name: size in bytes}}, written by prepare.
SOURCE = "ferjax_source.json"  # {"manual_dir", "files", "fingerprint"}: what prepare read.
DEFAULT_WAIT_S = 3600.0  # How long `prepare` waits for another process preparing the same set.


def default_data_dir() -> Path:
  """`$FERJAX_DATA_DIR` when set, else `~/.ferjax/datasets`."""
  env = os.environ.get(DATA_DIR_ENV)
  return Path(env).expanduser() if env else Path.home() / ".ferjax" / "datasets"


def _data_dir(data_dir) -> Path:
  path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
  if path.exists() and not path.is_dir():
    raise UserError(f"data dir {reading.shown(path)} is not a folder: expected a folder for the "
                    f"prepared datasets (--data-dir or ${DATA_DIR_ENV})")
  return path


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


def prepared_dir(name: str, data_dir=None, image_size: int | None = None) -> Path | None:
  """The folder `prepare(name, ..., image_size=image_size)` would reuse, or None when that
  preparation does not exist yet."""
  cls = _builder_cls(name)
  config = cls.config_for(image_size).name if hasattr(cls, "config_for") else None
  final = _variant_dir(cls, _data_dir(data_dir), config)
  return final if _is_complete(final) else None


def _not_prepared(name: str, data_dir: Path) -> UserError:
  spec = _spec(name)
  where = "" if data_dir == default_data_dir() else f" (with {DATA_DIR_ENV}={data_dir})"
  return UserError(f"dataset {name!r} is not prepared in {data_dir}: run "
                   f"`{prepare_command(name)}`{where} where DIR holds {spec.layout} "
                   f"(get it from {spec.source})")


def _damaged(name: str, data_dir: Path, path: Path, problem: str) -> UserError:
  where = "" if data_dir == default_data_dir() else f" --data-dir {data_dir}"
  return UserError(f"prepared dataset {name!r} is damaged: {reading.shown(path)} {problem}: "
                   f"prepare it again with `{prepare_command(name)} --force{where}`")


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


class _Prepared:
  """A prepared dataset opened for random access (TFDS array_record data sources).

  Opening checks what is cheap to check (both JSON files parse, every shard is a regular file
  of the size `prepare` recorded); an error while reading records later names the damaged
  shard too. Both are a UserError saying how to prepare the dataset again.
  """

  def __init__(self, name: str, data_dir: Path, image_size=None):
    prepared, config = _prepared_config(name, data_dir, image_size)
    if not prepared:
      raise _not_prepared(name, data_dir)
    import tensorflow_datasets as tfds
    self.name = name
    self.data_dir = data_dir
    self.spec = _spec(name)
    self.cls = _builder_cls(name)
    self.dir = _variant_dir(self.cls, data_dir, config)
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
    return _damaged(self.name, self.data_dir, path, problem)

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
  public = _Prepared(name, _data_dir(data_dir)).public_splits()
  if not folds or not public:
    return public
  return public + tuple(f"fold{k}_{side}" for k in range(_num_folds(name))
                        for side in ("train", "test"))


def _num_folds(name: str) -> int:
  """How many subject-disjoint folds dataset `name` has (CK+: 10; others: 0)."""
  return int(getattr(_module(name), "NUM_FOLDS", 0))


def fold_summary(name: str, data_dir=None) -> list[dict] | None:
  """Per fold of a dataset with subject-disjoint folds (CK+), from its prepared data:
  [{"fold", "subjects" (count), "images", "subject_ids"}] for every fold; None for others."""
  if not _num_folds(name):
    return None
  ds = _Prepared(name, _data_dir(data_dir))
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
  data_dir = _data_dir(data_dir)
  ds = _Prepared(name, data_dir)
  sizes = {}
  for split in ds.public_splits():
    sizes[split] = int(ds.indices(split)[1].size)
  return sizes


# ---------------------------------------------------------------------------------------------
# What a preparation was made from
# ---------------------------------------------------------------------------------------------


def _dir_key(path) -> tuple[int, int] | None:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def _hash_tree(folder: Path, prefix: bytes, digest, seen: set) -> int:
  """Adds `relative path NUL size` of every file under `folder` to `digest`, in sorted order;
  returns how many. Hidden files and OS droppings are skipped (`common.visible_entries`),
  folders in `seen` (visited, or the data dir) too, so symlinked folders are followed once."""
  from ferjax.data.builders import common
  key = _dir_key(folder)
  if key is None or key in seen:
    return 0
  seen.add(key)
  count = 0
  for path in common.visible_entries(folder):
    rel = prefix + os.fsencode(path.name)
    try:
      is_dir = path.is_dir()
    except OSError:
      is_dir = False
    if is_dir:
      count += _hash_tree(path, rel + b"/", digest, seen)
      continue
    try:
      size = path.stat().st_size
    except OSError:
      size = -1  # A broken link: still part of the listing.
    digest.update(rel + b"\0" + str(size).encode() + b"\n")
    count += 1
  return count


def _source_record(name: str, manual_dir, data_dir: Path) -> dict:
  """What `manual_dir` holds, cheaply (names and sizes, one stat per file, no contents read):
  {"manual_dir": resolved path, "files": count, "fingerprint": sha256 over the sorted relative
  paths and sizes}. Hidden files, OS droppings and the data dir (when inside) are left out."""
  from ferjax.data.builders import common
  root = common.require_dir(Path(manual_dir), _spec(name))  # UserError: missing or empty.
  digest = hashlib.sha256()
  data_key = _dir_key(data_dir)
  count = _hash_tree(root, b"", digest, {data_key} if data_key else set())
  return {"manual_dir": str(root), "files": count, "fingerprint": "sha256:" + digest.hexdigest()}


def _read_source(name: str, version_dir: Path, data_dir: Path) -> dict | None:
  """The source recorded in `version_dir`; None when prepared before ferjax recorded it."""
  path = version_dir / SOURCE
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_bytes())
  except OSError as e:
    raise _damaged(name, data_dir, path, f"cannot be read ({e.strerror or e})") from None
  except ValueError as e:
    raise _damaged(name, data_dir, path, f"is not valid JSON ({str(e).splitlines()[0]})") \
        from None
  fields = {"manual_dir": str, "files": int, "fingerprint": str}
  if not isinstance(record, dict) or not all(isinstance(record.get(k), t)
                                             for k, t in fields.items()):
    raise _damaged(name, data_dir, path, "does not record manual_dir, files and fingerprint")
  return record


def prepared_source(name: str, data_dir=None, image_size: int | None = None) -> dict | None:
  """What the preparation `prepare` would reuse was made from: {"manual_dir" (resolved),
  "files", "fingerprint"}; None when not prepared, or prepared before ferjax recorded it."""
  final = prepared_dir(name, data_dir, image_size)
  return None if final is None else _read_source(name, final, _data_dir(data_dir))


def _files(n: int) -> str:
  return f"{n} file{'s' if n != 1 else ''}"


def _other_source(name: str, data_dir: Path, recorded: dict, current: dict,
                  loading: bool) -> UserError:
  """The refusal of `current` as the source of a dataset prepared from `recorded`."""
  old, new = reading.shown(recorded["manual_dir"]), reading.shown(current["manual_dir"])
  what = f"dataset {name!r} in {reading.shown(data_dir)} was prepared from {old}"
  if old == new:
    differs = (f"{what} when it held {_files(recorded['files'])}; it now holds other files "
               f"({_files(current['files'])})")
  else:
    flag = "manual_dir" if loading else "--manual-dir"
    differs = (f"{what} ({_files(recorded['files'])}), not from {flag} {new} "
               f"({_files(current['files'])})")
  if not loading:
    return UserError(f"{differs}: add --force to prepare it again from {new} (the old "
                     f"preparation is replaced once the new one is complete)")
  where = "" if data_dir == default_data_dir() else f" --data-dir {reading.shown(data_dir)}"
  return UserError(f"{differs}: prepare it again with `{prepare_command(name, new)} --force"
                   f"{where}`, or leave manual_dir (config field data.manual_dir) unset to use "
                   f"the prepared data")


def _check_source(name: str, version_dir: Path, manual_dir, data_dir: Path, *,
                  loading: bool) -> dict | None:
  """Refuses `manual_dir` when the preparation in `version_dir` was made from other files;
  returns the recorded source (None: prepared before ferjax recorded it, so not checked).

  `loading`: the cheap check for every load: the recorded path itself is accepted without
  listing it (the raw files may even be gone); another path is compared by fingerprint.
  """
  recorded = _read_source(name, version_dir, data_dir)
  if recorded is None:
    return None
  manual_dir = Path(manual_dir).expanduser()
  if loading and str(manual_dir.resolve()) == recorded["manual_dir"]:
    return recorded
  current = _source_record(name, manual_dir, data_dir)
  if current["fingerprint"] != recorded["fingerprint"]:
    raise _other_source(name, data_dir, recorded, current, loading)
  return recorded


# ---------------------------------------------------------------------------------------------
# Preparing
# ---------------------------------------------------------------------------------------------


def _lock(path: Path, *, wait: float | None, what: str):
  """The lock serialising preparations of one builder in a data dir (ferjax.writing)."""
  def refusal(holder: str, waited: float | None) -> str:
    where = f"(lock file {reading.shown(path)})"
    if waited is None:
      return (f"{what} is being prepared by {reading.shown(holder)} {where}: wait for it to finish, "
              "or pass --wait SECONDS to wait for it")
    return (f"{what} is still being prepared by {reading.shown(holder)} after waiting {waited:g} s "
            f"{where}: try again later or pass a longer --wait")
  return writing.exclusive_lock(path, refusal=refusal, wait=wait,
                               waiting=f" to finish preparing {what} (lock file "
                                       f"{reading.shown(path)})")


def _inside(filename, root: Path) -> bool:
  try:
    return Path(os.fsdecode(filename)).resolve().is_relative_to(root.resolve())
  except (OSError, ValueError):
    return False


def _os_error(error: OSError, name: str, data_dir: Path) -> UserError:
  """A one-line UserError for an OS error while preparing `name` into `data_dir`."""
  writing = error.filename is None or _inside(error.filename, data_dir)
  if not writing:
    return reading.io_error(error, f"read {name}'s raw file")
  code = writing.os_errno(error)  # Also for errors TFDS re-raised without their errno.
  if code in (errno.ENOSPC, errno.EDQUOT):
    return UserError(f"{name}: data dir {reading.shown(data_dir)} is full (no space left on "
                     f"device): free some space or pass another --data-dir (nothing of this "
                     f"preparation was kept)")
  if code in (errno.EACCES, errno.EPERM, errno.EROFS):
    return UserError(f"{name}: cannot write into data dir {reading.shown(data_dir)} "
                     f"({error.strerror or os.strerror(code)}): pass a writable --data-dir or set "
                     f"${DATA_DIR_ENV}")
  return reading.io_error(error, f"prepare {name} in {reading.shown(data_dir)}: writing",
                        "nothing of this preparation was kept")


def _warn_empty_classes(cls, plan) -> None:
  """One warning line per split with classes that get no images."""
  names = cls.SPEC.class_names
  for split, items in plan.items():
    counts = np.bincount([int(item[cls.LABEL_INDEX]) for item in items], minlength=len(names))
    empty = [c for c, n in zip(names, counts) if n == 0]
    if empty:
      reading.warn(f"{cls.SPEC.name}: split {split!r} has no images of class(es) "
                 f"{', '.join(empty)}: a model trained or scored on it never sees them")


def prepare(name: str, manual_dir, data_dir=None, *, image_size: int | None = None,
            force: bool = False, num_workers: int | None = None,
            wait: float | None = DEFAULT_WAIT_S, progress: bool | None = None) -> dict[str, int]:
  """Prepares dataset `name` from the raw files in `manual_dir`; returns {split: count}.

  The raw layout is validated before anything is written (see `info(name)["layout"]`); every
  problem is a `UserError` naming the file; a split without images of some class is one
  `ferjax: warning:` line. Already prepared data is reused unless `force` (then the new data
  replaces the old only once complete); `prepared_dir` says whether a call would reuse it. Reuse
  needs `manual_dir` to hold the files the data was prepared from (same names and sizes,
  `prepared_source`): other files are a `UserError` naming both that suggests `force`.
  `image_size` sets AffectNet's stored size (default 112); other datasets have a fixed stored
  form. `num_workers` threads encode AffectNet's images (default: up to 8, one per CPU). While
  another process prepares the same dataset into `data_dir`, waits up to `wait` seconds for it
  (0: refuse at once, None: no limit). `progress`: one progress bar (images written) on
  stderr (None: when stderr is a terminal); TFDS' own bars and logging are silenced either way.
  """
  if progress is None:
    progress = sys.stderr.isatty()
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
    _check_source(name, final, manual_dir, data_dir, loading=False)
    return split_sizes(name, data_dir)
  try:
    plan = cls.scan(manual_dir)  # Validates the raw files; writes nothing.
  except OSError as e:  # An unreadable label file or folder.
    raise reading.io_error(e, f"read {name}'s raw file") from None
  _warn_empty_classes(cls, plan)
  manual_root = manual_dir.resolve()
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
    with _lock(data_dir / f".{cls.name}.lock", wait=wait,
               what=f"{name} in {reading.shown(data_dir)}"):
      # No other preparation of this builder runs: leftovers are stale.
      for stale in data_dir.glob(f".staging-{cls.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
      if _is_complete(final) and not force:  # Prepared meanwhile by another process.
        _check_source(name, final, manual_dir, data_dir, loading=False)
        return split_sizes(name, data_dir)
      source = _source_record(name, manual_root, data_dir)
      _build(cls, config, plan, source, data_dir, final, num_workers, progress)
  except OSError as e:
    raise _os_error(e, name, data_dir) from None
  except (RuntimeError, ValueError) as e:  # The array_record writer's OS errors.
    if writing.os_errno(e) is None:
      raise
    raise _os_error(OSError(str(e)), name, data_dir) from None
  return split_sizes(name, data_dir)


def _build(cls, config, plan, source: dict, data_dir: Path, final: Path,
           num_workers: int | None, progress: bool) -> None:
  """Prepares `plan` (read from `source`, a `_source_record`) in a staging dir and renames the
  result to `final` (replacing an older preparation only once the new one is complete); the
  staging dir never outlives the call."""
  from ferjax.data.builders import common
  import tensorflow_datasets as tfds
  staging = data_dir / f".staging-{cls.name}-{uuid.uuid4().hex[:12]}"
  manual_root = Path(source["manual_dir"])
  total = sum(len(items) for items in plan.values())
  try:
    with _small_shuffle_buffer(), _quiet_tfds(), reading.strict_images(), \
        _progress_bar(cls.name, total, progress) as on_example:
      builder = cls(data_dir=str(staging), config=config, file_format="array_record",
                    plan=plan, manual_root=manual_root, on_example=on_example,
                    num_workers=num_workers or common.default_num_workers())
      builder.download_and_prepare(
          download_dir=str(staging / "downloads"),
          download_config=tfds.download.DownloadConfig(manual_dir=str(manual_root)))
    built = Path(builder.data_path)
    sizes = {p.name: p.stat().st_size for p in sorted(built.iterdir())
             if ".array_record-" in p.name}
    (built / MANIFEST).write_text(json.dumps({"files": sizes}, indent=1) + "\n")
    (built / SOURCE).write_text(json.dumps(source, indent=1) + "\n")
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


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS' progress bars and logging (absl) off while this runs: ferjax shows its own bar."""
  from tensorflow_datasets.core.utils import tqdm_utils
  old = tqdm_utils._active
  logger = logging.getLogger("absl")
  level = logger.level
  tqdm_utils.display_progress_bar(False)
  logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    logger.setLevel(level)
    tqdm_utils.display_progress_bar(old)


@contextlib.contextmanager
def _progress_bar(name: str, total: int, enable: bool):
  """One tqdm bar on stderr counting examples: yields the callback to call once per example
  (None unless `enable`: `prepare` defaults it to whether stderr is a terminal)."""
  if not enable:
    yield None
    return
  from tqdm import tqdm
  bar = tqdm(total=total, desc=name, unit="img", file=sys.stderr, dynamic_ncols=True,
             mininterval=0.5)
  try:
    yield lambda: bar.update(1)
  finally:
    bar.close()


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
  """The prepared dataset, prepared first from `manual_dir` when needed; a `manual_dir` other
  than the one it was prepared from (other files) is refused (`_check_source`)."""
  cls = _builder_cls(name)
  cls.select(name, split, None)  # Unknown split names fail before any preparation.
  data_dir = _data_dir(data_dir)
  prepared, config = _prepared_config(name, data_dir, image_size)
  if not prepared:
    if manual_dir is None:
      raise _not_prepared(name, data_dir)
    prepare(name, manual_dir, data_dir)
  elif manual_dir is not None:
    _check_source(name, _variant_dir(cls, data_dir, config), manual_dir, data_dir, loading=True)
  return _Prepared(name, data_dir, image_size)


def load_prepared(name: str, split: str, data_dir=None, manual_dir=None, *,
                  lazy: bool = False) -> Dataset:
  """Reads split `split` of prepared dataset `name` into host memory (no TensorFlow).

  When the dataset is not prepared: prepares it from `manual_dir` if given, else raises a
  `UserError` naming the `ferjax data prepare` command to run; when prepared from other files
  than `manual_dir`'s, a `UserError` naming both. Records are decoded `READ_CHUNK` at a time
  into one preallocated array, so peak memory is the result plus a chunk. `lazy`: read only the
  labels now; the images are a `LazyImages` read when rows are sliced. `extras` holds every other
  non-image feature the split stores (CK+: `subject`, `fold`), aligned with the labels.
  """
  ds = _open(name, split, data_dir, manual_dir)
  stored, indices = ds.indices(split)
  if lazy:
    scalars = ds.scalars(stored)
    labels = np.asarray(scalars["label"], np.int32)[indices]
    extras = {key: values[indices] for key, values in scalars.items() if key != "label"}
    images = LazyImages(lambda records: ds.read(stored, records)[0], indices, ds.shape)
  else:
    images, labels, extras = ds.read_with_extras(stored, indices)
  return Dataset(images, labels, ds.spec.class_names, name, split, extras)


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
