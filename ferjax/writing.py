"""Writing files safely, the same way in every layer that writes: an exclusive lock that names its
holder, atomic replacement, and the OS error behind a wrapped one."""

import contextlib
import errno
import fcntl
import os
import pathlib
import shutil
import socket
import sys
import time
from typing import Callable

from ferjax.errors import UserError

LOCK_POLL_S = 0.5
# Texts of OS errors in exceptions that lost their errno: tensorstore's and the array_record
# writer's (no OSErrors), and OSErrors that TFDS or orbax re-raise with a message of their own.
OS_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def os_errno(error: BaseException) -> int | None:
  """The errno of an OSError, else the one its message names (see OS_MESSAGES), else None."""
  if isinstance(error, OSError) and error.errno is not None:
    return error.errno
  return next((code for text, code in OS_MESSAGES.items() if text in str(error)), None)


@contextlib.contextmanager
def atomic_path(path):
  """Yields a partial file name beside `path` (same suffix, so writers that choose a format by
  it still work) to write into; renamed onto `path` when the block ends without an error, and
  removed in every case: a kill never leaves `path` torn."""
  path = pathlib.Path(path)
  partial = path.with_name(f".{path.stem}.partial{path.suffix}")
  try:
    yield partial
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)


def write_atomic(path, data: str | bytes) -> None:
  """Writes `path` through a partial file renamed into place: a kill never leaves it torn."""
  with atomic_path(path) as partial:
    if isinstance(data, bytes):
      partial.write_bytes(data)
    else:
      partial.write_text(data)


@contextlib.contextmanager
def staged_folder(out, what: str = "--out"):
  """Yields a new hidden folder beside `out` to fill; renamed to `out` when the block ends without
  an error, removed otherwise: a failed or interrupted command leaves no half-written `out`.
  `out` must not exist (a UserError naming `what`), before and again just before the rename."""
  out = pathlib.Path(out)

  def refuse_existing():
    if out.exists():
      raise UserError(f"{what} {out}: already exists: expected a new folder (nothing was "
                      "written)")

  refuse_existing()
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
    partial.mkdir()
  except OSError as e:
    raise UserError(f"{what} {out}: cannot create ({e.strerror or e})") from None
  try:
    yield partial
    refuse_existing()  # Created meanwhile by another process: never replaced.
    os.rename(partial, out)
  finally:
    if partial.exists():
      shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path, *, refusal: Callable[[str, float | None], str],
                   wait: float | None = 0.0, waiting: str = ""):
  """Holds an OS file lock on `path` while the block runs. While held, the file names the holder
  ("pid N on HOST since TIME") for the others; it is emptied on release. The OS releases the lock
  when its holder ends, however it ends, so a dead holder never blocks.

  Held by another process: with `wait` <= 0, a UserError `refusal(holder, None)` at once;
  otherwise one `ferjax: waiting for up to WAIT s for HOLDER{waiting}` line on stderr, then
  `refusal(holder, wait)` if it is still held after `wait` seconds (None: no limit).
  """
  with open(path, "a+") as f:
    if not _try_lock(f):
      f.seek(0)
      holder = f.read().strip() or "another process"
      if wait is not None and wait <= 0:
        raise UserError(refusal(holder, None))
      limit = "" if wait is None else f" for up to {wait:g} s"
      print(f"ferjax: waiting{limit} for {holder}{waiting}", file=sys.stderr, flush=True)
      deadline = None if wait is None else time.monotonic() + wait
      while not _try_lock(f):
        if deadline is not None and time.monotonic() >= deadline:
          raise UserError(refusal(holder, wait))
        time.sleep(LOCK_POLL_S)
    try:
      f.seek(0)
      f.truncate()
      f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
      f.flush()
      yield
    finally:
      f.seek(0)
      f.truncate()  # An unheld lock is an empty file.
      f.flush()
      fcntl.flock(f, fcntl.LOCK_UN)


def _try_lock(f) -> bool:
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
