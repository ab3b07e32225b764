"""Device-side input pipeline: the dataset lives on the device as uint8, and batches are
sampled, converted and augmented inside the jitted train step (no per-step host copies).

Every function here is pure and traceable: `key` in, arrays out. Per-example work is written
for one example and vmapped.

See docs/methods.md (Re-sampling, Standard augmentations, Mixup, IoU-weighted face mixup).
"""

import jax
import jax.numpy as jnp
import numpy as np


def to_float(images_uint8, dtype=jnp.float32):
  """uint8 [..., H, W, C] in 0..255 -> float in [-1, 1] (the range every ferjax model uses)."""
  return images_uint8.astype(dtype) * (2.0 / 255.0) - 1.0


def to_uint8(images_float):
  """float in [-1, 1] -> uint8 0..255 (for export and grids)."""
  return jnp.round((jnp.clip(images_float, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def sample_uniform(key, num_examples: int, batch_size: int):
  """Indices of a batch drawn uniformly with replacement (i.i.d. steps; resume-exact by key)."""
  return jax.random.randint(key, (batch_size,), 0, num_examples)


def class_index(labels, num_classes: int):
  """(order, offsets, counts): examples sorted by class, where each class starts, its size.

  Computed once (host or device); lets `sample_by_class` draw a batch in O(batch) work.
  """
  order = jnp.argsort(labels, stable=True).astype(jnp.int32)
  counts = jnp.bincount(labels, length=num_classes).astype(jnp.int32)
  offsets = (jnp.cumsum(counts) - counts).astype(jnp.int32)
  return order, offsets, counts


def sample_by_class(key, index, classes):
  """For each requested class (int [B]), the index of a uniformly drawn example of that class."""
  order, offsets, counts = index
  within = jax.random.randint(key, classes.shape, 0, jnp.maximum(counts[classes], 1))
  return order[offsets[classes] + within]


def sample_weighted(key, index, class_probs, batch_size: int):
  """Indices whose classes are drawn from `class_probs` [K]; uniform within each class.

  Returns (indices, classes). Classes with no examples must have probability 0.
  """
  class_key, example_key = jax.random.split(key)
  logits = jnp.log(jnp.maximum(class_probs, 1e-30))
  classes = jax.random.categorical(class_key, logits, shape=(batch_size,))
  return sample_by_class(example_key, index, classes), classes


def flip_one(key, image):
  """Horizontal flip of one image [H, W, C] with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1, :], image)


def _flip_box(box, width, flipped):
  """The box [x0, y0, x1, y1] (pixel edges) of a horizontally flipped image, where `flipped`."""
  x0, y0, x1, y1 = box
  return jnp.where(flipped, jnp.stack([width - x1, y0, width - x0, y1]), box)


def random_flip(key, images):
  """Per-example horizontal flip of a batch [B, H, W, C]."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(flip_one)(keys, images)


# --- Balancing policies: which examples a batch is drawn from ----------------------------------
#
# Every policy draws a class for each batch slot from class probabilities q_j ∝ n_j^power and
# then an example of that class uniformly (Kang et al. 2020, "Decoupling representation and
# classifier"): instance power 1 (plain i.i.d. sampling), square-root 1/2, class-balanced 0;
# progressive moves linearly from instance (step 0) to class-balanced (last step). Random
# over-sampling instead repeats each class's examples up to the largest class's count once,
# fixed by the seed, and walks that enlarged set in shuffled epochs: over each epoch every class
# is drawn exactly max_n times and every example at least once.

SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive", "oversample")


def sampler_class_probs(sampler: str, class_counts, progress=0.0):
  """Class probabilities [K] of a class-aware policy; `progress` = step / num_steps in [0, 1]."""
  counts = jnp.asarray(class_counts, jnp.float32)
  present = (counts > 0).astype(jnp.float32)
  instance = counts / counts.sum()
  balanced = present / present.sum()
  if sampler == "instance":
    return instance
  if sampler == "class_balanced":
    return balanced
  if sampler == "sqrt":
    return jnp.sqrt(counts) / jnp.sqrt(counts).sum()
  if sampler == "progressive":
    progress = jnp.clip(progress, 0.0, 1.0)
    return (1.0 - progress) * instance + progress * balanced
  raise ValueError(f"sampler {sampler!r} has no class probabilities")


def oversampled_order(labels, num_classes: int, seed: int):
  """Host numpy: indices of the over-sampled train set, every present class repeated to max_n.

  Each class keeps all its examples, repeated whole as often as fits, plus a seeded random
  subset (without replacement) for the remainder.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  counts = np.bincount(labels, minlength=num_classes)
  target = counts.max()
  parts = []
  for k in range(num_classes):
    members = np.flatnonzero(labels == k)
    if len(members) == 0:
      continue
    repeats, remainder = divmod(target, len(members))
    parts.append(np.tile(members, repeats))
    parts.append(rng.choice(members, remainder, replace=False))
  return np.concatenate(parts).astype(np.int32)


def sample_epochs(key, order, step, batch_size: int):
  """Batch `step` of a walk through `order` in epochs, each epoch a fresh permutation.

  Positions step*B .. step*B+B-1 of the endless sequence perm_0 + perm_1 + ...; epoch e is
  permuted with fold_in(key, e), so any step can be computed directly (resume-exact).
  Needs batch_size <= len(order).
  """
  length = order.shape[0]
  position = step * batch_size + jnp.arange(batch_size)
  epoch, within = position // length, position % length
  first_epoch = epoch[0]  # A batch spans at most two epochs.
  perm_a = jax.random.permutation(jax.random.fold_in(key, first_epoch), length)
  perm_b = jax.random.permutation(jax.random.fold_in(key, first_epoch + 1), length)
  return order[jnp.where(epoch == first_epoch, perm_a[within], perm_b[within])]


def sample_indices(key, step, *, sampler: str, index, class_counts, batch_size: int,
                   num_steps: int, oversampled=None):
  """Training-set indices [B] of batch `step` under a balancing policy (see above).

  `index` is `class_index(labels, K)`; `oversampled` is `oversampled_order(...)` (on device),
  needed by the `oversample` policy only.
  """
  if sampler == "oversample":
    return sample_epochs(key, oversampled, step, batch_size)
  progress = step / max(num_steps - 1, 1)
  probs = sampler_class_probs(sampler, class_counts, progress)
  indices, _ = sample_weighted(key, index, probs, batch_size)
  return indices


# --- Augmentation: written for one example [H, W, C] float in [-1, 1], vmapped -----------------

CROPS = ("none", "pad", "resized")
# Random erasing's box: its share of the image area and its aspect (h/w) range, torchvision's
# `RandomErasing` defaults (EAC, RUL and DAN train with the scale (0.02, 0.25)).
ERASING_SCALE = (0.02, 0.33)
ERASING_RATIO = (0.3, 3.3)


# Boxes: [x0, y0, x1, y1] float in pixel edges (the whole H x W frame is [0, 0, W, H]). Each
# geometric stage below draws its parameters once (`_*_params`) and applies them to the image
# and, in `augment_one_with_box`, to a box, clipped to the frame.


def _clip_box(box, height, width):
  x0, y0, x1, y1 = box
  return jnp.stack([jnp.clip(x0, 0, width), jnp.clip(y0, 0, height), jnp.clip(x1, 0, width),
                    jnp.clip(y1, 0, height)])


def _pad_crop_params(key, padding: int):
  """(dy, dx): the crop's offset in the padded image, each uniform in 0..2 * padding."""
  dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return dy, dx


def _pad_crop(image, dy, dx, padding: int, mode: str = "reflect"):
  h, w, c = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode=mode)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))


def _pad_crop_box(box, dy, dx, padding: int, height, width):
  """Output pixel j shows input pixel j + dx - padding: the box moves by padding - dx."""
  shift = jnp.stack([padding - dx, padding - dy, padding - dx, padding - dy])
  return _clip_box(box + shift.astype(box.dtype), height, width)


def random_crop_one(key, image, padding: int, mode: str = "reflect"):
  """Pads by `padding` on each side (reflect) and crops back to H x W at a random offset."""
  if padding <= 0:
    return image
  dy, dx = _pad_crop_params(key, padding)
  return _pad_crop(image, dy, dx, padding, mode)


def _resample(image, src_y, src_x):
  """Bilinear sample of image [H, W, C] at float source coordinates [H', W'] (edges extended)."""
  sample = lambda plane: jax.scipy.ndimage.map_coordinates(plane, [src_y, src_x], order=1,
                                                           mode="nearest")
  return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def random_resized_crop_one(key, image, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)):
  """Crops a random box (area fraction in `scale`, aspect in `ratio`) and resizes it to H x W.

  As torchvision's RandomResizedCrop, except that a box too large for the image is clipped to
  it instead of being redrawn (no loop in a jitted step).
  """
  h, w, _ = image.shape
  return _resized_crop(image, *_resized_crop_params(key, h, w, scale, ratio))


def random_resized_crop(key, images, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """`random_resized_crop_one` on every image of float images [B, H, W, C], each with its own
  key (split from `key` by position, so the values do not depend on how the batch is sharded).
  MAE's pre-training crop is scale (0.2, 1.0); the dtype and shape are kept."""
  keys = jax.random.split(key, images.shape[0])
  crop = lambda k, image: random_resized_crop_one(k, image, tuple(scale), tuple(ratio))
  return jax.vmap(crop)(keys, images).astype(images.dtype)


def _resized_crop_params(key, h: int, w: int, scale, ratio=(3 / 4, 4 / 3)):
  """(y0, x0, box_h, box_w): the crop box in input pixel edges."""
  area_key, ratio_key, y_key, x_key = jax.random.split(key, 4)
  area = h * w * jax.random.uniform(area_key, (), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(ratio_key, (), minval=np.log(ratio[0]), maxval=np.log(ratio[1]))
  aspect = jnp.exp(log_ratio)  # width / height
  box_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
  box_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
  y0 = jax.random.uniform(y_key, (), maxval=h - box_h)
  x0 = jax.random.uniform(x_key, (), maxval=w - box_w)
  return y0, x0, box_h, box_w


def _resized_crop(image, y0, x0, box_h, box_w):
  h, w, _ = image.shape
  # Output pixel centres mapped into the box (half-pixel convention, as image resizing does).
  src_y = y0 + (jnp.arange(h) + 0.5) * box_h / h - 0.5
  src_x = x0 + (jnp.arange(w) + 0.5) * box_w / w - 0.5
  grid_y, grid_x = jnp.meshgrid(src_y, src_x, indexing="ij")
  return _resample(image, grid_y, grid_x)


def _resized_crop_box(box, y0, x0, box_h, box_w, height, width):
  """Output edge u shows input edge y0 + u * box_h / H: input s goes to (s - y0) * H / box_h."""
  x_a, y_a, x_b, y_b = box
  sx, sy = width / box_w, height / box_h
  return _clip_box(jnp.stack([(x_a - x0) * sx, (y_a - y0) * sy, (x_b - x0) * sx,
                              (y_b - y0) * sy]).astype(box.dtype), height, width)


def rotate(image, angle):
  """Rotates image [H, W, C] by `angle` radians about its centre (counter-clockwise on screen)."""
  h, w, _ = image.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx,
                      indexing="ij")
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Inverse map: each output pixel reads the source pixel rotated back by -angle
  # (rows grow downwards, so counter-clockwise on screen is this sign convention).
  src_x = cos * x - sin * y + cx
  src_y = sin * x + cos * y + cy
  return _resample(image, src_y, src_x)


def _rotate_box(box, angle, height, width):
  """The axis-aligned bounding box of the rotated box's corners, clipped to the frame.

  `rotate` reads output (x, y) from source R(angle) (x, y) about the centre, so a source point
  goes to R(-angle) of it; in pixel edges the centre is (W/2, H/2)."""
  x0, y0, x1, y1 = box
  cx, cy = width / 2.0, height / 2.0
  xs = jnp.stack([x0, x1, x1, x0]) - cx
  ys = jnp.stack([y0, y0, y1, y1]) - cy
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  out_x = cos * xs + sin * ys + cx
  out_y = -sin * xs + cos * ys + cy
  return _clip_box(jnp.stack([out_x.min(), out_y.min(), out_x.max(), out_y.max()])
                   .astype(box.dtype), height, width)


def _rotation_angle(key, max_degrees: float):
  return jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees) * (np.pi / 180.0)


def random_rotation_one(key, image, max_degrees: float):
  """Rotation by an angle drawn uniformly from [-max_degrees, max_degrees]."""
  if max_degrees <= 0:
    return image
  return rotate(image, _rotation_angle(key, max_degrees))


def random_erasing_one(key, image, prob: float, scale=ERASING_SCALE, ratio=ERASING_RATIO,
                       value: float = 0.0):
  """Random erasing (Zhong et al. 2020): with probability `prob`, one box is set to `value`.

  Box area fraction uniform in `scale` (config augment.erasing_scale), aspect (h/w) log-uniform
  in `ratio`, both torchvision's `RandomErasing` defaults; value 0 is mid-gray in [-1, 1]
  (torchvision's default fill after normalisation). Boxes are clipped to the image.
  """
  if prob <= 0:
    return image
  h, w, _ = image.shape
  apply_key, area_key, ratio_key, y_key, x_key = jax.random.split(key, 5)
  area = h * w * jax.random.uniform(area_key, (), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (), minval=np.log(ratio[0]),
                                      maxval=np.log(ratio[1])))
  box_h = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
  box_w = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
  y0 = jax.random.randint(y_key, (), 0, h - box_h + 1)
  x0 = jax.random.randint(x_key, (), 0, w - box_w + 1)
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  inside = (rows >= y0) & (rows < y0 + box_h) & (cols >= x0) & (cols < x0 + box_w)
  erase = inside & jax.random.bernoulli(apply_key, prob)
  return jnp.where(erase, jnp.asarray(value, image.dtype), image)


def augment_one(key, image, augment_config):
  """The standard augmentations of `config.augment`, in order: crop, flip, rotation, erasing."""
  crop_key, flip_key, rotate_key, erase_key = jax.random.split(key, 4)
  cfg = augment_config
  if cfg.crop == "pad":
    image = random_crop_one(crop_key, image, cfg.crop_padding)
  elif cfg.crop == "resized":
    image = random_resized_crop_one(crop_key, image, tuple(cfg.resized_crop_scale))
  if cfg.flip:
    image = flip_one(flip_key, image)
  image = random_rotation_one(rotate_key, image, cfg.rotation_deg)
  return erase_one(erase_key, image, cfg)


def erase_one(key, image, augment_config):
  """Random erasing as `config.augment` sets it (erasing_prob, erasing_scale); the image itself
  when erasing_prob is 0."""
  if augment_config.erasing_prob <= 0:
    return image
  return random_erasing_one(key, image, augment_config.erasing_prob,
                            tuple(augment_config.erasing_scale))


def erase_batch(key, images, augment_config):
  """`erase_one` over a batch [B, H, W, C], each image with its own key (EAC's independently
  erased mirror view)."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: erase_one(k, x, augment_config))(keys, images)


def augment_one_with_box(key, image, box, augment_config):
  """`augment_one` (the same keys, draws and image) that also moves a face box with the image.

  box: float [4], [x0, y0, x1, y1] in pixel edges of the input image. Returns (image, box): the
  box after each geometric stage with that stage's parameters (crop shift or crop-and-resize,
  flip, rotation: the axis-aligned box of the rotated corners), clipped to the frame; erasing
  does not move it. For SSFER's face mixup (`face_mixup_pairs`): SSFER found the faces with a
  YOLO face detector, which ferjax has no weights for; ferjax's datasets are aligned face crops
  (AffectNet's CSV face box is cropped to at preparation and not kept), so the box passed in is
  the whole frame and what varies is where each image's augmentation moved it.
  """
  crop_key, flip_key, rotate_key, erase_key = jax.random.split(key, 4)
  cfg = augment_config
  h, w, _ = image.shape
  box = jnp.asarray(box, jnp.float32)
  if cfg.crop == "pad" and cfg.crop_padding > 0:
    dy, dx = _pad_crop_params(crop_key, cfg.crop_padding)
    image = _pad_crop(image, dy, dx, cfg.crop_padding)
    box = _pad_crop_box(box, dy, dx, cfg.crop_padding, h, w)
  elif cfg.crop == "resized":
    params = _resized_crop_params(crop_key, h, w, tuple(cfg.resized_crop_scale))
    image = _resized_crop(image, *params)
    box = _resized_crop_box(box, *params, h, w)
  if cfg.flip:
    flipped = jax.random.bernoulli(flip_key)
    image = jnp.where(flipped, image[:, ::-1, :], image)
    box = _flip_box(box, w, flipped)
  if cfg.rotation_deg > 0:
    angle = _rotation_angle(rotate_key, cfg.rotation_deg)
    image = rotate(image, angle)
    box = _rotate_box(box, angle, h, w)
  return erase_one(erase_key, image, cfg), box


def augment_batch(key, images, augment_config):
  """Per-example augmentation of a batch [B, H, W, C] (one key per example)."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: augment_one(k, x, augment_config))(keys, images)


def augment_batch_with_boxes(key, images, boxes, augment_config):
  """`augment_batch` (same keys, same images) that also moves each example's box [B, 4]."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x, b: augment_one_with_box(k, x, b, augment_config))(
      keys, images, boxes)


def frame_boxes(images):
  """The whole frame [0, 0, W, H] of each image of a batch [B, H, W, C], as boxes [B, 4]."""
  b, h, w, _ = images.shape
  return jnp.broadcast_to(jnp.asarray([0.0, 0.0, w, h], jnp.float32), (b, 4))


def box_iou(a, b):
  """Intersection over union of boxes [..., 4] ([x0, y0, x1, y1]); 0 where the union is empty."""
  width = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  height = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  area = lambda x: (jnp.maximum(x[..., 2] - x[..., 0], 0) * jnp.maximum(x[..., 3] - x[..., 1], 0))
  inter = width * height
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def mixup_pairs(key, batch_size: int, alpha: float, dtype=jnp.float32):
  """(partner [B], lam [B]): each example's mixup partner perm(i) and its lam ~ Beta(alpha,
  alpha), the draws `mixup` and `face_mixup_pairs` make."""
  perm_key, lam_key = jax.random.split(key)
  partner = jax.random.permutation(perm_key, batch_size)
  lam = jax.random.beta(lam_key, alpha, alpha, (batch_size,)).astype(dtype)
  return partner, lam


def _mix(images, partner, lam):
  mix_one = lambda l, x, y: l * x + (1.0 - l) * y
  return jax.vmap(mix_one)(lam, images, images[partner])


def mixup(key, images, labels, alpha: float):
  """Mixup (Zhang et al. 2018) with one lambda ~ Beta(alpha, alpha) per example.

  Each example i is mixed with example perm(i) of the batch; returns (mixed images, partner
  labels [B], lam [B]); the loss is lam * L(labels) + (1 - lam) * L(partner labels).
  """
  partner, lam = mixup_pairs(key, images.shape[0], alpha, images.dtype)
  return _mix(images, partner, lam), labels[partner], lam


def face_mixup_pairs(key, images, boxes, alpha: float):
  """SSFER's face mixup draws (arXiv 2410.17622): (mixed images, partner [B], lam [B], iou [B]).

  As `mixup` (lam ~ Beta(alpha, alpha) per example, partner a random permutation), made out of
  place: `images` stay the unmixed ones for the loss's real branch. iou_i is the IoU of example
  i's face box and its partner's, both after their own augmentation (`augment_one_with_box`);
  the loss is `ferjax.losses.face_mixup_loss`.
  """
  partner, lam = mixup_pairs(key, images.shape[0], alpha, images.dtype)
  return _mix(images, partner, lam), partner, lam, box_iou(boxes, boxes[partner])
