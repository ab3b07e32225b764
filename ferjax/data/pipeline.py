"""Device-side input pipeline: the dataset lives on the device as uint8, and batches are
sampled, converted and augmented inside the jitted train step (no per-step host copies).

Every function here is pure and traceable: `key` in, arrays out. Per-example work is written
for one example and vmapped.
"""

import jax
import jax.numpy as jnp


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


def random_flip(key, images):
  """Per-example horizontal flip of a batch [B, H, W, C]."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(flip_one)(keys, images)
