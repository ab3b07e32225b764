"""Image-folder datasets: `<root>/<split>/<class>/*.png|jpg|tif`, e.g. `ferjax synthesize` output.

    ferjax.data.load("folder", "train", manual_dir="runs/synthetic_faces")

Class order comes from `<root>/classes.txt` (one name per line, UTF-8) when present, else from
the sorted class folder names; a class listed twice (or two names of one canonical class, e.g.
`happy` and `happiness`) is refused. The split is a plain name, never a path
(`reading.check_split_name`). Image values are read by the one rule of `images.to_uint8`
(16-bit scaled, floats in 0..1 or 0..255); values it refuses are a UserError naming the file.
Read straight into memory with Pillow: meant for sets of up to a few hundred thousand small
images; large real datasets have their own prepared builders.

Entries named like images that are not regular files (a FIFO would block the reader forever)
are skipped, counted in one `ferjax: warning:` line. A class without images is loaded as one
with no examples (the trainer refuses it, naming the class; evaluation reports its zero
support). An unreadable folder or image, a class folder name that is not UTF-8, and an image
over Pillow's decompression-bomb limit are one-line UserErrors.
"""

import pathlib

import numpy as np
from PIL import Image

from ferjax.data import labels, reading
from ferjax.data.reading import check_split_name
from ferjax.data.dataset import Dataset
from ferjax.data.images import to_8bit
from ferjax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def check_class_name(name, where) -> str:
  """A class name becomes a folder and file name: refuse separators, '.', '..', a leading dot
  and control characters, naming where the name came from."""
  if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".")
      or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name)):
    raise UserError(f"{reading.shown(where)}: class name {reading.shown(repr(name))} cannot be a "
                    "folder name (expected no '/', '\\', control characters or leading '.')")
  if not reading.is_utf8_name(name):
    raise UserError(f"{reading.shown(where)}: class name {reading.shown(repr(name))} is not valid "
                    "UTF-8: rename the class folder")
  return name


def class_names(root: pathlib.Path, split_dir: pathlib.Path) -> tuple[str, ...]:
  """The class names of `classes.txt`, else of the class folders: each a valid folder name, no
  two the same class (by canonical name: `happy` and `Happiness` are one class)."""
  listed = root / "classes.txt"
  if reading.is_regular(listed):
    try:
      names = tuple(line.strip() for _, line in reading.read_lines(listed) if line.strip())
    except OSError as e:
      raise reading.io_error(e, "read the class list") from None
    if not names:
      raise UserError(f"{reading.shown(listed)}: expected one class name per line, found none")
    names = tuple(check_class_name(n, listed) for n in names)
    return labels.check_distinct(names, f"{reading.shown(listed)}: class")
  names = tuple(check_class_name(p.name, p) for p in reading.list_dir(split_dir)
                if p.is_dir() and not p.name.startswith("."))
  return labels.check_distinct(names, f"{reading.shown(split_dir)}: class folder")


def load(root, split: str) -> Dataset:
  """Every image under `<root>/<split>/<class>/`, in its stored size and channels."""
  if root is None:
    raise UserError("dataset 'folder': pass manual_dir (config field data.manual_dir), the "
                    "folder holding <split>/<class>/*.png")
  check_split_name(split)
  root = pathlib.Path(root).expanduser()
  split_dir = root / split
  if not split_dir.is_dir():
    raise UserError(f"{reading.shown(split_dir)} not found: expected a folder dataset laid out as "
                    f"{reading.shown(root)}/{split}/<class>/*.png")
  names = class_names(root, split_dir)
  images, labels, shape, skipped, paths_read = [], [], None, 0, []
  with reading.strict_images():
    for k, name in enumerate(names):
      folder = split_dir / name
      entries = [p for p in reading.list_dir(folder) if p.suffix.lower() in IMAGE_SUFFIXES] \
          if folder.is_dir() else []
      paths = [p for p in entries if reading.is_regular(p)]
      skipped += len(entries) - len(paths)
      for path in paths:
        array = _read_image(path)
        if shape is None:
          shape = array.shape
        elif array.shape != shape:
          raise UserError(f"{reading.shown(path)}: expected every image to be {shape[1]}x{shape[0]} "
                          f"with {shape[2]} channel(s) like the first one, got {array.shape}")
        images.append(array)
        labels.append(k)
        paths_read.append(path.relative_to(split_dir).as_posix())
  reading.skipped_warning(skipped, split_dir)
  if not images:
    raise UserError(f"{reading.shown(split_dir)}: no images found in its class folders "
                    f"{reading.shown(list(names))}")
  return Dataset(np.stack(images), np.asarray(labels, np.int32), names, root.name, split,
                 {"file": np.asarray(paths_read, dtype=str)})


def _read_image(path: pathlib.Path) -> np.ndarray:
  """uint8 [H, W, 1 or 3] of one image file; a UserError naming it when it cannot be read."""
  try:
    with Image.open(path) as img:
      img = to_8bit(img)
      array = np.asarray(img.convert("L" if img.mode in ("L", "1", "P") else "RGB"))
  except reading.IMAGE_ERRORS as e:
    raise UserError(f"{reading.shown(path)}: not a readable image ({reading.image_reason(e)})") \
        from None
  return array[..., None] if array.ndim == 2 else array


def write(root, split: str, images: np.ndarray, labels: np.ndarray, names) -> None:
  """Writes uint8 [N, H, W, C] images as `<root>/<split>/<class>/<class>_<i>.png`."""
  root = pathlib.Path(root)
  for name in (split, *names):
    check_class_name(name, "folder dataset")
  (root / "classes.txt").write_text("".join(f"{n}\n" for n in names))
  counters = [0] * len(names)
  for image, label in zip(images, labels):
    folder = root / split / names[label]
    if not folder.resolve().is_relative_to(root.resolve()):  # Never write outside `root`.
      raise UserError(f"{folder}: outside the output folder {root}")
    folder.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil.save(folder / f"{names[label]}_{counters[label]:05d}.png")
    counters[label] += 1
