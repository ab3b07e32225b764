"""Jitted, batched, data-parallel evaluation of a trained classifier, and its metrics.

    result = evaluate_run("runs/baseline", split="test", tta="flip")   # the library
    ferjax evaluate --workdir runs/baseline --split test [--checkpoint best|last|STEP]
                    [--tta flip|none] [--logit-adjust TAU] [--features]

restores the run's config (workdir/config.json) and checkpoint, predicts the split in fixed-size
batches (the last one padded; padded rows are dropped before any metric), and writes
`eval_<split>.json` (overwritten by each re-evaluation; it records the settings used) and
`confusion_<split>.png`. Test-time flip augmentation and post-hoc logit adjustment change only
this evaluation, never the weights, so trying another --tta or --logit-adjust needs no
retraining. `--split val` evaluates the validation set the run selected its checkpoints on
(a named split, or the stratified hold-out of train).

Metric conventions (`metrics_from_confusion`):
  - rows of the confusion matrix are true classes, columns predictions;
  - recall of a class with no support, and precision of a class that is never predicted, are
    defined as 0 (and so is F1 when precision + recall = 0);
  - mean class accuracy (balanced accuracy) and macro-F1 average over the classes with support
    in the evaluated split, so a class absent from a small split does not count as a failure;
  - groups: the classes sorted by training count and cut into thirds (head / medium / tail;
    np.array_split sizes, e.g. 3/2/2 for 7 classes); each group's value is the mean recall of
    its classes that have support.
"""

import functools
import json
import pathlib

import jax
import numpy as np

from ferjax import losses, plots, runs
from ferjax.core import parallel
from ferjax.core import workdir as workdir_lib
from ferjax.data import pipeline, splits
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds.classifier import TTA_MODES


# --- Metrics (pure numpy) ----------------------------------------------------------------------
def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """int64 [K, K], rows = true class, columns = predicted class."""
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes)


def class_groups(train_counts) -> dict:
  """head / medium / tail: class indices sorted by training count (descending), cut in thirds."""
  order = np.argsort(-np.asarray(train_counts), kind="stable")
  head, medium, tail = np.array_split(order, 3)
  return {"head": head.tolist(), "medium": medium.tolist(), "tail": tail.tolist()}


def metrics_from_confusion(confusion, train_counts=None, class_names=None) -> dict:
  """accuracy, mean_class_accuracy, macro_f1, per-class lists and (given train counts) groups.

  See the module docstring for the conventions on empty rows and columns.
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = confusion.shape[0]
  names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
  support = confusion.sum(1)
  predicted = confusion.sum(0)
  correct = np.diag(confusion)
  recall = np.divide(correct, support, out=np.zeros(num_classes), where=support > 0)
  precision = np.divide(correct, predicted, out=np.zeros(num_classes), where=predicted > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros(num_classes), where=denom > 0)
  has_support = support > 0
  total = support.sum()
  result = {
      "accuracy": float(correct.sum() / total) if total else 0.0,
      "mean_class_accuracy": float(recall[has_support].mean()) if has_support.any() else 0.0,
      "macro_f1": float(f1[has_support].mean()) if has_support.any() else 0.0,
      "num_examples": int(total),
      "per_class": {
          name: {"recall": float(recall[k]), "precision": float(precision[k]),
                 "f1": float(f1[k]), "support": int(support[k])}
          for k, name in enumerate(names)},
      "confusion": confusion.astype(np.int64).tolist(),
  }
  if train_counts is not None:
    result["groups"] = {}
    for group, members in class_groups(train_counts).items():
      scored = [k for k in members if has_support[k]]
      result["groups"][group] = {
          "mean_recall": float(recall[scored].mean()) if scored else 0.0,
          "classes": [names[k] for k in members],
      }
  return result


# --- Jitted prediction -------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "tta"))
def _predict_batch(model, variables, images_uint8, tta: str):
  """(logits [B, K] float32, features [B, D]) of one batch; `flip` averages with the mirror."""
  images = pipeline.to_float(images_uint8)
  logits, features = model.apply(variables, images, train=False)
  if tta == "flip":
    flipped_logits, flipped_features = model.apply(variables, images[:, :, ::-1, :], train=False)
    logits = (logits + flipped_logits) / 2
    features = (features + flipped_features) / 2
  return logits, features


def predict_logits(model, variables, images_uint8, *, batch_size: int = 256, mesh=None,
                   tta: str = "none", return_features: bool = False):
  """Logits [N, K] (and features [N, D]) of uint8 images [N, H, W, C], as host numpy.

  Fixed-size batches split over the mesh's `data` axis; the last batch is padded with zero images
  and the padded rows are cut off, so they never reach a metric.
  """
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh, "eval batch_size")
  variables = parallel.put_replicated(variables, mesh)
  sharding = parallel.batch_sharding(mesh)
  n = images_uint8.shape[0]
  outputs = []  # Device arrays: every batch is dispatched before the first is fetched.
  for start in range(0, n, batch_size):
    batch = np.asarray(images_uint8[start:start + batch_size])
    valid = batch.shape[0]
    if valid < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)])
    outputs.append((valid, _predict_batch(model, variables, jax.device_put(batch, sharding), tta)))
  # to_host: in a multi-process run each batch spans the devices of every process.
  logits = [parallel.to_host(out[0])[:valid] for valid, out in outputs]
  features = ([parallel.to_host(out[1])[:valid] for valid, out in outputs] if return_features
              else [])
  logits = np.concatenate(logits) if logits else np.zeros((0, model.num_classes), np.float32)
  if return_features:
    return logits, (np.concatenate(features) if features else np.zeros((0, 0), np.float32))
  return logits


def eval_batch_size(config, mesh) -> int:
  """config.eval.batch_size rounded up to a multiple of the device count."""
  n = mesh.devices.size
  return -(-int(config.eval.batch_size) // n) * n


def evaluate_params(config, variables, dataset, *, train_counts=None, tta: str | None = None,
                    logit_adjust: float = 0.0, mesh=None, model=None, logits=None,
                    prior_counts=None) -> dict:
  """Metrics of `variables` ({'params', 'batch_stats'}) on a Dataset, as a JSON-ready dict.

  `train_counts` gives the head / medium / tail groups and, unless `prior_counts` (the class
  distribution the model was trained under, e.g. after rebalancing) is given, the prior for
  `logit_adjust` (tau of post-hoc adjustment). `tta` defaults to config.eval.tta. Pass precomputed raw `logits`
  to re-score them (e.g. with several tau) without predicting again.
  """
  tta = config.eval.tta if tta is None else tta
  prior_counts = train_counts if prior_counts is None else prior_counts
  if logit_adjust and prior_counts is None:
    raise ValueError("logit_adjust needs train_counts or prior_counts (the prior)")
  if logits is None:
    model = model or classifier_kind.build_model(config, len(dataset.class_names))
    mesh = mesh or parallel.make_mesh(config.train.num_devices)
    logits = predict_logits(model, variables, dataset.images, tta=tta, mesh=mesh,
                            batch_size=eval_batch_size(config, mesh))
  if logit_adjust:
    logits = np.asarray(losses.posthoc_adjust(logits, losses.log_prior(prior_counts), logit_adjust))
  preds = np.argmax(logits, axis=-1)
  confusion = confusion_matrix(dataset.labels, preds, len(dataset.class_names))
  result = metrics_from_confusion(confusion, train_counts, dataset.class_names)
  result.update(tta=tta, logit_adjust=float(logit_adjust))
  return result


# --- A finished run -----------------------------------------------------------------------------
def load_eval_split(config, split: str):
  """The Dataset of `split` for a run's config: "val" is the split the run selected its
  checkpoints on (a named split, or the stratified hold-out of train)."""
  if split == "val":
    return splits.load_splits(config.data, config.seed)[1]
  return splits.load_split(config.data, split, train=False)


def evaluate_run(workdir, split: str = "test", *, checkpoint="best", tta: str | None = None,
                 logit_adjust: float = 0.0, features: bool = False, write: bool = True) -> dict:
  """Metrics of a trained classifier run on one split of its dataset, as a JSON-ready dict.

  Restores the run's `checkpoint` (best: chosen on validation), predicts `split` (flip TTA and
  post-hoc logit adjustment as asked; defaults from the run's config) and, with `write`, writes
  `eval_<split>.json`, `confusion_<split>.png` and (with `features`) `features_<split>.npz`
  into the workdir (process 0 only). With `features` the result also holds the "logits" and
  "features" arrays (not written to the JSON).
  """
  workdir = pathlib.Path(workdir)
  if not np.isfinite(logit_adjust):
    raise UserError(f"--logit-adjust: expected a finite number, got {logit_adjust}")
  run = runs.open_classifier(workdir, str(checkpoint))
  if write and parallel.is_main_process():  # Before the work, not after it.
    workdir_lib.check_writable(workdir, "--workdir")
  config = run.config
  tta = tta or config.eval.tta
  if tta not in TTA_MODES:
    raise UserError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
  dataset = load_eval_split(config, split)
  if tuple(dataset.class_names) != run.class_names:
    raise UserError(f"split {split!r} has classes {dataset.class_names}, the checkpoint was "
                    f"trained on {run.class_names}")
  logits, feats = predict_logits(run.model, run.variables, dataset.images, tta=tta, mesh=run.mesh,
                                 batch_size=eval_batch_size(config, run.mesh),
                                 return_features=True)
  result = evaluate_params(config, run.variables, dataset, train_counts=run.train_counts, tta=tta,
                           logit_adjust=float(logit_adjust), logits=logits,
                           prior_counts=run.prior_counts)
  result.update(split=split, step=run.step, checkpoint=str(checkpoint))
  if write and parallel.is_main_process():  # Several processes: process 0 writes the files.
    (workdir / f"eval_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{split} (step {run.step}, tta {tta}, tau {float(logit_adjust):g})"
    plots.save_confusion(result["confusion"], dataset.class_names,
                         workdir / f"confusion_{split}.png", title=title)
    if features:
      np.savez(workdir / f"features_{split}.npz", features=feats.astype(np.float32),
               labels=dataset.labels, logits=logits.astype(np.float32),
               class_names=np.asarray(dataset.class_names, dtype=str))
  if features:
    return {**result, "logits": logits, "features": feats}
  return result


def cli_main(args) -> int:
  """`ferjax evaluate`: see the module docstring."""
  split = getattr(args, "split", None) or "test"
  result = evaluate_run(args.workdir, split, checkpoint=getattr(args, "checkpoint", None) or "best",
                        tta=getattr(args, "tta", None),
                        logit_adjust=float(getattr(args, "logit_adjust", 0.0) or 0.0),
                        features=bool(getattr(args, "features", False)))
  groups = result.get("groups", {})
  group_text = " ".join(f"{g} {v['mean_recall']:.4f}" for g, v in groups.items())
  print(f"{split} step {result['step']}: accuracy {result['accuracy']:.4f}  mean class accuracy "
        f"{result['mean_class_accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  ({group_text})  "
        f"-> {pathlib.Path(args.workdir) / f'eval_{split}.json'}")
  return 0
