"""Classifier trainer: ResNet on a device-resident dataset, with every long-tail baseline a switch.

    ferjax train --config experiments/configs/classifier_synthetic_tiny.py --workdir runs/tiny

One readable file, top to bottom: the batch (sampling -> gather -> [synthesis] ->
augmentation), the pure train step, the loop. What a classifier run is (config, model,
optimizer, state, random streams) lives in ferjax.kinds.classifier; reopening a finished run in
ferjax.runs; evaluation in ferjax.evaluate; benchmarks in ferjax.bench.

The train set lives on the devices as uint8 (split by rows over them, see ferjax.core.parallel);
each step samples its batch there by the configured balancing policy, augments it per example,
and updates the parameters: one jitted function `train_step(state, data) -> (state, metrics)`,
compiled once, its state donated. Its randomness is `fold_in(key(seed), step)`, so a run
resumed from a checkpoint replays the uninterrupted run exactly. Data parallelism: the batch
is split over the mesh axis `data`; parameters are replicated and XLA inserts the gradient
all-reduce.

Checkpoints: the last `train.keep_checkpoints` steps (for resuming) and the best step by the
validation metric `train.best_metric` (for `ferjax evaluate`). Validation is `data.val_split`, or,
when that is None, a stratified `data.val_fraction` of train held out with `seed`. The test
split never selects anything: `data.val_split='test'` is refused.

Workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/, curves.png. Training again in a
workdir that has checkpoints resumes from the latest one.
"""

import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import configs, losses, plots, runs
from ferjax import evaluate as evaluate_lib
from ferjax.augment import synthesis as synthesis_lib
from ferjax.core import checkpoint as checkpoint_lib
from ferjax.core import interrupt, monitor, parallel
from ferjax.core import workdir as workdir_lib
from ferjax.data import dataset as dataset_lib
from ferjax.data import pipeline, splits
from ferjax.errors import UserError
from ferjax.kinds import classifier as kind
from ferjax.kinds.classifier import BEST_METRICS, TrainState
from ferjax.models import import_weights, resnet


# =================================================================================================
# Data: the train set on the device
# =================================================================================================
def device_data(config, images, labels, num_classes: int, mesh) -> dict:
  """The train set on the device: images split by rows over the mesh (`parallel.put_rows`),
  labels and the class index the samplers draw from replicated (indices stay below N)."""
  labels = np.asarray(labels, np.int32)
  order, offsets, counts = pipeline.class_index(jnp.asarray(labels), num_classes)
  data = {"labels": labels, "class_index": (order, offsets, counts)}
  if config.sampler.name == "oversample":
    data["oversampled"] = pipeline.oversampled_order(labels, num_classes, config.seed)
  data = parallel.put_replicated(data, mesh)
  if not isinstance(images, dataset_lib.LazyImages):  # Lazy ones are read in chunks.
    images = np.asarray(images, np.uint8)
  data["images"] = parallel.put_rows(images, mesh)
  return data


def initial_weights(config, state, class_names) -> dict:
  """The {'params', 'batch_stats'} that `model.init_from` names laid over the fresh state's:
  a `ferjax import-weights` folder, a finished classifier workdir (its best checkpoint), or a
  `ferjax pretrain` workdir (its ViT encoder at the best checkpoint; the fresh head kept). The
  head comes along only when its classes are the run's; any other parameter that is missing or
  shaped differently is one line naming it."""
  source = pathlib.Path(config.model.init_from).expanduser()
  fresh = {"params": state.params, "batch_stats": state.batch_stats}
  what = f"model.init_from {source}"
  if (source / "config.json").is_file() and workdir_lib.run_kind(source) == "pretrain":
    if config.model.name in resnet.MODEL_NAMES:
      raise UserError(f"{what}: a ViT pre-training run cannot start model.name="
                      f"{config.model.name!r} (a ResNet): set model.name to the run's ViT")
    init = runs.open_pretrain(source, "best").encoder_variables
    what += " (pre-trained encoder)"
  elif (source / "config.json").is_file():  # A ferjax train workdir.
    run = runs.open_classifier(source, "best")
    init = dict(run.variables)
    if tuple(run.class_names) != tuple(class_names):
      init["params"] = {k: v for k, v in init["params"].items()
                        if k not in resnet.HEAD_MODULES}
  else:
    init, _ = import_weights.load_init(source)
  return import_weights.apply_init(fresh, init, what=what)


# =================================================================================================
# The batch: sampling -> gather -> [synthesis] -> augmentation
# =================================================================================================
# A synthesis stage (e.g. VAE-GAN samples for minority classes) plugs in between gathering and
# augmentation, as a pure function of its key, the step and the gathered batch:
#
#   synthesize(key, step, images, labels, example_weights, data)
#       -> (images, labels, example_weights)
#
# images are float [B, H, W, C] in [-1, 1], labels int32 [B], example_weights float32 [B]
# (ones from the sampler). It may overwrite any slots (e.g. the last S slots with synthesized
# minority-class faces), keeping the shapes; the loss then weights each example by its weight.
# `data` is the device-resident dict: the train set ("images" uint8, "labels", "class_index" for
# `pipeline.sample_by_class`, to draw seed images of a class) and "synthesis", whatever arrays
# the stage needs (generator parameters, latent statistics; `train_and_evaluate(...,
# synthesis_data=...)` puts them there), passed through the jitted step as arguments.
Synthesize = Callable[..., tuple]


def batch_maker(config, data: dict, *, num_steps: int, synthesize: Synthesize | None = None,
                mesh=None, with_boxes: bool = False):
  """Returns `make_batch(key, step) -> (images, labels, example_weights)` over `data`.

  Call inside the jitted step (data holds its traced device arrays). Stages:
    1. indices of the batch by the balancing policy (config.sampler.name);
    2. gather the uint8 images and their labels, convert to float in [-1, 1];
    3. synthesis, when given (see `Synthesize` above);
    4. per-example augmentation (config.augment: crop, flip, rotation, erasing).
  Mixup, which mixes pairs across the batch, is applied by the train step afterwards.
  `with_boxes` (face mixup) adds a fourth output, each image's face box [B, 4] moved by its own
  augmentation (`pipeline.augment_one_with_box`; the same images): the whole frame before it,
  as no dataset keeps a face box (AffectNet's is cropped to at preparation).
  """
  batch_size = config.train.batch_size
  epoch_key = kind.rng_streams(config.seed).epoch
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh)))
               if mesh is not None else (lambda x: x))

  def make_batch(key, step):
    sample_key, synth_key, augment_key = jax.random.split(key, 3)
    # 1. Sampling. The over-sampling policy walks fixed epochs, so it keys on the epoch instead.
    indices = pipeline.sample_indices(
        epoch_key if config.sampler.name == "oversample" else sample_key, step,
        sampler=config.sampler.name, index=data["class_index"],
        class_counts=data["class_index"][2], batch_size=batch_size, num_steps=num_steps,
        oversampled=data.get("oversampled"))
    indices = constrain(indices)  # From here on each device works on its share of the batch.
    # 2. Gather.
    images = pipeline.to_float(data["images"][indices])
    labels = data["labels"][indices]
    weights = jnp.ones((batch_size,), jnp.float32)
    # 3. Synthesis.
    if synthesize is not None:
      images, labels, weights = synthesize(synth_key, step, images, labels, weights, data)
    # 4. Augmentation.
    if with_boxes:
      images, boxes = pipeline.augment_batch_with_boxes(
          augment_key, images, pipeline.frame_boxes(images), config.augment)
      return constrain(images), constrain(labels), constrain(weights), constrain(boxes)
    images = pipeline.augment_batch(augment_key, images, config.augment)
    return constrain(images), constrain(labels), constrain(weights)

  return make_batch


# =================================================================================================
# The train step
# =================================================================================================
def make_train_step(config, model, tx, class_counts, num_steps: int, mesh, *,
                    synthesize: Synthesize | None = None, jit: bool = True):
  """`train_step(state, data) -> (state, metrics)`: pure; jitted with the state donated.

  The loss is mean_i e_i * [lam_i L(x_i, y_i) + (1 - lam_i) L(x_i, y'_i)]: per-example losses
  (with their class weights, see ferjax.losses), times the batch's example weights e, with mixup
  partners y' when mixup is on (lam = 1 otherwise). With loss.weight_average=normalized the sum is
  divided by sum_i [lam_i w(y_i) + (1 - lam_i) w(y'_i)] (the class weights, mixed as the losses
  are) instead of the batch size (`losses.weighted_average`).

  Methods that add to it (each a config switch; formulas in ferjax.losses):
    model.head=rul     the model mixes each example's embedding with a random partner's by
                       their relative uncertainty; the partner's label is y' and lam = 1/2
                       (RUL's add-up loss);
    model.head=dan     + affinity_weight * DAN's affinity loss + partition_weight * its
                       partition loss, from what the model sows;
    loss.eac_weight>0  + eac_weight * EAC's consistency between the class activation maps of
                       the batch and of its mirror image (a second forward pass, which also
                       updates the BatchNorm statistics, as EAC's two passes do).

  augment.face_mixup_alpha>0 (SSFER's face mixup) replaces the per-example loss: one forward
  pass of the unmixed batch and one of its mixup (made out of place; BatchNorm statistics
  threaded through both), e_i [lam_i L(mix_i, y_i) + (1 - lam_i) L(mix_i, y'_i)] + (1 - IoU_i)
  (e_i L(x_i, y_i) + e_p L(x_p, y_p)) with p the partner and IoU_i that of the two faces' boxes
  after augmentation (`losses.face_mixup_loss`), averaged as above; EAC and DAN read the unmixed
  pass, and train_accuracy is of the unmixed images. Metric face_mixup_iou: the batch mean IoU.
  """
  loss_fn = losses.make_loss(config.loss, class_counts, num_steps)
  class_weight = losses.make_class_weight(config.loss, class_counts)
  weight_average = config.loss.weight_average
  _, schedule = kind.make_optimizer(config, num_steps)
  train_key = kind.rng_streams(config.seed).train
  ema_decay = config.optim.ema_decay
  mixup_alpha = config.augment.mixup_alpha
  face_alpha = config.augment.face_mixup_alpha
  l = config.loss
  rul, dan, eac = config.model.head == "rul", config.model.head == "dan", l.eac_weight > 0
  mutable = ["batch_stats", "aux"] if (dan or eac) else ["batch_stats"]

  def train_step(state: TrainState, data: dict):
    step = state.step
    batch_key, mixup_key = jax.random.split(jax.random.fold_in(train_key, step))
    make_batch = batch_maker(config, data, num_steps=num_steps, synthesize=synthesize, mesh=mesh,
                             with_boxes=face_alpha > 0)
    images, labels, example_weights, *boxes = make_batch(batch_key, step)
    model_args = {}
    if face_alpha > 0:  # SSFER: the mixed batch beside the unmixed one, weighted by face IoU.
      mixed_images, partner, lam, iou = pipeline.face_mixup_pairs(mixup_key, images, boxes[0],
                                                                  face_alpha)
      partner_labels = labels[partner]
    elif mixup_alpha > 0:
      images, partner_labels, lam = pipeline.mixup(mixup_key, images, labels, mixup_alpha)
    elif rul:  # RUL: feature mixing inside the model, half the loss on each label.
      model_args["mix_with"] = jax.random.permutation(mixup_key, labels.shape[0])
      partner_labels, lam = labels[model_args["mix_with"]], jnp.full_like(example_weights, 0.5)
    else:
      partner_labels, lam = labels, jnp.ones_like(example_weights)
    dropout_key = jax.random.fold_in(mixup_key, 1)  # RUL's dropout; no other model has any.

    def forward(params, batch_stats, x):
      return model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                         mutable=mutable, rngs={"dropout": dropout_key}, **model_args)

    def face_mixup_losses(params, real_logits, batch_stats):
      """SSFER's weighted per-example losses [B] and the batch statistics after the mixed pass."""
      (mixed_logits, _), mixed = forward(params, batch_stats, mixed_images)
      e = example_weights
      weighted = losses.face_mixup_loss(
          e * loss_fn(mixed_logits, labels, step), e * loss_fn(mixed_logits, partner_labels, step),
          e * loss_fn(real_logits, labels, step), lam, iou, partner)
      return weighted, mixed["batch_stats"]

    def objective(params):
      (logits, _), updates = forward(params, state.batch_stats, images)
      if face_alpha > 0:
        weighted, mixed_stats = face_mixup_losses(params, logits, updates["batch_stats"])
        updates = {**updates, "batch_stats": mixed_stats}
      else:
        weighted = example_weights * (lam * loss_fn(logits, labels, step)
                                      + (1.0 - lam) * loss_fn(logits, partner_labels, step))
      mixed_weights = (lam * class_weight(labels, step)
                       + (1.0 - lam) * class_weight(partner_labels, step))
      loss = losses.weighted_average(weighted, mixed_weights, weight_average)
      batch_stats, terms = updates["batch_stats"], {}
      if eac:  # The mirror images' pass; the head's kernel is held fixed in the maps.
        _, flipped = forward(params, batch_stats, images[:, :, ::-1, :])
        batch_stats = flipped["batch_stats"]
        kernel = jax.lax.stop_gradient(params["head"]["kernel"])
        cams = lambda aux: losses.class_activation_maps(aux["feature_map"][0], kernel)
        terms["eac_loss"] = losses.eac_consistency(cams(updates["aux"]), cams(flipped["aux"]))
        loss = loss + l.eac_weight * terms["eac_loss"]
      if dan:
        aux = updates["aux"]["dan"]
        terms["affinity_loss"] = losses.affinity_loss(aux["dan_pooled"][0], labels,
                                                      aux["dan_centers"][0])
        terms["partition_loss"] = losses.partition_loss(aux["dan_heads"][0])
        loss = (loss + l.affinity_weight * terms["affinity_loss"]
                + l.partition_weight * terms["partition_loss"])
      return loss, (logits, batch_stats, terms)

    (loss, (logits, batch_stats, terms)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if ema_decay > 0:
      ema = lambda old, new: ema_decay * old + (1.0 - ema_decay) * new
      new_state = new_state.replace(ema_params=jax.tree.map(ema, state.ema_params, params),
                                    ema_batch_stats=jax.tree.map(ema, state.ema_batch_stats,
                                                                 batch_stats))
    metrics = {
        "loss": loss,
        "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "lr": schedule(step),
        "grad_norm": optax.tree.norm(grads),
        **terms,
    }
    if face_alpha > 0:
      metrics["face_mixup_iou"] = jnp.mean(iou)
    return new_state, metrics

  if not jit:  # The caller jits it (e.g. ferjax.bench, inside its own timed loop).
    return train_step
  # Compiled once: a second trace (a shape, dtype or static value that changed) is an error.
  return parallel.jit_once(train_step, donate_argnums=0)


# =================================================================================================
# The loop
# =================================================================================================
def train_and_evaluate(config, workdir, *, stop_after: int | None = None,
                       synthesize: Synthesize | None = None, synthesis_data=None,
                       datasets=None) -> dict:
  """Trains (or resumes) a classifier in `workdir`; returns the validation summary.

  `stop_after` ends this call after that step (checkpointed), as a preemption would; calling
  again resumes. `synthesize` and `synthesis_data` plug a synthesis stage into the batch (see
  `batch_maker`); when not given and config.augment.vaegan_workdir is set, the semantic
  augmentation stage of ferjax.augment.synthesis is built from the config. `datasets`, a
  (train, validation) pair of Datasets, replaces config.data's (e.g. synthetic faces only).
  """
  kind.validate_config(config)
  workdir, is_main = workdir_lib.open_for_training(workdir, config, kind.KIND,
                                                    kind.default_config())
  # is_main: this process writes the files.
  with workdir_lib.training_lock(workdir, is_main), workdir_lib.disk_errors(workdir):
    return _train(config, workdir, is_main, stop_after, synthesize, synthesis_data, datasets)


def _train(config, workdir, is_main, stop_after, synthesize, synthesis_data, datasets) -> dict:
  t = config.train
  num_steps = t.num_steps
  mesh = parallel.make_mesh(t.num_devices)

  # --- Data ---------------------------------------------------------------------------------
  train_ds, val_ds = datasets or splits.load_splits(config.data, config.seed)
  num_classes = len(train_ds.class_names)
  # A joint run validates on each member dataset's own validation set; others on one.
  val_sets = val_ds if isinstance(val_ds, tuple) else (val_ds,)
  for val in val_sets:
    if tuple(val.class_names) != tuple(train_ds.class_names):
      raise UserError(f"data.val_split {config.data.val_split!r}: its classes {val.class_names} "
                      f"differ from train's {train_ds.class_names}")
  val_split = "+".join(f"{v.name}:{v.split}" if len(val_sets) > 1 else v.split
                       for v in val_sets)
  train_counts = train_ds.class_counts()
  if not train_counts.all():  # Its recall would be 0 by construction and its prior log(0).
    empty = [n for n, c in zip(train_ds.class_names, train_counts) if c == 0]
    raise UserError(f"data: no training images of class(es) {', '.join(map(repr, empty))} "
                    f"(dataset {train_ds.name!r}, split {train_ds.split!r}, after any hold-out): "
                    "every class needs at least one: add images, or leave the class out")
  if config.sampler.name == "oversample" and t.batch_size > num_classes * train_counts.max():
    raise UserError(f"config field 'train.batch_size': expected at most the over-sampled train "
                    f"size ({num_classes * train_counts.max()}), got {t.batch_size}")
  data = device_data(config, train_ds.images, train_ds.labels, num_classes, mesh)
  # The class prior the model is trained under: prior-based losses (logit adjustment, balanced
  # softmax, LDAM, class weights) and post-hoc adjustment use it. It is the distribution of the
  # batches: the sampler's (kind.sampled_counts), or with semantic augmentation the rebalanced
  # one, not the raw train counts.
  prior_counts = kind.sampled_counts(config, train_counts)
  if synthesize is None and synthesis_lib.enabled(config):
    stage = synthesis_lib.build(config, train_ds.images, train_ds.labels, num_classes)
    synthesize, synthesis_data = stage.synthesize, stage.data
    prior_counts = stage.plan.real_counts + stage.plan.synthetic_counts
  if synthesis_data is not None:
    data["synthesis"] = parallel.put_replicated(synthesis_data, mesh)
  meta = {"train_counts": train_counts.tolist(), "prior_counts": prior_counts.tolist(),
          "class_names": list(train_ds.class_names), "val_split": val_split}

  # --- Model, optimizer, state (restored when the workdir has a checkpoint) ------------------
  model = kind.build_model(config, num_classes)
  tx, _ = kind.make_optimizer(config, num_steps)
  state = kind.init_state(config, model, tx, mesh)
  ckpt = checkpoint_lib.Checkpoints(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                    best_metric=t.best_metric)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state, "latest")
  elif config.model.init_from:
    state = kind.with_weights(state, initial_weights(config, state, train_ds.class_names), tx,
                              mesh)
  if is_main:  # Steps past the checkpoint (all, before the first one) are replayed.
    monitor.drop_metrics_after(workdir, int(state.step))
  train_step = make_train_step(config, model, tx, prior_counts, num_steps, mesh,
                               synthesize=synthesize)

  def validate(state):
    variables = kind.eval_variables(state)
    results = [evaluate_lib.evaluate_params(config, variables, val, train_counts=train_counts,
                                            mesh=mesh, model=model) for val in val_sets]
    if len(results) == 1:
      return {k: results[0][k] for k in BEST_METRICS}, results[0]
    # Joint: the mean over the member datasets (selects checkpoints), and each one's own.
    metrics = {k: float(np.mean([r[k] for r in results])) for k in BEST_METRICS}
    for val, r in zip(val_sets, results):
      metrics.update({f"{val.name}_{k}": r[k] for k in BEST_METRICS})
    return metrics, {**metrics, "per_class": {}, "per_dataset": {
        val.name: r for val, r in zip(val_sets, results)}}

  # --- Loop -----------------------------------------------------------------------------------
  # A resumed run hides the events an earlier run logged after its checkpoint.
  step = int(state.step)
  writer = (monitor.MetricWriter(workdir, purge_step=step + 1 if step else None)
            if is_main else None)
  last_step = num_steps if stop_after is None else min(num_steps, stop_after)
  summary = {}
  logged = monitor.IntervalMetrics(t.batch_size, watch=("loss",),
                                   last_checkpoint=ckpt.latest_step)
  with ckpt, monitor.progress(total=num_steps, initial=step) as bar, \
      interrupt.StopRequests() as stop:
    while step < last_step:
      state, metrics = train_step(state, data)
      logged.add(metrics)  # Device arrays: fetched only at logging points.
      step += 1
      bar.update(1)
      stopping = bool(stop)  # Read once: a signal arriving mid-step counts from the next one.
      is_eval = step % t.eval_every == 0 or step == num_steps
      # Resume points only every checkpoint_every steps: a validation step saves just a new best
      # (a save per epoch doubled the FER-2013 recipe's wall time on an H200).
      is_save = step % t.checkpoint_every == 0 or step == last_step
      if step % t.log_every == 0 or is_eval or is_save or stopping:
        train_metrics = logged.flush(step)  # NaN guard first: a NaN state is never saved.
        if writer:
          writer.write(step, train_metrics)
      if is_eval:
        val_metrics, summary = validate(state)
        if writer:
          writer.write(step, {f"val_{k}": v for k, v in val_metrics.items()})
        bar.write(f"step {step}: " + "  ".join(f"val {k} {v:.4f}" for k, v in val_metrics.items()))
        ckpt.save(step, state, metrics=val_metrics, extra=meta, last=is_save)
        logged.restart_clock()  # Do not count validation time as training time.
      elif is_save:
        ckpt.save(step, state, extra=meta)
      if stopping:  # Ctrl-C or SIGTERM: this step becomes a resume point, then one line.
        if not is_save:
          ckpt.save(step, state, extra=meta)
        if writer:
          writer.close()
        raise stop.stop(step, workdir)
    best_step = ckpt.best_step()
    best = ckpt.read_meta("best")["metrics"] if best_step is not None else {}

  if writer:
    plots.save_curves(monitor.read_metrics(workdir),
                      ["loss", "train_accuracy", "lr", "val_accuracy", "val_mean_class_accuracy",
                       "val_macro_f1"], workdir / "curves.png", title=str(workdir.name))
    writer.write_images(step, {"curves": workdir / "curves.png"})
    writer.close()
  return {
      "workdir": str(workdir), "step": step, "num_steps": num_steps,
      "best_step": best_step, "best_metric": t.best_metric,
      "best": best, "last": {k: summary.get(k) for k in BEST_METRICS} if summary else {},
      "last_per_class_recall": ({n: v["recall"] for n, v in summary["per_class"].items()}
                                if summary else {}),
      "train_counts": meta["train_counts"], "class_names": meta["class_names"],
      "val_split": val_split,
  }


def cli_main(args) -> int:
  """`ferjax train --config FILE --workdir DIR [--config.field=value ...]`."""
  config = configs.load_config(args.config, getattr(args, "overrides", None) or ())
  result = train_and_evaluate(config, args.workdir)
  best = result["best"].get(result["best_metric"])
  best_text = f"{best:.4f}" if best is not None else "n/a"
  print(f"trained {result['step']} steps in {result['workdir']}; best validation "
        f"{result['best_metric']} {best_text} at step {result['best_step']} "
        f"(evaluate with: ferjax evaluate --workdir {result['workdir']} --split test)")
  return 0
