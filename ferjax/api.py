"""ferjax from Python or a notebook: a handful of functions over the library, each a few lines.

    from ferjax import api
    config = api.make_config("classifier", {"train.num_steps": 300})
    api.train(config, "runs/baseline")
    metrics = api.evaluate("runs/baseline", split="test")
    features = api.extract_features("runs/baseline", images)
    predictions = api.predict("runs/baseline", crops)
    table = api.compare({"none": {}, "ros": {"sampler.name": "oversample"}},
                        config=config, out="runs/compare", seeds=(0, 1)).table

Every function delegates to the code the `ferjax` command runs (ferjax.configs, the trainers'
`train_and_evaluate`, ferjax.evaluate, ferjax.inference, ferjax.probe, ferjax.report), with the
same options and the same one-line `UserError`s. Overrides are written as on the command line
("optim.lr=0.1", typed by the field they replace), as a list of such strings or as a dict
{"optim.lr": 0.1}. docs/python.md walks through them; nothing in ferjax imports this module.
"""

import dataclasses
import pathlib
import re
from typing import NamedTuple

import ml_collections
import numpy as np

from ferjax import configs, data, evaluate as evaluate_lib, inference, probe, report, runs
from ferjax import writing
from ferjax.core import monitor
from ferjax.core import workdir as workdir_lib
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import pretrain as pretrain_kind
from ferjax.kinds import semisup as semisup_kind
from ferjax.kinds import vaegan as vaegan_kind
from ferjax.train import classifier as classifier_trainer
from ferjax.train import pretrain as pretrain_trainer
from ferjax.train import semisup as semisup_trainer
from ferjax.train import vaegan as vaegan_trainer

# Kind of run -> (its config spec module, its trainer), as `ferjax train`, `train-semisup`,
# `train-vaegan` and `pretrain` pair them.
KINDS = {"classifier": (classifier_kind, classifier_trainer),
         "semisup": (semisup_kind, semisup_trainer),
         "vaegan": (vaegan_kind, vaegan_trainer),
         "pretrain": (pretrain_kind, pretrain_trainer)}


# --- Configs and training ---------------------------------------------------------------------
def make_config(file_or_kind="classifier", overrides=()) -> ml_collections.ConfigDict:
  """A run's config: a kind's defaults (classifier, semisup, vaegan, pretrain) or a config file
  (a .py file with get_config(), e.g. experiments/configs/classifier_synthetic_tiny.py), with
  `overrides` applied ("field=value" strings or a {field: value} dict, typed by the field)."""
  if str(file_or_kind) in KINDS:
    config = KINDS[str(file_or_kind)][0].default_config()
    configs.apply_overrides(config, override_list(overrides))
    return config
  if not str(file_or_kind).endswith(".py"):
    raise UserError(f"config {file_or_kind!r}: expected a kind of run ({', '.join(KINDS)}) or "
                    "a config file ending in .py")
  return configs.load_config(file_or_kind, override_list(overrides))


def override_list(overrides) -> list[str]:
  """'field=value' strings from a list of them, one such string, or a {field: value} dict."""
  if isinstance(overrides, str):
    return [overrides]
  if isinstance(overrides, dict):
    return [f"{field}={value}" for field, value in overrides.items()]
  return list(overrides)


def train(config, workdir, *, kind: str = "classifier",
          stop_after: int | None = None) -> pathlib.Path:
  """Trains (or resumes) a run of `kind` in `workdir` with `config`, as `ferjax train` (or
  train-semisup, train-vaegan, pretrain) does; returns the workdir as a Path. `stop_after`:
  stop after that many steps, resumable later (ferjax.core.loop.Schedule)."""
  if kind not in KINDS:
    raise UserError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
  KINDS[kind][1].train_and_evaluate(config, workdir, stop_after=stop_after)
  return pathlib.Path(workdir)


# --- Data and finished runs -------------------------------------------------------------------
def load_dataset(name="synthetic", split="train", *, image_size=None, channels=None,
                 data_dir=None, manual_dir=None, **options) -> data.Dataset:
  """Split `split` of dataset `name` as a `Dataset` (uint8 images [N, H, W, C], int32 labels,
  class_names, class_counts()); see ferjax.data.load for the options (the synthetic set's
  num_examples, seed, imbalance_ratio, label_noise)."""
  return data.load(name, split, image_size=image_size, channels=channels, data_dir=data_dir,
                   manual_dir=manual_dir, **options)


def open_run(workdir, checkpoint="best"):
  """The run in `workdir` at `checkpoint` (best: chosen on validation; last; or a step): a
  classifier or semi-supervised run as a `runs.ClassifierRun`, a VAE-GAN run as a
  `runs.VAEGANRun`, a pre-training run as a `runs.PretrainRun`."""
  kind = workdir_lib.run_kind(workdir)
  if kind == vaegan_kind.KIND:
    return runs.open_vaegan(workdir, str(checkpoint))
  if kind == pretrain_kind.KIND:
    return runs.open_pretrain(workdir, str(checkpoint))
  return runs.open_classifier(workdir, str(checkpoint))


def evaluate(workdir, split="test", *, checkpoint="best", dataset=None, tta=None,
             logit_adjust=0.0, tau_norm=0.0, write=True, **options) -> dict:
  """Metrics of a classifier run on `split`, as `ferjax evaluate` computes and (with `write`)
  saves them: accuracy, mean_class_accuracy, macro_f1, per_class (recall, precision, f1,
  support), groups (head / medium / tail), confusion. `tta` (none, flip; default the run's
  eval.tta), `logit_adjust` and `tau_norm` change this evaluation only; `dataset` scores another
  dataset; `options`: the rest of ferjax.evaluate.evaluate_run's (data_dir, manual_dir, ...)."""
  return evaluate_lib.evaluate_run(workdir, split, checkpoint=checkpoint, dataset=dataset,
                                   tta=tta, logit_adjust=logit_adjust, tau_norm=tau_norm,
                                   write=write, **options)


def extract_features(run_or_workdir, images, *, checkpoint="best", flip=False) -> np.ndarray:
  """Penultimate features float32 [N, D] of face crops, from an open classifier run or a
  workdir (at `checkpoint`). `images`: uint8 [N, S, S, C] at the run's size and channels, a
  `Dataset`, or face crops of any size (converted as the training images were); `flip`: of
  their mirror images."""
  run = run_or_workdir
  if not isinstance(run, runs.ClassifierRun):
    run = runs.open_classifier(run_or_workdir, str(checkpoint))
  crops = as_crops(images, run.config.data.image_size, run.config.data.channels)
  return evaluate_lib.extract_features(run, crops, flip=flip)


class Predictions(NamedTuple):
  """What `predict` returns."""
  probabilities: np.ndarray  # float32 [N, K], columns in class_names order
  labels: list  # the predicted class name of each crop
  class_names: tuple  # the K class names


def predict(workdir, images, *, checkpoint="best", tta="none", logit_adjust=0.0) -> Predictions:
  """Class probabilities of face crops from the classifier run in `workdir`, as `ferjax
  predict` computes them (one device; flip TTA and post-hoc logit adjustment as asked).
  `images`: as for `extract_features`."""
  predictor = inference.from_run(workdir, checkpoint)
  crops = as_crops(images, predictor.image_size, predictor.channels)
  probabilities = predictor.probabilities(np.asarray(crops), tta=tta, logit_adjust=logit_adjust)
  names = predictor.class_names
  return Predictions(probabilities, [names[k] for k in probabilities.argmax(1)], names)


def as_crops(images, image_size: int, channels: int):
  """uint8 [N, image_size, image_size, channels] images as they are; a Dataset's images; any
  other face crops converted by ferjax.inference.prepare_crops."""
  if isinstance(images, data.Dataset):
    images = images.images
  shape = (image_size, image_size, channels)
  ready = (isinstance(images, (np.ndarray, data.LazyImages)) and images.dtype == np.uint8
           and tuple(images.shape[1:]) == shape)
  if ready:
    return images
  return inference.prepare_crops(images, image_size, channels)


# --- Linear probes ----------------------------------------------------------------------------
def linear_probe(train_features, train_labels, test_features, test_labels, *, class_names=None,
                 l2=None, seed=0) -> dict:
  """Fits a multinomial logistic regression on (train_features [N, D], train_labels [N]) and
  scores it on the test pair, as `ferjax probe --train A --test B` does (L2 chosen by
  cross-validation on the training part, or fixed by `l2`): accuracy, mean_class_accuracy,
  macro_f1, confusion, the chosen l2. Labels index `class_names` (default: 0..K-1)."""
  if class_names is None:  # 0..K-1, K from the largest label (probe_data checks them).
    labels = [np.asarray(y) for y in (train_labels, test_labels)]
    largest = max((int(y.max()) for y in labels if y.dtype.kind in "iu" and y.size), default=0)
    class_names = [str(k) for k in range(largest + 1)]
  train = probe_data(train_features, train_labels, class_names, "train")
  test = probe_data(test_features, test_labels, class_names, "test")
  if train["features"].shape[1] != test["features"].shape[1]:
    raise UserError(f"test features are {test['features'].shape[1]}-d, train features "
                    f"{train['features'].shape[1]}-d")
  if l2 is not None and not (np.isfinite(l2) and l2 >= 0):
    raise UserError(f"l2: expected a finite number >= 0, got {l2}")
  return probe.evaluate_split(train, test, np.arange(len(train["labels"])),
                              np.arange(len(test["labels"])), l2=l2, seed=seed)


def probe_data(features, labels, class_names, what: str) -> dict:
  """Features and labels in the form ferjax.probe reads from a features file (no subjects or
  folds), checked: one line naming what is wrong."""
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise UserError(f"{what}: expected features [N, D] and labels [N], got "
                    f"{list(features.shape)} and {list(labels.shape)}")
  if labels.dtype.kind not in "iu" or (len(labels) and not 0 <= labels.min() <= labels.max()
                                       < len(class_names)):
    raise UserError(f"{what}: expected integer labels in 0..{len(class_names) - 1}")
  if not np.isfinite(features).all():
    raise UserError(f"{what}: features hold NaN or infinite values")
  unknown = np.full(len(labels), -1, np.int64)
  return {"features": features, "labels": labels.astype(np.int64),
          "class_names": tuple(class_names), "subject": unknown, "fold": unknown}


# --- Comparing methods over seeds -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Comparison:
  """What `compare` returns: `table` (Markdown, mean ± std in % over seeds), `summary`
  (ferjax.report.summarize: method -> {metric: (mean %, std %)}, per-class recall included),
  `workdirs` (method -> its runs' workdirs, one per seed)."""
  table: str
  summary: dict
  workdirs: dict


def compare(methods: dict, *, config, out, seeds=(0, 1, 2), split="test") -> Comparison:
  """The protocol in miniature: each method (name -> its overrides on `config`, a ConfigDict,
  a kind or a config file) trained for each seed into `<out>/<method>_seed<seed>`, its
  checkpoint chosen on validation, then evaluated on `split`; `<out>/comparison.md` gets the
  table. A run already trained and evaluated with the same config is reused, an unfinished
  one resumed, so an interrupted comparison goes on where it stopped."""
  base = config if isinstance(config, ml_collections.ConfigDict) else make_config(config)
  out = pathlib.Path(out)
  if not methods or not seeds:
    raise UserError(f"compare: expected at least one method and one seed, got {len(methods)} "
                    f"and {len(seeds)}")
  for name in methods:
    if not re.fullmatch(r"[\w.-]+", name):
      raise UserError(f"method name {name!r}: expected letters, digits, '_', '.' or '-' (it "
                      "names a folder)")
  evaluations = {name: [] for name in methods}
  workdirs = {name: [] for name in methods}
  for seed in seeds:  # Seed by seed: every method has a result early on.
    for name, overrides in methods.items():
      run_config = base.copy_and_resolve_references()
      configs.apply_overrides(run_config, [*override_list(overrides), f"seed={seed}"])
      workdir = out / f"{name}_seed{seed}"
      evaluations[name].append(train_and_test(run_config, workdir, split))
      workdirs[name].append(workdir)
  summary = report.summarize(evaluations)
  table = report.markdown_table(summary)
  writing.write_atomic(out / "comparison.md", table + "\n")
  return Comparison(table, summary, workdirs)


def train_and_test(config, workdir, split="test") -> dict:
  """The evaluation on `split` of the classifier run of `config` in `workdir` (its
  validation-chosen checkpoint), training and evaluating it first unless that was done."""
  workdir = pathlib.Path(workdir)
  if split in ("val", config.data.val_split):
    raise UserError(f"split {split!r}: checkpoints are chosen on that split (data.val_split); "
                    "report another split, or set data.val_split=None to choose them on a "
                    "hold-out of train")
  result = workdir / f"eval_{evaluate_lib.output_tag(split, tta=config.eval.tta)}.json"
  if not (result.exists() and is_finished(config, workdir)):
    classifier_trainer.train_and_evaluate(config, workdir)
    evaluate_lib.evaluate_run(workdir, split)
  return report.read_eval(result)


def is_finished(config, workdir) -> bool:
  """Whether `workdir` holds the classifier run of `config` trained to its last step (a
  workdir holding another config is refused, in one line, as a trainer refuses it)."""
  recorded = workdir_lib.check_same_run(workdir, config, classifier_kind.KIND,
                                        classifier_kind.default_config())
  steps = [record["step"] for record in monitor.read_metrics(workdir)]
  return recorded == config.train.num_steps and max(steps, default=0) >= config.train.num_steps
