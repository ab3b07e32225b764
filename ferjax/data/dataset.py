"""The form every dataset loader returns: labels in memory, images in memory or read lazily."""

import dataclasses
from typing import Callable

import numpy as np


class LazyImages:
  """uint8 images [N, H, W, C] left on disk until rows are asked for (splits too big for host
  memory, e.g. AffectNet).

  `read(record_indices) -> uint8 [n, H, W, C]` reads records of the underlying source. A slice
  `images[a:b]` reads those rows (bounded work: trainers read in chunks); an index array or a
  boolean mask gives another LazyImages over that subset without reading anything; an integer
  reads one image; `np.asarray(images)` reads all of them.
  """
  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, read: Callable[[np.ndarray], np.ndarray], record_indices,
               image_shape: tuple[int, int, int]):
    self._read = read
    self.record_indices = np.asarray(record_indices, np.int64)
    self.image_shape = tuple(int(d) for d in image_shape)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.record_indices), *self.image_shape)

  def __len__(self) -> int:
    return len(self.record_indices)

  def __getitem__(self, key):
    if isinstance(key, slice):
      return self._checked(self._read(self.record_indices[key]), len(self.record_indices[key]))
    if isinstance(key, (int, np.integer)):
      return self._checked(self._read(self.record_indices[[key]]), 1)[0]
    key = np.asarray(key)
    if key.dtype == bool:
      key = np.flatnonzero(key)
    return LazyImages(self._read, self.record_indices[key], self.image_shape)

  def __array__(self, dtype=None, copy=None):
    images = self[:]
    return images if dtype is None else images.astype(dtype)

  def map(self, convert: Callable[[np.ndarray], np.ndarray], image_shape) -> "LazyImages":
    """The same rows, each read batch passed through `convert` (e.g. resizing)."""
    return LazyImages(lambda indices: convert(self._read(indices)), self.record_indices,
                      image_shape)

  def _checked(self, images: np.ndarray, n: int) -> np.ndarray:
    if images.dtype != np.uint8 or images.shape != (n, *self.image_shape):
      raise ValueError(f"lazy read returned {images.dtype} {images.shape}, expected uint8 "
                       f"{(n, *self.image_shape)}")
    return images


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image set.

  images: uint8 [N, H, W, C], a numpy array or a `LazyImages` (read on slicing);
  labels: int32 [N] indexing `class_names`, always in memory;
  extras: per-example ids where the dataset has them, each an array [N]: `file` (str, the
  source file relative to its folder), `subject` and `fold` (int, CK+), `index` (the example's
  position in its split as loaded, before any subset). Subsets (`take`) keep them aligned.
  """
  images: np.ndarray | LazyImages
  labels: np.ndarray
  class_names: tuple[str, ...]
  name: str = ""
  split: str = ""
  extras: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
    if self.labels.dtype != np.int32 or self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"labels must be int32 [N], got {self.labels.dtype} {self.labels.shape}")
    for key, value in self.extras.items():
      if np.shape(value)[:1] != self.labels.shape:
        raise ValueError(f"extras[{key!r}] must have {len(self.labels)} rows, got "
                         f"{np.shape(value)}")

  def take(self, indices, split: str | None = None, *, in_memory: bool = False) -> "Dataset":
    """The examples at `indices` (an index array; lazily read images stay on disk unless
    `in_memory`), extras kept aligned; `split` renames the split."""
    indices = np.asarray(indices, np.int64)
    images = self.images[indices]
    if in_memory:
      images = np.asarray(images)
    return Dataset(images, self.labels[indices], self.class_names, self.name,
                   self.split if split is None else split,
                   {k: np.asarray(v)[indices] for k, v in self.extras.items()})

  def replace(self, **changes) -> "Dataset":
    return dataclasses.replace(self, **changes)

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def class_counts(self) -> np.ndarray:
    return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)


def long_tail_subset(labels: np.ndarray, num_classes: int, imbalance_ratio: float,
                     seed: int = 0) -> np.ndarray:
  """Sorted indices of a long-tailed subset (e.g. FER-2013-LT, as CIFAR-10-LT is built).

  Classes keep their natural frequency order; the class of rank r (0 = most frequent) keeps
  n_max * imbalance_ratio^(-r / (K - 1)) images (at most what it has), drawn at random with a
  fixed seed, so every method sees the same subset.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  order = np.argsort(-counts, kind="stable")
  rank = np.empty(num_classes, np.float64)
  rank[order] = np.arange(num_classes)
  keep = np.minimum(counts, np.round(counts.max() * imbalance_ratio ** (
      -rank / max(num_classes - 1, 1)))).astype(np.int64)
  rng = np.random.default_rng([seed, 11])
  chosen = [rng.choice(np.flatnonzero(labels == k), keep[k], replace=False)
            for k in range(num_classes)]
  return np.sort(np.concatenate(chosen))
