"""Reopen a finished (or started) run from its workdir: config, model and restored variables.

    run = open_classifier("runs/baseline")          # the validation-chosen checkpoint
                                                    # (a train-semisup run: its EMA teacher)
    logits = run.model.apply(run.variables, images, train=False)[0]
    vae = open_vaegan("runs/vaegan", which="last")
    images = vae.decode(vae.encode(images)[0])
    mae = open_pretrain("runs/pretrain")            # its ViT encoder: mae.encoder_variables

`which` is "best" (chosen on the validation split), "last" / "latest", or a step number. Every
kind is restored the same way: the run's config.json laid over its kind's defaults, the model
built from it, and the checkpoint restored into the train state's abstract shapes, replicated
over the mesh (all devices, or `mesh`). Nothing here imports a trainer.
"""

import dataclasses
import pathlib

import jax
import ml_collections
import numpy as np

from ferjax.core import checkpoint as checkpoint_lib
from ferjax.core import parallel
from ferjax.core import workdir as workdir_lib
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import pretrain as pretrain_kind
from ferjax.kinds import semisup as semisup_kind
from ferjax.kinds import vaegan as vaegan_kind
from ferjax.models import import_weights
from ferjax.models import mae as mae_models
from ferjax.models import resnet, vit
from ferjax.models import vaegan as vaegan_models


# --- Classifier ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierRun:
  """A trained classifier: `model.apply(variables, images, train=False) -> (logits, features)`.

  `variables` are the evaluation weights (the EMA copy when the run kept one); `meta` is the
  checkpoint's metadata (step, validation metrics, class_names, train_counts, prior_counts).
  """
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  model: resnet.ResNet
  variables: dict
  meta: dict
  mesh: jax.sharding.Mesh

  @property
  def step(self) -> int:
    return int(self.meta["step"])

  @property
  def class_names(self) -> tuple:
    return tuple(self.meta["class_names"])

  @property
  def train_counts(self) -> np.ndarray:
    return np.asarray(self.meta["train_counts"])

  @property
  def prior_counts(self) -> np.ndarray:
    """The class distribution the model was trained under (after any rebalancing)."""
    return np.asarray(self.meta.get("prior_counts", self.meta["train_counts"]))


def classifier_checkpoints(workdir, config) -> checkpoint_lib.Checkpoints:
  return checkpoint_lib.Checkpoints(pathlib.Path(workdir) / "checkpoints",
                                    best_metric=config.train.best_metric, read_only=True)


def open_classifier(workdir, which="best", *, config=None, mesh=None) -> ClassifierRun:
  """The classifier run in `workdir` at checkpoint `which`, its variables on the mesh.

  `config` replaces the run's saved config (restoring into another config's shapes fails with
  one line naming the first parameter that differs)."""
  workdir = pathlib.Path(workdir)
  # A semi-supervised run is a classifier too: its teacher's weights are the ones evaluated.
  semisup = workdir_lib.run_kind(workdir) == semisup_kind.KIND
  kind = semisup_kind if semisup else classifier_kind
  if not semisup:
    workdir_lib.check_kind(workdir, classifier_kind.KIND, "pass a classifier workdir")
  config = config or kind.read_config(workdir)
  mesh = mesh or parallel.make_mesh(config.train.num_devices)
  with classifier_checkpoints(workdir, config) as ckpt:
    meta = ckpt.read_meta(which)
    model = kind.build_model(config, len(meta["class_names"]))
    target = (semisup_kind.abstract_state(config, model, mesh, meta["pool_size"]) if semisup
              else classifier_kind.abstract_state(config, model, mesh))
    state, meta = ckpt.restore(target, which)
  return ClassifierRun(workdir, config, model, kind.eval_variables(state), meta, mesh)


# --- VAE-GAN ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEGANRun:
  """The EMA encoder and generator of a VAE-GAN run, with eval-mode encode/decode.

  `encode(images)` / `decode(z)` use the stored variables; inside your own jitted code use
  `model.encode(encoder['params'], encoder['batch_stats'], images)` and `model.decode(...)`,
  which are pure functions of explicit variables (jit and vmap friendly).
  """
  config: ml_collections.ConfigDict
  model: vaegan_models.VAEGAN
  step: int
  encoder: dict  # {"params", "batch_stats"}
  generator: dict

  def encode(self, images, labels=None):
    """images uint8 (0..255) or float in [-1, 1], [B, S, S, C] -> (mu, logvar) [B, latent_dim].
    `labels` [B]: the images' classes, needed by a class-conditional run (`conditional`)."""
    return _encode(self.model, self.encoder, jax.numpy.asarray(images), _labels(self, labels))

  def decode(self, z, labels=None):
    """latents [B, latent_dim] -> float32 images in [-1, 1]; `labels` [B]: the classes to draw,
    needed by a class-conditional run."""
    return _decode(self.model, self.generator, jax.numpy.asarray(z), _labels(self, labels))

  @property
  def conditional(self) -> bool:
    return self.model.num_classes > 0


def _labels(run: VAEGANRun, labels):
  if not run.conditional:
    return None
  if labels is None:
    raise ValueError("this VAE-GAN is class-conditional: encode and decode need labels")
  return jax.numpy.asarray(labels, jax.numpy.int32)


@jax.jit(static_argnums=0)
def _encode(model, variables, images, labels):
  return model.encode(variables["params"], variables["batch_stats"], images, labels)


@jax.jit(static_argnums=0)
def _decode(model, variables, z, labels):
  return model.decode(variables["params"], variables["batch_stats"], z, labels)


def vaegan_checkpoints(workdir, config) -> checkpoint_lib.Checkpoints:
  return checkpoint_lib.Checkpoints(
      pathlib.Path(workdir) / "checkpoints",
      best_metric=vaegan_kind.BEST_METRIC if config.data.val_split else None, read_only=True)


def restore_vaegan_state(workdir, which="latest", *, mesh=None):
  """(config, model, train state, checkpoint meta) of the VAE-GAN run in `workdir`."""
  workdir_lib.check_kind(workdir, vaegan_kind.KIND, "pass a VAE-GAN workdir")
  config = vaegan_kind.read_config(workdir)
  mesh = mesh or parallel.make_mesh(config.train.num_devices)
  model = vaegan_kind.build_model(config)
  with vaegan_checkpoints(workdir, config) as ckpt:
    state, meta = ckpt.restore(vaegan_kind.abstract_state(config, model, mesh), which)
  return config, model, state, meta


def open_vaegan(workdir, which="best", *, mesh=None) -> VAEGANRun:
  """The VAE-GAN run in `workdir` at checkpoint `which`: its EMA encoder and generator."""
  config, model, state, meta = restore_vaegan_state(workdir, which, mesh=mesh)
  return VAEGANRun(config=config, model=model, step=int(meta["step"]),
                   encoder=state.ema["encoder"], generator=state.ema["generator"])


# --- MAE pre-training ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PretrainRun:
  """A masked-autoencoder pre-training run: its ViT encoder and MAE decoder with their params.

  `encoder_variables` ({'params'}, no head) are what a ViT classifier of the same shape starts
  from (`model.init_from`); `encoder.apply(encoder_variables, images, method=vit.ViT.encode)`
  gives the final tokens.
  """
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  encoder: vit.ViT
  decoder: mae_models.MAEDecoder
  params: dict  # {"encoder", "decoder"}
  meta: dict

  @property
  def step(self) -> int:
    return int(self.meta["step"])

  @property
  def encoder_variables(self) -> dict:
    return {"params": self.params["encoder"]}


def pretrain_checkpoints(workdir, config) -> checkpoint_lib.Checkpoints:
  return checkpoint_lib.Checkpoints(
      pathlib.Path(workdir) / "checkpoints", best_mode="min", read_only=True,
      best_metric=pretrain_kind.BEST_METRIC if config.data.val_fraction > 0 else None)


def open_pretrain(workdir, which="best", *, mesh=None) -> PretrainRun:
  """The pre-training run in `workdir` at checkpoint `which` ("best": the lowest validation
  loss; a run without validation has none, so "best" gives its last step)."""
  workdir = pathlib.Path(workdir)
  workdir_lib.check_kind(workdir, pretrain_kind.KIND, "pass a `ferjax pretrain` workdir")
  config = pretrain_kind.read_config(workdir)
  mesh = mesh or parallel.make_mesh(config.train.num_devices)
  models = pretrain_kind.build_models(config)
  with pretrain_checkpoints(workdir, config) as ckpt:
    if which == "best" and ckpt.best_step() is None:
      which = "latest"
    state, meta = ckpt.restore(pretrain_kind.abstract_state(config, models, mesh), which)
  return PretrainRun(workdir, config, models.encoder, models.decoder, state.params, meta)


# --- Weights to start a new run from ------------------------------------------------------------
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
    init = open_pretrain(source, "best").encoder_variables
    what += " (pre-trained encoder)"
  elif (source / "config.json").is_file():  # A ferjax train workdir.
    run = open_classifier(source, "best")
    init = dict(run.variables)
    if tuple(run.class_names) != tuple(class_names):
      init["params"] = {k: v for k, v in init["params"].items()
                        if k not in resnet.HEAD_MODULES}
  else:
    init, _ = import_weights.load_init(source)
  return import_weights.apply_init(fresh, init, what=what)
