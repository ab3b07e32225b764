"""Classifier trainer: ResNet on a device-resident dataset, with every long-tail baseline a switch.

    ferjax train --config experiments/configs/classifier_synthetic_tiny.py --workdir runs/tiny

One readable file, top to bottom: config defaults and validation, data, model and optimizer,
the batch (sampling -> gather -> [synthesis] -> augmentation), the pure train step, the loop.

The train set lives on the devices as uint8 (split by rows over them, see ferjax.train.parallel);
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

Workdir: config.json, metrics.jsonl, checkpoints/, curves.png. Training again in a workdir that
has checkpoints resumes from the latest one.
"""

import json
import pathlib
import sys
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ferjax import configs, losses, plots
from ferjax import data as fer_data
from ferjax import evaluate as evaluate_lib
from ferjax.configs import check
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.models import resnet
from ferjax.train import checkpoint as checkpoint_lib
from ferjax.train import monitor, parallel

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
BEST_METRICS = ("mean_class_accuracy", "accuracy", "macro_f1")


# =================================================================================================
# Config: defaults and validation
# =================================================================================================
def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults; experiment configs start from this."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameters, sampling, augmentation and the validation hold-out.

  config.data = ml_collections.ConfigDict(dict(
      name="synthetic",         # synthetic | fer2013 | ferplus | rafdb | affectnet | ckplus
      image_size=48,            # pixels (square); images are resized on load when needed
      channels=1,               # 1 (gray) or 3 (RGB)
      val_split="validation",   # named split for checkpoint selection; None: hold out of train
      val_fraction=0.1,         # stratified fraction of train held out when val_split is None
      data_dir=None,            # prepared datasets (default $FERJAX_DATA_DIR or ~/.ferjax/datasets)
      manual_dir=None,          # raw files, to prepare a real dataset on first use
      num_examples=None,        # synthetic only: train size (None: the dataset's default)
      imbalance_ratio=None,     # geometric train profile, max/min count (None: as it comes):
                                # synthetic draws it; real sets keep a fixed random subset
                                # (FER-2013-LT etc., see ferjax.data.dataset.long_tail_subset)
      label_noise=None,         # synthetic only: fraction of flipped train labels
  ))
  config.model = ml_collections.ConfigDict(dict(
      name="resnet18",          # resnet10 | resnet18 | resnet34 | resnet50
      stem="small",             # small (3x3/1, no pool; 32-64 px) | standard (7x7/2 + pool)
      width=1.0,                # channel multiplier (0.25: 16-32-64-128)
      cbam=False,               # CBAM attention in every block
      input_norm="none",        # none | per_image (standardise each image: removes lighting)
      dtype="float32",          # compute dtype: float32 | bfloat16 (parameters stay float32)
  ))
  config.optim = ml_collections.ConfigDict(dict(
      name="sgd",               # sgd | adamw
      lr=0.1,                   # peak learning rate
      momentum=0.9,             # sgd
      nesterov=True,            # sgd
      b1=0.9, b2=0.999,         # adamw
      weight_decay=5e-4,        # on conv and dense kernels only (not BatchNorm, not biases)
      schedule="cosine",        # cosine (to 0 at num_steps) | constant, after linear warm-up
      warmup_steps=0,
      ema_decay=0.0,            # > 0 keeps an EMA of the weights, used for validation and eval
  ))
  config.loss = ml_collections.ConfigDict(dict(
      name="ce",                # ce | focal | ldam | balanced_softmax | logit_adjusted
      label_smoothing=0.0,
      class_weights="none",     # none | inverse | effective (Cui et al. 2019)
      beta=0.9999,              # effective-number beta
      drw_start_step=None,      # class weights only from this step on (DRW); None: from step 0
      focal_gamma=2.0,
      ldam_max_margin=0.5,      # margin of the rarest class, in logit units
      ldam_scale=1.0,           # s in CE(s * (z - m)); our linear head needs no rescaling
      tau=1.0,                  # logit_adjusted
  ))
  config.sampler = ml_collections.ConfigDict(dict(
      name="instance",          # instance | class_balanced | sqrt | progressive | oversample
  ))
  config.augment = ml_collections.ConfigDict(dict(
      crop="pad",               # none | pad (random crop of the reflect-padded image) | resized
      crop_padding=4,
      resized_crop_scale=(0.6, 1.0),  # area fraction of random-resized crops (our choice for faces)
      flip=True,
      rotation_deg=0.0,         # max rotation, degrees (0: off)
      erasing_prob=0.0,         # random erasing probability (0: off)
      mixup_alpha=0.0,          # Beta(alpha, alpha) mixup (0: off)
      # Semantic augmentation (ferjax.augment.synthesis), on when vaegan_workdir is set: each
      # batch gets synthesized minority-class faces from a trained, frozen VAE-GAN.
      vaegan_workdir="",        # a `ferjax train-vaegan` workdir ("": off)
      vaegan_checkpoint="best",
      mode="posterior",         # posterior | interpolate | class_gaussian (latent perturbation)
      alpha=1.0,                # perturbation scale
      target="largest",         # rebalanced class counts: uniform | sqrt | largest | explicit
      fill=1.0,                 # share of each class's gap filled with synthesized faces
      target_counts=None,       # per-class counts when target == explicit
      synthetic_weight=1.0,     # loss weight of a synthesized example
      decode="full",            # full: G(z') (the paper) | residual: seed + G(z') - G(mu) (ours)
      start_step=0,             # synthesis from this train step on (0: always; ours, as DRW)
      filter_workdir="",        # a classifier workdir whose confidence filters samples ("": off)
      filter_threshold=0.5,
      filtered_weight=0.0,      # loss weight of a filtered-out sample
  ))
  config.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      batch_size=64,            # global batch; a multiple of the device count
      num_devices=None,         # None: all devices
      log_every=50,
      eval_every=200,           # validation; a new best is saved
      checkpoint_every=200,     # resume points (validation steps save only a new best)
      keep_checkpoints=2,
      best_metric="mean_class_accuracy",  # on validation: mean_class_accuracy | accuracy | macro_f1
  ))
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=256,
      tta="none",               # none | flip (averages the logits of the image and its mirror)
  ))
  return config


def validate_config(config) -> None:
  """Checks ranges and names before anything compiles; a UserError names the bad field."""
  d, m, o, l, s, a, t = (config.data, config.model, config.optim, config.loss, config.sampler,
                         config.augment, config.train)
  check(isinstance(config.seed, int) and config.seed >= 0, "seed", "an integer >= 0", config.seed)
  check(d.name in fer_data.DATASET_NAMES, "data.name", f"one of {fer_data.DATASET_NAMES}", d.name)
  check(isinstance(d.image_size, int) and 16 <= d.image_size <= 1024, "data.image_size",
        "16..1024 pixels", d.image_size)
  check(d.channels in (1, 3), "data.channels", "1 or 3", d.channels)
  check(d.val_split != "test", "data.val_split",
        "a validation split or None (hold out of train): checkpoints are never chosen on test",
        d.val_split)
  check(d.val_split is None or isinstance(d.val_split, str), "data.val_split",
        "a split name or None", d.val_split)
  check(0 < d.val_fraction < 1, "data.val_fraction", "a fraction in (0, 1)", d.val_fraction)
  check(d.imbalance_ratio is None or (isinstance(d.imbalance_ratio, (int, float))
                                      and d.imbalance_ratio >= 1), "data.imbalance_ratio",
        "None or a number >= 1 (largest / smallest class)", d.imbalance_ratio)

  check(m.name in resnet.MODEL_NAMES, "model.name", f"one of {resnet.MODEL_NAMES}", m.name)
  check(m.stem in resnet.STEMS, "model.stem", f"one of {resnet.STEMS}", m.stem)
  check(0 < m.width <= 8, "model.width", "a multiplier in (0, 8]", m.width)
  check(m.input_norm in resnet.INPUT_NORMS, "model.input_norm", f"one of {resnet.INPUT_NORMS}",
        m.input_norm)
  check(m.dtype in resnet.DTYPES, "model.dtype", f"one of {tuple(resnet.DTYPES)}", m.dtype)
  smallest = resnet.smallest_feature_map(d.image_size, m.stem)
  check(smallest >= 1, "data.image_size", f"large enough for the {m.stem} stem", d.image_size)
  if smallest < 3:  # Legal, but XLA on CPU is ~100x slower on such maps: say so once.
    print(f"ferjax: warning: model.stem={m.stem} at {d.image_size} px ends on a "
          f"{smallest}x{smallest} map (very slow on CPU); consider model.stem=small", file=sys.stderr)

  check(o.name in OPTIMIZERS, "optim.name", f"one of {OPTIMIZERS}", o.name)
  check(o.lr > 0, "optim.lr", "a positive number", o.lr)
  check(0 <= o.momentum < 1, "optim.momentum", "a value in [0, 1)", o.momentum)
  check(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
  check(o.schedule in SCHEDULES, "optim.schedule", f"one of {SCHEDULES}", o.schedule)
  check(0 <= o.warmup_steps < t.num_steps, "optim.warmup_steps",
        f"0 <= warmup_steps < train.num_steps ({t.num_steps})", o.warmup_steps)
  check(0 <= o.ema_decay < 1, "optim.ema_decay", "a value in [0, 1) (0: off)", o.ema_decay)

  check(l.name in losses.LOSS_NAMES, "loss.name", f"one of {losses.LOSS_NAMES}", l.name)
  check(0 <= l.label_smoothing < 1, "loss.label_smoothing", "a value in [0, 1)", l.label_smoothing)
  check(l.class_weights in losses.CLASS_WEIGHTS, "loss.class_weights",
        f"one of {losses.CLASS_WEIGHTS}", l.class_weights)
  check(0 < l.beta < 1, "loss.beta", "a value in (0, 1)", l.beta)
  check(l.drw_start_step is None or (isinstance(l.drw_start_step, int) and l.drw_start_step >= 0),
        "loss.drw_start_step", "None or a step >= 0", l.drw_start_step)
  check(l.drw_start_step is None or l.class_weights != "none", "loss.class_weights",
        "inverse or effective when loss.drw_start_step is set (DRW defers class weights)",
        l.class_weights)
  check(l.focal_gamma >= 0, "loss.focal_gamma", "a number >= 0", l.focal_gamma)
  check(l.ldam_max_margin >= 0, "loss.ldam_max_margin", "a number >= 0", l.ldam_max_margin)
  check(l.ldam_scale > 0, "loss.ldam_scale", "a positive number", l.ldam_scale)

  check(s.name in pipeline.SAMPLERS, "sampler.name", f"one of {pipeline.SAMPLERS}", s.name)
  check(a.crop in pipeline.CROPS, "augment.crop", f"one of {pipeline.CROPS}", a.crop)
  check(0 <= a.crop_padding <= d.image_size, "augment.crop_padding", "0..image_size pixels",
        a.crop_padding)
  lo, hi = tuple(a.resized_crop_scale)
  check(0 < lo <= hi <= 1, "augment.resized_crop_scale", "(low, high) with 0 < low <= high <= 1",
        a.resized_crop_scale)
  check(0 <= a.rotation_deg <= 180, "augment.rotation_deg", "0..180 degrees", a.rotation_deg)
  check(0 <= a.erasing_prob <= 1, "augment.erasing_prob", "a probability", a.erasing_prob)
  check(a.mixup_alpha >= 0, "augment.mixup_alpha", "a number >= 0 (0: off)", a.mixup_alpha)

  check(isinstance(t.num_steps, int) and t.num_steps > 0, "train.num_steps", "a positive integer",
        t.num_steps)
  available = jax.device_count()
  check(t.num_devices is None or 1 <= t.num_devices <= available, "train.num_devices",
        f"None or 1..{available} (devices available)", t.num_devices)
  num_devices = t.num_devices or available
  check(t.batch_size > 0 and t.batch_size % num_devices == 0, "train.batch_size",
        f"a positive multiple of the device count ({num_devices})", t.batch_size)
  for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    check(t[field] > 0, f"train.{field}", "a positive integer", t[field])
  check(t.best_metric in BEST_METRICS, "train.best_metric", f"one of {BEST_METRICS}",
        t.best_metric)
  check(config.eval.batch_size > 0, "eval.batch_size", "a positive integer", config.eval.batch_size)
  check(config.eval.tta in evaluate_lib.TTA_MODES, "eval.tta", f"one of {evaluate_lib.TTA_MODES}",
        config.eval.tta)


# =================================================================================================
# Data: train and validation splits on the host, then the train set on the device
# =================================================================================================
def load_dataset(config, split: str) -> fer_data.Dataset:
  """One split of config.data, converted to data.image_size x data.channels."""
  d = config.data
  options = {}
  if d.name == "synthetic" and split == "train":
    options = {k: d[k] for k in ("num_examples", "imbalance_ratio", "label_noise")
               if d[k] is not None}
  ds = fer_data.load(d.name, split, data_dir=d.data_dir, manual_dir=d.manual_dir,
                     image_size=d.image_size, channels=d.channels,
                     lazy=parallel.lazy_train_reads(split == "train"), **options)
  if d.name != "synthetic" and split == "train" and d.imbalance_ratio is not None:
    keep = fer_data.dataset.long_tail_subset(ds.labels, ds.num_classes, d.imbalance_ratio)
    ds = fer_data.Dataset(ds.images[keep], ds.labels[keep], ds.class_names, ds.name,
                          f"train-lt{d.imbalance_ratio:g}")
  return ds


def stratified_holdout(labels, fraction: float, seed: int):
  """(train indices, held-out indices): round(fraction * n_k) of each class held out (classes
  with at least 2 examples keep one on each side)."""
  rng = np.random.default_rng([seed, 7])  # Its own stream: independent of training randomness.
  train_idx, held_idx = [], []
  for k in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == k))
    n_held = int(round(fraction * len(members)))
    if len(members) >= 2:
      n_held = min(max(n_held, 1), len(members) - 1)
    else:
      n_held = 0
    held_idx.append(members[:n_held])
    train_idx.append(members[n_held:])
  return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(held_idx))


def load_splits(config):
  """(train, validation) Datasets: the named val split, or a stratified hold-out of train."""
  train = load_dataset(config, "train")
  if config.data.val_split is not None:
    return train, load_dataset(config, config.data.val_split)
  train_idx, held_idx = stratified_holdout(train.labels, config.data.val_fraction, config.seed)
  held = fer_data.Dataset(np.asarray(train.images[held_idx]), train.labels[held_idx],
                          train.class_names, train.name, "train-holdout")  # Read once, in memory.
  return (fer_data.Dataset(train.images[train_idx], train.labels[train_idx], train.class_names,
                           train.name, "train"), held)


def device_data(config, images, labels, num_classes: int, mesh) -> dict:
  """The train set on the device: images split by rows over the mesh (`parallel.put_rows`),
  labels and the class index the samplers draw from replicated (indices stay below N)."""
  labels = np.asarray(labels, np.int32)
  order, offsets, counts = pipeline.class_index(jnp.asarray(labels), num_classes)
  data = {"labels": labels, "class_index": (order, offsets, counts)}
  if config.sampler.name == "oversample":
    data["oversampled"] = pipeline.oversampled_order(labels, num_classes, config.seed)
  data = parallel.put_replicated(data, mesh)
  if not isinstance(images, fer_data.dataset.LazyImages):  # Lazy ones are read in chunks.
    images = np.asarray(images, np.uint8)
  data["images"] = parallel.put_rows(images, mesh)
  return data


# =================================================================================================
# Model, optimizer, train state
# =================================================================================================
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None       # None unless optim.ema_decay > 0
  ema_batch_stats: Any = None


def make_optimizer(config, num_steps: int):
  """(optax transform, learning-rate schedule): SGD (Nesterov) or AdamW, warm-up + cosine."""
  o = config.optim
  if o.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, num_steps, 0.0)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
        [o.warmup_steps])
  # Decay conv and dense kernels only; BatchNorm scales and biases are left alone (our choice).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if o.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask),
                     optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  else:
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
  return tx, schedule


def _keys(seed: int):
  """(init, train, epoch) keys: parameters; per-step randomness; over-sampling epoch order.

  Parameters are drawn with the `rbg` generator: its XLA program compiles ~4x faster on CPU
  than threefry's (10 s -> 2.5 s for a ResNet). Everything per step keeps threefry, whose values
  do not depend on how the batch is sharded (1 and 8 devices agree).
  """
  base = jax.random.key(seed)
  init_key = jax.random.key(seed, impl="rbg")
  return init_key, jax.random.fold_in(base, 1), jax.random.fold_in(base, 2)


def _init_fn(config, model, tx):
  def init():
    init_key, _, _ = _keys(config.seed)
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    variables = model.init(init_key, jnp.zeros(shape, jnp.float32), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    ema = config.optim.ema_decay > 0
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema_params=params if ema else None,
                      ema_batch_stats=batch_stats if ema else None)
  return init


def init_state(config, model, tx, mesh) -> TrainState:
  """Parameters created inside jit, directly replicated over the mesh."""
  return jax.jit(_init_fn(config, model, tx), out_shardings=parallel.replicated(mesh))()


def abstract_state(config, model, mesh, tx=None) -> TrainState:
  """Shapes, dtypes and shardings of the train state, without computing it (for restoring)."""
  tx = tx or make_optimizer(config, config.train.num_steps)[0]
  shapes = jax.eval_shape(_init_fn(config, model, tx))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def eval_variables(state: TrainState) -> dict:
  """The weights to evaluate: the EMA copy when the run keeps one."""
  if state.ema_params is not None:
    return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  return {"params": state.params, "batch_stats": state.batch_stats}


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
                mesh=None):
  """Returns `make_batch(key, step) -> (images, labels, example_weights)` over `data`.

  Call inside the jitted step (data holds its traced device arrays). Stages:
    1. indices of the batch by the balancing policy (config.sampler.name);
    2. gather the uint8 images and their labels, convert to float in [-1, 1];
    3. synthesis, when given (see `Synthesize` above);
    4. per-example augmentation (config.augment: crop, flip, rotation, erasing).
  Mixup, which mixes pairs across the batch, is applied by the train step afterwards.
  """
  batch_size = config.train.batch_size
  _, _, epoch_key = _keys(config.seed)
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
    images = pipeline.augment_batch(augment_key, images, config.augment)
    return constrain(images), constrain(labels), constrain(weights)

  return make_batch


# =================================================================================================
# The train step
# =================================================================================================
def make_train_step(config, model, tx, class_counts, num_steps: int, mesh, *,
                    synthesize: Synthesize | None = None, jit: bool = True):
  """`train_step(state, data) -> (state, metrics)`: pure; jitted with the state donated.

  The loss is mean_i w_i * [lam_i L(x_i, y_i) + (1 - lam_i) L(x_i, y'_i)]: per-example losses
  (with their class weights, see ferjax.losses), times the batch's example weights, with mixup
  partners y' when mixup is on (lam = 1 otherwise).
  """
  loss_fn = losses.make_loss(config.loss, class_counts)
  _, schedule = make_optimizer(config, num_steps)
  _, train_key, _ = _keys(config.seed)
  ema_decay = config.optim.ema_decay
  mixup_alpha = config.augment.mixup_alpha

  def train_step(state: TrainState, data: dict):
    step = state.step
    batch_key, mixup_key = jax.random.split(jax.random.fold_in(train_key, step))
    make_batch = batch_maker(config, data, num_steps=num_steps, synthesize=synthesize, mesh=mesh)
    images, labels, example_weights = make_batch(batch_key, step)
    if mixup_alpha > 0:
      images, partner_labels, lam = pipeline.mixup(mixup_key, images, labels, mixup_alpha)
    else:
      partner_labels, lam = labels, jnp.ones_like(example_weights)

    def objective(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      (logits, _), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
      per_example = (lam * loss_fn(logits, labels, step)
                     + (1.0 - lam) * loss_fn(logits, partner_labels, step))
      return jnp.mean(example_weights * per_example), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
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
    }
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0) if jit else train_step


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
  from ferjax.augment import synthesis as synthesis_lib  # Lazy: it imports the VAE-GAN trainer.
  validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = parallel.is_main_process()  # With several processes, only process 0 writes files.
  if is_main:
    configs.save_config(config, workdir / "config.json")
  t = config.train
  num_steps = t.num_steps
  mesh = parallel.make_mesh(t.num_devices)

  # --- Data ---------------------------------------------------------------------------------
  train_ds, val_ds = datasets or load_splits(config)
  num_classes = len(train_ds.class_names)
  if tuple(val_ds.class_names) != tuple(train_ds.class_names):
    raise UserError(f"data.val_split {config.data.val_split!r}: its classes {val_ds.class_names} "
                    f"differ from train's {train_ds.class_names}")
  train_counts = train_ds.class_counts()
  if config.sampler.name == "oversample" and t.batch_size > num_classes * train_counts.max():
    raise UserError(f"config field 'train.batch_size': expected at most the over-sampled train "
                    f"size ({num_classes * train_counts.max()}), got {t.batch_size}")
  data = device_data(config, train_ds.images, train_ds.labels, num_classes, mesh)
  # The class prior the model is trained under: prior-based losses (logit adjustment, balanced
  # softmax, LDAM, class weights) and post-hoc adjustment use it. With semantic augmentation
  # the batches follow the rebalanced distribution, not the real counts.
  prior_counts = train_counts.astype(np.float64)
  if synthesize is None and synthesis_lib.enabled(config):
    stage = synthesis_lib.build(config, train_ds.images, train_ds.labels, num_classes)
    synthesize, synthesis_data = stage.synthesize, stage.data
    prior_counts = stage.plan.real_counts + stage.plan.synthetic_counts
  if synthesis_data is not None:
    data["synthesis"] = parallel.put_replicated(synthesis_data, mesh)
  meta = {"train_counts": train_counts.tolist(), "prior_counts": prior_counts.tolist(),
          "class_names": list(train_ds.class_names), "val_split": val_ds.split}

  # --- Model, optimizer, state (restored when the workdir has a checkpoint) ------------------
  model = resnet.model_from_config(config.model, num_classes)
  tx, _ = make_optimizer(config, num_steps)
  state = init_state(config, model, tx, mesh)
  ckpt = checkpoint_lib.Checkpoints(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                    best_metric=t.best_metric)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state, "latest")
    if is_main:
      _drop_metrics_after(workdir, int(state.step))  # Steps past the checkpoint are replayed.
  train_step = make_train_step(config, model, tx, prior_counts, num_steps, mesh,
                               synthesize=synthesize)

  def validate(state):
    result = evaluate_lib.evaluate_params(config, eval_variables(state), val_ds,
                                          train_counts=train_counts, mesh=mesh, model=model)
    return {k: result[k] for k in BEST_METRICS}, result

  # --- Loop -----------------------------------------------------------------------------------
  writer = monitor.MetricWriter(workdir)
  step = int(state.step)
  last_step = num_steps if stop_after is None else min(num_steps, stop_after)
  summary = {}
  throughput, steps_since_tick = monitor.Throughput(), 0
  with monitor.progress(total=num_steps, initial=step) as bar:
    while step < last_step:
      state, metrics = train_step(state, data)
      step += 1
      steps_since_tick += 1
      bar.update(1)
      is_eval = step % t.eval_every == 0 or step == num_steps
      # Resume points only every checkpoint_every steps: a validation step saves just a new best
      # (a save per epoch doubled the FER-2013 recipe's wall time on an H200).
      is_save = step % t.checkpoint_every == 0 or step == last_step
      if step % t.log_every == 0 or is_eval or is_save:
        metrics = jax.device_get(metrics)
        monitor.check_finite(step, metrics)  # Before any save: a NaN state is never kept.
        if is_main:
          writer.write(step, {**metrics, **throughput.tick(steps_since_tick, t.batch_size)})
        steps_since_tick = 0
      if is_eval:
        val_metrics, summary = validate(state)
        if is_main:
          writer.write(step, {f"val_{k}": v for k, v in val_metrics.items()})
        bar.write(f"step {step}: " + "  ".join(f"val {k} {v:.4f}" for k, v in val_metrics.items()))
        ckpt.save(step, state, metrics=val_metrics, extra=meta, last=is_save)
        throughput = monitor.Throughput()  # Do not count validation time as training time.
        steps_since_tick = 0
      elif is_save:
        ckpt.save(step, state, extra=meta)

  best_step = ckpt.best_step()
  best = ckpt.read_meta("best")["metrics"] if best_step is not None else {}
  ckpt.close()
  if is_main:
    records = monitor.read_metrics(workdir)
    plots.save_curves(records, ["loss", "train_accuracy", "lr", "val_accuracy",
                                "val_mean_class_accuracy", "val_macro_f1"],
                      workdir / "curves.png", title=str(workdir.name))
  return {
      "workdir": str(workdir), "step": step, "num_steps": num_steps,
      "best_step": best_step, "best_metric": t.best_metric,
      "best": best, "last": {k: summary.get(k) for k in BEST_METRICS} if summary else {},
      "last_per_class_recall": ({n: v["recall"] for n, v in summary["per_class"].items()}
                                if summary else {}),
      "train_counts": meta["train_counts"], "class_names": meta["class_names"],
      "val_split": val_ds.split,
  }


def _drop_metrics_after(workdir, step: int) -> None:
  """Keeps metrics.jsonl to the records up to `step`, so a resumed run does not log twice."""
  records = monitor.read_metrics(workdir)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) < len(records):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


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
