"""Writing files safely, the same way in every layer that writes: an exclusive lock that names its
holder, atomic replacement and no-replace publishing through partial files created exclusively
(never a planted link), outputs that never clobber inputs, and the OS error behind a wrapped
one."""

import contextlib
import errno
import fcntl
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable

from ferjax.errors import UserError

LOCK_POLL_S = 0.5
# Texts of OS errors in exceptions that lost their errno: tensorstore's and the array_record
# writer's (no OSErrors), and OSErrors that TFDS or orbax re-raise with a message of their own.
OS_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


# A full disk, a quota or a read-only mount: what a write can meet that is not the code's fault.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def os_errno(error: BaseException) -> int | None:
  """The errno of an OSError, else the one its message names (see OS_MESSAGES), else None."""
  if isinstance(error, OSError) and error.errno is not None:
    return error.errno
  return next((code for text, code in OS_MESSAGES.items() if text in str(error)), None)


def _read_umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


UMASK = _read_umask()  # Read once: temporary files get the modes a plain open would give.


def _new_partial_file(path: pathlib.Path) -> pathlib.Path:
  """A new empty file beside `path` with an unpredictable name that keeps `path`'s suffix,
  created exclusively (never an existing file or link), with the mode a plain open gives."""
  fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}",
                              dir=path.parent)
  try:
    os.fchmod(fd, 0o666 & ~UMASK)
  finally:
    os.close(fd)
  return pathlib.Path(name)


@contextlib.contextmanager
def atomic_path(path):
  """Yields a new partial file beside `path` (an unpredictable name created exclusively, with
  the same suffix, so writers that choose a format by it still work) to write into; renamed
  onto `path` when the block ends without an error, and removed in every case: a kill never
  leaves `path` torn, and a link planted beside `path` is never followed."""
  path = pathlib.Path(path)
  partial = _new_partial_file(path)
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


def write_new(path, data: bytes, what: str = "--out") -> None:
  """Writes the new file `path` through a partial file published with a hard link, which fails
  when `path` exists: of several writers racing to one path exactly one wins, the others get a
  UserError naming `what`, and no existing file or link is ever replaced."""
  path = pathlib.Path(path)
  taken = UserError(f"{what} {path}: already exists; choose another name (an existing file is "
                    "never overwritten)")
  partial = _new_partial_file(path)
  try:
    partial.write_bytes(data)
    try:
      os.link(partial, path)
    except FileExistsError:
      raise taken from None
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
        raise
      _write_exclusive(path, data, taken)  # No hard links here: O_EXCL, not atomic but new.
  finally:
    partial.unlink(missing_ok=True)


def _write_exclusive(path, data: bytes, taken: UserError) -> None:
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
  except FileExistsError:
    raise taken from None
  with os.fdopen(fd, "wb") as f:
    f.write(data)


@contextlib.contextmanager
def staged_folder(out, what: str = "--out"):
  """Yields a new hidden folder beside `out` to fill (an unpredictable name created
  exclusively); renamed to `out` when the block ends without an error, removed otherwise: a
  failed or interrupted command leaves no half-written `out`. `out` must not exist (a UserError
  naming `what`), before and again just before the rename."""
  out = pathlib.Path(out)

  def refuse_existing():
    if out.exists() or out.is_symlink():
      raise UserError(f"{what} {out}: already exists: expected a new folder (nothing was "
                      "written)")

  refuse_existing()
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(partial, 0o777 & ~UMASK)
  except OSError as e:
    raise UserError(f"{what} {out}: cannot create ({e.strerror or e})") from None
  try:
    yield partial
    refuse_existing()  # Created meanwhile by another process: never replaced.
    os.rename(partial, out)
  finally:
    if partial.exists():
      shutil.rmtree(partial, ignore_errors=True)


# --- Outputs never clobber inputs -----------------------------------------------------------
def _real(path) -> pathlib.Path:
  return pathlib.Path(os.path.realpath(os.path.expanduser(str(path))))


def _same_file(a, b) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  return path == folder or folder in path.parents


def refuse_clobbering(output, *, inputs=(), input_dirs=(), what: str = "--out",
                      folder: bool = False) -> None:
  """A UserError naming `what` when writing `output` could change or feed what the command
  reads: `output` is one of the files `inputs` (by real path, or the same file through a hard
  or symbolic link), lies inside one of the folders `input_dirs` (or is one), or, for a
  `folder` output, holds one of the inputs. Paths are compared resolved, links followed (a
  case-insensitive file system's other spellings of a name are not caught). None entries are
  skipped."""
  named = shown(output)
  real = _real(output)
  for source in inputs:
    if source is None:
      continue
    if real == _real(source) or _same_file(output, source):
      raise UserError(f"{what} {named}: is the input {shown(source)}: choose another "
                      "name (nothing was written)")
    if folder and _inside(_real(source), real):
      raise UserError(f"{what} {named}: holds the input {shown(source)}: choose a "
                      "folder outside the inputs (nothing was written)")
  for source in input_dirs:
    if source is None:
      continue
    source_real = _real(source)
    if _inside(real, source_real):
      raise UserError(f"{what} {named}: lies inside the input folder {shown(source)}, "
                      "which this command reads: choose a path outside it (nothing was written)")
    if folder and _inside(source_real, real):
      raise UserError(f"{what} {named}: holds the input folder {shown(source)}: choose a "
                      "folder outside the inputs (nothing was written)")


def shown(path) -> str:
  """`path` as printable text (as ferjax.data.reading.shown: non-UTF-8 bytes escaped)."""
  return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def refuse_foreign_folder(out, verb: str, *, owned: Callable[[str], bool] = lambda name: False,
                          what: str = "--out") -> None:
  """A UserError naming `what` when the folder `out` exists and holds something `verb` did not
  write: it must be missing, empty, marked by an earlier `verb` (its marker file, see
  `output_folder`), or hold only entries whose names `owned` accepts."""
  out = pathlib.Path(out)
  if out.is_symlink() and not out.exists():
    raise UserError(f"{what} {shown(out)}: is a dangling link: expected a folder")
  if not out.exists():
    return
  if not out.is_dir():
    raise UserError(f"{what} {shown(out)}: is a file: expected a folder")
  marker = out / marker_name(verb)
  if marker.is_file() and not marker.is_symlink():
    return
  try:
    names = [entry.name for entry in out.iterdir()]
  except OSError as e:
    raise UserError(f"{what} {shown(out)}: cannot list ({e.strerror or e})") from None
  foreign = sorted(name for name in names if not owned(name))
  if foreign:
    raise UserError(f"{what} {shown(out)}: already holds {foreign[0]!r}"
                    f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, not written "
                    f"by ferjax {verb}: choose a new or empty folder (nothing was written)")


def marker_name(verb: str) -> str:
  """The file that marks (and locks) a folder written by `ferjax verb`."""
  return f".ferjax-{verb.replace(' ', '-')}.lock"


@contextlib.contextmanager
def output_folder(out, verb: str, *, owned: Callable[[str], bool] = lambda name: False,
                  what: str = "--out"):
  """Checks `out` (`refuse_foreign_folder`), creates it and holds its marker file as an
  exclusive lock while the block runs: two commands writing one folder at once never mix (the
  second gets a UserError naming the first), and a later run of `verb` knows the folder."""
  out = pathlib.Path(out)
  refuse_foreign_folder(out, verb, owned=owned, what=what)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"{what} {shown(out)}: cannot create ({e.strerror or e})") from None

  def refusal(holder, wait):
    return (f"{what} {shown(out)}: being written by {holder} (ferjax {verb}); wait for "
            "it or choose another folder")

  with exclusive_lock(out / marker_name(verb), refusal=refusal):
    yield out


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
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UserError(f"{path}: is a symbolic link: expected a lock file (remove it)") from None
    raise
  with os.fdopen(fd, "a+") as f:
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
