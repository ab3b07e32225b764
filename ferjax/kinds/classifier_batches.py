"""A classifier run's train set on the devices, and the batches its train step draws from it.

The train set lives on the devices as uint8 (images split by rows over the mesh, see
ferjax.core.parallel); each step samples its batch there by the configured balancing policy and
augments it per example, inside the jitted step. Shared by the classifier and semi-supervised
trainers (the labelled batch) and ferjax.bench.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ferjax.core import parallel
from ferjax.data import dataset as dataset_lib
from ferjax.data import pipeline
from ferjax.kinds import classifier


def device_data(config, images, labels, num_classes: int, mesh) -> dict:
  """The train set on the device: images split by rows over the mesh (`parallel.put_rows`),
  labels and the class index the samplers draw from replicated (indices stay below N)."""
  labels = np.asarray(labels, np.int32)
  order, offsets, counts = pipeline.class_index(jnp.asarray(labels), num_classes)
  data = {"labels": labels, "class_index": (order, offsets, counts)}
  if config.sampler.name == "oversample":
    data["oversampled"] = pipeline.oversampled_order(labels, num_classes, config.seed)
  data = parallel.put_replicated(data, mesh)
  if not isinstance(images, dataset_lib.LazyImages):  # Lazy ones are read in chunks.
    images = np.asarray(images, np.uint8)
  data["images"] = parallel.put_rows(images, mesh)
  return data


# --- The batch: sampling -> gather -> [synthesis] -> augmentation ------------------------------
# A synthesis stage (e.g. VAE-GAN samples for minority classes) plugs in between gathering and
# augmentation, as a pure function of its key, the step and the gathered batch:
#
#   synthesize(key, step, images, labels, example_weights, data)
#       -> (images, labels, example_weights)
#
# images are float [B, H, W, C] in [-1, 1], labels int32 [B], example_weights float32 [B]
# (ones from the sampler). It may overwrite any slots (e.g. the last S slots with synthesized
# minority-class faces), keeping the shapes; the loss then weights each example by its weight.
# `data` is the device-resident dict: the train set ("images" uint8, "labels", "class_index" for
# `pipeline.sample_by_class`, to draw seed images of a class) and "synthesis", whatever arrays
# the stage needs (generator parameters, latent statistics; the classifier trainer's
# `train_and_evaluate(..., synthesis_data=...)` puts them there), passed through the jitted step
# as arguments.
Synthesize = Callable[..., tuple]


def batch_maker(config, data: dict, *, num_steps: int, synthesize: Synthesize | None = None,
                mesh=None, with_boxes: bool = False):
  """Returns `make_batch(key, step) -> (images, labels, example_weights)` over `data`.

  Call inside the jitted step (data holds its traced device arrays). Stages:
    1. indices of the batch by the balancing policy (config.sampler.name);
    2. gather the uint8 images and their labels, convert to float in [-1, 1];
    3. synthesis, when given (see `Synthesize` above);
    4. per-example augmentation (config.augment: crop, flip, rotation, erasing).
  Mixup, which mixes pairs across the batch, is applied by the train step afterwards.
  `with_boxes` (face mixup) adds a fourth output, each image's face box [B, 4] moved by its own
  augmentation (`pipeline.augment_one_with_box`; the same images): the whole frame before it,
  as no dataset keeps a face box (AffectNet's is cropped to at preparation).
  """
  batch_size = config.train.batch_size
  epoch_key = classifier.rng_streams(config.seed).epoch
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh)))
               if mesh is not None else (lambda x: x))

  def make_batch(key, step):
    sample_key, synth_key, augment_key = jax.random.split(key, 3)
    # 1. Sampling. The over-sampling policy walks fixed epochs, so it keys on the epoch instead.
    indices = pipeline.sample_indices(
        epoch_key if config.sampler.name == "oversample" else sample_key, step,
        sampler=config.sampler.name, index=data["class_index"],
        class_counts=data["class_index"][2], batch_size=batch_size, num_steps=num_steps,
        oversampled=data.get("oversampled"))
    indices = constrain(indices)  # From here on each device works on its share of the batch.
    # 2. Gather.
    images = pipeline.to_float(data["images"][indices])
    labels = data["labels"][indices]
    weights = jnp.ones((batch_size,), jnp.float32)
    # 3. Synthesis.
    if synthesize is not None:
      images, labels, weights = synthesize(synth_key, step, images, labels, weights, data)
    # 4. Augmentation.
    if with_boxes:
      images, boxes = pipeline.augment_batch_with_boxes(
          augment_key, images, pipeline.frame_boxes(images), config.augment)
      return constrain(images), constrain(labels), constrain(weights), constrain(boxes)
    images = pipeline.augment_batch(augment_key, images, config.augment)
    return constrain(images), constrain(labels), constrain(weights)

  return make_batch
