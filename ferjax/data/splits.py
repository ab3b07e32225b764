"""The splits a run trains and selects on, read the same way by every kind of run.

`load_split` reads one split of a config's `data` group at the run's size and channels, with
the long-tailed train profile (`data.imbalance_ratio`) and a size limit applied; `load_splits`
returns (train, validation): the named validation split, or a stratified hold-out of train.
The test split is never read here unless asked for by name (evaluation does that).

Noisy labels (`data.label_noise`, the noisy-label protocol): `load_splits` flips that share of
the labels that train, after any hold-out is taken with the true labels, so validation stays
clean; the flips (`label_noise`) depend on the run's seed only, so every method at one seed sees
the same corrupted labels. The synthetic set keeps its generator's own label noise (fixed,
whatever the seed). Either way the true labels are kept in `extras["clean_label"]`.
"""

import pathlib

import jax
import ml_collections
import numpy as np

from ferjax.data import dataset as dataset_lib
from ferjax.data import labels
from ferjax.data.dataset import Dataset
from ferjax.data.loading import DATASET_NAMES, check_split_name, load
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

  Labels: a real set's stay clean here (`load_splits` adds data.label_noise after its
  hold-out); the synthetic set's train split carries its generator's noise, its true labels in
  extras["clean_label"].
  """
  split = fold_split(data, check_split_name(split))
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
  if "index" not in ds.extras:  # Positions in the split as loaded, kept through every subset.
    ds = ds.replace(extras={**ds.extras, "index": np.arange(len(ds), dtype=np.int64)})
  if data.get("classes"):
    ds, line = select_classes(ds, data.classes)
    if train and jax.process_index() == 0:
      print(f"data.classes={data.classes!r}: {data.name} {split}: {line}")
  if lt and data.name != "synthetic":
    keep = dataset_lib.long_tail_subset(ds.labels, ds.num_classes, lt)
    ds = ds.take(keep, f"{split}-lt{lt:g}")
  if limit is not None and len(ds) > limit:
    first = np.arange(limit)  # An index array, not a slice: lazily read images stay on disk.
    ds = ds.take(first)
  if len(ds) == 0:
    raise UserError(f"dataset {data.name!r} split {split!r} holds no images")
  if train:
    check_two_classes(ds, f"dataset {data.name!r} split {split!r}")
  return ds


def check_two_classes(ds: Dataset, what: str) -> None:
  """Refuses a train set with images of fewer than two classes: a model of one class always
  scores perfectly and learns nothing."""
  present = [ds.class_names[k] for k in np.unique(np.asarray(ds.labels)) if k >= 0]
  if len(present) < 2:
    classes = f"only class {present[0]!r}" if present else "no class"
    empty = [repr(n) for n in ds.class_names if n not in present]
    none = f" (none of {', '.join(empty)})" if empty else ""
    raise UserError(f"{what}: has images of {classes}{none}: expected images of at least two "
                    f"classes to train on")


def select_classes(ds: Dataset, spec: str) -> tuple[Dataset, str]:
  """`labels.select_classes`, with extras["clean_label"] renumbered as the labels (-1: a true
  class the run drops, of an example kept for its noisy label)."""
  out, line = labels.select_classes(ds, spec)
  if "clean_label" in out.extras:
    _, mapping = labels.class_mapping(ds.class_names, spec)
    clean = mapping[np.asarray(out.extras["clean_label"])].astype(np.int32)
    out = out.replace(extras={**out.extras, "clean_label": clean})
  return out, line


def label_noise(ds: Dataset, rate: float, seed: int) -> Dataset:
  """`ds` with round(rate * N) labels flipped, symmetric noise: examples drawn uniformly without
  replacement, each given a uniformly drawn *other* class (the "symmetric" / "uniform" noise of
  the noisy-label literature, e.g. Patrini et al. 2017, "Making deep neural networks robust to
  label noise", and the noisy-FER protocols of Wang et al. 2020, "Suppressing uncertainties
  for large-scale facial expression recognition" (SCN)). Seeded by `seed` alone, on its own
  stream: the same flips for every method at one seed. The true labels go to
  extras["clean_label"] (kept when already there: noise on noise keeps the first truth)."""
  k = ds.num_classes
  rng = np.random.default_rng([seed, 17])  # Its own stream (7: hold-out, 13: joint weights).
  n = int(round(rate * len(ds)))
  flip = rng.choice(len(ds), size=n, replace=False) if k > 1 else np.zeros(0, np.int64)
  shift = rng.integers(1, max(k, 2), size=len(flip))  # Never the same class.
  noisy = ds.labels.copy()
  noisy[flip] = (noisy[flip] + shift) % k
  clean = ds.extras.get("clean_label", ds.labels)
  return ds.replace(labels=noisy.astype(np.int32), extras={**ds.extras, "clean_label": clean})


def labelled_subset(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(labelled indices, unlabeled-pool indices) of a train split for a label fraction
  (data.label_fraction, the semi-supervised protocol): round(fraction * n_k) of each class k
  keep their labels, at least one, drawn with `seed` on its own stream, so every method at one
  seed trains on the same labelled subset; the rest is the pool a semi-supervised stage may
  use without its labels."""
  rng = np.random.default_rng([seed, 19])  # Its own stream (7 hold-out, 13 joint, 17 noise).
  labelled = []
  for k in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == k))
    labelled.append(members[:max(1, int(round(fraction * len(members))))])
  labelled = np.sort(np.concatenate(labelled)) if labelled else np.zeros(0, np.int64)
  return labelled, np.setdiff1d(np.arange(len(labels)), labelled)


def fold_split(data, split: str) -> str:
  """The split `split` names for a run with `data.fold` set (CK+ cross-validation):
  train -> fold<k>_train, test -> fold<k>_test; other names (and runs without a fold) as given."""
  fold = data.get("fold")
  if fold is None or split not in ("train", "test"):
    return split
  return f"fold{int(fold)}_{split}"


def stratified_holdout(labels, fraction: float, seed: int, groups=None):
  """(train indices, held-out indices): round(fraction * n_k) of each class held out (classes
  with at least 2 examples keep one on each side). With `groups` (e.g. CK+ subjects, [N]) whole
  groups are held out instead, so no group is on both sides (`grouped_holdout`)."""
  if groups is not None:
    return grouped_holdout(labels, groups, fraction, seed)
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


def grouped_holdout(labels, groups, fraction: float, seed: int):
  """(train indices, held-out indices) with whole groups on one side: groups are taken in a
  seeded random order and a group is held out when at least half its images fill classes whose
  hold-out is still short of `fraction`, so the hold-out is stratified as far as whole groups
  allow. At least one group on each side when there are two or more."""
  labels, groups = np.asarray(labels), np.asarray(groups)
  rng = np.random.default_rng([seed, 7])
  names = rng.permutation(np.unique(groups))
  num_classes = int(labels.max()) + 1 if len(labels) else 0
  want = fraction * np.bincount(labels, minlength=num_classes)
  have = np.zeros(num_classes)
  held = []
  for g in names:
    if len(held) == len(names) - 1:
      break  # Train keeps at least one group.
    counts = np.bincount(labels[groups == g], minlength=num_classes)
    useful = np.minimum(have + counts, want).sum() - np.minimum(have, want).sum()
    if not held or useful >= 0.5 * counts.sum():  # Mostly filling classes still short.
      held.append(g)
      have += counts
  in_held = np.isin(groups, held)
  return np.flatnonzero(~in_held), np.flatnonzero(in_held)


def check_disjoint(train: Dataset, val: Dataset, field: str = "data.val_split") -> None:
  """Refuses a validation split that shares subjects with train (CK+ folds), or is train."""
  if train.name == val.name and train.split.split("-lt")[0] == val.split:
    raise UserError(f"{field}={val.split!r}: is the split the run trains on: expected a split "
                    f"that shares no image with it (or None: hold validation out of train)")
  subjects = (train.extras.get("subject"), val.extras.get("subject"))
  if train.name == val.name and all(s is not None for s in subjects):
    shared = np.intersect1d(subjects[0], subjects[1])
    if len(shared):
      raise UserError(f"{field}={val.split!r}: shares {len(shared)} subject(s) (e.g. "
                      f"{int(shared[0])}) with the train split {train.split!r}: expected a "
                      f"subject-disjoint split, or None (a subject-grouped hold-out of train)")


# --- Joint training on several datasets ---------------------------------------------------------
def parse_members(spec: str, field: str = "data.datasets") -> list[tuple[str, float]]:
  """[(dataset name, sampling weight), ...] of "fer2013,rafdb:2,affectnet:0.5"."""
  members = []
  for entry in (e.strip() for e in str(spec).split(",") if e.strip()):
    name, colon, weight = entry.partition(":")
    name = name.strip()
    if name not in DATASET_NAMES:
      raise UserError(f"{field}: unknown dataset {name!r} in {spec!r}: expected names from "
                      f"{', '.join(DATASET_NAMES)}, each with an optional :weight")
    try:
      value = float(weight) if colon else 1.0
    except ValueError:
      value = float("nan")
    if not (np.isfinite(value) and value > 0):
      raise UserError(f"{field}: weight of {name!r} in {spec!r}: expected a number > 0, got "
                      f"{weight!r}")
    if name in (m for m, _ in members):
      raise UserError(f"{field}: dataset {name!r} is named twice in {spec!r}")
    members.append((name, value))
  if len(members) < 2:
    raise UserError(f"{field}: expected two or more datasets for joint training (e.g. "
                    f"'fer2013,rafdb:2'), got {spec!r}")
  return members


def member_data(data, name: str):
  """The data group of one member of a joint run: the joint group with `name`, its own classes
  (mapped to canonical names later) and its own validation split when it has one (else a
  hold-out of its train split)."""
  member = ml_collections.ConfigDict(data.to_dict())
  member.update(name=name, classes="", datasets="", fold=None)
  if data.val_split is not None and not has_split(member, data.val_split):
    member.val_split = None  # E.g. RAF-DB has no validation split.
  return member


def has_split(data, split: str) -> bool:
  """Whether dataset data.name has split `split` (without loading it)."""
  if data.name == "synthetic":
    from ferjax.data.synthetic import SPLITS
    return split in SPLITS
  check_split_name(split)
  if data.name == "folder":
    return data.manual_dir is not None and (pathlib.Path(data.manual_dir).expanduser()
                                            / split).is_dir()
  from ferjax.data import builders
  return split in builders.available_splits(data.name, data_dir=data.data_dir)


def to_label_space(ds: Dataset, class_names) -> Dataset:
  """`ds` relabelled into `class_names` (canonical names) by canonical name (its
  extras["clean_label"] too)."""
  to_joint = np.asarray([class_names.index(c) for c in labels.canonical_names(ds.class_names)],
                        np.int32)
  extras = ds.extras
  if "clean_label" in extras:
    clean = np.asarray(extras["clean_label"])
    extras = {**extras, "clean_label": np.where(clean >= 0, to_joint[clean], -1).astype(np.int32)}
  return ds.replace(labels=to_joint[ds.labels], class_names=tuple(class_names), extras=extras)


def joint_class_names(datasets) -> tuple[str, ...]:
  """Every canonical class any of `datasets` has: the canonical order, then other names."""
  names = {c for ds in datasets for c in labels.canonical_names(ds.class_names)}
  return (tuple(c for c in labels.CANONICAL if c in names)
          + tuple(sorted(names - set(labels.CANONICAL))))


def weighted_rows(n: int, weight: float, seed: int) -> np.ndarray:
  """Row indices of one member repeated `weight` times on average (whole copies, then a seeded
  random part for the fraction): its examples are drawn `weight` times as often."""
  whole, fraction = int(weight), weight - int(weight)
  extra = np.random.default_rng([seed, 13]).permutation(n)[:int(round(fraction * n))]
  return np.concatenate([np.tile(np.arange(n), whole), np.sort(extra)]).astype(np.int64)


def load_joint(data, seed: int) -> tuple[Dataset, tuple[Dataset, ...] | None]:
  """(the union of every member's train split in one canonical label space, each member
  weighted by `weighted_rows`; each member's own validation set). Every member is loaded at
  data.image_size x data.channels, in host memory; `data.classes` applies to the union, so
  "-contempt" drops contempt from every member. The long-tail methods see the joint counts."""
  loaded = []
  for name, weight in parse_members(data.datasets):
    train, val = load_splits(member_data(data, name), seed)
    loaded.append((name, weight, train, val))
  names = joint_class_names([train for _, _, train, _ in loaded])
  trains, vals = [], []
  for name, weight, train, val in loaded:
    rows = weighted_rows(len(train), weight, seed)
    trains.append(to_label_space(train.take(rows, in_memory=True), names))
    vals.append(to_label_space(val, names).replace(name=name) if val is not None else None)
  extras = {"dataset": np.concatenate([np.full(len(t), n) for t, (n, *_) in zip(trains, loaded)])}
  if any("clean_label" in t.extras for t in trains):  # Members without noise: clean as labelled.
    extras["clean_label"] = np.concatenate([t.extras.get("clean_label", t.labels)
                                            for t in trains]).astype(np.int32)
  joint = Dataset(np.concatenate([t.images for t in trains]),
                  np.concatenate([t.labels for t in trains]).astype(np.int32), names, "joint",
                  "train", extras)
  if jax.process_index() == 0:
    print(f"joint train set: {len(joint)} images, " + ", ".join(
        f"{name} {len(t)} (weight {weight:g})" for t, (name, weight, *_) in zip(trains, loaded))
        + f"; classes {', '.join(names)}")
  if data.get("classes"):
    joint, line = select_classes(joint, data.classes)
    if jax.process_index() == 0:
      print(f"data.classes={data.classes!r}: joint train: {line}")
    vals = [labels.select_classes(v, data.classes)[0] if v is not None else None for v in vals]
  if any(v is None for v in vals):
    return joint, None
  return joint, tuple(vals)


def load_splits(data, seed: int, *, with_pool: bool = False):
  """(train, validation) Datasets of `data`: the named data.val_split, or (when it is None and
  the group has `val_fraction`) a stratified `val_fraction` of train held out with `seed`, read
  into memory once. Validation is None when the group has neither. The train split is
  data.split (default "train"), cut to data.num_examples; validation to data.val_examples.
  A joint run (data.name="joint", `load_joint`) has a tuple of validation sets, one per member
  dataset.

  Label noise (data.label_noise): a real set's train labels are flipped by `label_noise` with
  `seed` after the hold-out, which is taken (stratified) with the true labels and keeps them;
  the synthetic set's hold-out gets its true labels back (extras["clean_label"]). Validation is
  clean either way. The flipped count is printed once.

  Label fraction (data.label_fraction < 1): after the hold-out, only a stratified, seeded
  subset of the train split keeps its labels and trains (`labelled_subset`, at least one image
  per class); the same subset for every method at one seed. With `with_pool` the result is
  (train, validation, pool): the rest of train, the unlabeled pool of a semi-supervised run
  (None without a label fraction below 1). Its `labels` are the hidden true labels (clean ones
  under label noise), for diagnostics only: a trainer must not learn from them."""
  check_split_name(data.get("split", "train"), "data.split")
  if data.get("val_split") is not None:
    check_split_name(data.val_split, "data.val_split")
  if data.name == "joint":
    return (*load_joint(data, seed), None) if with_pool else load_joint(data, seed)
  train = load_split(data, data.get("split", "train"), train=True)
  val = None
  if data.val_split is not None:
    val = load_split(data, data.val_split, train=False, limit=data.get("val_examples"))
    check_disjoint(train, val)
  elif data.get("val_fraction") is not None:
    truth = train.extras.get("clean_label", train.labels)
    train_idx, held_idx = stratified_holdout(truth, data.val_fraction, seed,
                                             groups=train.extras.get("subject"))
    dropped = held_idx[truth[held_idx] < 0]  # True class dropped by data.classes: trains only.
    train_idx = np.sort(np.concatenate([train_idx, dropped]))
    held_idx = held_idx[truth[held_idx] >= 0]
    val = train.take(held_idx, f"{train.split}-holdout", in_memory=True)
    if "clean_label" in val.extras:
      val = val.replace(labels=val.extras["clean_label"].astype(np.int32))
    train = train.take(train_idx)
  fraction = data.get("label_fraction")
  unlabeled = None
  if fraction is not None and fraction < 1:  # After the hold-out: validation keeps its size.
    labelled, pool = labelled_subset(train.extras.get("clean_label", train.labels), fraction,
                                     seed)
    if jax.process_index() == 0:
      print(f"data.label_fraction={fraction:g}: {data.name} {train.split}: {len(labelled)} of "
            f"{len(train)} train images keep their labels (stratified, seed {seed}); "
            f"{len(pool)} left unlabeled")
    if with_pool:
      unlabeled = train.take(pool, f"{train.split}-unlabeled")
      if "clean_label" in unlabeled.extras:
        unlabeled = unlabeled.replace(labels=unlabeled.extras["clean_label"].astype(np.int32))
    train = train.take(labelled)
  rate = data.get("label_noise")
  if rate and data.name != "synthetic":
    train = label_noise(train, rate, seed)
  if "clean_label" in train.extras and jax.process_index() == 0:
    flipped = int(np.sum(train.labels != train.extras["clean_label"]))
    source = "the generator's own" if data.name == "synthetic" else f"symmetric, seed {seed}"
    print(f"data.label_noise={rate:g}: {data.name} {train.split}: {flipped} of {len(train)} "
          f"train labels flipped ({source}); validation clean")
  return (train, val, unlabeled) if with_pool else (train, val)
