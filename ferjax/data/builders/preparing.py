"""Preparing a real FER dataset (`prepare`) and recording the raw files it was prepared from.

Preparation writes into a staging dir and moves the finished version dir into place with one
rename, so a failed or interrupted preparation leaves nothing that looks prepared; the next
`prepare` removes stale staging dirs and starts again. A version dir also holds
`ferjax_files.json` (the byte size of every shard as written, checked when it is opened) and
`ferjax_source.json`: the manual dir it was prepared from (resolved path, number of files, a
fingerprint of their names and sizes). Asking for the dataset again from other raw files
(`prepare` without `force`, or `load_prepared` with another `manual_dir`) is refused
(`check_source`) instead of silently reusing the old preparation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

from ferjax import writing
from ferjax.data import reading
from ferjax.data.builders.locate import (DATA_DIR_ENV, MANIFEST, SOURCE, builder_cls,
                                         dataset_spec, default_data_dir, is_complete,
                                         prepare_command, resolve_data_dir, variant_dir)
from ferjax.data.builders.prepared import read_source, split_sizes
from ferjax.errors import UserError

DEFAULT_WAIT_S = 3600.0  # How long `prepare` waits for another process preparing the same set.


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
  while_writing = error.filename is None or _inside(error.filename, data_dir)
  if not while_writing:
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
  cls = builder_cls(name)
  spec = dataset_spec(name)
  if image_size is not None and not hasattr(cls, "config_for"):
    raise UserError(f"dataset {name!r} has a fixed stored image size {spec.image_shape}; "
                    f"image_size applies to affectnet only")
  config = cls.config_for(image_size) if hasattr(cls, "config_for") else None
  data_dir = resolve_data_dir(data_dir)
  manual_dir = Path(manual_dir).expanduser()
  final = variant_dir(cls, data_dir, config.name if config else None)
  if is_complete(final) and not force:
    check_source(name, final, manual_dir, data_dir, loading=False)
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
      if is_complete(final) and not force:  # Prepared meanwhile by another process.
        check_source(name, final, manual_dir, data_dir, loading=False)
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
  root = common.require_dir(Path(manual_dir), dataset_spec(name))  # UserError: missing or empty.
  digest = hashlib.sha256()
  data_key = _dir_key(data_dir)
  count = _hash_tree(root, b"", digest, {data_key} if data_key else set())
  return {"manual_dir": str(root), "files": count, "fingerprint": "sha256:" + digest.hexdigest()}


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


def check_source(name: str, version_dir: Path, manual_dir, data_dir: Path, *,
                  loading: bool) -> dict | None:
  """Refuses `manual_dir` when the preparation in `version_dir` was made from other files;
  returns the recorded source (None: prepared before ferjax recorded it, so not checked).

  `loading`: the cheap check for every load: the recorded path itself is accepted without
  listing it (the raw files may even be gone); another path is compared by fingerprint.
  """
  recorded = read_source(name, version_dir, data_dir)
  if recorded is None:
    return None
  manual_dir = Path(manual_dir).expanduser()
  if loading and str(manual_dir.resolve()) == recorded["manual_dir"]:
    return recorded
  current = _source_record(name, manual_dir, data_dir)
  if current["fingerprint"] != recorded["fingerprint"]:
    raise _other_source(name, data_dir, recorded, current, loading)
  return recorded
