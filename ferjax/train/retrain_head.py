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
sweep of heads without retraining it. With `synth.mode=feature`, semantic augmentation happens in
feature space (ferjax.augment.feature_synthesis): a small VAE is trained on the train features, and the
last S slots of each batch hold synthetic minority-class features made by perturbing its
latents, where no decoder blur can reach the backbone. With `synth.mode=pixel`, the decoupled
use of pixel-space synthesis: a trained VAE-GAN (`synth.vaegan_workdir`) makes
`synth.pool_per_class` synthetic faces of each class the plan synthesizes before training
(ferjax.augment.synthesis.synthesize_per_class), the frozen backbone turns them into features
exactly as it does the real train images, and the same last S slots of each batch draw from
that pool of synthetic-face features, by class (the feature mode's plan; no feature VAE). The
faces reach the head only, never the representation. The config (defaults and rules) is
ferjax.kinds.retrain_head.

One readable file, top to bottom: the features (extracted once, eval mode; in pixel mode those
of the synthetic faces too), the batch and the pure train step `train_step(state, data) ->
(state, metrics)` (jitted once, state donated, its randomness fold_in(key(seed), step)), the loop
(validation every head.eval_every steps on the run's own validation set; the best head is kept),
and the new workdir.

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
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import configs, writing, losses, plots, runs
from ferjax import evaluate as evaluate_lib
from ferjax.augment import feature_synthesis
from ferjax.augment import synthesis
from ferjax.core import checkpoint as checkpoint_lib
from ferjax.core import monitor, parallel
from ferjax.core import workdir as workdir_lib
from ferjax.data import pipeline, splits
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import retrain_head as kind
from ferjax.kinds.retrain_head import HeadState

NEIGHBOURS_PER_CLASS = 6  # synthetic features per class in synthetic_neighbours.png
FACES_PER_ROW = 6  # (seed, synthetic face) pairs per class in synthetic_faces.png (pixel mode)


# =================================================================================================
# Features: the frozen backbone's penultimate features, extracted once
# =================================================================================================
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
  batch_size = evaluate_lib.eval_batch_size(run.config, run.mesh)
  _, features = evaluate_lib.predict_logits(
      run.model, run.variables, _Mirrored(images) if flip else images, batch_size=batch_size,
      mesh=run.mesh, return_features=True)
  return np.asarray(features, np.float32)


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
  pool = [extract_features(run, train_ds.images)]
  if config.head.flip:
    pool.append(extract_features(run, train_ds.images, flip=True))
  labels = np.tile(np.asarray(train_ds.labels, np.int32), len(pool))
  val = [(ds, extract_features(run, ds.images)) for ds in val_sets]
  return np.concatenate(pool), labels, val


# =================================================================================================
# Pixel mode: the features of synthetic faces, made once before training
# =================================================================================================
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


def synthetic_pool(config, run, vae, train_ds, feature_plan) -> dict:
  """synth.pool_per_class synthetic faces of each class the plan synthesizes, from real seeds of
  that class (ferjax.augment.synthesis.synthesize_per_class, in the classifier's image format),
  and their eval-mode features, extracted as the real pool's (`load_features`: the mirrored
  faces' too with head.flip). Returns {"faces" uint8 [M, H, W, C], "face_labels" [M], "seeds"
  (each face's real seed image) [M, H, W, C], "features" [P, D], "labels" [P]}."""
  s = config.synth
  classes = np.flatnonzero(feature_plan.synth_probs > 0)
  labels = np.asarray(train_ds.labels, np.int32)
  rows = np.flatnonzero(np.isin(labels, classes))  # Only those classes' images are read.
  images = np.asarray(train_ds.images[rows])
  faces, face_labels, seed_idx = synthesis.synthesize_per_class(
      vae, images, labels[rows], len(run.class_names), int(s.pool_per_class), mode=s.perturb,
      alpha=float(s.alpha), seed=int(config.seed), image_size=run.config.data.image_size,
      channels=run.config.data.channels, residual=s.decode == "residual")
  faces, face_labels = np.asarray(faces), np.asarray(face_labels, np.int32)
  features = [extract_features(run, faces)]
  if config.head.flip:
    features.append(extract_features(run, faces, flip=True))
  return {"faces": faces, "face_labels": face_labels, "seeds": images[np.asarray(seed_idx)],
          "features": np.concatenate(features),
          "labels": np.tile(face_labels, len(features))}


def pool_stage_data(feature_plan, pool: dict, num_classes: int) -> dict:
  """The pixel stage's device arrays (the train step's data["synthesis"]): the synthetic slots'
  class distribution and the synthetic-face features with their class index."""
  labels = jnp.asarray(pool["labels"])
  return {"synth_probs": jnp.asarray(feature_plan.synth_probs, jnp.float32),
          "features": jnp.asarray(pool["features"], jnp.float32),
          "class_index": pipeline.class_index(labels, num_classes)}


def make_pool_synthesize(num_synthetic: int, *, weight: float = 1.0):
  """The pixel stage, with the feature stage's signature (feature_synthesis.make_synthesize):
  `synthesize(key, features, labels, weights, data)` -> the same with the last `num_synthetic`
  slots overwritten, each by a uniformly drawn synthetic-face feature of a class drawn from the
  plan (data["synthesis"]: `pool_stage_data`), carrying weight `weight`."""
  def synthesize(key, features, labels, weights, data):
    aux = data["synthesis"]
    class_key, pick_key = jax.random.split(key)
    classes = jax.random.categorical(class_key, jnp.log(jnp.maximum(aux["synth_probs"], 1e-30)),
                                     shape=(num_synthetic,))
    fake = aux["features"][pipeline.sample_by_class(pick_key, aux["class_index"], classes)]
    first = features.shape[0] - num_synthetic
    return (features.at[first:].set(fake.astype(features.dtype)),
            labels.at[first:].set(classes.astype(labels.dtype)),
            weights.at[first:].set(jnp.asarray(weight, weights.dtype)))

  return synthesize


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


def make_train_step(config, prior_counts, *, synthesize=None, jit: bool = True, tx=None):
  """`train_step(state, data) -> (state, metrics)`: pure; jitted once with the state donated.
  `tx`: the optimizer the state was made with (`kind.make_optimizer(config)`, built if None).

  Loss: mean_i w_i CE(z_i + tau log pi, y_i), with pi the class prior of the batches
  (`prior_counts`) when head.loss is logit_adjusted (tau = 0 otherwise), w_i the example weights
  (synth.weight on the synthetic slots). With head.max_norm, every step ends with weight
  balancing's MaxNorm projection of the kernel's class columns (`kind.project_max_norm`).
  """
  h = config.head
  made_tx, schedule = kind.make_optimizer(config)
  tx = made_tx if tx is None else tx
  train_key = kind.rng_streams(config.seed).train
  offset = (h.tau * jnp.asarray(losses.log_prior(prior_counts)) if h.loss == "logit_adjusted"
            else jnp.zeros((len(prior_counts),), jnp.float32))

  def train_step(state: HeadState, data: dict):
    step = state.step
    features, labels, weights = make_batch(config, data, jax.random.fold_in(train_key, step), step,
                                           synthesize)

    def objective(params):
      logits = kind.apply_head(params, features)
      per_example = losses.cross_entropy(logits + offset, labels)
      return jnp.mean(weights * per_example), logits

    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = kind.project_max_norm(optax.apply_updates(state.params, updates), h.max_norm)
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
def retrain_head(config, workdir, out) -> dict:
  """Trains a new head on the frozen backbone of the classifier run in `workdir` and writes the
  new run to `out` (see the module docstring); returns head.json's content."""
  kind.validate_config(config)
  out = check_out(out)
  run = runs.open_classifier(workdir, str(config.source.checkpoint))
  if run.config.model.get("head", "linear") != "linear":  # NormedLinear: no bias, scaled cosines.
    raise UserError(f"--workdir {workdir}: its model.head is {run.config.model.head!r}: "
                    f"retrain-head re-trains a linear head (kernel and bias) only")
  try:
    with writing.staged_folder(out, "--out") as staging:
      result = _retrain(config, run, staging)
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


def _retrain(config, run, staging: pathlib.Path) -> dict:
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
    faces = synthetic_pool(config, run, vaegan, train_ds, feature_plan)
    data["synthesis"] = pool_stage_data(feature_plan, faces, num_classes)
    synthesize = make_pool_synthesize(feature_plan.num_synthetic, weight=float(s.weight))

  # --- Loop -------------------------------------------------------------------------------------
  tx, _ = kind.make_optimizer(config)
  state = kind.init_state(config, source_head, tx)
  train_step = make_train_step(config, feature_plan.prior_counts, synthesize=synthesize, tx=tx)
  writer = monitor.MetricWriter(staging)
  writer.write(0, {f"val_{k}": v for k, v in before.items()})
  logged = monitor.IntervalMetrics(h.batch_size, watch=("loss",))
  best, last = None, None  # (step, head, metrics, summary)
  with writer, monitor.progress(total=h.steps, desc="head") as bar:
    for step in range(1, h.steps + 1):
      state, metrics = train_step(state, data)
      logged.add(metrics)
      bar.update(1)
      if step % h.eval_every == 0 or step == h.steps:
        head = jax.device_get(state.params)
        val_metrics, summary = validate(run.config, head, val, train_counts)
        train_metrics = logged.flush(step)  # The NaN guard first.
        writer.write(step, {**train_metrics, **{f"val_{k}": v for k, v in val_metrics.items()}})
        bar.write(f"step {step}: " + "  ".join(f"val {k} {v:.4f}" for k, v in val_metrics.items()))
        last = (step, head, val_metrics, summary)
        if best is None or val_metrics[h.best_metric] > best[2][h.best_metric]:
          best = last
  plots.save_curves(monitor.read_metrics(staging),
                    ["loss", "train_accuracy", "lr", "val_accuracy", "val_mean_class_accuracy",
                     "val_macro_f1"], staging / "curves.png",
                    title=f"retrain-head {run.workdir.name}")

  # --- The new workdir --------------------------------------------------------------------------
  meta = {"class_names": list(run.class_names), "train_counts": train_counts.tolist(),
          "prior_counts": feature_plan.prior_counts.tolist(), "val_split": val_split,
          "source": {"workdir": str(run.workdir.absolute()), "checkpoint": str(
              config.source.checkpoint), "step": run.step}}
  write_classifier_run(staging, run, best, last, meta, best_metric=h.best_metric)
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


# =================================================================================================
# The new workdir: a classifier run with the source backbone and the new head
# =================================================================================================
def classifier_state(run, head: dict, step: int, tx) -> classifier_kind.TrainState:
  """The classifier train state of the source's evaluation weights with `head`, a fresh
  optimizer state of `tx` (the source config's optimizer), at `step`, replicated over the run's
  mesh (what open_classifier restores)."""
  variables = {"params": {**run.variables["params"], "head": jax.tree.map(jnp.asarray, head)},
               "batch_stats": run.variables["batch_stats"]}
  ema = run.config.optim.ema_decay > 0  # with_weights reads only the step and whether EMA.
  template = classifier_kind.TrainState(
      step=jnp.asarray(step, jnp.int32), params=None, batch_stats=None, opt_state=None,
      ema_params={} if ema else None, ema_batch_stats={} if ema else None)
  return classifier_kind.with_weights(template, variables, tx, run.mesh)


def write_classifier_run(folder: pathlib.Path, run, best, last, meta: dict, *,
                         best_metric: str) -> None:
  """run.json, config.json and checkpoints/ (best, then last) of the new classifier run."""
  record = {"kind": classifier_kind.KIND, "stage": kind.KIND,
            "source": meta["source"]["workdir"]}
  writing.write_atomic(folder / "run.json", json.dumps(record, indent=2) + "\n")
  configs.save_config(run.config, folder / "config.json")
  tx, _ = classifier_kind.make_optimizer(run.config)
  best_state = classifier_state(run, best[1], best[0], tx)
  last_state = best_state if last[0] == best[0] else classifier_state(run, last[1], last[0], tx)
  with checkpoint_lib.Checkpoints(folder / "checkpoints", max_to_keep=1,
                                  best_metric=best_metric) as ckpt:
    ckpt.save(best[0], best_state, metrics=best[2], extra=meta, last=False)
    ckpt.save(last[0], last_state, metrics=last[2], extra=meta)


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
