"""Cross-dataset table: train on each dataset, test on every dataset, one matrix per metric.

  python experiments/cross_dataset.py --train fer2013,rafdb --test fer2013,ckplus,rafdb,ferplus \
      --out runs/xdata
  python experiments/cross_dataset.py --train fer2013,ckplus --test fer2013,ckplus,rafdb \
      --out runs/xdata --seeds 0 1 2 --data-dir /data/ferjax
  python experiments/cross_dataset.py --train synthetic --test synthetic,mine --folder mine=DIR \
      --out runs/xdata_demo config.train.num_steps=300      # overrides for every training run

For every train dataset that is prepared (`ferjax data prepare NAME`; the others are skipped with
one line each), one classifier per seed is trained into `<out>/<dataset>_seed<seed>` (resumable:
a finished run is reused) and evaluated, at its checkpoint chosen on the train dataset's own
validation data (the config's data.val_split, or a hold-out of its train split), on the report
split of every test dataset that is prepared: the dataset's `test` split (its `validation` split
when it has no test split, e.g. the shared FER-2013 copy), CK+ on `all` (every image; no CK+
image is ever trained on unless CK+ is the train dataset, whose own cell is its `test` fold).
`--split-for NAME=SPLIT` changes a test dataset's split. Classes are matched by canonical
emotion name and the argmax is taken over the classes the two datasets share (images of other
classes are dropped; results.md lists the classes scored in each cell). Nothing is chosen on
any test dataset: no checkpoint, no setting, no early stop.

Config per train dataset: `--config-for NAME=FILE`, else experiments/configs/
classifier_<name>_cpu.py on a CPU-only machine, then classifier_<name>.py, then
classifier_fer2013_cpu.py with data.name set to the dataset (the CPU FER-2013 recipe: 48 px
gray, about 20 minutes of training on a 2-core CPU per run). `--folder LABEL=DIR` adds an image-
folder dataset (`DIR/<split>/<class>/*.png`) under the name LABEL, usable in --train and --test.
FER+ relabels FER-2013's images (same split membership), so the cells between the two measure a
change of labels, not of domain.

Writes results.md (accuracy and mean class accuracy matrices, mean ± std over seeds, the
in-domain diagonal marked) and results.json (every cell, with its evaluation files).

See docs/methods.md (DeepFEVER-style transfer).
"""

import argparse
import json
import pathlib

import jax

import runner

from ferjax import evaluate, report
from ferjax.data import builders
from ferjax.data.loading import DATASET_NAMES
from ferjax.errors import UserError

CPU_FALLBACK = "classifier_fer2013_cpu.py"
# Full GPU recipes (days on a CPU): on a CPU a dataset without a `_cpu` config gets CPU_FALLBACK.
GPU_RECIPES = ("classifier_fer2013.py", "classifier_rafdb.py", "classifier_affectnet.py")
METRICS = (("accuracy", "Accuracy"), ("mean_class_accuracy", "Mean class accuracy"))
# The split a test dataset is reported on when it is not the train dataset (default "test").
OFF_DIAGONAL_SPLIT = {"ckplus": "all"}
TRAINING_SPLITS = ("train", "all")  # Hold the train dataset's own training images.


class Source:
  """One dataset of the matrix: a ferjax dataset name, or an image folder under a label."""

  def __init__(self, label: str, name: str, manual_dir=None, data_dir=None):
    self.label, self.name, self.manual_dir, self.data_dir = label, name, manual_dir, data_dir

  def missing(self) -> str | None:
    """Why this dataset cannot be used (one line), or None."""
    if self.name == "synthetic":
      return None
    if self.name == "folder":
      return None if pathlib.Path(self.manual_dir).is_dir() else \
          f"{self.label}: folder {self.manual_dir} not found"
    if not builders.is_prepared(self.name, self.data_dir):
      return (f"{self.label}: not prepared in {self.data_dir or builders.default_data_dir()} "
              f"(ferjax data prepare {self.name} --manual-dir DIR)")
    return None

  def has_split(self, split: str) -> bool:
    if self.name == "synthetic":
      return split in ("train", "validation", "test")
    if self.name == "folder":
      return (pathlib.Path(self.manual_dir) / split).is_dir()
    return split in builders.available_splits(self.name, self.data_dir, folds=True)

  def loaded_name(self) -> str:
    """The dataset name evaluation files are tagged with."""
    return pathlib.Path(self.manual_dir).expanduser().name if self.name == "folder" else self.name

  def overrides(self) -> list[str]:
    out = [f"config.data.name={self.name}"]
    if self.manual_dir:
      out.append(f"config.data.manual_dir={self.manual_dir}")
    if self.data_dir:
      out.append(f"config.data.data_dir={self.data_dir}")
    return out


def parse_pairs(items, flag: str) -> dict:
  pairs = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
      raise UserError(f"{flag} {item!r}: expected NAME=VALUE")
    pairs[key] = value
  return pairs


def parse_list(text: str, flag: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise UserError(f"{flag}: expected a comma-separated list of datasets, got {text!r}")
  if len(set(names)) < len(names):
    raise UserError(f"{flag}: a dataset is named twice in {text!r}")
  return names


def sources(names, folders: dict, data_dir) -> dict:
  out = {}
  for label in names:
    if label in folders:
      out[label] = Source(label, "folder", manual_dir=folders[label], data_dir=data_dir)
    elif label in DATASET_NAMES and label != "folder":
      out[label] = Source(label, label, data_dir=data_dir)
    else:
      known = [n for n in DATASET_NAMES if n != "folder"] + list(folders)
      raise UserError(f"unknown dataset {label!r}: expected one of {', '.join(known)} (an image "
                      "folder: --folder LABEL=DIR)")
  return out


def config_for(source: Source, chosen: dict) -> tuple[str, list[str]]:
  """(config file, overrides that point it at the dataset) for training on `source`."""
  if source.label in chosen:
    return chosen[source.label], source.overrides()
  names = [f"classifier_{source.name}.py"]
  if jax.default_backend() == "cpu":
    names = [f"classifier_{source.name}_cpu.py", *(n for n in names if n not in GPU_RECIPES)]
  for name in names:
    if (runner.CONFIGS / name).is_file() and source.name != "folder":
      return name, source.overrides()
  return CPU_FALLBACK, source.overrides()


def report_split(source: Source, split_for: dict, *, own: bool) -> str:
  """The split `source` is scored on: its test split in its own cell, else CK+ `all`, else
  test; without a test split, validation. --split-for overrides it, except with a split that
  holds training images (`all`, `train`) in the dataset's own cell."""
  if source.label in split_for and not (own and split_for[source.label] in TRAINING_SPLITS):
    return split_for[source.label]
  split = "test" if own else OFF_DIAGONAL_SPLIT.get(source.name, "test")
  if split == "test" and not source.has_split("test") and source.has_split("validation"):
    return "validation"
  return split


def cell_eval(workdir: pathlib.Path, test: Source, split: str) -> dict:
  """The run's evaluation on another dataset (reused when already written)."""
  tag = evaluate.output_tag(split, dataset=test.loaded_name())
  path = workdir / f"eval_{tag}.json"
  if path.exists():
    return report.read_eval(path)
  return evaluate.evaluate_run(workdir, split, checkpoint="best", tta="none", dataset=test.name,
                               data_dir=test.data_dir, manual_dir=test.manual_dir,
                               restrict_to_shared=True)


def run_matrix(train: dict, test: dict, out: pathlib.Path, seeds, *, config_files: dict,
               split_for: dict, overrides=()) -> dict:
  """Trains and evaluates every cell; returns the results.json structure."""
  skipped = {}
  for source in {**train, **test}.values():
    why = source.missing()
    if why:
      skipped[source.label] = why
      print(f"skipped {why}", flush=True)
  trained = [t for t in train if t not in skipped]
  tested = [t for t in test if t not in skipped]
  if not trained:
    raise UserError(f"no train dataset is available: {'; '.join(skipped.values())}")
  splits = {}
  for label in tested:  # Checked before any training.
    splits[label] = report_split(test[label], split_for, own=False)
  cells, runs = {}, {}
  for label in trained:
    source = train[label]
    config_file, data_overrides = config_for(source, config_files)
    own_split = report_split(source, split_for, own=True) if label in test else None
    runs[label] = {"config": str(config_file), "workdirs": [], "val": []}
    for seed in seeds:
      workdir = out / f"{label}_seed{seed}"
      run_overrides = [*data_overrides, *overrides, f"config.seed={seed}"]
      print(f"\n=== train {label} (seed {seed}, {config_file}) -> {workdir} ===", flush=True)
      if own_split is None:  # Not a test dataset: trained and validated only.
        own = train_and_validate(config_file, workdir, run_overrides)
      else:
        own = runner.train_and_test(config_file, workdir, run_overrides, report_split=own_split)
      runs[label]["workdirs"].append(str(workdir))
      runs[label]["val"].append(own["val"])
      for target in tested:
        if target == label:
          result, split = own, own_split
        else:
          split = splits[target]
          try:
            result = cell_eval(workdir, test[target], split)
          except UserError as e:  # E.g. no class in common: the other cells still count.
            print(f"skipped the cell {label} -> {target}: {e}", flush=True)
            continue
        cells.setdefault(label, {}).setdefault(target, {"split": split, "evals": []})
        cells[label][target]["evals"].append(result)
  return {"train": trained, "test": tested, "splits": splits, "skipped": skipped, "runs": runs,
          "cells": cells, "seeds": list(seeds)}


def train_and_validate(config_file, workdir: pathlib.Path, overrides) -> dict:
  """Trains (or resumes) a run that has no cell of its own; {"val": its validation eval}."""
  from ferjax.train import classifier
  out = workdir / "eval_val.json"
  if not out.exists():
    classifier.train_and_evaluate(runner.load(config_file, overrides), workdir)
    evaluate.evaluate_run(workdir, "val", checkpoint="best", tta="none")
  return {"val": report.read_eval(out)}


def summarize(matrix: dict) -> dict:
  """results.json: per cell mean ± std (%) of each metric, the classes scored and files."""
  cells = {}
  for label, row in matrix["cells"].items():
    for target, cell in row.items():
      evals = cell["evals"]
      cells.setdefault(label, {})[target] = {
          "split": cell["split"], "in_domain": label == target, "runs": len(evals),
          **{key: report.stat([e[key] for e in evals]) for key, _ in METRICS},
          "classes": list(evals[0]["per_class"]),
          "num_examples": evals[0]["num_examples"],
          "dropped": evals[0].get("dropped"),
          "files": [e.get("file", "eval_val.json") for e in evals],
      }
  runs = {label: {"config": r["config"], "workdirs": r["workdirs"],
                  "val": {key: report.stat([v[key] for v in r["val"]]) for key, _ in METRICS}}
          for label, r in matrix["runs"].items()}
  return {"train": matrix["train"], "test": matrix["test"], "splits": matrix["splits"],
          "seeds": matrix["seeds"],
          "skipped": matrix["skipped"], "runs": runs, "cells": cells}


def markdown(summary: dict) -> str:
  tests, cells, splits = summary["test"], summary["cells"], summary["splits"]
  lines = ["# Cross-dataset evaluation", "",
           f"Rows: the train dataset; columns: the test dataset (split). Mean ± std over seeds "
           f"{summary['seeds']} (%). **Bold**: in-domain (the train dataset's own held-out split, "
           "named where it differs from the column's). Every checkpoint is chosen on the train "
           "dataset's own validation data; off-diagonal cells score the classes the two datasets "
           "share (listed below).", ""]
  for key, title in METRICS:
    lines += [f"## {title}", "",
              "| train \\ test | " + " | ".join(f"{t} ({splits[t]})" for t in tests) + " |",
              "|---|" + "---:|" * len(tests)]
    for label in summary["train"]:
      row = []
      for target in tests:
        cell = cells.get(label, {}).get(target)
        text = "—" if cell is None else report.fmt(cell[key])
        if cell is not None and cell["split"] != splits[target]:
          text += f" ({cell['split']})"
        row.append(f"**{text}**" if label == target else text)
      lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append("")
  lines += ["## Selection (validation of the train dataset, %)", "",
            "| train | config | runs | " + " | ".join(t for _, t in METRICS) + " |",
            "|---|---|---:|" + "---:|" * len(METRICS)]
  for label, run in summary["runs"].items():
    lines.append(f"| {label} | {run['config']} | {len(run['workdirs'])} | " +
                 " | ".join(report.fmt(run["val"][key]) for key, _ in METRICS) + " |")
  lines += ["", "## Classes scored per cell", ""]
  for label, row in cells.items():
    for target, cell in row.items():
      if label != target:
        dropped = f"; {cell['dropped']}" if cell["dropped"] else ""
        lines.append(f"- {label} -> {target}: {', '.join(cell['classes'])} "
                     f"({cell['num_examples']} images{dropped})")
  if summary["skipped"]:
    lines += ["", "## Skipped", ""] + [f"- {why}" for why in summary["skipped"].values()]
  return "\n".join(lines) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train", required=True, help="comma-separated train datasets")
  parser.add_argument("--test", required=True, help="comma-separated test datasets")
  parser.add_argument("--out", default="runs/xdata", help="output folder (default runs/xdata)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--config-for", action="append", metavar="NAME=FILE",
                      help="the classifier config of a train dataset (repeatable)")
  parser.add_argument("--split-for", action="append", metavar="NAME=SPLIT",
                      help="the split a test dataset is scored on (repeatable; default: test, "
                           "CK+ all, validation where a dataset has no test split)")
  parser.add_argument("--folder", action="append", metavar="LABEL=DIR",
                      help="an image-folder dataset DIR/<split>/<class>/*.png named LABEL")
  parser.add_argument("--data-dir", default=None,
                      help="prepared datasets (default $FERJAX_DATA_DIR or ~/.ferjax/datasets)")
  parser.add_argument("overrides", nargs="*", help="config.field=value for every training run")
  args = parser.parse_args()
  folders = parse_pairs(args.folder, "--folder")
  train = sources(parse_list(args.train, "--train"), folders, args.data_dir)
  test = sources(parse_list(args.test, "--test"), folders, args.data_dir)
  config_files = parse_pairs(args.config_for, "--config-for")
  split_for = parse_pairs(args.split_for, "--split-for")
  for flag, given, known in (("--config-for", config_files, train),
                             ("--split-for", split_for, test)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise UserError(f"{flag}: {unknown} not among the datasets {list(known)}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  matrix = run_matrix(train, test, out, args.seeds, config_files=config_files,
                      split_for=split_for, overrides=args.overrides)
  summary = summarize(matrix)
  text = markdown(summary)
  (out / "results.md").write_text(text)
  (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
  print("\n" + text + f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
