"""RandAugment on the device: the strong augmentation of semi-supervised training (FixMatch).

    strong = jax.vmap(lambda k, x: rand_augment(k, x, num_ops=2, magnitude=10))(keys, images)

Every op is written for one float image [H, W, C] in [-1, 1] (C 1 or 3) and a level v in [0, 1]
(a magnitude m in 0..MAX_MAGNITUDE is v = m / MAX_MAGNITUDE); ops with a direction (brightness
up or down, rotate left or right...) get a random sign. `rand_augment` applies `num_ops` ops
drawn uniformly (`jax.lax.switch`), each with its own magnitude drawn uniformly from
[0, magnitude], as FixMatch's RandAugment variant draws them (Sohn et al. 2020, appendix D;
Cubuk et al. 2020 used one fixed magnitude). Vmapped over a batch the switch computes every op
and selects (cheap for faces of 32-112 px; the ops are a few elementwise passes, a 3x3 blur,
a per-channel sort and a bilinear resample). Pure jax: no host image library in the step.

Ranges at v = 1 follow FixMatch's: brightness, contrast and sharpness factors 1 +- 0.9; posterize
down to 4 bits; solarize threshold down to 0 (everything inverted); rotate +-30 degrees; shear
+-0.3; translate +-30% of the side; cutout a square of half the side, filled with mid-gray (0).
Geometric ops fill uncovered pixels with mid-gray (PIL's fill in FixMatch is (128, 128, 128)).

Equalize is the empirical-CDF form of histogram equalization: each pixel becomes the share of
its channel's pixels that are <= it (a sort, no histogram), the continuous version of PIL's
256-bin ImageOps.equalize (which also offsets by half a bin and skips the darkest bin's mass).

See docs/methods.md (RandAugment).
"""

import jax
import jax.numpy as jnp
import numpy as np

MAX_MAGNITUDE = 10.0  # magnitude 10 is each op's strongest setting (FixMatch's scale)
FILL = 0.0  # mid-gray in [-1, 1]


# --- Helpers: [0, 1] space and blending, as PIL's ImageEnhance -----------------------------------
def _to_unit(image):
  return (image + 1.0) / 2.0


def _from_unit(image):
  return jnp.clip(image, 0.0, 1.0) * 2.0 - 1.0


def _gray(image):
  """Luma of an image in [0, 1] as [H, W, 1] (the image itself when it has one channel)."""
  if image.shape[-1] == 1:
    return image
  return jnp.sum(image * jnp.asarray([0.299, 0.587, 0.114], image.dtype), -1, keepdims=True)


def _blend(degenerate, image, factor):
  """PIL's enhance: degenerate + factor * (image - degenerate), clipped to [0, 1]."""
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _signed(key, v):
  return jnp.where(jax.random.bernoulli(key), v, -v)


def _affine(image, src_y, src_x):
  """Bilinear sample of [H, W, C] at source coordinates [H, W]; outside the image: FILL."""
  sample = lambda plane: jax.scipy.ndimage.map_coordinates(plane, [src_y, src_x], order=1,
                                                           mode="constant", cval=FILL)
  return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def _grid(image):
  """(y, x) pixel coordinates [H, W] relative to the image centre."""
  h, w, _ = image.shape
  return jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2.0,
                      jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2.0, indexing="ij")


def _centre(image):
  h, w, _ = image.shape
  return (h - 1) / 2.0, (w - 1) / 2.0


# --- The ops: op(key, image [-1, 1], v in [0, 1]) -> image [-1, 1] -------------------------------
def identity(key, image, v):
  del key, v
  return image


def autocontrast(key, image, v):
  """Each channel stretched so its darkest pixel is black and its brightest white."""
  del key, v
  lo = jnp.min(image, axis=(0, 1), keepdims=True)
  hi = jnp.max(image, axis=(0, 1), keepdims=True)
  span = hi - lo
  stretched = (image - lo) / jnp.where(span > 0, span, 1.0) * 2.0 - 1.0
  return jnp.where(span > 0, stretched, image)


def equalize(key, image, v):
  """Empirical-CDF equalization per channel (module docstring)."""
  del key, v
  h, w, c = image.shape
  flat = image.reshape(h * w, c)

  def one_channel(values):
    rank = jnp.searchsorted(jnp.sort(values), values, side="right")
    return rank.astype(image.dtype) / (h * w)

  return (jax.vmap(one_channel, in_axes=1, out_axes=1)(flat) * 2.0 - 1.0).reshape(h, w, c)


def brightness(key, image, v):
  return _from_unit(_blend(0.0, _to_unit(image), 1.0 + _signed(key, 0.9 * v)))


def contrast(key, image, v):
  x = _to_unit(image)
  return _from_unit(_blend(jnp.mean(_gray(x)), x, 1.0 + _signed(key, 0.9 * v)))


def sharpness(key, image, v):
  """Blend with PIL's SMOOTH-filtered image (3x3 kernel, centre 5, others 1, over 13)."""
  h, w, _ = image.shape
  x = _to_unit(image)
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  smooth = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  smooth = (smooth + 4.0 * x) / 13.0
  return _from_unit(_blend(smooth, x, 1.0 + _signed(key, 0.9 * v)))


def posterize(key, image, v):
  """Keeps 8 - round(4 v) bits of each 8-bit value (4 bits at v = 1)."""
  del key
  shift = jnp.round(4.0 * v).astype(jnp.int32)
  values = jnp.round(_to_unit(image) * 255.0).astype(jnp.int32)
  kept = jnp.left_shift(jnp.right_shift(values, shift), shift)
  return kept.astype(image.dtype) / 255.0 * 2.0 - 1.0


def solarize(key, image, v):
  """Inverts the pixels at or above the threshold 1 - v (of [0, 1])."""
  del key
  x = _to_unit(image)
  return _from_unit(jnp.where(x >= 1.0 - v, 1.0 - x, x))


def rotate(key, image, v):
  """Rotation by up to +-30 degrees about the centre."""
  angle = _signed(key, v * np.pi / 6.0)
  y, x = _grid(image)
  cy, cx = _centre(image)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return _affine(image, sin * x + cos * y + cy, cos * x - sin * y + cx)


def shear_x(key, image, v):
  y, x = _grid(image)
  cy, cx = _centre(image)
  return _affine(image, y + cy, x + _signed(key, 0.3 * v) * y + cx)


def shear_y(key, image, v):
  y, x = _grid(image)
  cy, cx = _centre(image)
  return _affine(image, y + _signed(key, 0.3 * v) * x + cy, x + cx)


def translate_x(key, image, v):
  y, x = _grid(image)
  cy, cx = _centre(image)
  return _affine(image, y + cy, x + _signed(key, 0.3 * v) * image.shape[1] + cx)


def translate_y(key, image, v):
  y, x = _grid(image)
  cy, cx = _centre(image)
  return _affine(image, y + _signed(key, 0.3 * v) * image.shape[0] + cy, x + cx)


def cutout(key, image, v):
  """A square of side v * H / 2 at a random centre (clipped at the edges) set to FILL."""
  h, w, _ = image.shape
  half = v * h / 4.0
  cy = jax.random.uniform(jax.random.fold_in(key, 0), (), maxval=h)
  cx = jax.random.uniform(jax.random.fold_in(key, 1), (), maxval=w)
  rows = jnp.arange(h, dtype=jnp.float32)[:, None, None] + 0.5
  cols = jnp.arange(w, dtype=jnp.float32)[None, :, None] + 0.5
  inside = (jnp.abs(rows - cy) < half) & (jnp.abs(cols - cx) < half)
  return jnp.where(inside, jnp.asarray(FILL, image.dtype), image)


OPS = (identity, autocontrast, equalize, brightness, contrast, sharpness, posterize, solarize,
       rotate, shear_x, shear_y, translate_x, translate_y, cutout)
OP_NAMES = tuple(op.__name__ for op in OPS)


def apply_op(index, key, image, v):
  """OPS[index](key, image, v) for a traced index (jax.lax.switch)."""
  return jax.lax.switch(index, OPS, key, image, v)


def rand_augment(key, image, num_ops: int = 2, magnitude: float = 10.0):
  """`num_ops` ops drawn uniformly with replacement, each at a level drawn uniformly from
  [0, magnitude / MAX_MAGNITUDE], applied in turn to one image [H, W, C] in [-1, 1]."""
  for i in range(num_ops):
    op_key, level_key, arg_key = jax.random.split(jax.random.fold_in(key, i), 3)
    index = jax.random.randint(op_key, (), 0, len(OPS))
    v = jax.random.uniform(level_key, (), maxval=magnitude / MAX_MAGNITUDE)
    image = jnp.clip(apply_op(index, arg_key, image, v), -1.0, 1.0).astype(image.dtype)
  return image


def rand_augment_batch(key, images, num_ops: int = 2, magnitude: float = 10.0):
  """`rand_augment` per example of a batch [B, H, W, C] (one key each)."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: rand_augment(k, x, num_ops, magnitude))(keys, images)
