"""Semi-supervised trainer (stage 3 of SSFER): FixMatch with an EMA teacher, on the device.

    ferjax train-semisup --config experiments/configs/semisup_synthetic_tiny.py \
        --workdir runs/semisup_tiny
    ferjax evaluate --workdir runs/semisup_tiny --split test

`data.label_fraction` (< 1) keeps a stratified share of train labelled (ferjax.data.splits); the
rest, with `semisup.extra_sources` joined to it, is the unlabeled pool. Both live on the devices
as uint8. Each step:

  labelled batch    B images by the classifier's sampler and augmentation
                    (ferjax.kinds.classifier_batches.batch_maker);
  unlabeled batch   semisup.ratio x B pool images drawn uniformly; a weak view (config.augment:
                    by default flip + pad crop, FixMatch's weak augmentation) and a strong view
                    (another weak draw, then RandAugment: ferjax.data.randaugment);
  pseudo-labels     the teacher (the EMA of the student, in eval mode) on the weak views: its
                    argmax, kept where its max probability reaches the threshold: semisup.threshold
                    (fixed), or FlexMatch's per-class threshold from the record of confident
                    predictions before the batch, which the batch then updates
                    (`flex_pseudo_labels`);
  loss              the classifier's supervised loss (loss.*, ferjax.losses) on the labelled
                    batch + semisup.unlabeled_weight * mean_u(mask_u * CE(student(strong_u),
                    pseudo_u)) (FixMatch's: averaged over the whole unlabeled batch); the student
                    sees both batches in one forward pass (one set of BatchNorm statistics);
  teacher           EMA of the student, decay min(semisup.ema_decay, (1 + step) / (10 + step)).

The step is `state, data -> state, metrics, pseudo`, jitted once with the state donated; its
randomness is folded from the step number, so a resumed run replays the uninterrupted one. The
pool's true labels stay in a separate device array read only for the diagnostics logged per class
(`pseudo_count`, `pseudo_accuracy`: how many confident pseudo-labels each class got in the logging
interval and how many were right); nothing trained or selected ever reads them.

Validation and `ferjax evaluate` use the teacher (the EMA weights, as is standard for FixMatch
with an EMA model): it picks the best checkpoint by `train.best_metric` on the validation split,
and ferjax.runs.open_classifier opens the workdir as a classifier with the teacher's weights.

Workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/, curves.png, summary.json.
Training again in a workdir that has checkpoints resumes from the latest one.

See docs/methods.md (FixMatch with an EMA teacher, FlexMatch thresholds, RandAugment).
"""

import json
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import configs, losses, runs, writing
from ferjax import evaluate as evaluate_lib
from ferjax.core import checkpoint as checkpoint_lib
from ferjax.core import loop, parallel
from ferjax.data import pipeline, randaugment, splits, unlabeled
from ferjax.errors import UserError
from ferjax.kinds import classifier_batches
from ferjax.kinds import semisup as kind
from ferjax.kinds.semisup import BEST_METRICS, TrainState

CURVE_KEYS = ("loss", "sup_loss", "unlabeled_loss", "mask_rate", "pseudo_label_accuracy",
              "val_accuracy", "val_mean_class_accuracy")


# =================================================================================================
# Pseudo-labels: thresholds, mask, unlabeled loss (pure; tested against their formulas)
# =================================================================================================
def flex_thresholds(record, num_classes: int, threshold: float):
  """FlexMatch's per-class thresholds [K] from the pool's record (int [N]: the class of each
  image's last prediction above `threshold`, -1 none yet).

  Learning effect sigma_c = #{record == c}; normalised beta_c = sigma_c / max(max_c sigma_c,
  #{record == -1}) (the unused images count, FlexMatch's threshold warm-up); threshold_c =
  M(beta_c) * threshold with the convex M(x) = x / (2 - x). At the start every image is unused,
  so every threshold is 0 and all pseudo-labels count (as in FlexMatch). The train step masks a
  batch with the thresholds of the record from before it, then writes the batch into the record
  (USB's `FlexMatchThresholdingHook`, TorchSSL's FlexMatch). Ours differs from the references
  only when every image holds one value: they keep their previous thresholds, we use the
  formula."""
  counts = jnp.bincount(record + 1, length=num_classes + 1).astype(jnp.float32)
  beta = counts[1:] / jnp.maximum(jnp.max(counts), 1.0)
  return threshold * beta / (2.0 - beta)


def update_record(record, index, confidence, labels, threshold: float):
  """FlexMatch's record after a batch: pool images `index` whose confidence reaches `threshold`
  (>=, as the references) take their pseudo-label. An image drawn twice keeps the label of its
  last confident draw: the references write only the confident draws
  (`selected_label[idx[select == 1]] = pseudo_label[select == 1]`), so an unconfident later
  draw never erases a confident earlier one."""
  confident = confidence >= threshold
  same = index[:, None] == index[None, :]
  later = jnp.triu(same & confident[None, :], k=1).any(axis=1)  # A later confident draw.
  write = confident & ~later
  # Positions not written go to an out-of-range row, which the scatter drops.
  target = jnp.where(write, index, record.shape[0])
  return record.at[target].set(labels, mode="drop")


def flex_pseudo_labels(teacher_logits, record, index, threshold: float):
  """FlexMatch's step: (labels [U], mask [U], confidence [U], thresholds [K], the record after
  the batch) of teacher logits [U, K] on pool images `index` [U]. The mask uses the thresholds
  of the record from before the batch; the batch is written into the record afterwards (USB's
  `FlexMatchThresholdingHook.masking`, TorchSSL's FlexMatch), so on the first step every
  threshold is 0."""
  thresholds = flex_thresholds(record, teacher_logits.shape[-1], threshold)
  labels, mask, confidence = pseudo_labels(teacher_logits, thresholds)
  new_record = update_record(record, index, confidence, labels, threshold)
  return labels, mask, confidence, thresholds, new_record


def pseudo_labels(teacher_logits, thresholds):
  """(labels [U], mask [U] float, confidence [U]) of teacher logits [U, K]: the argmax, kept
  where the max probability reaches its class's threshold (thresholds [K])."""
  probs = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
  confidence, labels = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)
  mask = (confidence >= thresholds[labels]).astype(jnp.float32)
  return labels, mask, confidence


def unlabeled_loss(student_logits, labels, mask):
  """FixMatch's unlabeled loss: mean over the batch of mask * CE(student logits, pseudo-label)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), labels)
  return jnp.mean(mask * ce)


# =================================================================================================
# Data: the labelled set and the unlabeled pool on the device
# =================================================================================================
def load_data(config):
  """(labelled train, validation, pool images, pool true labels): the pool is the rest of train
  (its true labels kept for diagnostics only) plus semisup.extra_sources (true label -1)."""
  train, val, pool = splits.load_splits(config.data, config.seed, with_pool=True)
  if pool is None or len(pool) == 0:
    raise UserError(f"config field 'data.label_fraction': {config.data.label_fraction} labels "
                    "every train image: a semi-supervised run with no unlabeled pool left")
  images, truth = pool.images, np.asarray(pool.labels, np.int32)
  if config.semisup.extra_sources:
    extra_data = kind.extra_sources_data(config)
    more, more_truth = [np.asarray(images, np.uint8)], [truth]
    for source in unlabeled.parse_sources(config.semisup.extra_sources, "semisup.extra_sources"):
      read = unlabeled.read_source(source, extra_data)
      rows = splits.weighted_rows(len(read), source.weight, config.seed)
      if not len(rows):  # Before step 1: the refused run leaves no record (core.workdir).
        raise UserError(f"config field 'semisup.extra_sources': {source} gives 0 unlabeled rows "
                        f"({len(read)} images times weight {source.weight:g}): expected a "
                        "weight that keeps at least one row, or leave the source out")
      more.append(read[rows])
      more_truth.append(np.full(len(rows), -1, np.int32))
    images, truth = np.concatenate(more), np.concatenate(more_truth)
  if jax.process_index() == 0:
    print(f"semisup data: {len(train)} labelled, {len(truth)} unlabeled "
          f"({int(np.sum(truth < 0))} from semisup.extra_sources)")
  return train, val, images, truth


# =================================================================================================
# The train step
# =================================================================================================
def make_train_step(config, model, tx, class_counts, num_classes: int, pool_size: int,
                    num_steps: int, mesh, *, jit: bool = True):
  """`train_step(state, data) -> (state, metrics, pseudo)`: pure; jitted with the state donated.

  `data`: {"labelled": `classifier_batches.device_data`, "pool": uint8 [N, H, W, C] rows,
  "pool_truth": int32 [N] (diagnostics only)}. `metrics` are scalars (means over a logging
  interval make sense); `pseudo` are per-class sums for the interval: confident pseudo-labels per
  class ("count"), those with a known true label ("known") and the right ones ("correct"), and
  the current thresholds."""
  s = config.semisup
  loss_fn = losses.make_loss(config.loss, class_counts, num_steps)
  class_weight = losses.make_class_weight(config.loss, class_counts)
  _, schedule = kind.make_optimizer(config, num_steps)
  train_key = kind.rng_streams(config.seed).train
  labelled_size = config.train.batch_size
  unlabeled_size = s.ratio * labelled_size
  flexmatch = s.threshold_mode == "flexmatch"
  sharding = parallel.batch_sharding(mesh)
  constrain = lambda x: jax.lax.with_sharding_constraint(x, sharding)

  def train_step(state: TrainState, data: dict):
    chex.assert_rank([data["labelled"]["images"], data["pool"]], 4)  # uint8 rows on the device.
    chex.assert_type([data["labelled"]["images"], data["pool"], data["pool_truth"]],
                     [jnp.uint8, jnp.uint8, jnp.int32])
    step = state.step
    batch_key, index_key, weak_key, strong_key, ra_key, dropout_key = jax.random.split(
        jax.random.fold_in(train_key, step), 6)
    make_batch = classifier_batches.batch_maker(config, data["labelled"], num_steps=num_steps,
                                                mesh=mesh)
    images, labels, example_weights = make_batch(batch_key, step)

    # The unlabeled batch: weak and strong views of the same pool images.
    index = constrain(pipeline.sample_uniform(index_key, pool_size, unlabeled_size))
    raw = pipeline.to_float(data["pool"][index])
    weak = pipeline.augment_batch(weak_key, raw, config.augment)
    strong = pipeline.augment_batch(strong_key, raw, config.augment)
    strong = constrain(randaugment.rand_augment_batch(ra_key, strong, s.randaugment_ops,
                                                      s.randaugment_magnitude))

    # Pseudo-labels from the teacher on the weak views (eval mode, no gradient).
    teacher = {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
    teacher_logits = jax.lax.stop_gradient(model.apply(teacher, constrain(weak), train=False)[0])
    record = state.pseudo_record
    if flexmatch:
      pseudo, mask, confidence, thresholds, record = flex_pseudo_labels(teacher_logits, record,
                                                                        index, s.threshold)
    else:
      thresholds = jnp.full((num_classes,), s.threshold, jnp.float32)
      pseudo, mask, confidence = pseudo_labels(teacher_logits, thresholds)

    def objective(params):
      both = jnp.concatenate([images, strong])
      (logits, _), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, both, train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_key})
      labelled_logits, strong_logits = logits[:labelled_size], logits[labelled_size:]
      sup = losses.weighted_average(example_weights * loss_fn(labelled_logits, labels, step),
                                    class_weight(labels, step), config.loss.weight_average)
      unsup = unlabeled_loss(strong_logits, pseudo, mask)
      loss = sup + s.unlabeled_weight * unsup
      return loss, (labelled_logits, updates["batch_stats"], sup, unsup)

    (loss, (logits, batch_stats, sup, unsup)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(s.ema_decay, (1.0 + step) / (10.0 + step))
    ema = lambda old, new: decay * old + (1.0 - decay) * new
    new_state = state.replace(
        step=step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        teacher_params=jax.tree.map(ema, state.teacher_params, params),
        teacher_batch_stats=jax.tree.map(ema, state.teacher_batch_stats, batch_stats),
        pseudo_record=record)

    # Diagnostics: the true labels of the pool never reach the loss above.
    truth = data["pool_truth"][index]
    chosen = jax.nn.one_hot(pseudo, num_classes) * mask[:, None]
    known = chosen * (truth >= 0)[:, None]
    metrics = {
        "loss": loss, "sup_loss": sup, "unlabeled_loss": unsup, "mask_rate": jnp.mean(mask),
        "teacher_confidence": jnp.mean(confidence),
        "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "lr": schedule(step), "grad_norm": optax.tree.norm(grads),
    }
    pseudo_stats = {"count": jnp.sum(chosen, 0), "known": jnp.sum(known, 0),
                    "correct": jnp.sum(known * (truth == pseudo)[:, None], 0),
                    "thresholds": thresholds}
    return new_state, metrics, pseudo_stats

  if not jit:
    return train_step
  return parallel.jit_once(train_step, donate_argnums=0)


class PseudoTotals:
  """The per-class pseudo-label sums of the steps since the last logging point (device arrays,
  fetched at `flush`)."""

  def __init__(self, class_names):
    self.class_names = list(class_names)
    self.pending = []

  def add(self, pseudo: dict) -> None:
    self.pending.append(pseudo)

  def interval(self) -> list:
    """The pending steps' sums as JSON (dtypes kept), saved by a stop between logging points."""
    return [{k: {"dtype": v.dtype.name, "value": v.tolist()} for k, v in h.items()}
            for h in jax.device_get(self.pending)]

  def resume_interval(self, saved: list) -> None:
    """Takes back what `interval()` gave: the resumed run logs the same sums."""
    self.pending = [{k: np.asarray(v["value"], v["dtype"]) for k, v in h.items()} for h in saved]

  def flush(self) -> dict:
    history, self.pending = jax.device_get(self.pending), []
    if not history:
      return {}
    count, known, correct = (np.sum([h[k] for h in history], 0)
                             for k in ("count", "known", "correct"))
    with np.errstate(invalid="ignore", divide="ignore"):
      per_class = np.where(known > 0, correct / np.maximum(known, 1), np.nan)
    result = {"pseudo_count": count.tolist(),
              "pseudo_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
              "thresholds": np.asarray(history[-1]["thresholds"]).tolist()}
    if known.sum() > 0:
      result["pseudo_label_accuracy"] = float(correct.sum() / known.sum())
    return result


# =================================================================================================
# The run
# =================================================================================================
def train_and_evaluate(config, workdir, *, stop_after: int | None = None) -> dict:
  """Trains (or resumes) a semi-supervised classifier in `workdir`; returns a summary dict.
  `stop_after`: see ferjax.core.loop.Schedule."""
  t_start = time.perf_counter()
  t = config.train
  with loop.open_workdir(workdir, config, kind) as (workdir, is_main):
    mesh = parallel.make_mesh(t.num_devices)
    parallel.check_batch_size(t.batch_size, mesh, "train.batch_size")

    # --- Data -------------------------------------------------------------------------------
    train_ds, val_ds, pool_images, pool_truth = load_data(config)
    class_names = tuple(train_ds.class_names)
    num_classes = len(class_names)
    if val_ds is not None and tuple(val_ds.class_names) != class_names:
      raise UserError(f"data.val_split {config.data.val_split!r}: its classes "
                      f"{val_ds.class_names} differ from train's {class_names}")
    train_counts = train_ds.class_counts()
    if not train_counts.all():
      empty = [n for n, c in zip(class_names, train_counts) if c == 0]
      raise UserError(f"data: no labelled training images of class(es) "
                      f"{', '.join(map(repr, empty))}: every class needs at least one")
    prior_counts = kind.sampled_counts(config, train_counts)
    pool_size = len(pool_truth)
    data = {"labelled": classifier_batches.device_data(config, train_ds.images, train_ds.labels,
                                                       num_classes, mesh),
            "pool": parallel.put_rows(pool_images, mesh),
            "pool_truth": parallel.put_replicated(pool_truth, mesh)}
    meta = {"train_counts": train_counts.tolist(), "prior_counts": prior_counts.tolist(),
            "class_names": list(class_names), "val_split": config.data.val_split or "holdout",
            "pool_size": pool_size}

    # --- Model, optimizer, state, step --------------------------------------------------------
    model = kind.build_model(config, num_classes)
    tx, _ = kind.make_optimizer(config, t.num_steps)
    state = kind.init_state(config, model, tx, mesh, pool_size)
    train_step = make_train_step(config, model, tx, prior_counts, num_classes, pool_size,
                                 t.num_steps, mesh)
    totals = PseudoTotals(class_names)

    def step_fn(state):
      state, metrics, pseudo = train_step(state, data)
      totals.add(pseudo)
      return state, metrics

    def validate(state):
      result = evaluate_lib.evaluate_params(config, kind.eval_variables(state), val_ds,
                                            train_counts=train_counts, mesh=mesh, model=model)
      return {k: result[k] for k in BEST_METRICS}

    # --- Loop ---------------------------------------------------------------------------------
    with checkpoint_lib.Checkpoints(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                    best_metric=t.best_metric if val_ds is not None else None
                                    ) as ckpt:
      state, resumed = loop.resume(ckpt, state, workdir, "train-semisup")
      if not resumed and config.model.init_from:
        state = kind.with_weights(state, runs.initial_weights(config, state, class_names), tx,
                                  mesh)
      done = loop.run(step_fn, state,
                      schedule=loop.Schedule.from_config(t, stop_after=stop_after),
                      workdir=workdir, is_main=is_main, checkpoints=ckpt,
                      images_per_step=t.batch_size * (1 + config.semisup.ratio),  # both batches
                      validate=validate if val_ds is not None else None, log_extra=totals.flush,
                      extra_interval=totals,
                      meta=meta, desc="train-semisup", postfix=("loss", "mask_rate"),
                      curves=(CURVE_KEYS, f"{workdir.name} (semi-supervised)"))
      best_step = ckpt.best_step() if val_ds is not None else None
      best = ckpt.read_meta("best")["metrics"] if best_step is not None else {}

  result = {"workdir": str(workdir), "step": done.step, "num_steps": t.num_steps,
            "best_step": best_step, "best_metric": t.best_metric, "best": best,
            "last": done.val, "train": done.train, "labelled": len(train_ds),
            "unlabeled": pool_size, "wall_s": round(time.perf_counter() - t_start, 1)}
  if is_main and done.step == t.num_steps:
    writing.write_atomic(workdir / "summary.json", json.dumps(result, indent=2) + "\n")
  return result


def cli_main(args) -> int:
  """`ferjax train-semisup --config FILE --workdir DIR [--config.field=value ...]`."""
  config = configs.load_config(args.config, getattr(args, "overrides", None) or ())
  result = train_and_evaluate(config, args.workdir)
  best = result["best"].get(result["best_metric"])
  best_text = f"{best:.4f}" if best is not None else "n/a"
  print(f"train-semisup: {result['step']} steps ({result['labelled']} labelled, "
        f"{result['unlabeled']} unlabeled images) in {result['wall_s']:.0f} s; best validation "
        f"{result['best_metric']} {best_text} (teacher) at step {result['best_step']} "
        f"(evaluate with: ferjax evaluate --workdir {result['workdir']} --split test)")
  return 0
