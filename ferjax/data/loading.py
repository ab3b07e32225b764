"""`ferjax.data.load`: one entry point for every dataset ferjax knows."""

import numpy as np
from PIL import Image

from ferjax.data.dataset import Dataset, LazyImages
from ferjax.errors import UserError

DATASET_NAMES = ("synthetic", "fer2013", "ferplus", "rafdb", "affectnet", "affectnet8", "ckplus",
                 "folder")
# Too big for host memory at full size: `load` leaves their images on disk (LazyImages), the
# trainers read them in chunks straight onto the devices; `ferjax data stats` streams them.
STREAMED = ("affectnet", "affectnet8")


def load(name: str, split: str, *, data_dir=None, manual_dir=None, image_size=None,
         channels=None, lazy: bool | None = None, **options) -> Dataset:
  """Loads split `split` of dataset `name` into host memory.

  `synthetic` is generated from a seed (options: num_examples, seed, imbalance_ratio,
  label_noise). `folder` reads `<manual_dir>/<split>/<class>/*.png`. Real datasets are read
  from their prepared TFDS form in `data_dir`; when not prepared yet and `manual_dir` is given,
  they are prepared first. `image_size` (pixels, square) and `channels` (1 or 3) convert the
  images; None keeps the dataset's native form. `lazy`: leave a prepared dataset's images on
  disk as `LazyImages` (None: only for the datasets in STREAMED; synthetic and folder data are
  always in memory).
  """
  if name not in DATASET_NAMES:
    raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
  if channels not in (None, 1, 3):
    raise UserError(f"channels: expected 1 or 3, got {channels!r}")
  if image_size is not None and not 8 <= int(image_size) <= 1024:
    raise UserError(f"image_size: expected 8..1024 pixels, got {image_size!r}")
  if name == "synthetic":
    from ferjax.data import synthetic
    return synthetic.load(split, image_size=image_size or 48, channels=channels or 1, **options)
  if options:
    raise UserError(f"dataset {name!r} takes no options {sorted(options)}")
  if name == "folder":  # <manual_dir>/<split>/<class>/*.png, e.g. `ferjax synthesize` output.
    from ferjax.data import folder
    return convert(folder.load(manual_dir, split), image_size=image_size, channels=channels)
  from ferjax.data import builders
  ds = builders.load_prepared(name, split, data_dir=data_dir, manual_dir=manual_dir,
                              lazy=name in STREAMED if lazy is None else lazy)
  return convert(ds, image_size=image_size, channels=channels)


def convert(ds: Dataset, *, image_size=None, channels=None) -> Dataset:
  """Resizes (bilinear, square) and converts channels (gray <-> RGB) of a dataset's images
  (lazily, as they are read, for `LazyImages`)."""
  if isinstance(ds.images, LazyImages):
    h, w, c = ds.images.image_shape
    shape = (image_size or h, image_size or w, channels or c)
    if shape == (h, w, c):
      return ds
    convert_rows = lambda rows: convert_images(rows, image_size=image_size, channels=channels)
    return Dataset(ds.images.map(convert_rows, shape), ds.labels, ds.class_names, ds.name,
                   ds.split)
  images = convert_images(ds.images, image_size=image_size, channels=channels)
  if images is ds.images:
    return ds
  return Dataset(images, ds.labels, ds.class_names, ds.name, ds.split)


def convert_images(images: np.ndarray, *, image_size=None, channels=None) -> np.ndarray:
  """uint8 [N,H,W,C] -> uint8 [N,S,S,channels]; returns the input itself when nothing changes."""
  n, h, w, c = images.shape
  out = images
  if image_size is not None and (h, w) != (image_size, image_size):
    mode = "L" if c == 1 else "RGB"
    resized = np.empty((n, image_size, image_size, c), np.uint8)
    for i in range(n):
      pil = Image.fromarray(images[i, ..., 0] if c == 1 else images[i], mode)
      arr = np.asarray(pil.resize((image_size, image_size), Image.BILINEAR))
      resized[i] = arr.reshape(image_size, image_size, c)
    out = resized
  if channels is not None and channels != out.shape[-1]:
    if channels == 1:  # ITU-R 601 luma, as PIL's "L" conversion.
      gray = out.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
      out = np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
    else:
      out = np.repeat(out, 3, axis=-1)
  return out
