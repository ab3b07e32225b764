"""Image conversion on the host: resize (bilinear, square) and gray <-> RGB, for whole datasets or
batches of uint8 images. Below `loading` and the builders, which both use it."""

import numpy as np
from PIL import Image

from ferjax.data.dataset import Dataset, LazyImages


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


def to_8bit(img: Image.Image) -> Image.Image:
  """A PIL image of any bit depth as an 8-bit one ("L" or a colour mode), ready for
  `convert("L" / "RGB")`. Pillow's own conversion of 16-bit and 32-bit integer images clips
  instead of scaling (a 16-bit face turns almost white); here 0..65535 maps to 0..255."""
  if img.mode in ("I;16", "I;16L", "I;16B", "I;16N") or (img.mode == "I" and
                                                        np.asarray(img).max(initial=0) > 255):
    array = np.asarray(img).astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "L")
  if img.mode in ("I", "F"):  # 8-bit values in a wider type.
    return Image.fromarray(np.clip(np.round(np.asarray(img, np.float64)), 0, 255)
                           .astype(np.uint8), "L")
  return img
