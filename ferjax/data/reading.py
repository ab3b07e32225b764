"""Reading users' files without tracebacks: text encodings, odd file names, non-regular files.

Shared by the image-folder loader and the dataset builders (light: no TensorFlow Datasets).
Every problem a user can fix is a one-line `UserError` naming the file; notes that are not
errors are one `ferjax: warning:` line on stderr.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import re
import stat
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ferjax.errors import UserError

# Pillow refuses images over 2 x MAX_IMAGE_PIXELS (DecompressionBombError) and only warns above
# MAX_IMAGE_PIXELS; `strict_images` turns the warning into an error too (no face is that big).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning)


class UnsupportedImage(UserError, ValueError):
  """Image values whose range ferjax does not understand (NaN, negative, floats over 255, ...):
  a ValueError, so readers that skip undecodable files skip it too, and a UserError elsewhere.
  `reason` is the message without the file name."""

  def __init__(self, reason: str, name: str = ""):
    super().__init__(f"{name}: {reason}" if name else reason)
    self.reason = reason


def shown(path) -> str:
  """`path` as printable text: bytes of a non-UTF-8 file name (kept by Python as lone
  surrogates, which cannot be printed or encoded) become `\\xNN` escapes."""
  return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8_name(name: str) -> bool:
  """False for a file name whose bytes are not UTF-8 (see `shown`)."""
  return not any("\udc80" <= c <= "\udcff" for c in name)


def warn(message: str) -> None:
  """One `ferjax: warning: ...` line on stderr."""
  print(f"ferjax: warning: {shown(message)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def strict_images():
  """Pillow's decompression-bomb warning raised as an error while this runs (worker threads
  started inside see it too): a 100-megapixel "face" is a broken or hostile file."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    yield


def image_reason(error: BaseException) -> str:
  """A short reason for an image that cannot be read, for messages."""
  if isinstance(error, UnsupportedImage):
    return error.reason
  if isinstance(error, Image.UnidentifiedImageError):
    return "not an image PIL can read"
  if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
    return (f"{str(error).split(',')[0]} (Pillow's decompression-bomb guard): expected a face "
            f"image of at most a few megapixels")
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error).splitlines()[0] if str(error) else ""
  return text or type(error).__name__


def is_regular(path: Path) -> bool:
  """Whether `path` is a regular file (following symlinks): FIFOs, sockets, devices and folders
  are not, and opening a FIFO would block forever."""
  try:
    return stat.S_ISREG(path.stat().st_mode)
  except OSError:
    return False


def list_dir(folder: Path) -> list[Path]:
  """The entries of `folder`, sorted; an unreadable folder is a UserError naming it."""
  try:
    return sorted(folder.iterdir())
  except OSError as e:
    raise UserError(f"cannot read folder {shown(folder)}: {e.strerror or e}") from None


def skipped_warning(count: int, where) -> None:
  if count:
    warn(f"skipped {count} non-regular file{'s' if count != 1 else ''} (FIFO, socket, device or "
         f"folder named like an image) under {shown(where)}")


# ---------------------------------------------------------------------------------------------
# Text files: UTF-8 (a BOM allowed), or UTF-16 with its byte-order mark
# ---------------------------------------------------------------------------------------------


def _encoding(path: Path) -> str:
  with open(path, "rb") as f:
    start = f.read(4)
  if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
    return "utf-16"
  return "utf-8-sig"


def _not_text(path: Path, encoding: str, error: UnicodeDecodeError) -> UserError:
  if encoding == "utf-16":
    return UserError(f"{shown(path)}: not valid UTF-16 text ({error.reason}): expected a UTF-8 "
                     f"text file (or UTF-16 with a byte-order mark)")
  line, byte = 1, None
  with open(path, "rb") as f:
    for line, raw in enumerate(f, 1):
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError as e:
        byte = raw[e.start]
        break
  what = f"byte 0x{byte:02x}" if byte is not None else "a byte sequence"
  return UserError(f"{shown(path)} line {line}: {what} is not UTF-8 (Latin-1 or another "
                   f"encoding?): expected a UTF-8 text file; re-save it as UTF-8")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
  """(line number, line) of a UTF-8 (or BOM-marked UTF-16) text file."""
  path = Path(path)
  encoding = _encoding(path)
  line_no = 0
  with open(path, encoding=encoding, newline=None) as f:
    try:
      for line_no, line in enumerate(f, 1):
        if "\0" in line:
          raise UserError(f"{shown(path)} line {line_no}: holds NUL bytes (UTF-16 without a "
                          f"byte-order mark, or a binary file?): expected a UTF-8 text file")
        yield line_no, line
    except UnicodeDecodeError as e:
      raise _not_text(path, encoding, e) from None


def read_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
  """(line number, row) for every non-empty row of a CSV file, header included."""
  path = Path(path)
  encoding = _encoding(path)
  with open(path, newline="", encoding=encoding) as f:
    reader = csv.reader(f)
    try:
      for row in reader:
        if any("\0" in cell for cell in row):
          raise UserError(f"{shown(path)} line {reader.line_num}: holds NUL bytes (UTF-16 "
                          f"without a byte-order mark, or a binary file?): expected a UTF-8 "
                          f"comma-separated file")
        if row and any(cell.strip() for cell in row):
          yield reader.line_num, row
    except UnicodeDecodeError as e:
      raise _not_text(path, encoding, e) from None
    except csv.Error as e:
      hint = " (UTF-16 without a byte-order mark?)" if "NUL" in str(e) else ""
      raise UserError(f"{shown(path)} line {reader.line_num + 1}: not valid CSV ({e}){hint}: "
                      f"expected a UTF-8 comma-separated file") from None


def io_error(error: OSError, action: str, hint: str = "") -> UserError:
  """A one-line UserError for an OSError: what failed, on which file, and why."""
  where = f" {shown(error.filename)}" if error.filename else ""
  reason = error.strerror or str(error) or type(error).__name__
  if error.errno == errno.ENOSPC:
    reason = "no space left on device"
  return UserError(f"cannot {action}{where}: {reason}{': ' + hint if hint else ''}")


# A split is a name, never a path: it becomes a folder name (`folder` datasets) and part of
# output file names (`eval_<split>.json`).
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_split_name(split, field: str = "split") -> str:
  """`split` when it is a plain name (a letter or digit, then letters, digits, '_', '.', '-';
  no '..'); else a one-line UserError naming `field`, before anything is read."""
  if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split) or ".." in split:
    raise UserError(f"{field}: expected a split name such as 'train', 'validation' or 'test' "
                    f"(letters, digits, '_', '.', '-'; no path), got {split!r}")
  return split
