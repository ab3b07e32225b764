"""Head re-training: a second stage on a finished classifier run's frozen backbone.

    ferjax retrain-head --workdir runs/baseline --out runs/baseline_crt
    ferjax retrain-head --workdir runs/baseline --out runs/baseline_feat \\
        --config.synth.mode=feature --config.head.loss=logit_adjusted
    ferjax retrain-head --workdir runs/baseline --out runs/baseline_pix \\
        --config.synth.mode=pixel --config.synth.vaegan_workdir=runs/vaegan \\
        --config.synth.decode=residual --config.head.loss=logit_adjusted

Decoupled classifier re-training (cRT, Kang et al. 2020): the representation is learned on real
data only (the source run); here only the final Dense layer is trained again, on the backbone's
penultimate features, with class-balanced batches by default. One trained backbone thus serves a
sweep of heads without retraining it. With `synth.mode=feature`, semantic augmentation happens
in feature space (ferjax.augment.feature_synthesis): a small VAE is trained on the train
features, and the last S slots of each batch hold synthetic minority-class features made by
perturbing its latents, where no decoder blur can reach the backbone. With `synth.mode=pixel`, the decoupled
use of pixel-space synthesis: a trained VAE-GAN (`synth.vaegan_workdir`) makes
`synth.pool_per_class` synthetic faces of each class the plan synthesizes before training
(ferjax.augment.synthesis.synthesize_per_class), the frozen backbone turns them into features
exactly as it does the real train images, and the same last S slots of each batch draw from
that pool of synthetic-face features, by class (the feature mode's plan; no feature VAE). The
faces reach the head only, never the representation. The config (defaults and rules) is
ferjax.kinds.retrain_head.

One readable file, top to bottom: the run's data, the batch and the pure train step
`train_step(state, data) -> (state, metrics)` (jitted once, state donated, its randomness
fold_in(key(seed), step)), then the stage: features extracted once (eval mode,
ferjax.evaluate.extract_features; in pixel mode those of the synthetic faces too,
ferjax.augment.feature_synthesis), ferjax.core.loop's loop (validation every head.eval_every
steps on the run's own validation set; the best head is kept) and the new workdir
(ferjax.kinds.retrain_head.write_classifier_run).

The output (`--out`, which must not exist) is a regular classifier workdir, so `ferjax evaluate`,
`ferjax predict`, `ferjax export` and ferjax.runs.open_classifier use it unchanged: config.json
(the source run's config), run.json (kind classifier, plus where it came from), checkpoints/
(`best` and `last` classifier train states: the source's evaluation weights with the new head,
a fresh optimizer state, step = head steps; their meta holds class_names, train_counts,
prior_counts: the class distribution of the head's batches, for post-hoc logit adjustment), plus
head.json (this stage's config and results), metrics.jsonl, curves.png and, in feature mode,
synthetic_neighbours.png (in pixel mode synthetic_faces.png: real seeds beside the synthetic
faces made from them, a row per synthesized class). It is written into a hidden folder beside
`--out` and renamed into place when complete: a failed or interrupted stage leaves nothing
half-written.

See docs/methods.md (cRT and tau-normalisation, Weight balancing, Feature-space semantic
augmentation, Pixel-space faces in a decoupled head).
"""

import json
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import configs, losses, plots, runs, writing
from ferjax import evaluate as evaluate_lib
from ferjax.augment import feature_synthesis
from ferjax.augment import synthesis
from ferjax.core import loop, parallel
from ferjax.core import workdir as workdir_lib
from ferjax.data import pipeline, splits
from ferjax.errors import UserError
from ferjax.kinds import retrain_head as kind
from ferjax.kinds.retrain_head import HeadState

NEIGHBOURS_PER_CLASS = 6  # synthetic features per class in synthetic_neighbours.png
FACES_PER_ROW = 6  # (seed, synthetic face) pairs per class in synthetic_faces.png (pixel mode)


# =================================================================================================
# Data: the source run's own splits and their frozen features
# =================================================================================================
def load_data(run):
  """(train Dataset, validation Datasets, val split name) of the run's own splits, checked
  against its checkpoint's classes."""
  train_ds, val_ds = splits.load_splits(run.config.data, run.config.seed)
  val_sets = val_ds if isinstance(val_ds, tuple) else (val_ds,)
  for ds in (train_ds, *val_sets):
    if tuple(ds.class_names) != run.class_names:
      raise UserError(f"{run.workdir}: the {ds.split!r} split now has classes {ds.class_names}, "
                      f"the checkpoint was trained on {run.class_names} (has the data changed?)")
  counts = train_ds.class_counts()
  if not counts.all():
    empty = [n for n, c in zip(train_ds.class_names, counts) if c == 0]
    raise UserError(f"{run.workdir}: no training images of class(es) {', '.join(empty)} in its "
                    "train split: every class needs at least one to train a head")
  val_split = "+".join(f"{ds.name}:{ds.split}" if len(val_sets) > 1 else ds.split
                       for ds in val_sets)
  return train_ds, val_sets, val_split


def load_features(config, run, train_ds, val_sets):
  """(train pool features [P, D], pool labels [P], validation [(Dataset, features)]): the pool
  is the train split's features, followed by those of its mirror images when head.flip."""
  pool = [evaluate_lib.extract_features(run, train_ds.images)]
  if config.head.flip:
    pool.append(evaluate_lib.extract_features(run, train_ds.images, flip=True))
  labels = np.tile(np.asarray(train_ds.labels, np.int32), len(pool))
  val = [(ds, evaluate_lib.extract_features(run, ds.images)) for ds in val_sets]
  return np.concatenate(pool), labels, val


def open_vaegan(config):
  """The synth.vaegan_workdir run at synth.vaegan_checkpoint (ferjax.runs.VAEGANRun); a workdir
  that is missing or not a VAE-GAN's (or lacks that checkpoint) is refused in one line naming
  the fields."""
  s = config.synth
  try:
    return runs.open_vaegan(s.vaegan_workdir, str(s.vaegan_checkpoint))
  except UserError as e:
    raise UserError(f"config field 'synth.vaegan_workdir' (at synth.vaegan_checkpoint="
                    f"{s.vaegan_checkpoint}): {e}") from None


# =================================================================================================
# The batch and the train step
# =================================================================================================
def make_batch(config, data: dict, key, step, synthesize=None):
  """(features [B, D], labels [B], example weights [B]) of batch `step`: real features drawn by
  head.sampler, then (feature or pixel mode) the last S slots overwritten by the synthesis stage
  (`feature_synthesis.make_synthesize`, `make_pool_synthesize`)."""
  h = config.head
  sample_key, synth_key = jax.random.split(key)
  indices = pipeline.sample_indices(sample_key, step, sampler=h.sampler,
                                    index=data["class_index"], class_counts=data["class_index"][2],
                                    batch_size=h.batch_size, num_steps=h.steps)
  features, labels = data["features"][indices], data["labels"][indices]
  weights = jnp.ones((h.batch_size,), jnp.float32)
  if synthesize is not None:
    features, labels, weights = synthesize(synth_key, features, labels, weights, data)
  return features, labels, weights


def make_train_step(config, prior_counts, *, synthesize=None, jit: bool = True, tx=None,
                    max_norm: kind.MaxNorm | None = None):
  """`train_step(state, data) -> (state, metrics)`: pure; jitted once with the state donated.
  `tx`: the optimizer the state was made with (`kind.make_optimizer(config)`, built if None).

  Loss: mean_i w_i CE(z_i + tau log pi, y_i), with pi the class prior of the batches
  (`prior_counts`) when head.loss is logit_adjusted (tau = 0 otherwise), w_i the example weights
  (synth.weight on the synthetic slots). With `max_norm` (`kind.max_norm`: weight balancing),
  every max_norm.every-th step and the last (head.steps) end with MaxNorm's projection of the
  kernel's class columns onto the ball of radius max_norm.radius (`kind.project_max_norm`).
  """
  h = config.head
  made_tx, schedule = kind.make_optimizer(config)
  tx = made_tx if tx is None else tx
  train_key = kind.rng_streams(config.seed).train
  offset = (h.tau * jnp.asarray(losses.log_prior(prior_counts)) if h.loss == "logit_adjusted"
            else jnp.zeros((len(prior_counts),), jnp.float32))

  def train_step(state: HeadState, data: dict):
    chex.assert_rank([data["features"], data["labels"]], [2, 1])  # Features [N, D], labels [N].
    chex.assert_type([data["features"], data["labels"]], [jnp.float32, jnp.int32])
    step = state.step
    features, labels, weights = make_batch(config, data, jax.random.fold_in(train_key, step), step,
                                           synthesize)

    def objective(params):
      logits = kind.apply_head(params, features)
      per_example = losses.cross_entropy(logits + offset, labels)
      return jnp.mean(weights * per_example), logits

    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if max_norm is not None:
      due = ((step + 1) % max_norm.every == 0) | (step + 1 == h.steps)
      projected = kind.project_max_norm(params, max_norm.radius)
      params = jax.tree.map(lambda a, b: jnp.where(due, a, b), projected, params)
    new_state = state.replace(step=step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss, "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "lr": schedule(step), "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  if not jit:
    return train_step
  return parallel.jit_once(train_step, donate_argnums=0)


# =================================================================================================
# Validation
# =================================================================================================
def validate(config, head: dict, val, train_counts) -> tuple[dict, dict]:
  """(the BEST_METRICS that select heads, the full summary) of `head` on the validation features:
  one set's metrics, or for a joint run the mean over its member datasets (and each one's).
  `config`: the source run's (evaluate_params reads its eval.tta, reported only)."""
  head = jax.device_get(head)
  results = [evaluate_lib.evaluate_params(config, None, ds, train_counts=train_counts,
                                          logits=np.asarray(kind.apply_head(head, features)))
             for ds, features in val]
  if len(results) == 1:
    return {k: results[0][k] for k in kind.BEST_METRICS}, results[0]
  metrics = {k: float(np.mean([r[k] for r in results])) for k in kind.BEST_METRICS}
  for (ds, _), r in zip(val, results):
    metrics.update({f"{ds.name}_{k}": r[k] for k in kind.BEST_METRICS})
  return metrics, {**metrics, "per_dataset": {ds.name: r for (ds, _), r in zip(val, results)}}


# =================================================================================================
# The stage
# =================================================================================================
def retrain_head(config, workdir, out, *, stop_after: int | None = None) -> dict:
  """Trains a new head on the frozen backbone of the classifier run in `workdir` and writes the
  new run to `out` (see the module docstring); returns head.json's content. `stop_after` trains
  only that many steps (the stage has no resume points: it is short, and written whole)."""
  kind.validate_config(config)
  out = check_out(out)
  # The new run may not live inside a run it reads (a later extension or cleanup of that run
  # would find a foreign folder in it, or remove the new run with it).
  writing.refuse_clobbering(out, input_dirs=[workdir, config.synth.vaegan_workdir],
                            what="--out", folder=True)
  run = runs.open_classifier(workdir, str(config.source.checkpoint))
  if run.config.model.get("head", "linear") != "linear":  # NormedLinear: no bias, scaled cosines.
    raise UserError(f"--workdir {workdir}: its model.head is {run.config.model.head!r}: "
                    f"retrain-head re-trains a linear head (kernel and bias) only")
  try:
    with writing.staged_folder(out, "--out") as staging:
      result = _retrain(config, run, staging, stop_after)
      result["workdir"] = str(out)
      writing.write_atomic(staging / "head.json", json.dumps(result, indent=2) + "\n")
  except Exception as e:  # Orbax and tensorstore wrap the OSError in their own types.
    code = writing.os_errno(e)
    if isinstance(e, UserError) or code not in workdir_lib.DISK_ERRNOS:
      raise
    raise UserError(f"--out {out}: cannot write ({os.strerror(code)}); nothing was written: "
                    "free space and run the same command again") from None
  return result


def check_out(out) -> pathlib.Path:
  """`--out` as a Path: a new folder that can be created (refused in one line otherwise)."""
  out = workdir_lib.check_writable(out, "--out")
  if out.exists():
    raise UserError(f"--out {out}: already exists: expected a new folder (the retrained run is "
                    "written there; nothing is overwritten)")
  return out


def _retrain(config, run, staging: pathlib.Path, stop_after) -> dict:
  h, s = config.head, config.synth
  streams = kind.rng_streams(config.seed)

  # --- Data, the batch plan, features ----------------------------------------------------------
  train_ds, val_sets, val_split = load_data(run)
  num_classes = len(run.class_names)
  train_counts = train_ds.class_counts()
  feature_plan = feature_synthesis.plan_for(config, train_counts)  # A plan with no slot: one line.
  vaegan = open_vaegan(config) if s.mode == "pixel" else None  # Refused before any work.
  pool, pool_labels, val = load_features(config, run, train_ds, val_sets)
  source_head = jax.device_get(run.variables["params"]["head"])
  before, _ = validate(run.config, source_head, val, train_counts)

  # --- Feature VAE and the synthesis stage (feature mode) ----------------------------------------
  data = {"features": jnp.asarray(pool), "labels": jnp.asarray(pool_labels),
          "class_index": pipeline.class_index(jnp.asarray(pool_labels), num_classes)}
  synthesize, vae = None, None
  if s.mode == "feature":
    vae = feature_synthesis.train_vae(data["features"], init_key=streams.vae_init,
                                 train_key=streams.vae_train,
                                 latent_dim=s.vae.latent_dim, hidden=s.vae.hidden,
                                 steps=s.vae.steps, lr=s.vae.lr, batch_size=s.vae.batch_size,
                                 beta=s.vae.kl_weight)
    data["synthesis"] = feature_synthesis.stage_data(vae, feature_plan, s.perturb, data["features"],
                                                pool_labels, num_classes)
    synthesize = feature_synthesis.make_synthesize(
        vae.model, feature_plan.num_synthetic, mode=s.perturb, alpha=float(s.alpha),
        residual=s.decode == "residual", weight=float(s.weight))

  # --- Synthetic faces and their features (pixel mode) -------------------------------------------
  faces = None
  if s.mode == "pixel":
    faces = feature_synthesis.synthetic_pool(config, run, vaegan, train_ds, feature_plan)
    data["synthesis"] = feature_synthesis.pool_stage_data(feature_plan, faces, num_classes)
    synthesize = feature_synthesis.make_pool_synthesize(feature_plan.num_synthetic,
                                                        weight=float(s.weight))

  # --- Loop -------------------------------------------------------------------------------------
  tx, _ = kind.make_optimizer(config)
  state = kind.init_state(config, source_head, tx)
  max_norm = kind.max_norm(config, state.params, len(train_ds))
  train_step = make_train_step(config, feature_plan.prior_counts, synthesize=synthesize, tx=tx,
                               max_norm=max_norm)
  best, last = None, None  # (step, head, metrics, summary)

  def validate_head(state):
    nonlocal best, last
    head = jax.device_get(state.params)
    val_metrics, summary = validate(run.config, head, val, train_counts)
    last = (int(state.step), head, val_metrics, summary)
    if best is None or val_metrics[h.best_metric] > best[2][h.best_metric]:
      best = last
    return val_metrics

  # No resume points: the stage is short and its output is written whole at the end.
  num_steps = h.steps if stop_after is None else min(h.steps, stop_after)
  loop.run(lambda state: train_step(state, data), state,
           schedule=loop.Schedule(num_steps, h.eval_every, h.eval_every, None),
           workdir=staging, is_main=True, checkpoints=None, images_per_step=h.batch_size,
           validate=validate_head, first_val=before, desc="head",
           curves=(CURVE_KEYS, f"retrain-head {run.workdir.name}"))

  # --- The new workdir --------------------------------------------------------------------------
  meta = {"class_names": list(run.class_names), "train_counts": train_counts.tolist(),
          "prior_counts": feature_plan.prior_counts.tolist(), "val_split": val_split,
          "source": {"workdir": str(run.workdir.absolute()), "checkpoint": str(
              config.source.checkpoint), "step": run.step}}
  kind.write_classifier_run(staging, run, best, last, meta, best_metric=h.best_metric)
  result = {
      "stage": kind.KIND, "config": configs.to_dict(config),
      "source": meta["source"], "val_split": val_split,
      "pool": {"train_examples": len(train_ds), "features": int(pool.shape[0]),
               "dim": int(pool.shape[1]), "flip": bool(h.flip)},
      "plan": feature_plan.report(run.class_names),
      "before": before, "best_step": best[0], "best": best[2], "last_step": last[0],
      "last": last[2],
      "best_per_class_recall": {n: v["recall"] for n, v in best[3].get("per_class", {}).items()},
  }
  if max_norm is not None:  # Weight balancing: the radius used and the projection interval.
    result["max_norm"] = max_norm._asdict()
  if vae is not None:
    result["vae"] = {"first_loss": vae.first_loss, "final_loss": vae.final_loss,
                     "curve": vae.curve}
    result["neighbours"] = save_neighbours(config, vae, data, feature_plan, pool, pool_labels,
                                           train_ds, staging)
  if faces is not None:
    m = len(faces["face_labels"])
    intended = np.argmax(np.asarray(kind.apply_head(source_head, faces["features"][:m])), -1)
    result["pixel"] = {
        "vaegan_workdir": str(pathlib.Path(s.vaegan_workdir).absolute()),
        "vaegan_checkpoint": str(s.vaegan_checkpoint), "vaegan_step": vaegan.step,
        "vaegan_format": [vaegan.model.image_size, vaegan.model.channels],
        "faces_per_class": {run.class_names[k]: int(c) for k, c in zip(
            *np.unique(faces["face_labels"], return_counts=True))},
        "features": int(faces["features"].shape[0]),
        # How often the source head already assigns a synthetic face its intended class.
        "source_head_accuracy": float(np.mean(intended == faces["face_labels"])),
        "png": save_faces(faces, run.class_names, staging)}
  return result


CURVE_KEYS = ("loss", "train_accuracy", "lr", "val_accuracy", "val_mean_class_accuracy",
              "val_macro_f1")


# =================================================================================================
# Pictures: what was synthesized
# =================================================================================================
def save_neighbours(config, vae, data: dict, feature_plan, pool, pool_labels, train_ds,
                    folder: pathlib.Path) -> dict:
  """synthetic_neighbours.png: for each synthesized class a row of NEIGHBOURS_PER_CLASS pairs
  (the seed image of a synthetic feature, then the train image whose feature is nearest to that
  synthetic feature); returns how often that nearest feature has the planned class and comes
  from the seed image itself (or its mirror)."""
  s = config.synth
  classes = np.flatnonzero(feature_plan.synth_probs > 0)
  fake, wanted, seed_idx = feature_synthesis.synthesize_per_class(
      vae.model, data["synthesis"], data["features"], data["class_index"], classes,
      NEIGHBOURS_PER_CLASS,
      kind.rng_streams(config.seed).report, mode=s.perturb, alpha=float(s.alpha),
      residual=s.decode == "residual")
  near = feature_synthesis.nearest(fake, pool, vae.variables["stats"])
  n = len(train_ds)

  def images_of(pool_idx):
    images = np.asarray(train_ds.images[pool_idx % n])
    return np.where((pool_idx >= n)[:, None, None, None], images[:, :, ::-1, :], images)

  grid, grid_labels = [], []
  for row, k in enumerate(classes):
    members = np.flatnonzero(wanted == k)
    pairs = np.stack([seed_idx[members], near[members]], axis=1).reshape(-1)
    grid.append(images_of(pairs))
    grid_labels += [np.full(2 * len(members), row)]
  plots.save_class_grid(np.concatenate(grid), np.concatenate(grid_labels),
                        [train_ds.class_names[k] for k in classes],
                        folder / "synthetic_neighbours.png", per_class=2 * NEIGHBOURS_PER_CLASS)
  return {"png": "synthetic_neighbours.png", "per_class": NEIGHBOURS_PER_CLASS,
          "layout": "a row per synthesized class of (seed image, train image whose feature is "
                    "nearest to the seed's synthetic feature) pairs",
          "nearest_same_class": float(np.mean(pool_labels[near] == wanted)),
          "nearest_is_seed": float(np.mean(near % n == seed_idx % n))}


def save_faces(pool: dict, class_names, folder: pathlib.Path) -> str:
  """synthetic_faces.png: a row per synthesized class, FACES_PER_ROW real seeds then the faces
  made from them; returns the file's name."""
  classes = np.unique(pool["face_labels"])
  rows = np.searchsorted(classes, pool["face_labels"])
  plots.save_seed_grid(folder / "synthetic_faces.png",
                       synthesis.seeds_like(pool["seeds"], pool["faces"]), pool["faces"], rows,
                       [class_names[k] for k in classes], per_row=FACES_PER_ROW)
  return "synthetic_faces.png"


# =================================================================================================
# The command
# =================================================================================================
def cli_main(args) -> int:
  """`ferjax retrain-head --workdir RUN --out NEWRUN [--config FILE] [--config.field=value ...]`."""
  overrides = getattr(args, "overrides", None) or ()
  if getattr(args, "config", None):
    config = configs.load_config(args.config, overrides)
  else:
    config = kind.default_config()
    configs.apply_overrides(config, overrides)
  result = retrain_head(config, args.workdir, args.out)
  metric = config.head.best_metric
  print(f"retrained the head of {args.workdir} ({config.head.steps} steps, synth "
        f"{config.synth.mode}): validation {metric} {result['before'][metric]:.4f} -> "
        f"{result['best'][metric]:.4f} (step {result['best_step']}) in {result['workdir']} "
        f"(evaluate with: ferjax evaluate --workdir {result['workdir']} --split test)")
  return 0
