"""`ferjax data prepare` and `ferjax data stats`."""

import json
import math
import pathlib
import sys

import numpy as np

from ferjax import plots, writing
from ferjax.data import loading, reading
from ferjax.data.dataset import Dataset
from ferjax.errors import UserError

SYNTHETIC_SPLITS = ("train", "validation", "test")


def prepare(args) -> int:
  from ferjax.data import builders
  if args.name not in loading.DATASET_NAMES or args.name in ("synthetic", "folder"):
    real = [n for n in loading.DATASET_NAMES if n not in ("synthetic", "folder")]
    raise UserError(f"data prepare: unknown dataset {args.name!r}: expected one of "
                    f"{', '.join(real)} (synthetic and folder datasets need no preparation)")
  manual = pathlib.Path(args.manual_dir).expanduser()
  if not manual.is_dir():  # Checked even when an earlier preparation is reused.
    what = "is not a folder" if manual.exists() else "does not exist"
    raise UserError(f"data prepare {args.name}: --manual-dir {reading.shown(manual)} {what}: "
                    f"expected a folder holding {builders.info(args.name)['layout']}")
  if not (math.isfinite(args.wait) and args.wait >= 0):
    raise UserError(f"data prepare: --wait: expected a number of seconds >= 0, got {args.wait}")
  where = builders.default_data_dir() if args.data_dir is None else args.data_dir
  reused = not args.force and builders.prepared_dir(args.name, args.data_dir) is not None
  counts = builders.prepare(args.name, manual, data_dir=args.data_dir, force=args.force,
                            wait=args.wait)
  if reused:
    print(_reused_note(args.name, where, manual, args.data_dir))
  else:
    print(f"prepared {args.name} in {where}")
  for split, n in counts.items():
    print(f"  {split}: {n} images")
  return 0


def _reused_note(name: str, where, manual: pathlib.Path, data_dir) -> str:
  """What `data prepare` says when it reused an earlier preparation."""
  from ferjax.data import builders
  source = builders.prepared_source(name, data_dir)
  if source is None:
    return (f"note: {name} was already prepared in {where}, before ferjax recorded what a "
            f"preparation is made from: reused it without checking that it came from "
            f"{reading.shown(manual)} (add --force to prepare it again from there)")
  return (f"{name} was already prepared in {where} from the same files "
          f"({source['files']} in {reading.shown(source['manual_dir'])}): reused that preparation "
          f"(add --force to prepare it again)")


def split_stats(labels: np.ndarray, class_names) -> dict:
  """Per-class counts, total and imbalance ratio (largest / smallest non-empty class)."""
  counts = np.bincount(labels, minlength=len(class_names))
  nonzero = counts[counts > 0]
  ratio = float(nonzero.max() / nonzero.min()) if len(nonzero) else float("nan")
  return {"counts": {c: int(n) for c, n in zip(class_names, counts)}, "total": int(counts.sum()),
          "imbalance_ratio": round(ratio, 2), "empty_classes": [c for c, n in
                                                                zip(class_names, counts) if n == 0]}


def stats(args) -> int:
  name = args.name
  if name not in loading.DATASET_NAMES:
    raise UserError(f"data stats: unknown dataset {name!r}: expected one of "
                            f"{', '.join(loading.DATASET_NAMES)}")
  splits, listed, folds = _stats_splits(args)
  out = _stats_dir(args)
  result = {"dataset": name, "available_splits": list(listed), "splits": {}}
  if folds is not None:
    result["folds"] = folds
  train = None
  for split in splits:
    labels, sample = _load_for_stats(name, split, args.data_dir)
    result["class_names"] = list(sample.class_names)
    result["image_shape"] = list(sample.images.shape[1:])
    result["splits"][split] = split_stats(labels, sample.class_names)
    if split == "train" or train is None:
      train = sample

  counts_by_split = {s: list(v["counts"].values()) for s, v in result["splits"].items()}
  try:
    out.mkdir(parents=True, exist_ok=True)
    hist = plots.save_class_histogram(counts_by_split, result["class_names"],
                                      out / f"{name}_class_histogram.png",
                                      title=f"{name}: images per class")
    grid = plots.save_class_grid(train.images, train.labels, train.class_names,
                                 out / f"{name}_samples_{train.split}.png", per_class=12, scale=2)
  except OSError as e:
    raise reading.io_error(e, "write the stats PNGs into", "pass a writable --out folder") \
        from None
  result["files"] = [str(hist), str(grid)]

  if args.json:
    json.dump(result, sys.stdout, indent=2)
    print()
  else:
    print(_table(result))
  return 0


def _stats_splits(args) -> tuple[tuple[str, ...], tuple[str, ...], list | None]:
  """(splits to count, every split the dataset accepts, CK+'s per-fold summary or None).

  Counted: --split, else the dataset's main splits; CK+'s fold<k>_train / fold<k>_test are
  accepted and listed but counted only when asked for.
  """
  name = args.name
  if name == "synthetic":
    listed = SYNTHETIC_SPLITS
    splits, folds = listed, None
  else:
    from ferjax.data import builders
    listed = builders.available_splits(name, data_dir=args.data_dir, folds=True)
    folds = builders.fold_summary(name, data_dir=args.data_dir)
    splits = tuple(s for s in listed if s not in _fold_names(folds))
  if args.split is not None:
    if args.split not in listed:
      raise UserError(f"data stats {name}: no split {args.split!r} (available: "
                      f"{_splits_text(listed, folds)})")
    splits = (args.split,)
  return splits, listed, folds


def _fold_names(folds) -> set[str]:
  """The per-fold split names (CK+'s fold<k>_train / fold<k>_test) of a fold summary (None:
  no folds)."""
  return {f"fold{row['fold']}_{side}" for row in folds or () for side in ("train", "test")}


def _stats_dir(args) -> pathlib.Path:
  """--out, else `<data dir>/stats/<name>` (beside the prepared data, never the current folder);
  a UserError when it is not a folder. Created only once the stats are computed."""
  from ferjax.data import builders
  if args.out is not None:
    out = pathlib.Path(args.out).expanduser()
  else:
    data_dir = pathlib.Path(builders.default_data_dir() if args.data_dir is None
                            else args.data_dir).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
      raise UserError(f"data stats: data dir {reading.shown(data_dir)} is not a folder: expected "
                      f"a folder (or pass --out for the PNGs)")
    out = data_dir / "stats" / args.name
  if out.exists() and not out.is_dir():
    raise UserError(f"data stats: --out {reading.shown(out)} is not a folder: expected a folder "
                    f"for the PNGs")
  if args.out is not None and args.name != "synthetic":  # The prepared data is read from there.
    data_dir = pathlib.Path(builders.default_data_dir() if args.data_dir is None
                            else args.data_dir).expanduser()
    stats_dir = data_dir / "stats"
    if not _inside(out, stats_dir):
      writing.refuse_clobbering(out, input_dirs=[data_dir], what="data stats: --out",
                                folder=True)
  writing.refuse_foreign_folder(out, "data stats", owned=_stats_file, what="data stats: --out")
  return out


def _inside(path, folder) -> bool:
  path, folder = pathlib.Path(path).resolve(), pathlib.Path(folder).resolve()
  return path == folder or folder in path.parents


def _stats_file(name: str) -> bool:
  """Whether `name` is one of the PNGs `ferjax data stats` writes."""
  return name.endswith(".png") and ("_class_histogram" in name or "_samples_" in name)


def _load_for_stats(name: str, split: str, data_dir):
  """(all labels of the split, a Dataset to draw the sample grid from).

  Streamed datasets (AffectNet) are read batch by batch; their first batch is the sample.
  """
  if name not in loading.STREAMED:
    ds = loading.load(name, split, data_dir=data_dir)
    return ds.labels, ds
  from ferjax.data import builders
  sample, labels = None, []
  for images, batch_labels in builders.stream(name, split, data_dir=data_dir, batch_size=1024):
    if sample is None:
      sample = Dataset(images, batch_labels, tuple(builders.info(name)["class_names"]), name, split)
    labels.append(batch_labels)
  return np.concatenate(labels), sample


def _splits_text(splits, folds) -> str:
  """Split names for people: the per-fold ones (CK+, from the fold summary `folds`) folded
  into one pattern."""
  fold_names = _fold_names(folds)
  text = ", ".join(s for s in splits if s not in fold_names)
  if fold_names:
    ks = [row["fold"] for row in folds]
    text += f", fold<k>_train / fold<k>_test (k = {min(ks)}..{max(ks)})"
  return text


def _fold_lines(folds) -> list[str]:
  """The per-fold table: subjects and images in each fold's test side."""
  lines = [f"{'fold':<6}{'subjects':>10}{'images':>10}"]
  for row in folds:
    lines.append(f"{row['fold']:<6}{row['subjects']:>10}{row['images']:>10}")
  lines.append(f"{'total':<6}{sum(r['subjects'] for r in folds):>10}"
               f"{sum(r['images'] for r in folds):>10}")
  return lines


def _table(result: dict) -> str:
  names = result["class_names"]
  width = max(10, *(len(n) for n in names))
  splits = list(result["splits"])
  lines = [f"{result['dataset']}: images {tuple(result['image_shape'])}, {len(names)} classes"]
  lines.append(f"splits: {_splits_text(result['available_splits'], result.get('folds'))}")
  lines.append(f"{'class':<{width}}" + "".join(f"{s:>12}" for s in splits))
  for c in names:
    lines.append(f"{c:<{width}}" +
                 "".join(f"{result['splits'][s]['counts'][c]:>12}" for s in splits))
  lines.append(f"{'total':<{width}}" +
               "".join(f"{result['splits'][s]['total']:>12}" for s in splits))
  lines.append(f"{'imbalance':<{width}}" +
               "".join(f"{result['splits'][s]['imbalance_ratio']:>12.2f}" for s in splits))
  for s in splits:
    empty = result["splits"][s]["empty_classes"]
    if empty:
      lines.append(f"warning: split {s!r} has no images of class(es) {', '.join(empty)}")
  if result.get("folds"):
    lines.append("subject-disjoint folds (fold<k>_test = fold k, fold<k>_train = the others):")
    lines.extend(_fold_lines(result["folds"]))
  lines.append("wrote " + ", ".join(result["files"]))
  return "\n".join(lines)
