"""Classifier trainer: ResNet on a device-resident dataset, with every long-tail baseline a switch.

    ferjax train --config experiments/configs/classifier_synthetic_tiny.py --workdir runs/tiny

One readable file, top to bottom: the pure train step, then the run (data, model, state, the
loop). What a classifier run is (config, model, optimizer, state, random streams) lives in
ferjax.kinds.classifier, its batch (sampling -> gather -> [synthesis] -> augmentation) in
ferjax.kinds.classifier_batches; when it logs, validates, saves and stops in ferjax.core.loop;
reopening a finished run in ferjax.runs; evaluation in ferjax.evaluate; benchmarks in
ferjax.bench.

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

Each method this trainer switches on is described in docs/methods.md.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import configs, losses, runs
from ferjax import evaluate as evaluate_lib
from ferjax.augment import synthesis as synthesis_lib
from ferjax.core import checkpoint as checkpoint_lib
from ferjax.core import loop, parallel
from ferjax.data import pipeline, splits
from ferjax.errors import UserError
from ferjax.kinds import classifier as kind
from ferjax.kinds import classifier_batches
from ferjax.kinds.classifier import BEST_METRICS, TrainState
from ferjax.kinds.classifier_batches import Synthesize


# =================================================================================================
# The train step
# =================================================================================================
def eac_views(key, images, augment_config):
  """EAC's noisy-label views of a batch augmented but not yet erased, [B, H, W, C]: (the images
  randomly erased, their mirrors randomly erased with boxes of their own), as the reference's
  noisy-label loader makes its second view (mirror, then its own transform)."""
  erase_key, mirror_key = jax.random.split(key)
  return (pipeline.erase_batch(erase_key, images, augment_config),
          pipeline.erase_batch(mirror_key, images[:, :, ::-1, :], augment_config))


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
                       updates the BatchNorm statistics, as EAC's two passes do). The mirror
                       view is the erased image mirrored (loss.eac_flip_erasing=same, EAC's
                       clean-label script), or the image before erasing, mirrored and then
                       erased with its own box (independent, EAC's noisy-label script).

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
  # EAC's noisy-label view: the batch is made unerased, each view then erased with its own box.
  eac_own_box = eac and l.eac_flip_erasing == "independent" and config.augment.erasing_prob > 0
  batch_config = config
  if eac_own_box:
    batch_config = config.copy_and_resolve_references()
    batch_config.augment.erasing_prob = 0.0

  def train_step(state: TrainState, data: dict):
    chex.assert_rank(data["images"], 4)  # The train set on the device: uint8 rows, int32 labels.
    chex.assert_type([data["images"], data["labels"]], [jnp.uint8, jnp.int32])
    step = state.step
    batch_key, mixup_key = jax.random.split(jax.random.fold_in(train_key, step))
    make_batch = classifier_batches.batch_maker(batch_config, data, num_steps=num_steps,
                                                synthesize=synthesize, mesh=mesh,
                                                with_boxes=face_alpha > 0)
    images, labels, example_weights, *boxes = make_batch(batch_key, step)
    own_mirror = None  # EAC's mirror view when it is erased on its own.
    if eac_own_box:
      images, own_mirror = eac_views(jax.random.fold_in(mixup_key, 2), images, config.augment)
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
        view = images[:, :, ::-1, :] if own_mirror is None else own_mirror
        _, flipped = forward(params, batch_stats, view)
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
# The run
# =================================================================================================
def train_and_evaluate(config, workdir, *, stop_after: int | None = None,
                       synthesize: Synthesize | None = None, synthesis_data=None,
                       datasets=None) -> dict:
  """Trains (or resumes) a classifier in `workdir`; returns the validation summary.

  `stop_after`: see ferjax.core.loop.Schedule. `synthesize` and `synthesis_data` plug a
  synthesis stage into the batch (see `classifier_batches.batch_maker`); when not given and
  config.augment.vaegan_workdir is set, the semantic augmentation stage of
  ferjax.augment.synthesis is built from the config. `datasets`, a (train, validation) pair of
  Datasets, replaces config.data's (e.g. synthetic faces only).
  """
  t = config.train
  with loop.open_workdir(workdir, config, kind) as (workdir, is_main):
    mesh = parallel.make_mesh(t.num_devices)

    # --- Data -------------------------------------------------------------------------------
    train_ds, val_ds = datasets or splits.load_splits(config.data, config.seed)
    # A joint run validates on each member dataset's own validation set; others on one.
    val_sets = val_ds if isinstance(val_ds, tuple) else (val_ds,)
    train_counts = check_data(config, train_ds, val_sets)
    num_classes = len(train_ds.class_names)
    data = classifier_batches.device_data(config, train_ds.images, train_ds.labels, num_classes,
                                          mesh)
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
    val_split = "+".join(f"{v.name}:{v.split}" if len(val_sets) > 1 else v.split
                         for v in val_sets)
    meta = {"train_counts": train_counts.tolist(), "prior_counts": prior_counts.tolist(),
            "class_names": list(train_ds.class_names), "val_split": val_split}

    # --- Model, optimizer, state, step --------------------------------------------------------
    model = kind.build_model(config, num_classes)
    tx, _ = kind.make_optimizer(config, t.num_steps)
    state = kind.init_state(config, model, tx, mesh)
    train_step = make_train_step(config, model, tx, prior_counts, t.num_steps, mesh,
                                 synthesize=synthesize)
    summary = {}  # The last validation's full result (per-class recall...).

    def validate(state):
      nonlocal summary
      metrics, summary = validate_sets(config, kind.eval_variables(state), val_sets,
                                       train_counts, mesh, model)
      return metrics

    # --- Loop ---------------------------------------------------------------------------------
    with checkpoint_lib.Checkpoints(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                    best_metric=t.best_metric) as ckpt:
      state, resumed = loop.resume(ckpt, state, workdir, "train")
      if not resumed and config.model.init_from:
        state = kind.with_weights(state, runs.initial_weights(config, state, train_ds.class_names),
                                  tx, mesh)
      done = loop.run(lambda state: train_step(state, data), state,
                      schedule=loop.Schedule.from_config(t, stop_after=stop_after),
                      workdir=workdir, is_main=is_main, checkpoints=ckpt,
                      images_per_step=t.batch_size, validate=validate, meta=meta,
                      curves=(CURVE_KEYS, str(workdir.name)))
      best_step = ckpt.best_step()
      best = ckpt.read_meta("best")["metrics"] if best_step is not None else {}

  return {
      "workdir": str(workdir), "step": done.step, "num_steps": t.num_steps,
      "best_step": best_step, "best_metric": t.best_metric,
      "best": best, "last": {k: summary.get(k) for k in BEST_METRICS} if summary else {},
      "last_per_class_recall": ({n: v["recall"] for n, v in summary["per_class"].items()}
                                if summary else {}),
      "train_counts": meta["train_counts"], "class_names": meta["class_names"],
      "val_split": val_split,
  }


CURVE_KEYS = ("loss", "train_accuracy", "lr", "val_accuracy", "val_mean_class_accuracy",
              "val_macro_f1")


def check_data(config, train_ds, val_sets) -> np.ndarray:
  """The train class counts, once the data is fit to train on (one line naming the problem)."""
  for val in val_sets:
    if tuple(val.class_names) != tuple(train_ds.class_names):
      raise UserError(f"data.val_split {config.data.val_split!r}: its classes {val.class_names} "
                      f"differ from train's {train_ds.class_names}")
  train_counts = train_ds.class_counts()
  if not train_counts.all():  # Its recall would be 0 by construction and its prior log(0).
    empty = [n for n, c in zip(train_ds.class_names, train_counts) if c == 0]
    raise UserError(f"data: no training images of class(es) {', '.join(map(repr, empty))} "
                    f"(dataset {train_ds.name!r}, split {train_ds.split!r}, after any hold-out): "
                    "every class needs at least one: add images, or leave the class out")
  num_classes, batch_size = len(train_ds.class_names), config.train.batch_size
  if config.sampler.name == "oversample" and batch_size > num_classes * train_counts.max():
    raise UserError(f"config field 'train.batch_size': expected at most the over-sampled train "
                    f"size ({num_classes * train_counts.max()}), got {batch_size}")
  return train_counts


def validate_sets(config, variables, val_sets, train_counts, mesh, model) -> tuple[dict, dict]:
  """(metrics that select checkpoints, full result) on the validation set(s). Joint: the mean
  over the member datasets selects, and each one's own is logged beside it."""
  results = [evaluate_lib.evaluate_params(config, variables, val, train_counts=train_counts,
                                          mesh=mesh, model=model) for val in val_sets]
  if len(results) == 1:
    return {k: results[0][k] for k in BEST_METRICS}, results[0]
  metrics = {k: float(np.mean([r[k] for r in results])) for k in BEST_METRICS}
  for val, r in zip(val_sets, results):
    metrics.update({f"{val.name}_{k}": r[k] for k in BEST_METRICS})
  return metrics, {**metrics, "per_class": {}, "per_dataset": {
      val.name: r for val, r in zip(val_sets, results)}}


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
