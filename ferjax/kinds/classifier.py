"""What a classifier run is: its config (defaults and rules together), model, optimizer, train
state and random streams. The trainer (ferjax.train.classifier), evaluation, benchmarks and
everything that reopens a finished run (ferjax.runs) build on this module, never on the trainer.
"""

import pathlib
import sys
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ferjax import configs, losses
from ferjax import data as fer_data
from ferjax.configs import check, checkpoint, custom, flag, integer, number, one_of, text
from ferjax.core import parallel
from ferjax.data import pipeline
from ferjax.models import resnet, vit

KIND = "classifier"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
BEST_METRICS = ("mean_class_accuracy", "accuracy", "macro_f1")
TTA_MODES = ("none", "flip")
# Losses that correct for the train class prior (margins or logit offsets from the counts).
PRIOR_LOSSES = ("logit_adjusted", "balanced_softmax", "ldam", "coupling")
EAC_FLIP_ERASING = ("same", "independent")


# =================================================================================================
# Config: every field the trainer reads, its default and what a valid value is
# =================================================================================================
def _crop_scale(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 2
          and all(configs.is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1)


SPEC = {
    "seed": integer(0, 0, doc="Seed of the parameters, batch sampling, augmentation, the "
                    "validation hold-out and the label noise."),
    "data": {
        "name": one_of("synthetic", (*fer_data.DATASET_NAMES, "joint"),
                       doc="Dataset: the generated synthetic faces, a prepared real dataset, "
                       "folder (data.manual_dir holds <split>/<class>/*.png) or joint (the "
                       "union of data.datasets)."),
        "datasets": text("", doc="With data.name=joint (and only then): the datasets trained "
                         "together in one canonical label space, each with an optional "
                         "sampling weight, e.g. `fer2013,rafdb:2,affectnet`; each is validated "
                         "on its own validation set."),
        "image_size": integer(48, 16, 1024, doc="Side of the square images in pixels; every "
                              "image is resized to it on load."),
        "channels": integer(1, 1, 3, doc="Image channels: 1 (gray) or 3 (RGB); 2 is refused."),
        "val_split": custom("validation", "a split name other than 'test' (checkpoints are never "
                            "chosen on test), or None (hold out of train)",
                            lambda v: v is None or (isinstance(v, str) and v != "test"),
                            doc="Named split on which the best checkpoint is chosen; None holds "
                            "data.val_fraction of train out instead (with data.fold: by subject)."),
        "val_fraction": number(0.1, 0, 1, lo_open=True, hi_open=True,
                               doc="Share of train held out (seeded) for validation when "
                               "data.val_split is None."),
        "data_dir": text(None, doc="Where prepared datasets live; None: $FERJAX_DATA_DIR, else "
                         "~/.ferjax/datasets."),
        "manual_dir": text(None, doc="Folder of the raw files, to prepare a real dataset on "
                           "first use; with data.name=folder, the folder dataset itself."),
        "num_examples": integer(None, 1, optional=True,
                                doc="Train size: the synthetic set's size (None: 7000), else the "
                                "first N rows of the train split (None: all)."),
        "imbalance_ratio": number(None, 1, optional=True,
                                  doc="Geometric long-tailed train profile, the largest class "
                                  "count over the smallest: the synthetic set draws it, a real "
                                  "set keeps a fixed random subset (FER-2013-LT etc.); None: "
                                  "the data as it comes."),
        "label_noise": number(None, 0, 1, hi_open=True, optional=True,
                              doc="Noisy-label protocol: this share of train labels flipped to "
                              "another class, seeded by `seed`, after the hold-out (validation "
                              "stays clean; the synthetic set flips its own, generator-seeded); "
                              "None: no noise."),
        "label_fraction": number(None, 0, 1, lo_open=True, optional=True,
                                 doc="Semi-supervised protocol: the share of train (after the "
                                 "hold-out) that keeps its labels, stratified and seeded, at "
                                 "least one per class; None: all labelled."),
        "classes": text("", doc="Keep, drop or merge classes by canonical name, e.g. `-disgust`, "
                        "`anger,happy,sad` or `happy,negative=anger+fear+sad`; `''`: all, as the "
                        "dataset names them."),
        "fold": integer(None, 0, 9, optional=True,
                        doc="CK+ cross-validation fold k (data.name=ckplus only): train on "
                        "fold<k>_train (validation held out of it by subject), test on "
                        "fold<k>_test; None: the dataset's own train and test."),
    },
    "model": {
        "name": one_of("resnet18", (*resnet.MODEL_NAMES, *vit.MODEL_NAMES),
                       doc="Backbone: a ResNet or a ViT."),
        "patch_size": integer(0, 0, doc="ViT only: patch side in pixels; 0: "
                              "vit.default_patch_size (4 px up to 48 px images)."),
        "readout": one_of("cls", vit.READOUTS, doc="ViT only: class-token (cls) or "
                          "average-pooled (gap) readout."),
        "depth": integer(None, 1, optional=True, doc="ViT only: number of transformer blocks; "
                         "None: the preset's 12."),
        "stem": one_of("small", resnet.STEMS, doc="ResNet only: small (3x3 stride-1 conv, no "
                       "pool), strided (3x3 stride-2 conv, no pool: half the maps, for CPUs) or "
                       "standard (7x7 stride-2 conv and max-pool)."),
        "width": number(1.0, 0, 8, lo_open=True, doc="Channel multiplier (0.25: a ResNet's "
                        "16-32-64-128 stages)."),
        "cbam": flag(False, doc="ResNet only: CBAM attention in every block."),
        "input_norm": one_of("none", resnet.INPUT_NORMS, doc="per_image: standardise each input "
                             "image (zero mean, unit variance) first."),
        "dtype": one_of("float32", tuple(resnet.DTYPES), doc="Compute dtype; the parameters "
                        "stay float32."),
        # The scale rule between model.cosine_scale and loss.ldam_scale is checked in
        # validate_config.
        "head": one_of("linear", resnet.HEADS,
                       doc="Classifier head (a ViT's is linear): linear (Dense and bias), "
                       "cosine (LDAM-DRW's NormedLinear, scaled cosines, no bias), rul (RUL, "
                       "NeurIPS 2021: embedding and uncertainty branches, features mixed by "
                       "relative uncertainty in training) or dan (DAN, Wen et al. 2021: "
                       "attention heads with its affinity and partition losses)."),
        "cosine_scale": number(1.0, 0, lo_open=True,
                               doc="model.head=cosine: the logits are this times the cosines; "
                               "1 with loss.name=ldam (the loss scales: loss.ldam_scale), > 1 "
                               "(e.g. 30) with any other loss, 1 with other heads."),
        "rul_dim": integer(64, 1, doc="RUL head: embedding width (published: 64)."),
        "rul_dropout": number(0.4, 0, 1, hi_open=True, doc="RUL head: dropout rate before the "
                              "embeddings (published: 0.4)."),
        "dan_heads": integer(4, 1, 16, doc="DAN head: number of attention heads (published: 4)."),
        "pooling": one_of("avg", resnet.POOLINGS,
                          doc="ResNet pooling of the last map: avg (global average) or app "
                          "(APViT's attentive patch pooling: the mean of the model.app_keep "
                          "share of positions with the largest L1 norm over channels)."),
        "app_keep": number(0.8, 0, 1, lo_open=True, doc="model.pooling=app: share of positions "
                           "kept (APViT: 160 of 196 tokens)."),
        "init_from": text("", doc="Start a fresh run from these weights instead of random ones: "
                          "a `ferjax import-weights` folder or a finished `ferjax train` workdir "
                          "(its best checkpoint); the head is kept only when the classes are the "
                          "same; `''`: random."),
    },
    "optim": {
        "name": one_of("sgd", OPTIMIZERS, doc="Optimizer: SGD or AdamW."),
        "lr": number(0.1, 0, lo_open=True, doc="Peak learning rate (after optim.warmup_steps)."),
        "momentum": number(0.9, 0, 1, hi_open=True, doc="SGD momentum."),
        "nesterov": flag(True, doc="SGD: Nesterov momentum."),
        "b1": number(0.9, 0, 1, hi_open=True, doc="AdamW beta1."),
        "b2": number(0.999, 0, 1, hi_open=True, doc="AdamW beta2."),
        "weight_decay": number(5e-4, 0, doc="Weight decay, on conv and dense kernels only (not "
                               "BatchNorm parameters or biases)."),
        "schedule": one_of("cosine", SCHEDULES, doc="Learning rate after the warm-up: cosine "
                           "(to 0 at train.num_steps) or constant."),
        "warmup_steps": integer(0, 0, doc="Steps of linear learning-rate warm-up from 0; "
                                "< train.num_steps."),
        "ema_decay": number(0.0, 0, 1, hi_open=True, doc="Decay of an exponential moving "
                            "average of the weights used for validation and evaluation; 0: off."),
        "layer_decay": number(1.0, 0, 1, lo_open=True,
                              doc="ViT only: layer-wise learning-rate decay for fine-tuning "
                              "(BEiT; MAE, He et al. 2022: 0.65 for ViT-B, 0.75 for ViT-L): "
                              "layer i learns at lr * layer_decay^(depth + 1 - i), the patch "
                              "embedding being layer 0 and the final norm and head depth + 1; "
                              "1.0: off."),
    },
    "loss": {
        "name": one_of("ce", losses.LOSS_NAMES,
                       doc="Loss: cross-entropy, focal, LDAM, balanced softmax, logit-adjusted "
                       "or coupling (focal early, LDAM late, weighted by 1 - (t/T)^2)."),
        "label_smoothing": number(0.0, 0, 1, hi_open=True, doc="Label smoothing of the targets, "
                                  "for every loss; 0: off."),
        "class_weights": one_of("none", losses.CLASS_WEIGHTS,
                                doc="Per-class loss weights: none, inverse frequency or inverse "
                                "effective number of samples (Cui et al. 2019)."),
        "beta": number(0.9999, 0, 1, lo_open=True, hi_open=True,
                       doc="Beta of the effective number of samples (class_weights=effective)."),
        "drw_start_step": integer(None, 0, optional=True,
                                  doc="Deferred re-weighting (DRW, LDAM-DRW): the class weights "
                                  "apply from this step on; None: from step 0."),
        "weight_average": one_of("mean", losses.WEIGHT_AVERAGES,
                                 doc="How a weighted batch loss is averaged: mean (sum over the "
                                 "batch size, Cui et al. 2019) or normalized (sum over the sum "
                                 "of the class weights, as the LDAM-DRW reference code)."),
        "focal_gamma": number(2.0, 0, doc="Focusing exponent gamma of the focal loss (focal, "
                              "coupling)."),
        "ldam_max_margin": number(0.5, 0, doc="LDAM (ldam, coupling): the rarest class's margin, "
                                  "in logit units (margins scale as n^-1/4)."),
        "ldam_scale": number(1.0, 0, lo_open=True,
                             doc="LDAM: s in CE(s * (z - m)); LDAM-DRW's 30 goes with "
                             "model.head=cosine (z are cosines)."),
        "tau": number(1.0, 0, doc="Logit-adjusted loss: tau in CE(z + tau * log prior)."),
        "eac_weight": number(0.0, 0,
                             doc="EAC (erasing attention consistency, Zhang et al. 2022): weight "
                             "of the MSE between the class activation maps of each image and "
                             "the mirrored maps of its mirror image (a second forward pass; "
                             "published 5, with augment.erasing_prob > 0); 0: off."),
        "eac_flip_erasing": one_of("same", EAC_FLIP_ERASING,
                                   doc="EAC: same: the mirror view is the erased image "
                                   "mirrored (EAC's clean-label training); independent: it is "
                                   "erased with its own box (EAC's noisy-label training)."),
        "affinity_weight": number(1.0, 0, doc="DAN head: weight of its feature-clustering "
                                  "(affinity) loss."),
        "partition_weight": number(1.0, 0, doc="DAN head: weight of its attention-head "
                                   "partition loss."),
    },
    "sampler": {
        "name": one_of("instance", pipeline.SAMPLERS,
                       doc="Which examples a batch draws: instance (i.i.d.), class_balanced, "
                       "sqrt (class probability as sqrt of its count), progressive (instance "
                       "to class-balanced over training) or oversample (each class repeated "
                       "to the largest class's count, in shuffled epochs)."),
    },
    "augment": {
        "crop": one_of("pad", pipeline.CROPS, doc="Random crop: none, pad (reflect-padded random "
                       "crop) or resized (random-resized crop)."),
        "crop_padding": integer(4, 0, doc="augment.crop=pad: padding in pixels on each side "
                                "(<= data.image_size)."),
        "resized_crop_scale": custom((0.6, 1.0), "(low, high) with 0 < low <= high <= 1",
                                     _crop_scale, doc="augment.crop=resized: the range of the "
                                     "crop's share of the image area (ours)."),
        "flip": flag(True, doc="Random horizontal flips."),
        "rotation_deg": number(0.0, 0, 180, doc="Random rotation by an angle drawn uniformly "
                               "from -rotation_deg..rotation_deg degrees; 0: off."),
        "erasing_prob": number(0.0, 0, 1, doc="Probability of random erasing per image; 0: off."),
        "erasing_scale": custom(pipeline.ERASING_SCALE, "(low, high) with 0 < low <= high <= 1",
                                _crop_scale, doc="augment.erasing_prob > 0: the range of the "
                                "erased box's share of the image area (torchvision's default; "
                                "EAC, RUL and DAN train with (0.02, 0.25))."),
        "mixup_alpha": number(0.0, 0, doc="Mixup with Beta(alpha, alpha) mixing weights; 0: "
                              "off."),
        "face_mixup_alpha": number(0.0, 0,
                                   doc="SSFER face mixup: mixup with Beta(alpha, alpha) plus the "
                                   "unmixed images' loss weighted by 1 - IoU of the two faces' "
                                   "boxes after augmentation (published: 1.0); 0: off."),
        # The semantic augmentation fields below are checked by ferjax.augment.synthesis, which
        # knows the modes.
        "vaegan_workdir": text("", doc="Semantic augmentation: a `ferjax train-vaegan` workdir "
                               "whose frozen VAE-GAN adds synthesized minority-class faces to "
                               "each batch; `''`: off."),
        "vaegan_checkpoint": checkpoint(doc="Semantic augmentation: the VAE-GAN run's "
                                        "checkpoint to use."),
        "mode": text("posterior", optional=False,
                     doc="Semantic augmentation: latent perturbation, posterior (mu + alpha * "
                     "sigma * eps), interpolate (between two images of the class) or "
                     "class_gaussian (a Gaussian fitted to the class's latents)."),
        "alpha": number(1.0, 0, doc="Semantic augmentation: the perturbation's scale."),
        "target": text("largest", optional=False,
                       doc="Semantic augmentation: the per-class counts the batches are "
                       "rebalanced to, uniform (the mean count), sqrt, largest (the largest "
                       "class's) or explicit (augment.target_counts)."),
        "fill": number(1.0, 0, 1, doc="Semantic augmentation: share of each class's gap to its "
                       "target filled with synthesized faces (0: plain re-sampling)."),
        "target_counts": custom(None, "None or per-class counts",
                                lambda v: v is None or isinstance(v, (tuple, list)),
                                doc="Semantic augmentation with augment.target=explicit: the "
                                "per-class target counts."),
        "synthetic_weight": number(1.0, 0, doc="Semantic augmentation: loss weight of a "
                                   "synthesized face."),
        "decode": text("full", optional=False,
                       doc="Semantic augmentation: full (the decoding G(z'), as the paper) or "
                       "residual (seed + G(z') - G(mu), ours)."),
        "start_step": integer(0, 0, doc="Semantic augmentation: synthesized faces join the "
                              "batches from this train step on (ours, as DRW)."),
        "filter_workdir": text("", doc="Semantic augmentation: a classifier workdir (trained on "
                               "real data) whose confidence in the intended class filters the "
                               "synthesized faces; `''`: no filter."),
        "filter_threshold": number(0.5, 0, 1, doc="Semantic augmentation filter: the least "
                                   "probability of the intended class a face needs to keep its "
                                   "weight."),
        "filtered_weight": number(0.0, 0, doc="Semantic augmentation filter: loss weight of a "
                                  "filtered-out face (0: dropped)."),
    },
    "train": {
        "num_steps": integer(1000, 1, doc="Training steps."),
        "batch_size": integer(64, 1, doc="Global batch size, a multiple of the device count."),
        "num_devices": integer(None, 1, optional=True, meaning=" (all devices)",
                               doc="Devices to train on; None: all."),
        "log_every": integer(50, 1, doc="Steps between metric lines (means over the interval) "
                             "in metrics.jsonl and TensorBoard."),
        "eval_every": integer(200, 1, doc="Steps between validations; a new best checkpoint is "
                              "saved."),
        "checkpoint_every": integer(200, 1, doc="Steps between resume checkpoints."),
        "keep_checkpoints": integer(2, 1, doc="Resume checkpoints kept (the best one is kept "
                                    "apart)."),
        "best_metric": one_of("mean_class_accuracy", BEST_METRICS,
                              doc="Validation metric that chooses the best checkpoint."),
    },
    "eval": {
        "batch_size": integer(256, 1, doc="Batch size of validation and evaluation."),
        "tta": one_of("none", TTA_MODES, doc="Test-time augmentation: flip averages the logits "
                      "of each image and its mirror."),
    },
}


def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults, locked: experiment configs start from this,
  and setting a field it does not have is an error."""
  return configs.from_spec(SPEC)


def validate_config(config) -> None:
  """Field rules (SPEC), then the rules that tie fields together; a UserError names the field."""
  configs.check_spec(config, SPEC)
  d, m, o, l, a, t = (config.data, config.model, config.optim, config.loss, config.augment,
                      config.train)
  check(d.channels in (1, 3), "data.channels", "1 or 3", d.channels)
  if m.name in resnet.MODEL_NAMES:
    smallest = resnet.smallest_feature_map(d.image_size, m.stem)
    check(smallest >= 1, "data.image_size", f"large enough for the {m.stem} stem", d.image_size)
    if smallest < 3:  # Legal, but XLA on CPU is ~100x slower on such maps: say so once.
      print(f"ferjax: warning: model.stem={m.stem} at {d.image_size} px ends on a "
            f"{smallest}x{smallest} map (very slow on CPU); consider model.stem=small",
            file=sys.stderr)
    for field, value, default in (("patch_size", m.patch_size, 0), ("readout", m.readout, "cls"),
                                  ("depth", m.depth, None)):
      check(value == default, f"model.{field}", f"{default} (a ViT field) with a ResNet", value)
  else:
    patch = m.patch_size or vit.default_patch_size(d.image_size)
    check(d.image_size % patch == 0, "model.patch_size",
          f"a patch size dividing data.image_size ({d.image_size})", patch)
    for field, value, default in (("stem", m.stem, "small"), ("cbam", m.cbam, False),
                                  ("head", m.head, "linear"), ("pooling", m.pooling, "avg")):
      check(value == default, f"model.{field}", f"{default!r} (a ResNet field) with a ViT", value)
  # The cosine head's scale: exactly one of model.cosine_scale and (LDAM) loss.ldam_scale
  # lifts the cosines out of [-1, 1] (ferjax.models.resnet's docstring).
  if m.head != "cosine":
    check(m.cosine_scale == 1, "model.cosine_scale",
          f"1 when model.head is {m.head} (it scales the cosine head's logits only)",
          m.cosine_scale)
  elif l.name == "ldam":
    check(m.cosine_scale == 1, "model.cosine_scale", "1 with model.head=cosine and "
          "loss.name=ldam (LDAM scales inside its loss: set loss.ldam_scale, 30 in LDAM-DRW)",
          m.cosine_scale)
    check(l.ldam_scale > 1, "loss.ldam_scale", "a scale > 1 with model.head=cosine (its logits "
          "are cosines in [-1, 1]; LDAM-DRW uses 30)", l.ldam_scale)
  else:
    check(m.cosine_scale > 1, "model.cosine_scale", f"a scale > 1 with model.head=cosine and "
          f"loss.name={l.name} (its logits are cosines in [-1, 1]; e.g. 30)", m.cosine_scale)
  if m.head in ("rul", "dan"):
    check(m.pooling == "avg", "model.pooling", f"avg with model.head={m.head} (the {m.head} "
          "head pools the last map its own way)", m.pooling)
  check(l.eac_weight == 0 or m.head == "linear", "loss.eac_weight",
        f"0 with model.head={m.head} (EAC's class activation maps are made with a linear "
        "head's class weights)", l.eac_weight)
  check(m.head != "rul" or a.mixup_alpha == 0, "augment.mixup_alpha",
        "0 with model.head=rul (RUL mixes features itself)", a.mixup_alpha)
  check(a.face_mixup_alpha == 0 or a.mixup_alpha == 0, "augment.face_mixup_alpha",
        f"0 when augment.mixup_alpha is set ({a.mixup_alpha}; one mixup at a time)",
        a.face_mixup_alpha)
  check(a.face_mixup_alpha == 0 or m.head != "rul", "augment.face_mixup_alpha",
        "0 with model.head=rul (RUL mixes features itself)", a.face_mixup_alpha)
  check(o.layer_decay == 1 or m.name in vit.MODEL_NAMES, "optim.layer_decay",
        f"1.0 with model.name={m.name} (layer-wise lr decay is for ViTs)", o.layer_decay)
  check(o.warmup_steps < t.num_steps, "optim.warmup_steps",
        f"0 <= warmup_steps < train.num_steps ({t.num_steps})", o.warmup_steps)
  check(l.drw_start_step is None or l.class_weights != "none", "loss.class_weights",
        "inverse or effective when loss.drw_start_step is set (DRW defers class weights)",
        l.class_weights)
  # The progressive sampler's class distribution moves during training: no single prior fits
  # it, so a loss or class weights built from the prior would be wrong for most steps.
  check(config.sampler.name != "progressive" or (l.name not in PRIOR_LOSSES
                                                   and l.class_weights == "none"),
        "sampler.name", f"a fixed-distribution sampler with loss.name={l.name!r} and "
        f"loss.class_weights={l.class_weights!r} (progressive sampling changes the class prior "
        "over training; use loss.name=ce, focal or class_weights=none with it)",
        config.sampler.name)
  check(a.crop_padding <= d.image_size, "augment.crop_padding", "0..image_size pixels",
        a.crop_padding)
  if d.classes:
    fer_data.labels.parse_classes(d.classes)  # The form; the names are checked on loading.
  check((d.name == "joint") == bool(d.datasets), "data.datasets",
        "two or more datasets (e.g. 'fer2013,rafdb:2') exactly when data.name is 'joint'",
        d.datasets)
  if d.datasets:
    fer_data.splits.parse_members(d.datasets)
  check(d.fold is None or d.name == "ckplus", "data.fold",
        "None unless data.name is ckplus (the dataset with cross-validation folds)", d.fold)
  check(d.fold is None or d.val_split is None, "data.val_split",
        "None when data.fold is set (validation is then held out of fold<k>_train by subject)",
        d.val_split)
  parallel.check_train_devices(t)


def sampled_counts(config, train_counts) -> np.ndarray:
  """The class counts of the batches the sampler draws (float [K]): the prior that
  prior-based losses (logit adjustment, balanced softmax, LDAM margins), class weights and
  post-hoc adjustment must use. Giving them the raw train counts when a rebalancing sampler has
  already balanced the batches would correct twice (e.g. balanced softmax on class-balanced
  batches). instance: the train counts; class_balanced and sqrt: the same total spread by the
  policy's class probabilities; oversample: every present class at the largest count."""
  counts = np.asarray(train_counts, np.float64)
  name = config.sampler.name
  if name == "oversample":
    return np.where(counts > 0, counts.max(), 0.0)
  if name in ("class_balanced", "sqrt"):
    return counts.sum() * np.asarray(pipeline.sampler_class_probs(name, counts), np.float64)
  return counts  # instance (progressive is refused with prior-based losses above).


def read_config(workdir) -> ml_collections.ConfigDict:
  """A finished (or started) run's config.json laid over the defaults."""
  return configs.read_saved(default_config(), pathlib.Path(workdir) / "config.json",
                            "ferjax train")


# =================================================================================================
# Model, optimizer, random streams, train state
# =================================================================================================
def build_model(config, num_classes: int):
  """The ResNet or ViT of config.model; both apply as (logits, features) with a `head`."""
  if config.model.name in vit.MODEL_NAMES:
    return vit.model_from_config(config.model, num_classes, config.data.image_size)
  return resnet.model_from_config(config.model, num_classes)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None       # None unless optim.ema_decay > 0
  ema_batch_stats: Any = None


def learning_rate_schedule(optim_config, num_steps: int):
  """Linear warm-up over optim.warmup_steps to optim.lr, then cosine to 0 at `num_steps` or
  constant (optim.schedule)."""
  o = optim_config
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, num_steps, 0.0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
      [o.warmup_steps])


def kernel_decay_mask(params):
  """Weight decay on conv and dense kernels only: BatchNorm and LayerNorm scales, biases and
  tokens are left alone (the same leaves as ndim > 1 for the ResNets; a ViT's q/k/v biases
  are 2-D, hence the name test)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: getattr(path[-1], "key", None) == "kernel", params)


def vit_layer_id(path, depth: int) -> int:
  """The layer of a ViT parameter for layer-wise lr decay (BEiT / MAE's get_layer_id_for_vit):
  0 for the patch embedding and class token, j for block j (named block<j>, 1-based), and
  depth + 1 for everything after the blocks (the final LayerNorm, the head)."""
  name = str(getattr(path[0], "key", path[0]))
  if name in ("embedding", "cls"):
    return 0
  if name.startswith("block") and name[len("block"):].isdigit():
    return int(name[len("block"):])
  return depth + 1


def layer_decay_scales(params, decay: float):
  """Per-leaf lr multipliers (a tree like `params`): decay^(L - layer), L = depth + 1 with the
  depth read from the tree's block<j> names; the head and final norm get 1.0."""
  depth = sum(1 for name in params if str(name).startswith("block")
              and str(name)[len("block"):].isdigit())
  return jax.tree_util.tree_map_with_path(
      lambda path, p: float(decay) ** (depth + 1 - vit_layer_id(path, depth)), params)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each ViT update by its `layer_decay_scales` factor. Placed last in the chain it
  scales that leaf's learning rate (and, as in BEiT / MAE's param groups, its decoupled weight
  decay); with SGD momentum, being linear, the same holds."""
  def scale(updates, params=None):
    del params
    scales = layer_decay_scales(updates, decay)
    return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
  return optax.stateless(scale)


def make_optimizer(config, num_steps: int | None = None):
  """(optax transform, learning-rate schedule): SGD (Nesterov) or AdamW, warm-up + cosine, and
  for ViTs with optim.layer_decay < 1 layer-wise lr decay (`scale_by_layer_decay`)."""
  o = config.optim
  schedule = learning_rate_schedule(o, num_steps or config.train.num_steps)
  decay_mask = kernel_decay_mask
  if o.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask),
                     optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  else:
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
  if o.get("layer_decay", 1.0) != 1.0:
    tx = optax.chain(tx, scale_by_layer_decay(o.layer_decay))
  return tx, schedule


class RngStreams(NamedTuple):
  init: jax.Array   # parameters
  train: jax.Array  # per-step randomness: fold_in(train, step)
  epoch: jax.Array  # the over-sampling policy's epoch order


def rng_streams(seed: int) -> RngStreams:
  """The run's random streams, all derived from `seed`.

  Parameters are drawn with the `rbg` generator: its XLA program compiles ~4x faster on CPU
  than threefry's (10 s -> 2.5 s for a ResNet). Everything per step keeps threefry, whose values
  do not depend on how the batch is sharded (1 and 8 devices agree).
  """
  base = jax.random.key(seed)
  return RngStreams(init=jax.random.key(seed, impl="rbg"), train=jax.random.fold_in(base, 1),
                    epoch=jax.random.fold_in(base, 2))


def _init_fn(config, model, tx):
  def init():
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    variables = model.init(rng_streams(config.seed).init, jnp.zeros(shape, jnp.float32),
                           train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ema = config.optim.ema_decay > 0
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema_params=params if ema else None,
                      ema_batch_stats=batch_stats if ema else None)
  return init


def init_state(config, model, tx, mesh) -> TrainState:
  """Parameters created inside jit, directly replicated over the mesh."""
  return parallel.init_replicated(_init_fn(config, model, tx), mesh, fast_compile=False)


def with_weights(state: TrainState, variables: dict, tx, mesh) -> TrainState:
  """`state` starting from `variables` ({'params', 'batch_stats'}, same tree as the state's):
  a fresh optimizer state (and EMA copies) for them, replicated over the mesh."""
  ema = state.ema_params is not None
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  fresh = TrainState(step=state.step, params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), ema_params=params if ema else None,
                     ema_batch_stats=batch_stats if ema else None)
  return parallel.put_replicated(fresh, mesh)


def abstract_state(config, model, mesh, tx=None) -> TrainState:
  """Shapes, dtypes and shardings of the train state, without computing it (for restoring)."""
  tx = tx or make_optimizer(config)[0]
  return parallel.abstract_replicated(_init_fn(config, model, tx), mesh)


def eval_variables(state: TrainState) -> dict:
  """The weights to evaluate: the EMA copy when the run keeps one."""
  if state.ema_params is not None:
    return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  return {"params": state.params, "batch_stats": state.batch_stats}
