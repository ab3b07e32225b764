"""The in-memory form every dataset loader returns."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image set held in host memory.

  images: uint8 [N, H, W, C]; labels: int32 [N] indexing `class_names`.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  name: str = ""
  split: str = ""

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
    if self.labels.dtype != np.int32 or self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"labels must be int32 [N], got {self.labels.dtype} {self.labels.shape}")

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
