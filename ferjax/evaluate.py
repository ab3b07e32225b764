"""Jitted, batched, data-parallel evaluation of a trained classifier, and its metrics.

    result = evaluate_run("runs/baseline", split="test", tta="flip")   # the library
    ferjax evaluate --workdir runs/baseline --split test [--checkpoint best|last|STEP]
                    [--tta flip|none] [--logit-adjust TAU] [--tau-norm TAU] [--features]
    ferjax evaluate --workdir runs/fer2013 --dataset ckplus --split all    # cross-dataset

restores the run's config (workdir/config.json) and checkpoint, predicts the split in fixed-size
batches (the last one padded; padded rows are dropped before any metric), and writes
`eval_<tag>.json` (it records the settings used) and `confusion_<tag>.png`, the tag naming the
split, the dataset when it is not the run's own, and every non-default setting (`output_tag`:
`eval_test.json`, `eval_test_tta-flip_tau-1.json`, `eval_ckplus-all.json`), so no evaluation
overwrites another made with other settings. Test-time flip augmentation, post-hoc logit
adjustment and tau-normalisation change only this evaluation, never the stored weights, so trying
another --tta, --logit-adjust or --tau-norm needs no retraining. `--split val` evaluates the
validation set the run selected its checkpoints on (a named split, or the stratified hold-out of
train).

tau-normalisation (`--tau-norm TAU`, `tau_normalize`; Kang et al. 2020, "Decoupling
representation and classifier for long-tailed recognition"): each class's weight vector w_k (a
column of the head's [D, K] kernel) becomes w_k / ||w_k||^TAU and the bias is dropped, as the
authors' code (github.com/facebookresearch/classifier-balancing, `pnorm` then
`dotproduct_similarity(feat, ws)`: logits are features times the normalised weights, no bias).
TAU = 1 gives every class a unit-norm weight; TAU = 0 (the default) is off: nothing changes, the
bias included (the authors' curve at p = 0 is the raw weights without the bias).

Cross-dataset (`--dataset NAME`): the images are converted to the run's size and channels and
the classes matched by canonical emotion name (ferjax.data.labels); images of classes the model
does not know are dropped with one printed line, and the argmax is taken over the classes the
two share (`--all-classes`: over all the model's classes, so e.g. a CK+ face predicted
`neutral` counts as wrong).

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
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ferjax import losses, plots, runs, writing
from ferjax.core import parallel
from ferjax.core import workdir as workdir_lib
from ferjax.data import labels as fer_labels
from ferjax.data import pipeline, splits
from ferjax.data.loading import DATASET_NAMES, check_split_name
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


# --- tau-normalisation ------------------------------------------------------------------------
def tau_normalize(variables, tau: float):
  """`variables` with the head's class weights tau-normalised (Kang et al. 2020): the kernel
  [D, K]'s column k divided by its L2 norm to the power `tau`, the bias set to zero (the
  authors' `pnorm` + `dotproduct_similarity`, which use no bias). `tau` = 0 returns `variables`
  unchanged (bias kept). Norms are floored at 1e-12 so an all-zero column stays finite."""
  if not tau:
    return variables
  head = variables["params"]["head"]
  kernel = head["kernel"]
  norms = jnp.maximum(jnp.linalg.norm(kernel.astype(jnp.float32), axis=0), 1e-12)
  new_head = {**head, "kernel": (kernel / norms ** tau).astype(kernel.dtype)}
  if "bias" in head:
    new_head["bias"] = jnp.zeros_like(head["bias"])
  return {**variables, "params": {**variables["params"], "head": new_head}}


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


class _Mirrored:
  """uint8 images [N, H, W, C] (an array or ferjax.data LazyImages) read mirrored, in slices."""

  def __init__(self, images):
    self.images = images
    self.shape = tuple(images.shape)

  def __getitem__(self, rows: slice):
    return np.ascontiguousarray(np.asarray(self.images[rows])[:, :, ::-1, :])


def extract_features(run, images, *, flip: bool = False) -> np.ndarray:
  """Eval-mode penultimate features [N, D] (float32) of uint8 images; with `flip`, of their
  mirror images."""
  batch_size = eval_batch_size(run.config, run.mesh)
  _, features = predict_logits(
      run.model, run.variables, _Mirrored(images) if flip else images, batch_size=batch_size,
      mesh=run.mesh, return_features=True)
  return np.asarray(features, np.float32)


def evaluate_params(config, variables, dataset, *, train_counts=None, tta: str | None = None,
                    logit_adjust: float = 0.0, mesh=None, model=None, logits=None,
                    prior_counts=None) -> dict:
  """Metrics of `variables` ({'params', 'batch_stats'}) on a Dataset, as a JSON-ready dict.

  `train_counts` gives the head / medium / tail groups and, unless `prior_counts` (the class
  distribution the model was trained under, e.g. after rebalancing) is given, the prior for
  `logit_adjust` (tau of post-hoc adjustment). `tta` defaults to config.eval.tta. Pass
  precomputed raw `logits` to re-score them (e.g. with several tau) without predicting again.
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
  checkpoints on (a named split, or the stratified hold-out of train); with data.fold set,
  "test" is that fold's test split."""
  if config.data.name == "joint":
    raise UserError(f"this run trained on several datasets ({config.data.datasets}): pass "
                    f"--dataset NAME to say which one's {split!r} split to use")
  if split == "val":
    return splits.load_splits(config.data, config.seed)[1]
  return splits.load_split(config.data, split, train=False)


def load_other_dataset(config, dataset: str, split: str, *, data_dir=None, manual_dir=None):
  """Split `split` of another dataset (any prepared one, or a `folder` dataset in
  `manual_dir`) at the run's image size and channels, with every class it has."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(name=dataset, classes="", fold=None, imbalance_ratio=None, label_noise=None,
              num_examples=None, manual_dir=manual_dir)
  if data_dir is not None:
    data.data_dir = data_dir
  return splits.load_split(data, split, train=False)


def load_target(config, split: str, dataset=None, *, data_dir=None, manual_dir=None):
  """(the Dataset to score, whether it is another dataset than the run's own): `split` of the
  run's data as it trained (`load_eval_split`), or of `dataset` with every class it has."""
  check_split_name(split, "--split")
  if dataset is None or is_own_dataset(config, dataset, data_dir, manual_dir):
    return load_eval_split(config, split), False
  if dataset not in DATASET_NAMES:
    raise UserError(f"--dataset: unknown dataset {dataset!r}: expected one of "
                    f"{', '.join(DATASET_NAMES)}")
  return load_other_dataset(config, dataset, split, data_dir=data_dir,
                            manual_dir=manual_dir), True


def check_tta(tta: str) -> str:
  if tta not in TTA_MODES:
    raise UserError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
  return tta


def is_own_dataset(config, dataset, data_dir=None, manual_dir=None) -> bool:
  """Whether `--dataset` (with `--data-dir` / `--manual-dir`) names the run's own data as it was
  trained (no data.classes): a `folder` dataset in another folder is another dataset."""
  same = lambda given, own: given is None or (own is not None and pathlib.Path(
      given).expanduser().resolve() == pathlib.Path(own).expanduser().resolve())
  return (dataset == config.data.name and not config.data.get("classes")
          and same(data_dir, config.data.data_dir) and same(manual_dir, config.data.manual_dir))


def output_tag(split: str, *, dataset: str | None = None, checkpoint="best", tta: str = "none",
               logit_adjust: float = 0.0, restrict_to_shared: bool = True,
               tau_norm: float = 0.0) -> str:
  """The name part of an evaluation's files (`eval_<tag>.json`, `confusion_<tag>.png`,
  `features_<tag>.npz`): the split, prefixed by the dataset when it is not the run's own, and one
  suffix per setting that differs from the default, so evaluations never overwrite each other.
  E.g. `test`, `test_tta-flip_tau-1`, `test_taunorm-0.5`, `ckplus-all`,
  `ckplus-all_all-classes_ckpt-last`."""
  tag = split if dataset is None else f"{dataset}-{split}"
  if dataset is not None and not restrict_to_shared:
    tag += "_all-classes"
  if str(checkpoint) != "best":
    tag += f"_ckpt-{checkpoint}"
  if tta != "none":
    tag += f"_tta-{tta}"
  if logit_adjust:
    tag += f"_tau-{float(logit_adjust):g}"
  if tau_norm:
    tag += f"_taunorm-{float(tau_norm):g}"
  return tag


def match_classes(run, dataset, *, restrict_to_shared: bool):
  """Scores a target dataset in a model's label space, classes matched by canonical name
  (ferjax.data.labels): (the dataset with its labels in model label space and the examples of
  classes the model does not know dropped, the model labels kept for the argmax (all, or the
  shared ones), a line saying what was dropped or None)."""
  to_model, shared = fer_labels.shared_classes(run.class_names, dataset.class_names)
  if not shared:
    raise UserError(f"dataset {dataset.name!r} has no class the model knows: its classes "
                    f"{', '.join(dataset.class_names)}, the model's {', '.join(run.class_names)}")
  new_labels = to_model[dataset.labels]
  keep = np.flatnonzero(new_labels >= 0)
  note = None
  if len(keep) < len(dataset):
    unknown = [n for k, n in enumerate(dataset.class_names) if to_model[k] < 0]
    note = (f"{dataset.name} {dataset.split}: dropped {len(dataset) - len(keep)} images of "
            f"{', '.join(unknown)} (classes the model does not know)")
    dataset = dataset.take(keep)
  dataset = dataset.replace(labels=new_labels[keep].astype(np.int32),
                            class_names=run.class_names)
  columns = shared if restrict_to_shared else list(range(len(run.class_names)))
  return dataset, columns, note


def evaluate_run(workdir, split: str = "test", *, checkpoint="best", tta: str | None = None,
                 logit_adjust: float = 0.0, features: bool = False, write: bool = True,
                 dataset: str | None = None, data_dir=None, manual_dir=None,
                 restrict_to_shared: bool = True, quiet: bool = False,
                 tau_norm: float = 0.0) -> dict:
  """Metrics of a trained classifier run on one split of its dataset, or of another dataset,
  as a JSON-ready dict.

  Restores the run's `checkpoint` (best: chosen on validation), predicts `split` (flip TTA and
  post-hoc logit adjustment as asked; defaults from the run's config; `tau_norm`: the head's class
  weights tau-normalised first, see `tau_normalize`) and, with `write`, writes
  `eval_<tag>.json`, `confusion_<tag>.png` and (with `features`) `features_<tag>.npz` into the
  workdir (process 0 only; `output_tag` names them). With `features` the result also holds the
  "logits" and "features" arrays (not written to the JSON).

  `dataset`: score another dataset (cross-dataset evaluation): its images are converted to the
  run's size and channels, its classes matched to the model's by canonical name; images of
  classes the model does not know are dropped (one printed line), and with
  `restrict_to_shared` the argmax is taken over the shared classes only. `data_dir` /
  `manual_dir` locate it (default: the run's data dir; `manual_dir` for a `folder` dataset).
  """
  workdir = pathlib.Path(workdir)
  check_split_name(split, "--split")  # A name, never a path: it names the output files too.
  if not np.isfinite(logit_adjust):
    raise UserError(f"--logit-adjust: expected a finite number, got {logit_adjust}")
  if not (np.isfinite(tau_norm) and tau_norm >= 0):
    raise UserError(f"--tau-norm: expected a finite number >= 0, got {tau_norm}")
  run = runs.open_classifier(workdir, str(checkpoint))
  head = run.config.model.head
  if tau_norm and head != "linear":
    why = {"cosine": "whose class weights are normalised already",
           "dan": "whose logits pass a BatchNorm after its class weights",
           "rul": "whose classifier sits on its uncertainty-mixed embedding"}[head]
    raise UserError(f"--tau-norm: {workdir} has model.head={head}, {why} (tau-normalisation "
                    "is for model.head=linear)")
  if write and parallel.is_main_process():  # Before the work, not after it.
    workdir_lib.check_writable(workdir, "--workdir")
  config = run.config
  tta = check_tta(tta or config.eval.tta)
  data, cross = load_target(config, split, dataset, data_dir=data_dir, manual_dir=manual_dir)
  if cross:
    data, columns, note = match_classes(run, data, restrict_to_shared=restrict_to_shared)
  else:
    if tuple(data.class_names) != run.class_names:
      raise UserError(f"split {split!r} has classes {data.class_names}, the checkpoint was "
                      f"trained on {run.class_names}")
    columns, note = list(range(len(run.class_names))), None
  if note and not quiet and parallel.is_main_process():
    print(note)
  variables = run.variables
  if tau_norm:  # Jitted: the variables may span the devices of several processes.
    variables = jax.jit(functools.partial(tau_normalize, tau=float(tau_norm)))(variables)
  logits, feats = predict_logits(run.model, variables, data.images, tta=tta, mesh=run.mesh,
                                 batch_size=eval_batch_size(config, run.mesh),
                                 return_features=True)
  if logit_adjust:  # On every class, with the prior the model was trained under; then restrict.
    logits = np.asarray(losses.posthoc_adjust(logits, losses.log_prior(run.prior_counts),
                                              logit_adjust))
  position = np.full(len(run.class_names), -1, np.int32)
  position[columns] = np.arange(len(columns))
  scored = data.replace(labels=position[data.labels], class_names=tuple(
      run.class_names[k] for k in columns))
  result = evaluate_params(config, variables, scored,
                           train_counts=run.train_counts[columns], tta=tta,
                           logits=logits[:, columns])
  tag = output_tag(split, dataset=data.name if cross else None, checkpoint=checkpoint, tta=tta,
                   logit_adjust=logit_adjust, restrict_to_shared=restrict_to_shared,
                   tau_norm=tau_norm)
  result.update(split=split, step=run.step, checkpoint=str(checkpoint),
                logit_adjust=float(logit_adjust), tau_norm=float(tau_norm),
                dataset=data.name if cross else config.data.name,
                cross_dataset=cross, restrict_to_shared=bool(restrict_to_shared),
                dropped=note, file=f"eval_{tag}.json")
  if write and parallel.is_main_process():  # Several processes: process 0 writes the files.
    writing.write_atomic(workdir / f"eval_{tag}.json", json.dumps(result, indent=2) + "\n")
    title = (f"{result['dataset']} {split} (step {run.step}, tta {tta}, "
             f"tau {float(logit_adjust):g}" + (f", tau-norm {float(tau_norm):g})" if tau_norm
                                               else ")"))
    plots.save_confusion(result["confusion"], scored.class_names, workdir / f"confusion_{tag}.png",
                         title=title)
    if features:
      write_features(workdir / f"features_{tag}.npz", data, feats, logits, run, split)
  if features:
    return {**result, "logits": logits, "features": feats}
  return result


# --- Features ----------------------------------------------------------------------------------
FEATURES_FORMAT_VERSION = 1


def write_features(path, dataset, features, logits, run, split: str, *,
                   new: bool = False) -> None:
  """Penultimate features of a dataset as one .npz file (read with np.load, no pickle):

    features float32 [N, D]; logits float32 [N, K_model] (after any post-hoc adjustment);
    labels int32 [N] indexing class_names; class_names str [K] (canonical emotion names);
    model_class_names str [K_model]; path str [N] (the source file where the dataset keeps it,
    else '<dataset>/<split>/<index>'); index int64 [N] (position in the split as loaded);
    subject, fold int32 [N] (-1 where the dataset has none: CK+ has both);
    dataset, split, workdir str (the run's resolved path: with step, the run that wrote the
    file); step, format_version int.

  `ferjax probe` reads this format. With `new`, `path` must not exist (see
  ferjax.writing.write_new); otherwise it is replaced atomically."""
  n = len(dataset)
  extras = dataset.extras
  index = np.asarray(extras.get("index", np.arange(n)), np.int64)
  names = (np.asarray(extras["file"], dtype=str) if "file" in extras else
           np.asarray([f"{dataset.name}/{split}/{i}" for i in index], dtype=str))
  ids = {key: np.asarray(extras.get(key, np.full(n, -1)), np.int32) for key in ("subject", "fold")}
  arrays = dict(features=np.asarray(features, np.float32), logits=np.asarray(logits, np.float32),
                labels=np.asarray(dataset.labels, np.int32),
                class_names=np.asarray(fer_labels.canonical_names(dataset.class_names), dtype=str),
                model_class_names=np.asarray(run.class_names, dtype=str), path=names, index=index,
                **ids, dataset=np.asarray(dataset.name), split=np.asarray(split),
                workdir=np.asarray(str(pathlib.Path(run.workdir).resolve())),
                step=np.asarray(run.step),
                format_version=np.asarray(FEATURES_FORMAT_VERSION))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  if new:
    writing.write_new(path, buffer.getvalue(), "--out")
  else:
    writing.write_atomic(path, buffer.getvalue())


def cli_main(args) -> int:
  """`ferjax evaluate`: see the module docstring."""
  split = getattr(args, "split", None) or "test"
  result = evaluate_run(args.workdir, split, checkpoint=getattr(args, "checkpoint", None) or "best",
                        tta=getattr(args, "tta", None),
                        logit_adjust=float(getattr(args, "logit_adjust", 0.0) or 0.0),
                        tau_norm=float(getattr(args, "tau_norm", 0.0) or 0.0),
                        features=bool(getattr(args, "features", False)),
                        dataset=getattr(args, "dataset", None),
                        data_dir=getattr(args, "data_dir", None),
                        manual_dir=getattr(args, "manual_dir", None),
                        restrict_to_shared=not getattr(args, "all_classes", False))
  groups = result.get("groups", {})
  group_text = " ".join(f"{g} {v['mean_recall']:.4f}" for g, v in groups.items())
  where = f"{result['dataset']} " if result["cross_dataset"] else ""
  print(f"{where}{split} step {result['step']}: accuracy {result['accuracy']:.4f}  mean class "
        f"accuracy {result['mean_class_accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
        f"({group_text})  -> {pathlib.Path(args.workdir) / result['file']}")
  return 0
