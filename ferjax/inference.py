"""Use a trained classifier on new face crops: from a run's checkpoint, or from one exported file.

    predictor = from_run("runs/baseline")                 # or load_exported("model.ferjax")
    crops = prepare_crops([face_a, face_b], predictor.image_size, predictor.channels)
    probs = predictor.probabilities(crops, tta="flip", logit_adjust=1.0)   # float32 [N, K]

Crops are converted exactly as training images were (8-bit, bilinear resize, ITU-R 601 luma for
gray models); prediction is jitted on one device in batches padded to a power of two (at most
64 crops), so one photo costs a small batch and only a few shapes are ever compiled.
Flip TTA averages the logits of each crop and its mirror; logit adjustment subtracts
`tau * log(prior)` (the class prior the model was trained under) before the softmax.

A model written by `ferjax export` is opened with ferjax.export.load_exported.
"""


import jax
import jax.numpy as jnp
import numpy as np

from ferjax import losses
from ferjax.data import images as images_lib
from ferjax.data import pipeline
from ferjax.data.reading import UnsupportedImage
from ferjax.errors import UserError
from ferjax.kinds.classifier import TTA_MODES

BATCH_SIZE = 64  # Crops per compiled call (the last batch is padded).


# --- The predictor -------------------------------------------------------------------------------
class Predictor:
  """A classifier ready for face crops: uint8 [N, S, S, C] -> class probabilities.

  `run_batch(images_uint8 [B, S, S, C], flip: bool, tau: float32) -> probabilities [B, K]` runs
  one padded batch of crops (a power of two, at most `batch_size`); the rest is shared by every
  way of getting a model.
  """

  def __init__(self, run_batch, *, class_names, image_size: int, channels: int, prior_counts,
               source: str, batch_size: int = BATCH_SIZE):
    self._run_batch = run_batch
    self.class_names = tuple(class_names)
    self.image_size = int(image_size)
    self.channels = int(channels)
    self.prior_counts = None if prior_counts is None else np.asarray(prior_counts)
    self.source = source
    self.batch_size = int(batch_size)

  def __repr__(self):
    return (f"Predictor({self.source}: {len(self.class_names)} classes, "
            f"{self.image_size}x{self.image_size}x{self.channels})")

  def probabilities(self, crops_uint8: np.ndarray, *, tta: str = "none",
                    logit_adjust: float = 0.0) -> np.ndarray:
    """uint8 [N, image_size, image_size, channels] -> float32 [N, K] softmax probabilities."""
    if tta not in TTA_MODES:
      raise UserError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
    if not np.isfinite(logit_adjust):
      raise UserError(f"--logit-adjust: expected a finite number, got {logit_adjust}")
    if logit_adjust and self.prior_counts is None:
      raise UserError(f"--logit-adjust: {self.source} records no class prior to adjust by")
    crops = np.asarray(crops_uint8)
    shape = (self.image_size, self.image_size, self.channels)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != shape:
      raise ValueError(f"expected uint8 crops [N, {', '.join(map(str, shape))}] (see "
                       f"prepare_crops), got {crops.dtype} {list(crops.shape)}")
    flip, tau = np.asarray(tta == "flip"), np.float32(logit_adjust)
    outputs = []  # Device arrays: every batch is dispatched before the first is fetched.
    # Padded to a power of two up to batch_size: one photo costs one small batch, not 64 crops,
    # and at most log2(batch_size) + 1 shapes are ever compiled.
    size = min(self.batch_size, 1 << max(len(crops) - 1, 0).bit_length())
    for start in range(0, len(crops), size):
      batch = crops[start:start + size]
      valid = len(batch)
      if valid < size:
        batch = np.concatenate([batch, np.zeros((size - valid, *shape), np.uint8)])
      outputs.append((valid, self._run_batch(batch, flip, tau)))
    probs = [np.asarray(out, np.float32)[:valid] for valid, out in outputs]
    return np.concatenate(probs) if probs else np.zeros((0, len(self.class_names)), np.float32)


def probabilities_fn(model, variables, log_prior, images_uint8, flip, tau):
  """Softmax probabilities [B, K] of uint8 crops: the model's own input scaling, optional flip TTA
  (a traced bool: logits of crop and mirror averaged), `tau * log_prior` subtracted. Pure; the
  same function runs from a run (jitted) and in an exported file (weights as constants)."""
  images = pipeline.to_float(images_uint8)
  logits_of = lambda x: model.apply(variables, x, train=False)[0].astype(jnp.float32)
  both = lambda x: (logits_of(x) + logits_of(x[:, :, ::-1, :])) / 2
  logits = jax.lax.cond(flip, both, logits_of, images)
  return jax.nn.softmax(losses.posthoc_adjust(logits, log_prior, tau), axis=-1)


_probabilities_jit = jax.jit(probabilities_fn, static_argnums=0)


def log_prior(prior_counts, num_classes: int) -> np.ndarray:
  if prior_counts is None:
    return np.zeros(num_classes, np.float32)
  return losses.log_prior(prior_counts)


# --- From a run ----------------------------------------------------------------------------------
def from_run(workdir, checkpoint="best") -> Predictor:
  """The classifier run in `workdir` at `checkpoint` (best, last or a step), on one device."""
  from ferjax import runs  # Lazily: reading an exported file needs no checkpoints (nor orbax).
  from ferjax.core import parallel
  run = runs.open_classifier(workdir, str(checkpoint), mesh=parallel.make_mesh(1))
  return from_model(run.model, run.variables, class_names=run.class_names,
                    image_size=run.config.data.image_size, channels=run.config.data.channels,
                    prior_counts=run.prior_counts,
                    source=f"{workdir} (step {run.step}, {checkpoint})")


def from_model(model, variables, *, class_names, image_size: int, channels: int, prior_counts,
               source: str) -> Predictor:
  """A Predictor of a Flax classifier and its evaluation variables (on their device)."""
  prior = log_prior(prior_counts, len(class_names))
  run_batch = lambda batch, flip, tau: _probabilities_jit(model, variables, prior, batch,
                                                          flip, tau)
  return Predictor(run_batch, class_names=class_names, image_size=image_size, channels=channels,
                   prior_counts=prior_counts, source=source)


# --- Crops ---------------------------------------------------------------------------------------
def _to_8bit(image) -> np.ndarray:
  """One image array (HxW, or HxWxC with 1, 3 or 4 channels) as uint8 [H, W, 1] (gray) or
  [H, W, 3] (colour; alpha dropped), as training images were read: values by the rule of
  `ferjax.data.images.to_uint8` (uint8, bool, 16-bit, floats in 0..1 or 0..255; anything else
  is an UnsupportedImage error, a ValueError)."""
  array = np.asarray(image)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f"expected an HxW or HxWxC (C = 1, 3 or 4) image, got shape {array.shape}")
  if array.ndim == 3:
    array = array[..., :3]  # RGBA -> RGB drops alpha, as PIL's convert("RGB").
  array = images_lib.to_uint8(array)
  return array if array.ndim == 3 else array[..., None]


def prepare_crops(images, image_size: int, channels: int) -> np.ndarray:
  """Face crops of any size and kind (HxW or HxWxC with 1/3/4 channels; 8 or 16 bits, floats in
  0..1 or 0..255, bool) -> uint8 [N, image_size, image_size, channels]: resized bilinear, then
  gray (ITU-R 601 luma, as PIL's "L") or RGB, exactly as the training data was converted."""
  crops = np.empty((len(images), image_size, image_size, channels), np.uint8)
  for i, image in enumerate(images):
    try:
      crop = _to_8bit(image)
    except UnsupportedImage as e:
      raise UnsupportedImage(e.reason, f"image {i}") from None
    crops[i] = images_lib.convert_images(crop[None], image_size=image_size,
                                         channels=channels)[0]
  return crops
