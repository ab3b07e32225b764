"""Datasets: one in-memory form (`Dataset`) for the synthetic default and every real FER set."""

from ferjax.data import labels, splits
from ferjax.data.dataset import Dataset, LazyImages
from ferjax.data.loading import DATASET_NAMES, load

__all__ = ["DATASET_NAMES", "Dataset", "LazyImages", "labels", "load", "splits"]
