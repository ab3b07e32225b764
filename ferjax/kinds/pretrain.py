"""What a pre-training run is: masked-autoencoder (MAE) pre-training of a ViT on unlabeled faces.
Its config (defaults and rules together), models, optimizer, train state and random streams. The
trainer (ferjax.train.pretrain), benchmarks and ferjax.runs (which reopens a finished run, e.g.
for a classifier's `model.init_from`) build on this module, never on the trainer.

The encoder is the classifier's own ViT (`model` fields as the classifier's, `vit.model_from_
config`), initialised through `ViT.encode` so its parameters are exactly a ViT classifier's minus
the head; the decoder is ferjax.models.mae's. Values follow MAE (He et al. 2022) unless a
field's doc says "ours": mask ratio 0.75, AdamW (0.9, 0.95) with weight decay 0.05,
normalised-pixel targets, flips and (augment.crop_scale, off by default) random-resized crops.
"""

import pathlib
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ferjax import configs
from ferjax.configs import check, custom, flag, integer, number, one_of, text
from ferjax.core import parallel
from ferjax.data import unlabeled
from ferjax.kinds import classifier
from ferjax.models import mae, resnet, vit

KIND = "pretrain"
BEST_METRIC = "val_loss"  # Lower is better.
SCHEDULES = ("cosine", "constant")


# ================================================================================================
# Config: every field the trainer reads, its default and what a valid value is
# ================================================================================================
SPEC = {
    "seed": integer(0, 0, doc="Seed of the parameters, masks, batches and the validation "
                    "hold-out."),
    "data": {
        "sources": custom("synthetic", unlabeled.EXPECTED,
                          lambda v: isinstance(v, str) and bool(v.strip()),
                          doc="Unlabeled images: synthetic (the synthetic train faces), a "
                          "prepared dataset's name (its splits as data.include_test and "
                          "data.include_validation say, labels ignored) or folder:PATH (searched "
                          "recursively), several joined by commas, each with an optional "
                          ":weight."),
        "image_size": integer(48, 16, 1024, doc="Side of the square images in pixels; every "
                              "image is resized to it."),
        "channels": custom(1, "1 or 3", lambda v: configs.is_int(v) and v in (1, 3),
                           doc="Image channels: 1 (gray) or 3 (RGB)."),
        "val_fraction": number(0.05, 0, 1, hi_open=True,
                               doc="Share of every source held out (seeded) for the validation "
                               "loss; 0: no validation."),
        "include_test": flag(False, doc="Also read a named dataset's test split (off: a "
                             "classifier later tested on it would have seen its images)."),
        "include_validation": flag(True, doc="Also read a named dataset's validation split "
                                   "(e.g. FER-2013's PublicTest); turn off when a classifier "
                                   "reports its numbers on that split."),
        "data_dir": text(None, doc="Where prepared datasets live; None: $FERJAX_DATA_DIR, else "
                         "~/.ferjax/datasets."),
        "manual_dir": text(None, doc="Folder of the raw files, to prepare a named dataset on "
                           "first use."),
        "num_examples": integer(None, 1, optional=True, doc="Size of the synthetic source; "
                                "None: its default (7000)."),
    },
    "model": {  # The encoder: the classifier's ViT fields (ferjax.kinds.classifier).
        "name": one_of("vit_ti", vit.MODEL_NAMES, doc="The ViT encoder pre-trained."),
        "patch_size": integer(0, 0, doc="Patch side in pixels; 0: vit.default_patch_size (4 px "
                              "up to 48 px images)."),
        "readout": one_of("cls", vit.READOUTS, doc="Class-token (cls) or average-pooled (gap) "
                          "readout, as the classifier's (with cls the class token is "
                          "pre-trained too, as in MAE)."),
        "depth": integer(None, 1, optional=True, doc="Number of transformer blocks; None: the "
                         "preset's 12."),
        "width": number(1.0, 0, 8, lo_open=True, doc="Width multiplier (heads kept)."),
        "input_norm": one_of("none", resnet.INPUT_NORMS, doc="per_image: standardise each input "
                             "image (zero mean, unit variance) first."),
        "dtype": one_of("float32", tuple(resnet.DTYPES), doc="Compute dtype; the parameters "
                        "stay float32."),
    },
    "mae": {
        "mask_ratio": number(0.75, 0, 1, lo_open=True, hi_open=True,
                             doc="Share of each image's patches masked (MAE: 0.75)."),
        "decoder_width": integer(256, 4, doc="Decoder width (MAE's is 512 for 224 px; ours is "
                                 "lighter, for 48 px faces' 144 patches)."),
        "decoder_depth": integer(4, 1, doc="Decoder blocks (MAE: 8; ours lighter)."),
        "decoder_heads": integer(8, 1, doc="Decoder attention heads (MAE: 16; ours lighter)."),
        "norm_pix_loss": flag(True, doc="Reconstruct each patch's pixels standardised (MAE's "
                              "normalised-pixel targets)."),
    },
    "augment": {  # Every image is flipped at random; more is set here.
        "crop_scale": custom(None, "None or (min, max) with 0 < min <= max <= 1",
                             lambda v: v is None or classifier._crop_scale(v),
                             doc="Random-resized crop (MAE's is (0.2, 1.0), aspect 3/4..4/3): "
                             "the (min, max) share of the image area cut and resized back "
                             "(bilinear); None: off."),
    },
    "optim": {  # AdamW, linear warm-up, then cosine to 0 (or constant).
        "lr": number(1e-3, 0, lo_open=True, doc="Peak learning rate of AdamW (ours; MAE scales "
                     "1.5e-4 * batch / 256)."),
        "b1": number(0.9, 0, 1, hi_open=True, doc="AdamW beta1."),
        "b2": number(0.95, 0, 1, hi_open=True, doc="AdamW beta2 (MAE: 0.95)."),
        "weight_decay": number(0.05, 0, doc="Weight decay, on Dense and patch-embedding kernels "
                               "only (MAE: 0.05)."),
        "warmup_steps": integer(0, 0, doc="Steps of linear learning-rate warm-up from 0; "
                                "< train.num_steps."),
        "schedule": one_of("cosine", SCHEDULES, doc="Learning rate after the warm-up: cosine "
                           "(to 0 at train.num_steps) or constant."),
    },
    "train": {
        "num_steps": integer(10000, 1, doc="Training steps."),
        "batch_size": integer(256, 1, doc="Global batch size, a multiple of the device count."),
        "num_devices": integer(None, 1, optional=True, meaning=" (all devices)",
                               doc="Devices to train on; None: all."),
        "log_every": integer(50, 1, doc="Steps between metric lines (means over the interval) "
                             "in metrics.jsonl and TensorBoard."),
        "eval_every": integer(1000, 1, doc="Steps between validation losses and reconstruction "
                              "grids."),
        "checkpoint_every": integer(1000, 1, doc="Steps between resume checkpoints."),
        "keep_checkpoints": integer(2, 1, doc="Resume checkpoints kept."),
    },
}


def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults, locked: experiment configs start from this,
  and setting a field it does not have is an error."""
  return configs.from_spec(SPEC)


def patch_size(config) -> int:
  return config.model.patch_size or vit.default_patch_size(config.data.image_size)


def num_patches(config) -> int:
  return (config.data.image_size // patch_size(config)) ** 2


def validate_config(config) -> None:
  """Field rules (SPEC), then the rules that tie fields together; a UserError names the field."""
  configs.check_spec(config, SPEC)
  d, a, o, t = config.data, config.mae, config.optim, config.train
  unlabeled.parse_sources(d.sources)
  patch = patch_size(config)
  check(d.image_size % patch == 0, "model.patch_size",
        f"a patch size dividing data.image_size ({d.image_size})", patch)
  n = num_patches(config)
  kept = mae.num_kept(n, a.mask_ratio)
  check(1 <= kept < n, "mae.mask_ratio", f"a ratio in (0, 1) that keeps at least one of the {n} "
        f"patches and masks at least one (it keeps {kept})", a.mask_ratio)
  check(a.decoder_width % 4 == 0 and a.decoder_width % a.decoder_heads == 0,
        "mae.decoder_width", f"a multiple of 4 and of mae.decoder_heads ({a.decoder_heads})",
        a.decoder_width)
  check(o.warmup_steps < t.num_steps, "optim.warmup_steps",
        f"0 <= warmup_steps < train.num_steps ({t.num_steps})", o.warmup_steps)
  parallel.check_train_devices(t)


def read_config(workdir) -> ml_collections.ConfigDict:
  """A finished (or started) run's config.json laid over the defaults."""
  return configs.read_saved(default_config(), pathlib.Path(workdir) / "config.json",
                            "ferjax pretrain")


# ================================================================================================
# Models, optimizer, random streams, train state
# ================================================================================================
class Models(NamedTuple):
  encoder: vit.ViT  # the classifier's ViT, applied through ViT.encode
  decoder: mae.MAEDecoder


def build_models(config) -> Models:
  encoder = vit.model_from_config(config.model, 1, config.data.image_size)  # The head is unused.
  a, p = config.mae, encoder.patch_size
  grid = config.data.image_size // p
  decoder = mae.MAEDecoder(grid=(grid, grid), patch_dim=p * p * config.data.channels,
                           width=a.decoder_width, depth=a.decoder_depth, heads=a.decoder_heads,
                           num_prefix_tokens=encoder.num_prefix_tokens, dtype=encoder.dtype)
  return Models(encoder, decoder)


def make_optimizer(config):
  """(optax transform, learning-rate schedule): AdamW with warm-up, then cosine or constant;
  kernels only are decayed (biases, LayerNorms, the class and mask tokens are not, as MAE's
  param groups leave them)."""
  o = config.optim
  schedule = classifier.learning_rate_schedule(o, config.train.num_steps)
  decay_mask = classifier.kernel_decay_mask
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
  return tx, schedule


class RngStreams(NamedTuple):
  init: jax.Array   # parameters
  train: jax.Array  # per-step randomness: fold_in(train, step)
  val: jax.Array    # the validation masks: the same at every evaluation


def rng_streams(seed: int) -> RngStreams:
  """The run's random streams, all derived from `seed` (raw uint32 threefry keys)."""
  init, train, val = jax.random.split(jax.random.PRNGKey(seed), 3)
  return RngStreams(init=init, train=train, val=val)


@flax.struct.dataclass
class TrainState:
  """Encoder and decoder parameters with one optimizer state, in one pytree."""
  step: jax.Array
  params: Any     # {"encoder": ViT params (no head), "decoder": MAEDecoder params}
  opt_state: Any


def _init_fn(config, models: Models):
  tx, _ = make_optimizer(config)

  def init():
    encoder_key, decoder_key = jax.random.split(rng_streams(config.seed).init)
    s, c = config.data.image_size, config.data.channels
    n = num_patches(config)
    kept = mae.num_kept(n, config.mae.mask_ratio)
    encoder = models.encoder.init(encoder_key, jnp.zeros((1, s, s, c), jnp.float32),
                                  method=vit.ViT.encode)["params"]
    tokens = jnp.zeros((1, models.encoder.num_prefix_tokens + kept, models.encoder.hidden))
    decoder = models.decoder.init(decoder_key, tokens,
                                  jnp.arange(n, dtype=jnp.int32)[None])["params"]
    params = {"encoder": encoder, "decoder": decoder}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def init_state(config, models: Models, mesh) -> TrainState:
  """The whole train state, compiled fast (it runs once) straight into replicated arrays."""
  return parallel.init_replicated(_init_fn(config, models), mesh, fast_compile=True)


def abstract_state(config, models: Models, mesh) -> TrainState:
  """Shapes, dtypes and shardings of the train state, without computing it (for restoring)."""
  return parallel.abstract_replicated(_init_fn(config, models), mesh)
