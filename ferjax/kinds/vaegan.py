"""What a VAE-GAN run is: its config (defaults and rules together), model, optimizers, train
state and random streams. The trainer (ferjax.train.vaegan), the synthesis stages, benchmarks and
ferjax.runs (which reopens a finished run) build on this module, never on the trainer.

The seed paper (Li et al. 2024, arXiv 2411.17254) publishes no architecture, resolution, loss
weights or optimiser: every value below is our choice unless its doc names a source.
"""

import pathlib
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ferjax import configs
from ferjax import data as fer_data
from ferjax.configs import check, custom, flag, integer, number, one_of, text
from ferjax.core import parallel
from ferjax.models import vaegan as vaegan_models

KIND = "vaegan"
NETS = ("encoder", "generator", "discriminator")
EMA_NETS = ("encoder", "generator")  # The networks sampling uses.
BEST_METRIC = "val_psnr"
IMAGE_SIZES = tuple(s for s in range(32, 129)
                    if vaegan_models.smallest_map(s) <= vaegan_models.MAX_MAP)


# ================================================================================================
# Config: every field the trainer reads, its default and what a valid value is
# ================================================================================================
NOT_TEST = ("a split name other than 'test' (the test split is never used for training or "
            "checkpoint selection)")


SPEC = {
    "seed": integer(0, 0, doc="Seed of the parameters, batch sampling and noise."),
    "data": {
        "name": one_of("synthetic", fer_data.DATASET_NAMES, doc="Dataset: the generated "
                       "synthetic faces, a prepared real dataset or folder (data.manual_dir)."),
        "split": custom("train", NOT_TEST, lambda v: isinstance(v, str) and v != "test",
                        doc="Split trained on (never `test`: the test split is never loaded)."),
        "val_split": custom("validation", NOT_TEST + ", or None (no validation)",
                            lambda v: v is None or (isinstance(v, str) and v != "test"),
                            doc="Split held out for reconstruction MSE, PSNR and KL (it chooses "
                            "the best checkpoint); None: no validation."),
        "image_size": custom(64, f"one of {list(IMAGE_SIZES)} (32..128 px, halving down to a "
                             "3x3..8x8 map)", lambda v: configs.is_int(v) and v in IMAGE_SIZES,
                             doc="Side of the square images in pixels; every image is resized "
                             "to it on load."),
        "channels": custom(1, "1 or 3", lambda v: configs.is_int(v) and v in (1, 3),
                           doc="Image channels: 1 (gray) or 3 (RGB)."),
        "data_dir": text(None, doc="Where prepared datasets live; None: $FERJAX_DATA_DIR, else "
                         "~/.ferjax/datasets."),
        "manual_dir": text(None, doc="Folder of the raw files, to prepare a real dataset on "
                           "first use; with data.name=folder, the folder dataset itself."),
        "num_examples": integer(None, 1, optional=True, doc="Train size: the synthetic set's "
                                "size, else the first N rows of the split (None: all)."),
        "val_examples": integer(None, 1, optional=True, doc="Validation size, as "
                                "data.num_examples for the validation split."),
        "imbalance_ratio": number(None, 1, optional=True,
                                  doc="Long-tailed train profile (largest over smallest class "
                                  "count), as the classifier's data.imbalance_ratio, so the "
                                  "VAE-GAN of a *-LT protocol sees only its classifiers' "
                                  "images; None: the data as it comes."),
    },
    "model": {
        "arch": one_of("dcgan", vaegan_models.ARCHS, doc="Layout: dcgan (DCGAN-64 convolutions) "
                       "or resnet (residual blocks, spectral-normalised discriminator)."),
        "latent_dim": integer(128, 1, doc="Width of the latent code (ours)."),
        "widths": custom(None, "None or a tuple of positive integers",
                         lambda v: v is None or isinstance(v, (tuple, list)),
                         doc="Channel width of each stride-2 stage, checked against the image "
                         "size; None: 64, 128, 256, 512, 512, ... (DCGAN)."),
        "dtype": one_of("float32", ("float32", "bfloat16"), doc="Compute dtype; the parameters "
                        "stay float32."),
        "num_classes": integer(None, 1, optional=True,
                               doc="Class-conditional encoder, generator and projection "
                               "discriminator (ours, for class-preserving synthesis): the "
                               "dataset's class count; None: unconditional (the paper's)."),
    },
    "loss": {
        "beta": number(1e-3, 0, doc="Weight of the KL term (per example, summed over latent "
                       "dimensions) against the reconstruction terms (means over pixels or "
                       "features)."),
        "kl_warmup_steps": integer(2000, 0, doc="Steps over which loss.beta rises linearly from "
                                   "0."),
        "feature_recon_weight": number(1.0, 0, doc="Weight of the reconstruction MSE in the "
                                       "discriminator's feature space (Larsen et al. 2016)."),
        "pixel_l1_weight": number(1.0, 0, doc="Weight of the pixel L1 reconstruction loss (ours: "
                                  "keeps early reconstructions close)."),
        "adv_weight": number(0.1, 0, doc="Weight of the generator's hinge adversarial loss "
                             "(ours)."),
        "adversarial_to_encoder": flag(False, doc="Whether the generator's adversarial loss also "
                                       "trains the encoder (off, as Larsen et al.)."),
        "classifier_workdir": text(None, doc="Class consistency (ours): a classifier run trained "
                                   "on real faces of the same dataset whose best checkpoint, "
                                   "frozen, judges the generator's decodings; None: none."),
        "class_consistency_weight": number(0.0, 0,
                                           doc="Class consistency: weight of the frozen "
                                           "classifier's cross-entropy of a decoded posterior "
                                           "sample against its seed's label (needs "
                                           "loss.classifier_workdir); 0: off."),
        "perceptual_weight": number(0.0, 0, doc="Class consistency: weight of the squared "
                                    "distance between the frozen classifier's penultimate "
                                    "features of the decoding and of the real image (needs "
                                    "loss.classifier_workdir); 0: off."),
    },
    "optim": {
        "lr": number(2e-4, 0, lo_open=True, doc="Learning rate of the Adam optimizers of the "
                     "encoder, generator and discriminator (DCGAN's)."),
        "b1": number(0.5, 0, 1, hi_open=True, doc="Adam beta1 (DCGAN's)."),
        "b2": number(0.999, 0, 1, hi_open=True, doc="Adam beta2."),
        "ema_decay": number(0.999, 0, 1, hi_open=True,
                            doc="Decay of the EMA of the encoder's and generator's parameters "
                            "and batch statistics used for validation and sampling, warmed up "
                            "as min(ema_decay, (1 + step) / (10 + step)) (ours)."),
    },
    "train": {
        "num_steps": integer(20000, 1, doc="Training steps."),
        "batch_size": integer(64, 1, doc="Global batch size, a multiple of the device count."),
        "num_devices": integer(None, 1, optional=True, meaning=" (all devices)",
                               doc="Devices to train on; None: all."),
        "log_every": integer(100, 1, doc="Steps between metric lines (means over the interval) "
                             "in metrics.jsonl and TensorBoard."),
        "eval_every": integer(1000, 1, doc="Steps between validations."),
        "sample_every": integer(1000, 1, doc="Steps between the reconstruction, prior-sample "
                                "and perturbation grids (PNG)."),
        "checkpoint_every": integer(1000, 1, doc="Steps between resume checkpoints."),
        "keep_checkpoints": integer(3, 1, doc="Resume checkpoints kept."),
    },
}


def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults, locked: experiment configs start from this,
  and setting a field it does not have is an error."""
  return configs.from_spec(SPEC)


def validate_config(config) -> None:
  """Field rules (SPEC), then the rules that tie fields together; a UserError names the field."""
  configs.check_spec(config, SPEC)
  d, m, t = config.data, config.model, config.train
  stages = vaegan_models.num_stages(d.image_size)
  check(m.widths is None or (len(m.widths) == stages
                             and all(configs.is_int(w) and w >= 1 for w in m.widths)),
        "model.widths", f"None or {stages} positive integers ({d.image_size} px has {stages} "
        f"stride-2 stages, e.g. {vaegan_models.default_widths(d.image_size)})", m.widths)
  parallel.check_train_devices(t)
  lo = config.loss
  judged = lo.class_consistency_weight > 0 or lo.perceptual_weight > 0
  check(not judged or bool(lo.classifier_workdir), "loss.classifier_workdir",
        "a finished classifier run's workdir when loss.class_consistency_weight or "
        "loss.perceptual_weight is > 0", lo.classifier_workdir)
  check(judged or not lo.classifier_workdir, "loss.classifier_workdir",
        "None when loss.class_consistency_weight and loss.perceptual_weight are 0 (it would be "
        "read for nothing)", lo.classifier_workdir)


def read_config(workdir) -> ml_collections.ConfigDict:
  """A finished (or started) run's config.json laid over the defaults."""
  return configs.read_saved(default_config(), pathlib.Path(workdir) / "config.json",
                            "train-vaegan")


# ================================================================================================
# Model, optimizers, random streams, train state
# ================================================================================================
def build_model(config) -> vaegan_models.VAEGAN:
  m = config.model
  return vaegan_models.build(arch=m.arch, image_size=config.data.image_size,
                             channels=config.data.channels, latent_dim=m.latent_dim,
                             widths=m.widths, dtype=m.dtype, num_classes=m.num_classes or 0)


def make_optimizers(config) -> dict:
  o = config.optim
  return {net: optax.adam(o.lr, b1=o.b1, b2=o.b2) for net in NETS}


class RngStreams(NamedTuple):
  init: jax.Array   # parameters
  train: jax.Array  # per-step randomness: fold_in(train, step)


def rng_streams(seed: int) -> RngStreams:
  """The run's random streams, all derived from `seed` (raw uint32 threefry keys)."""
  init, train = jax.random.split(jax.random.PRNGKey(seed))
  return RngStreams(init=init, train=train)


@flax.struct.dataclass
class TrainState:
  """E, G and D with their optimizer states and the EMA copy of E and G, in one pytree."""
  step: jax.Array
  params: Any       # {net: params}
  batch_stats: Any  # {net: batch_stats}
  opt_state: Any    # {net: optimizer state}
  ema: Any          # {"encoder" | "generator": {"params", "batch_stats"}}


def _init_fn(config, model):
  optimizers = make_optimizers(config)

  def init():
    variables = model.init(rng_streams(config.seed).init)
    params = {net: variables[net]["params"] for net in NETS}
    batch_stats = {net: variables[net]["batch_stats"] for net in NETS}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state={net: optimizers[net].init(params[net]) for net in NETS},
        ema={net: {"params": params[net], "batch_stats": batch_stats[net]} for net in EMA_NETS})
  return init


def init_state(config, model, mesh) -> TrainState:
  """The whole train state, compiled fast (it runs once) straight into replicated arrays."""
  return parallel.init_replicated(_init_fn(config, model), mesh, fast_compile=True)


def abstract_state(config, model, mesh) -> TrainState:
  """Shapes, dtypes and shardings of the train state, without computing it (for restoring)."""
  return parallel.abstract_replicated(_init_fn(config, model), mesh)
