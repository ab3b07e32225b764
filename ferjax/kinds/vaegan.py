"""What a VAE-GAN run is: its config (defaults and rules together), model, optimizers, train
state and random streams. The trainer (ferjax.train.vaegan), the synthesis stages, benchmarks and
ferjax.runs (which reopens a finished run) build on this module, never on the trainer.

The seed paper (Li et al. 2024, arXiv 2411.17254) publishes no architecture, resolution, loss
weights or optimiser: every value below is our choice unless a comment names a source.
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
    "seed": integer(0, 0),  # Parameters, batch sampling and noise all derive from it.
    "data": {
        "name": one_of("synthetic", fer_data.DATASET_NAMES),
        # Trained on; the test split is never loaded.
        "split": custom("train", NOT_TEST, lambda v: isinstance(v, str) and v != "test"),
        # Held out for recon MSE / PSNR / KL; None: no validation.
        "val_split": custom("validation", NOT_TEST + ", or None (no validation)",
                            lambda v: v is None or (isinstance(v, str) and v != "test")),
        "image_size": custom(64, f"one of {list(IMAGE_SIZES)} (32..128 px, halving down to a "
                             "3x3..8x8 map)", lambda v: configs.is_int(v) and v in IMAGE_SIZES),
        "channels": custom(1, "1 or 3", lambda v: configs.is_int(v) and v in (1, 3)),
        "data_dir": text(None),  # Prepared datasets (None: $FERJAX_DATA_DIR, ~/.ferjax/datasets).
        "manual_dir": text(None),  # Raw files, prepared on first use.
        "num_examples": integer(None, 1, optional=True),  # Synthetic's size, else the first N.
        "val_examples": integer(None, 1, optional=True),  # Validation examples, as above.
        # Long-tailed train profile (max/min count), as the classifier's data.imbalance_ratio,
        # so the VAE-GAN of a *-LT protocol sees only the images its classifiers see.
        "imbalance_ratio": number(None, 1, optional=True),
    },
    "model": {
        "arch": one_of("dcgan", vaegan_models.ARCHS),  # DCGAN-64 layout | residual, spectral D
        "latent_dim": integer(128, 1),  # Ours.
        # One per stride-2 stage; None: 64, 128, 256, 512, ... (DCGAN). Checked against the size.
        "widths": custom(None, "None or a tuple of positive integers",
                         lambda v: v is None or isinstance(v, (tuple, list))),
        "dtype": one_of("float32", ("float32", "bfloat16")),  # Compute dtype; params stay f32.
        # Class-conditional E, G and projection D (ferjax.models.vaegan; ours, for
        # class-preserving synthesis): the dataset's class count, checked against it; None:
        # unconditional (the paper's VAE-GAN).
        "num_classes": integer(None, 1, optional=True),
    },
    "loss": {
        # KL per example (summed over latent dims) against reconstruction terms that are means
        # over pixels / features: beta sets how much of the latent code the prior may erase.
        "beta": number(1e-3, 0),
        "kl_warmup_steps": integer(2000, 0),  # beta rises linearly from 0 over these steps.
        "feature_recon_weight": number(1.0, 0),  # MSE in D's feature space (Larsen et al. 2016).
        "pixel_l1_weight": number(1.0, 0),  # Pixel L1 (ours: keeps early reconstructions close).
        "adv_weight": number(0.1, 0),  # G's hinge loss (weight ours).
        # Whether G's adversarial loss also trains E. Off as in Larsen et al.
        "adversarial_to_encoder": flag(False),
        # Class consistency (ours): a frozen classifier run (`classifier_workdir`, trained on real
        # faces of the same dataset; its best checkpoint) judges G's decodings of posterior
        # samples; G is trained on its cross-entropy against the seed's label (weight
        # `class_consistency_weight`) and on the squared distance between its penultimate
        # features of the decoding and of the real image (`perceptual_weight`, a perceptual
        # term in a face-expression feature space). 0: off; a weight > 0 needs the workdir.
        "classifier_workdir": text(None),
        "class_consistency_weight": number(0.0, 0),
        "perceptual_weight": number(0.0, 0),
    },
    "optim": {
        "lr": number(2e-4, 0, lo_open=True),  # Adam for each of E, G, D (DCGAN's settings).
        "b1": number(0.5, 0, 1, hi_open=True),
        "b2": number(0.999, 0, 1, hi_open=True),
        # EMA of E's and G's params and batch stats, for validation and sampling. The decay warms
        # up as min(ema_decay, (1 + step) / (10 + step)). Ours.
        "ema_decay": number(0.999, 0, 1, hi_open=True),
    },
    "train": {
        "num_steps": integer(20000, 1),
        "batch_size": integer(64, 1),  # Global batch, split over devices (a multiple of them).
        "num_devices": integer(None, 1, optional=True, meaning=" (all devices)"),
        "log_every": integer(100, 1),  # metrics.jsonl (means over the interval), TensorBoard.
        "eval_every": integer(1000, 1),  # Validation.
        "sample_every": integer(1000, 1),  # Reconstruction, prior-sample, perturbation grids.
        "checkpoint_every": integer(1000, 1),
        "keep_checkpoints": integer(3, 1),
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
