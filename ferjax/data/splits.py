"""The splits a run trains and selects on, read the same way by every kind of run.

`load_split` reads one split of a config's `data` group at the run's size and channels, with
the long-tailed train profile (`data.imbalance_ratio`) and a size limit applied; `load_splits`
returns (train, validation): the named validation split, or a stratified hold-out of train.
The test split is never read here unless asked for by name (evaluation does that).
"""

import jax
import numpy as np

from ferjax.data import dataset as dataset_lib
from ferjax.data.dataset import Dataset
from ferjax.data.loading import load
from ferjax.errors import UserError


def lazy_reads(train: bool) -> bool | None:
  """`lazy` for `load`: with several processes the train split stays on disk, so that
  `parallel.put_rows` makes each process read only its own devices' rows; otherwise None (the
  dataset's default: lazy for AffectNet only)."""
  return True if train and jax.process_count() > 1 else None


def load_split(data, split: str, *, train: bool, limit: int | None = None) -> Dataset:
  """One split of `data` (a config's data group) at data.image_size x data.channels.

  `train`: this is the split the run trains on, so the long-tailed profile
  (data.imbalance_ratio) and the synthetic set's train options (data.label_noise) apply: the
  synthetic set draws the profile, a real set keeps a fixed long-tailed subset
  (`dataset.long_tail_subset`). `limit`: the synthetic set's size, else the first `limit` rows
  (default for the train split: data.num_examples).
  The synthetic set is always generated with its own fixed seed, whatever the run's seed: the
  training seed never changes the data.
  """
  lt = data.get("imbalance_ratio") if train else None
  if train and limit is None:
    limit = data.get("num_examples")
  options = {}
  if data.name == "synthetic":
    if limit is not None:
      options["num_examples"] = limit
    if lt:
      options["imbalance_ratio"] = lt
    if train and data.get("label_noise") is not None:
      options["label_noise"] = data.label_noise
  ds = load(data.name, split, data_dir=data.data_dir, manual_dir=data.manual_dir,
            image_size=data.image_size, channels=data.channels, lazy=lazy_reads(train), **options)
  if lt and data.name != "synthetic":
    keep = dataset_lib.long_tail_subset(ds.labels, ds.num_classes, lt)
    ds = Dataset(ds.images[keep], ds.labels[keep], ds.class_names, ds.name, f"{split}-lt{lt:g}")
  if limit is not None and len(ds) > limit:
    first = np.arange(limit)  # An index array, not a slice: lazily read images stay on disk.
    ds = Dataset(ds.images[first], ds.labels[first], ds.class_names, ds.name, ds.split)
  if len(ds) == 0:
    raise UserError(f"dataset {data.name!r} split {split!r} holds no images")
  return ds


def stratified_holdout(labels, fraction: float, seed: int):
  """(train indices, held-out indices): round(fraction * n_k) of each class held out (classes
  with at least 2 examples keep one on each side)."""
  rng = np.random.default_rng([seed, 7])  # Its own stream: independent of training randomness.
  train_idx, held_idx = [], []
  for k in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == k))
    n_held = int(round(fraction * len(members)))
    if len(members) >= 2:
      n_held = min(max(n_held, 1), len(members) - 1)
    else:
      n_held = 0
    held_idx.append(members[:n_held])
    train_idx.append(members[n_held:])
  return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(held_idx))


def load_splits(data, seed: int) -> tuple[Dataset, Dataset | None]:
  """(train, validation) Datasets of `data`: the named data.val_split, or (when it is None and
  the group has `val_fraction`) a stratified `val_fraction` of train held out with `seed`, read
  into memory once. Validation is None when the group has neither. The train split is
  data.split (default "train"), cut to data.num_examples; validation to data.val_examples."""
  train = load_split(data, data.get("split", "train"), train=True)
  if data.val_split is not None:
    return train, load_split(data, data.val_split, train=False, limit=data.get("val_examples"))
  if data.get("val_fraction") is None:
    return train, None
  train_idx, held_idx = stratified_holdout(train.labels, data.val_fraction, seed)
  held = Dataset(np.asarray(train.images[held_idx]), train.labels[held_idx], train.class_names,
                 train.name, "train-holdout")
  return (Dataset(train.images[train_idx], train.labels[train_idx], train.class_names,
                  train.name, "train"), held)
