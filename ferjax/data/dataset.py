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
