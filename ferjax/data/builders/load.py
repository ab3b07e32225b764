"""Reading a split of a prepared dataset without TensorFlow: into memory (`load_prepared`,
which prepares the dataset first from a `manual_dir` when needed) or batch by batch (`stream`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ferjax.data.builders.locate import (builder_cls, not_prepared, prepared_config,
                                         resolve_data_dir, variant_dir)
from ferjax.data.builders.prepared import Prepared
from ferjax.data.builders.preparing import check_source, prepare
from ferjax.data.dataset import Dataset, LazyImages
from ferjax.errors import UserError


def _open(name: str, split: str, data_dir, manual_dir=None, image_size=None) -> Prepared:
  """The prepared dataset, prepared first from `manual_dir` when needed; a `manual_dir` other
  than the one it was prepared from (other files) is refused (`check_source`)."""
  cls = builder_cls(name)
  cls.select(name, split, None)  # Unknown split names fail before any preparation.
  data_dir = resolve_data_dir(data_dir)
  prepared, config = prepared_config(name, data_dir, image_size)
  if not prepared:
    if manual_dir is None:
      raise not_prepared(name, data_dir)
    prepare(name, manual_dir, data_dir)
  elif manual_dir is not None:
    check_source(name, variant_dir(cls, data_dir, config), manual_dir, data_dir, loading=True)
  return Prepared(name, data_dir, image_size)


def load_prepared(name: str, split: str, data_dir=None, manual_dir=None, *,
                  lazy: bool = False) -> Dataset:
  """Reads split `split` of prepared dataset `name` into host memory (no TensorFlow).

  When the dataset is not prepared: prepares it from `manual_dir` if given, else raises a
  `UserError` naming the `ferjax data prepare` command to run; when prepared from other files
  than `manual_dir`'s, a `UserError` naming both. Records are decoded `READ_CHUNK` at a time
  into one preallocated array, so peak memory is the result plus a chunk. `lazy`: read only the
  labels now; the images are a `LazyImages` read when rows are sliced. `extras` holds every other
  non-image feature the split stores (CK+: `subject`, `fold`), aligned with the labels.
  """
  ds = _open(name, split, data_dir, manual_dir)
  stored, indices = ds.indices(split)
  if lazy:
    scalars = ds.scalars(stored)
    labels = np.asarray(scalars["label"], np.int32)[indices]
    extras = {key: values[indices] for key, values in scalars.items() if key != "label"}
    images = LazyImages(lambda records: ds.read(stored, records)[0], indices, ds.shape)
  else:
    images, labels, extras = ds.read_with_extras(stored, indices)
  return Dataset(images, labels, ds.spec.class_names, name, split, extras)


def stream(name: str, split: str, data_dir=None, batch_size: int = 256,
           shuffle_seed: int | None = None, image_size: int | None = None,
           drop_remainder: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One pass over a prepared split as (uint8 images [B,H,W,C], int32 labels [B]) batches.

  For sets too big for memory (AffectNet); works for every prepared dataset. `shuffle_seed`
  visits the examples in a seeded random order (None: stored order). `image_size` resizes
  (bilinear, square). The last batch is smaller unless `drop_remainder`. Errors (not prepared,
  unknown split) are raised by this call, not by the first `next`.
  """
  if int(batch_size) < 1:
    raise UserError(f"batch_size: expected a positive integer, got {batch_size!r}")
  batch_size = int(batch_size)
  ds = _open(name, split, data_dir, image_size=image_size)
  stored, indices = ds.indices(split)
  if shuffle_seed is not None:
    indices = np.random.default_rng(shuffle_seed).permutation(indices)
  convert: Callable[[np.ndarray], np.ndarray] = lambda x: x
  if image_size is not None and tuple(ds.shape[:2]) != (image_size, image_size):
    from ferjax.data.images import convert_images
    convert = lambda x: convert_images(x, image_size=int(image_size))

  def batches():
    stop = len(indices) - len(indices) % batch_size if drop_remainder else len(indices)
    for start in range(0, stop, batch_size):
      images, labels = ds.read(stored, indices[start:start + batch_size])
      yield convert(images), labels

  return batches()
