"""Image-folder datasets: `<root>/<split>/<class>/*.png|jpg`, e.g. `ferjax synthesize` output.

    ferjax.data.load("folder", "train", manual_dir="runs/synthetic_faces")

Class order comes from `<root>/classes.txt` (one name per line) when present, else from the
sorted class folder names. Read straight into memory with Pillow: meant for sets of up to a few
hundred thousand small images; large real datasets have their own prepared builders.
"""

import pathlib

import numpy as np
from PIL import Image

from ferjax.data.dataset import Dataset
from ferjax.data.images import to_8bit
from ferjax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def check_class_name(name, where) -> str:
  """A class name becomes a folder and file name: refuse separators, '.', '..', a leading dot
  and control characters, naming where the name came from."""
  if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".")
      or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name)):
    raise UserError(f"{where}: class name {name!r} cannot be a folder name (expected no '/', "
                    "'\\', control characters or leading '.')")
  return name


def class_names(root: pathlib.Path, split_dir: pathlib.Path) -> tuple[str, ...]:
  listed = root / "classes.txt"
  if listed.is_file():
    names = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
    if not names:
      raise UserError(f"{listed}: expected one class name per line, found none")
    return tuple(check_class_name(n, listed) for n in names)
  return tuple(sorted(p.name for p in split_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".")))


def load(root, split: str) -> Dataset:
  """Every image under `<root>/<split>/<class>/`, in its stored size and channels."""
  if root is None:
    raise UserError("dataset 'folder': pass manual_dir (config field data.manual_dir), the "
                    "folder holding <split>/<class>/*.png")
  root = pathlib.Path(root).expanduser()
  split_dir = root / split
  if not split_dir.is_dir():
    raise UserError(f"{split_dir} not found: expected a folder dataset laid out as "
                    f"{root}/{split}/<class>/*.png")
  names = class_names(root, split_dir)
  images, labels, shape = [], [], None
  for k, name in enumerate(names):
    folder = split_dir / name
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []
    for path in files:
      try:
        with Image.open(path) as img:
          img = to_8bit(img)
          array = np.asarray(img.convert("L" if img.mode in ("L", "1", "P") else "RGB"))
      except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
      array = array[..., None] if array.ndim == 2 else array
      if shape is None:
        shape = array.shape
      elif array.shape != shape:
        raise UserError(f"{path}: expected every image to be {shape[1]}x{shape[0]} with "
                        f"{shape[2]} channel(s) like the first one, got {array.shape}")
      images.append(array)
      labels.append(k)
  if not images:
    raise UserError(f"{split_dir}: no images found in its class folders {list(names)}")
  return Dataset(np.stack(images), np.asarray(labels, np.int32), names, root.name, split)


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
