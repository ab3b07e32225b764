"""Jitted, batched, data-parallel evaluation of a trained classifier, and its metrics.

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
import jax.numpy as jnp
import ml_collections
import numpy as np

from ferjax import configs, losses, plots
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.models import resnet
from ferjax.train import parallel

TTA_MODES = ("none", "flip")


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
    model = model or resnet.model_from_config(config.model, len(dataset.class_names))
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


# --- ferjax evaluate ---------------------------------------------------------------------------
def config_from_workdir(workdir) -> ml_collections.ConfigDict:
  from ferjax.train import classifier
  return configs.read_saved(classifier.default_config(), pathlib.Path(workdir) / "config.json",
                            "ferjax train")


def restore_variables(config, workdir, checkpoint="best", mesh=None):
  """(variables, checkpoint meta) of a trained run; EMA weights when the run kept them."""
  from ferjax.train import checkpoint as checkpoint_lib
  from ferjax.train import classifier
  mesh = mesh or parallel.make_mesh(config.train.num_devices)
  ckpt = checkpoint_lib.Checkpoints(pathlib.Path(workdir) / "checkpoints",
                                    best_metric=config.train.best_metric)
  try:
    meta = ckpt.read_meta(checkpoint)
    model = resnet.model_from_config(config.model, len(meta["class_names"]))
    target = classifier.abstract_state(config, model, mesh)
    state, meta = ckpt.restore(target, checkpoint)
  finally:
    ckpt.close()
  return classifier.eval_variables(state), meta


def cli_main(args) -> int:
  """`ferjax evaluate`: see the module docstring."""
  from ferjax.train import classifier
  workdir = pathlib.Path(args.workdir)
  config = config_from_workdir(workdir)
  split = getattr(args, "split", None) or "test"
  tta = getattr(args, "tta", None) or config.eval.tta
  if tta not in TTA_MODES:
    raise UserError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
  logit_adjust = float(getattr(args, "logit_adjust", 0.0) or 0.0)
  which = str(getattr(args, "checkpoint", None) or "best")
  mesh = parallel.make_mesh(config.train.num_devices)
  variables, meta = restore_variables(config, workdir, which, mesh)
  train_counts = np.asarray(meta["train_counts"])

  if split == "val":
    _, dataset = classifier.load_splits(config)
  else:
    dataset = classifier.load_dataset(config, split)
  if tuple(dataset.class_names) != tuple(meta["class_names"]):
    raise UserError(f"split {split!r} has classes {dataset.class_names}, the checkpoint was "
                    f"trained on {tuple(meta['class_names'])}")
  model = resnet.model_from_config(config.model, len(dataset.class_names))
  logits, features = predict_logits(model, variables, dataset.images, tta=tta, mesh=mesh,
                                    batch_size=eval_batch_size(config, mesh), return_features=True)
  result = evaluate_params(config, variables, dataset, train_counts=train_counts, tta=tta,
                           logit_adjust=logit_adjust, logits=logits,
                           prior_counts=meta.get("prior_counts"))
  result.update(split=split, step=int(meta["step"]), checkpoint=which)
  if not parallel.is_main_process():  # Several processes: process 0 writes the files.
    return 0
  (workdir / f"eval_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
  title = f"{split} (step {meta['step']}, tta {tta}, tau {logit_adjust:g})"
  plots.save_confusion(result["confusion"], dataset.class_names, workdir / f"confusion_{split}.png",
                       title=title)
  if getattr(args, "features", False):
    np.savez(workdir / f"features_{split}.npz", features=features.astype(np.float32),
             labels=dataset.labels, logits=logits.astype(np.float32),
             class_names=np.asarray(dataset.class_names, dtype=str))
  groups = result.get("groups", {})
  group_text = " ".join(f"{g} {v['mean_recall']:.4f}" for g, v in groups.items())
  print(f"{split} step {meta['step']}: accuracy {result['accuracy']:.4f}  mean class accuracy "
        f"{result['mean_class_accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  ({group_text})  "
        f"-> {workdir / f'eval_{split}.json'}")
  return 0


# --- Benchmark ---------------------------------------------------------------------------------
def bench(config, batch_size=None, steps: int = 20, what=("classifier", "evaluate"),
          stage=None) -> list[dict]:
  """Throughput records (see ferjax.bench.time_step) on random data of the configured shape
  (data.image_size, data.channels; 7 classes in RAF-DB's long-tailed proportions), batch
  `batch_size` (default train.batch_size), for each of `what`:

  - "classifier": the full train step (on-device sampling, gather, [synthesis], augmentation,
    forward, backward, update);
  - "sampler": the batch pipeline alone (sampling, gather, [synthesis], augmentation);
  - "evaluate": one jitted batch of predictions (config.eval.tta).

  `stage(config, images, labels, num_classes) -> (synthesize, synthesis_data, extra)` plugs a
  synthesis stage into the batch (ferjax.augment.synthesis.bench does).
  """
  from ferjax import bench as bench_lib
  from ferjax.data import synthetic
  from ferjax.train import classifier
  batch = int(batch_size or config.train.batch_size)
  config = ml_collections.ConfigDict(config.to_dict())  # Do not touch the caller's config.
  config.train.batch_size = batch
  classifier.validate_config(config)
  mesh = parallel.make_mesh(config.train.num_devices)
  size, channels, num_classes = config.data.image_size, config.data.channels, 7
  rng = np.random.default_rng(0)
  num_examples = max(4 * batch, 512)
  images = rng.integers(0, 256, (num_examples, size, size, channels), dtype=np.uint8)
  counts = synthetic.class_counts("train", num_examples)
  labels = rng.permutation(np.repeat(np.arange(num_classes), counts)).astype(np.int32)
  num_steps = config.train.num_steps
  model = resnet.model_from_config(config.model, num_classes)
  setup = dict(model=config.model.name, stem=config.model.stem, width=config.model.width,
               cbam=config.model.cbam, image_size=size, channels=channels)

  tx, _ = classifier.make_optimizer(config, num_steps)
  state = classifier.init_state(config, model, tx, mesh)
  variables = jax.tree.map(jnp.copy, classifier.eval_variables(state))  # The state is donated.
  data = classifier.device_data(config, images, labels, num_classes, mesh)
  synthesize = None
  if stage is not None:
    synthesize, synthesis_data, stage_extra = stage(config, images, labels, num_classes)
    data["synthesis"] = parallel.put_replicated(synthesis_data, mesh)
    setup.update(stage_extra)
  time = lambda fn, carry, name, extra=setup: bench_lib.time_step(
      fn, carry, what=name, batch=batch, dtype=config.model.dtype, steps=steps, extra=extra)
  records = []

  if "sampler" in what:
    _, train_key, _ = classifier._keys(config.seed)

    def pipeline_carry(carry):
      data, step, checksum = carry
      make_batch = classifier.batch_maker(config, data, num_steps=num_steps,
                                          synthesize=synthesize, mesh=mesh)
      images, labels, weights = make_batch(jax.random.fold_in(train_key, step), step)
      return data, step + 1, checksum + jnp.sum(images) + jnp.sum(weights) + jnp.sum(labels)

    pipeline_data = jax.tree.map(jnp.copy, data)  # The carry is donated; keep `data`.
    records.append(time(pipeline_carry, (pipeline_data, jnp.zeros((), jnp.int32),
                                         jnp.zeros((), jnp.float32)), "sampler"))

  if "classifier" in what:
    train_step = classifier.make_train_step(config, model, tx, counts, num_steps, mesh,
                                            synthesize=synthesize, jit=False)

    def train_carry(carry):
      state, data = carry
      state, _ = train_step(state, data)
      return state, data

    records.append(time(train_carry, (state, data), "classifier"))

  if "evaluate" in what:
    eval_images = jax.device_put(images[:batch], parallel.batch_sharding(mesh))

    def eval_carry(carry):
      variables, images, checksum = carry
      logits, _ = _predict_batch(model, variables, images, config.eval.tta)
      return variables, images, checksum + jnp.sum(logits)

    records.append(time(eval_carry, (variables, eval_images, jnp.zeros((), jnp.float32)),
                        "evaluate", {**setup, "tta": config.eval.tta}))
  return records
