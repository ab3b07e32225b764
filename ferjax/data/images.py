"""Image conversion on the host: the one rule that turns image values of any type into uint8
(`to_uint8`, `to_8bit`), resize (bilinear, square) and gray <-> RGB, for whole datasets or
batches of uint8 images. Below `loading` and the builders, which both use it."""

import numpy as np
from PIL import Image

from ferjax.data import reading
from ferjax.data.dataset import Dataset, LazyImages
from ferjax.data.reading import UnsupportedImage


def convert(ds: Dataset, *, image_size=None, channels=None) -> Dataset:
  """Resizes (bilinear, square) and converts channels (gray <-> RGB) of a dataset's images
  (lazily, as they are read, for `LazyImages`)."""
  if isinstance(ds.images, LazyImages):
    h, w, c = ds.images.image_shape
    shape = (image_size or h, image_size or w, channels or c)
    if shape == (h, w, c):
      return ds
    convert_rows = lambda rows: convert_images(rows, image_size=image_size, channels=channels)
    return ds.replace(images=ds.images.map(convert_rows, shape))
  images = convert_images(ds.images, image_size=image_size, channels=channels)
  if images is ds.images:
    return ds
  return ds.replace(images=images)


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


def to_uint8(array, name: str = "") -> np.ndarray:
  """The one rule for image values: uint8 as is; bool as 0/255; 16-bit unsigned integers scaled
  by their range (0..65535 -> 0..255); other integers as 8-bit values in a wider type when they
  fit 0..255, else as 16-bit ones; floats in [0, 1] scaled to 0..255, floats in [0, 255]
  rounded. Anything else (NaN or infinity, negative values, integers over 65535, floats over
  255, complex numbers) is an `UnsupportedImage` error (ferjax.data.reading; `name`: the file,
  for its message)."""
  array = np.asarray(array)
  kind = array.dtype.kind
  if array.dtype == np.uint8:
    return array
  if kind == "b":
    return array.astype(np.uint8) * 255
  if kind not in "iuf":
    raise UnsupportedImage(f"image values of type {array.dtype} are not supported: expected "
                           "8 or 16-bit integers or floats in 0..1 or 0..255", name)
  if kind == "f" and not np.isfinite(array).all():
    raise UnsupportedImage("image holds NaN or infinite values: expected floats in 0..1 or "
                           "0..255", name)
  low, high = (array.min(), array.max()) if array.size else (0, 0)
  if low < 0:
    raise UnsupportedImage(f"image values go down to {low:g}: expected no negative values "
                           "(8 or 16-bit integers, or floats in 0..1 or 0..255)", name)
  if kind == "f":
    if high > 255:
      raise UnsupportedImage(f"float image values go up to {high:g}: expected floats in 0..1 "
                             "or 0..255", name)
    scaled = array.astype(np.float64) * (255.0 if high <= 1 else 1.0)
  elif (kind == "u" and array.dtype.itemsize == 2) or high > 255:
    if high > 65535:
      raise UnsupportedImage(f"integer image values go up to {high}: expected 8 or 16-bit "
                             "values (at most 65535)", name)
    scaled = array.astype(np.float64) / 257.0  # 0..65535 -> 0..255
  else:
    scaled = array  # 8-bit values in a wider type.
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def to_8bit(img: Image.Image) -> Image.Image:
  """A PIL image of any bit depth as an 8-bit one ("L" or a colour mode), ready for
  `convert("L" / "RGB")`, by the rule of `to_uint8`. Pillow's own conversions clip instead of
  scaling (a 16-bit face turns almost white, a float one in 0..1 black); an image whose values
  the rule refuses is an `UnsupportedImage` error (ferjax.data.reading) naming its file when
  Pillow knows it."""
  if img.mode.startswith("I") or img.mode == "F":  # I;16 variants, 32-bit integers, floats.
    name = getattr(img, "filename", "") or ""
    return Image.fromarray(to_uint8(np.asarray(img), reading.shown(name)), "L")
  return img
