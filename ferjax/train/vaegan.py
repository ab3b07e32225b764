"""VAE-GAN trainer: one jitted, data-parallel step updates E, G and D; orbax checkpoints.

  ferjax train-vaegan --config experiments/configs/vaegan_synthetic_tiny.py --workdir runs/tiny

The train split lives on the devices as uint8 (split by rows over them, `parallel.put_rows`);
each step draws its batch there with a key folded from the step number, so a resumed run
replays the uninterrupted one exactly. The step is `state, images -> state, metrics` with the
state donated; the batch is split over the mesh axis `data`, parameters are replicated, and
XLA inserts the gradient all-reduce (BatchNorm statistics are over the global batch). The test
split is never loaded.

Losses (weights in `config.loss`; see `default_config` for which choices are ours):
  D: hinge loss, real images against reconstructions and prior samples.
  G: hinge generator loss + reconstruction (D-feature MSE, Larsen et al. 2016, + pixel L1).
  E: beta * KL(q(z|x) || N(0, I)) with a linear warm-up + the same reconstruction terms
     (+ G's adversarial loss only when loss.adversarial_to_encoder).
One forward pass feeds all three; each network then takes the gradient of its own loss only.
"""

import collections
import dataclasses
import json
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import ferjax.data
from ferjax import bench as bench_lib
from ferjax import configs, plots
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.models import vaegan as vaegan_models
from ferjax.train import checkpoint, monitor, parallel

NETS = ("encoder", "generator", "discriminator")
EMA_NETS = ("encoder", "generator")  # The networks sampling uses.
PERTURB_ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0)
BEST_METRIC = "val_psnr"
# Traces of the train step in the current run (a Python side effect runs only while tracing):
# it must stay at one, i.e. the step compiles once.
TRACE_COUNTS = collections.Counter()


# ================================================================================================
# Config
# ================================================================================================
def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads. Experiment configs start here and change what they need.

  The seed paper (Li et al. 2024, arXiv 2411.17254) publishes no architecture, resolution,
  loss weights or optimiser: every value below is our choice unless a comment names a source.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameters, batch sampling and noise all derive from it.

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic"  # One of ferjax.data.DATASET_NAMES.
  config.data.split = "train"  # Trained on; the test split is never loaded.
  config.data.val_split = "validation"  # Held out for recon MSE / PSNR / KL; None: no validation.
  config.data.image_size = 64  # Model resolution (32..128); images are resized to it.
  config.data.channels = 1  # 1 (gray) or 3 (RGB).
  config.data.data_dir = None  # Prepared datasets (None: $FERJAX_DATA_DIR or ~/.ferjax/datasets).
  config.data.manual_dir = None  # Raw files, prepared on first use.
  config.data.num_examples = None  # Train examples: synthetic's size, else the first N (None: all).
  config.data.val_examples = None  # Validation examples, as above.
  # Long-tailed train profile (max/min count), as the classifier's data.imbalance_ratio, so the
  # VAE-GAN of a *-LT protocol sees only the images its classifiers see (None: as it comes).
  config.data.imbalance_ratio = None

  config.model = ml_collections.ConfigDict()
  config.model.arch = "dcgan"  # "dcgan" (DCGAN-64 layout) or "resnet" (residual, spectral-norm D).
  config.model.latent_dim = 128  # Ours.
  config.model.widths = None  # One per stride-2 stage; None: 64, 128, 256, 512, ... (DCGAN).
  config.model.dtype = "float32"  # Compute dtype ("bfloat16" on accelerators); params stay f32.

  config.loss = ml_collections.ConfigDict()
  # KL per example (summed over latent dims) against reconstruction terms that are means over
  # pixels / features: beta therefore sets how much of the latent code the prior may erase. Ours.
  config.loss.beta = 1e-3
  config.loss.kl_warmup_steps = 2000  # beta rises linearly from 0 over these steps. Ours.
  config.loss.feature_recon_weight = 1.0  # MSE in D's feature space (Larsen et al. 2016).
  config.loss.pixel_l1_weight = 1.0  # Pixel L1 (ours: keeps early reconstructions anchored).
  config.loss.adv_weight = 0.1  # G's hinge loss (weight ours).
  # Whether G's adversarial loss also trains E. Off as in Larsen et al.: E learns from KL and
  # reconstruction only.
  config.loss.adversarial_to_encoder = False

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-4  # Adam for each of E, G, D (DCGAN's settings).
  config.optim.b1 = 0.5
  config.optim.b2 = 0.999
  # EMA of E's and G's params and batch stats, used for validation and sampling. The decay
  # warms up as min(ema_decay, (1 + step) / (10 + step)) so short runs are not dominated by
  # the initial weights. Ours.
  config.optim.ema_decay = 0.999

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 20000
  config.train.batch_size = 64  # Global batch, split over devices (a multiple of their count).
  config.train.num_devices = None  # None: all devices of all processes.
  config.train.log_every = 100  # metrics.jsonl (means over the interval) and the progress bar.
  config.train.eval_every = 1000  # Validation.
  config.train.sample_every = 1000  # Reconstruction, prior-sample and perturbation grids.
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  return config


def validate_config(config) -> None:
  """Range checks that run before anything loads or compiles; each names the field it rejects."""
  _check_fields(config, default_config())
  d, m, l, o, t = config.data, config.model, config.loss, config.optim, config.train
  check = configs.check
  check(_is_int(config.seed) and config.seed >= 0, "seed", "an integer >= 0", config.seed)

  check(d.name in ferjax.data.DATASET_NAMES, "data.name",
        f"one of {', '.join(ferjax.data.DATASET_NAMES)}", d.name)
  for field, split in (("data.split", d.split), ("data.val_split", d.val_split)):
    check(split is None or (isinstance(split, str) and split != "test"), field,
          "a split name other than 'test' (the test split is never used for training or "
          "checkpoint selection)", split)
  check(d.split is not None, "data.split", "a split name", d.split)
  check(d.imbalance_ratio is None or (isinstance(d.imbalance_ratio, (int, float))
                                      and d.imbalance_ratio >= 1), "data.imbalance_ratio",
        "None or a number >= 1 (largest / smallest class)", d.imbalance_ratio)
  sizes = [s for s in range(32, 129) if vaegan_models.smallest_map(s) <= vaegan_models.MAX_MAP]
  check(_is_int(d.image_size) and d.image_size in sizes, "data.image_size",
        f"one of {sizes} (32..128 px, halving down to a 3x3..8x8 map)", d.image_size)
  check(d.channels in (1, 3) and _is_int(d.channels), "data.channels", "1 or 3", d.channels)
  for field in ("num_examples", "val_examples"):
    value = d[field]
    check(value is None or (_is_int(value) and value >= 1), f"data.{field}",
          "None or an integer >= 1", value)

  check(m.arch in vaegan_models.ARCHS, "model.arch", " or ".join(vaegan_models.ARCHS), m.arch)
  check(_is_int(m.latent_dim) and m.latent_dim >= 1, "model.latent_dim", "an integer >= 1",
        m.latent_dim)
  stages = vaegan_models.num_stages(d.image_size)
  widths = m.widths
  check(widths is None or (isinstance(widths, (tuple, list)) and len(widths) == stages
                           and all(_is_int(w) and w >= 1 for w in widths)),
        "model.widths", f"None or {stages} positive integers ({d.image_size} px has {stages} "
        f"stride-2 stages, e.g. {vaegan_models.default_widths(d.image_size)})", widths)
  check(m.dtype in ("float32", "bfloat16"), "model.dtype", "'float32' or 'bfloat16'", m.dtype)

  for field in ("beta", "feature_recon_weight", "pixel_l1_weight", "adv_weight"):
    check(_is_number(l[field]) and 0 <= l[field] < math.inf, f"loss.{field}",
          "a finite number >= 0", l[field])
  check(_is_int(l.kl_warmup_steps) and l.kl_warmup_steps >= 0, "loss.kl_warmup_steps",
        "an integer >= 0", l.kl_warmup_steps)
  check(isinstance(l.adversarial_to_encoder, bool), "loss.adversarial_to_encoder", "True or False",
        l.adversarial_to_encoder)

  check(_is_number(o.lr) and 0 < o.lr < math.inf, "optim.lr", "a finite number > 0", o.lr)
  for field in ("b1", "b2", "ema_decay"):
    check(_is_number(o[field]) and 0 <= o[field] < 1, f"optim.{field}", "a number in [0, 1)",
          o[field])

  for field in ("num_steps", "batch_size", "log_every", "eval_every", "sample_every",
                "checkpoint_every", "keep_checkpoints"):
    check(_is_int(t[field]) and t[field] >= 1, f"train.{field}", "an integer >= 1", t[field])
  available = jax.device_count()
  check(t.num_devices is None or (_is_int(t.num_devices) and 1 <= t.num_devices <= available),
        "train.num_devices", f"None or 1..{available} (devices available)", t.num_devices)
  num_devices = t.num_devices or available
  check(t.batch_size % num_devices == 0, "train.batch_size",
        f"a multiple of the device count ({num_devices})", t.batch_size)


def _check_fields(config, template, prefix=""):
  """Every field of the template present, nothing unknown (a typo in a config file)."""
  for key in template.keys():
    if key not in config:
      raise UserError(f"config field {prefix + key!r} is missing (start from "
                      "ferjax.train.vaegan.default_config())")
  for key in config.keys():
    if key not in template:
      raise UserError(f"unknown config field {prefix + key!r} (known: "
                      f"{', '.join(sorted(template.keys()))})")
    if isinstance(template[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise UserError(f"config field {prefix + key!r}: expected a group of fields")
      _check_fields(config[key], template[key], prefix + key + ".")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def build_model(config) -> vaegan_models.VAEGAN:
  m = config.model
  return vaegan_models.build(arch=m.arch, image_size=config.data.image_size,
                             channels=config.data.channels, latent_dim=m.latent_dim,
                             widths=m.widths, dtype=m.dtype)


# ================================================================================================
# Data
# ================================================================================================
def load_dataset(config, split: str, limit=None) -> ferjax.data.Dataset:
  """One split (images and labels) at the model's resolution: in host memory, or left on disk
  (`LazyImages`) for AffectNet and for the train split when there are several processes.

  The synthetic set is always the default one (its own fixed seed), whatever config.seed: the
  training seed must not change the data, so that the classifiers see the same faces.
  """
  d = config.data
  lt = d.imbalance_ratio if split == d.split else None
  options = {}
  if d.name == "synthetic":
    options = {"num_examples": limit, **({"imbalance_ratio": lt} if lt else {})}
  ds = ferjax.data.load(d.name, split, data_dir=d.data_dir, manual_dir=d.manual_dir,
                        image_size=d.image_size, channels=d.channels,
                        lazy=parallel.lazy_train_reads(split == d.split), **options)
  if lt and d.name != "synthetic":
    keep = ferjax.data.dataset.long_tail_subset(ds.labels, ds.num_classes, lt)
    ds = ferjax.data.Dataset(ds.images[keep], ds.labels[keep], ds.class_names, ds.name, ds.split)
  if limit is not None and len(ds) > limit:
    first = np.arange(limit)  # An index array, not a slice: lazily read images stay on disk.
    ds = ferjax.data.Dataset(ds.images[first], ds.labels[first], ds.class_names, ds.name,
                             ds.split)
  if len(ds) == 0:
    raise UserError(f"dataset {d.name!r} split {split!r} holds no images")
  return ds


def load_images(config, split: str, limit=None) -> np.ndarray:
  """uint8 [N, S, S, C] of one split at the model's resolution (see `load_dataset`)."""
  return load_dataset(config, split, limit).images


# ================================================================================================
# Train state
# ================================================================================================
def make_optimizers(config) -> dict:
  o = config.optim
  return {net: optax.adam(o.lr, b1=o.b1, b2=o.b2) for net in NETS}


def init_state(model, optimizers, seed: int) -> dict:
  """The whole train state as one pytree of arrays (raw uint32 PRNG key, no typed keys)."""
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = model.init(init_key)
  params = {net: variables[net]["params"] for net in NETS}
  batch_stats = {net: variables[net]["batch_stats"] for net in NETS}
  return {
      "step": jnp.zeros((), jnp.int32),
      "rng": rng,  # Base key; step keys are fold_in(rng, step).
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": {net: optimizers[net].init(params[net]) for net in NETS},
      "ema": {net: {"params": params[net], "batch_stats": batch_stats[net]} for net in EMA_NETS},
  }


def create_state(model, optimizers, seed: int, mesh):
  """`init_state` compiled straight into replicated arrays on the mesh.

  Compiled without LLVM optimisation: it runs once, and on CPU the optimised build of the
  initialisers' random-number code takes ~20 s (3 s unoptimised). Always the same options, so
  the same seed gives the same parameters.
  """
  init = jax.jit(lambda: init_state(model, optimizers, seed),
                 out_shardings=parallel.replicated(mesh))
  return init.lower().compile(compiler_options=FAST_COMPILE)()


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # For functions that run once.


# ================================================================================================
# Losses and per-network gradients
# ================================================================================================
def kl_weight_at(step, loss_config):
  """beta, ramped linearly from 0 over kl_warmup_steps."""
  if loss_config.kl_warmup_steps == 0:
    return jnp.float32(loss_config.beta)
  ramp = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / loss_config.kl_warmup_steps)
  return loss_config.beta * ramp


def compute_losses(model, params, batch_stats, images, key, loss_config, kl_weight):
  """One train-mode forward pass of E, G and D on a batch of images in [-1, 1].

  Returns (losses, (new_batch_stats, metrics)); `losses` maps each network to its own loss.
  """
  eps_key, prior_key = jax.random.split(key)
  batch = images.shape[0]

  def apply(net, *args):
    variables = {"params": params[net], "batch_stats": batch_stats[net]}
    out, updates = getattr(model, net).apply(variables, *args, train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]

  (mu, logvar), encoder_stats = apply("encoder", images)
  eps = jax.random.normal(eps_key, mu.shape)
  z = vaegan_models.perturb(mu, logvar, eps, 1.0)
  z_prior = jax.random.normal(prior_key, mu.shape)
  # One G pass and one D pass over everything: BatchNorm normalises real and fake together,
  # so D cannot tell them apart by batch statistics.
  fakes, generator_stats = apply("generator", jnp.concatenate([z, z_prior]))
  recon = fakes[:batch]
  (logits, features), discriminator_stats = apply("discriminator",
                                                  jnp.concatenate([images, fakes]))
  logits_real, logits_fake = logits[:batch], logits[batch:]
  logits_recon = logits[batch:2 * batch]
  features_real, features_recon = features[:batch], features[batch:2 * batch]

  feature_recon = jnp.mean(jnp.square(features_recon - jax.lax.stop_gradient(features_real)))
  pixel_l1 = jnp.mean(jnp.abs(recon - images))
  recon_loss = (loss_config.feature_recon_weight * feature_recon
                + loss_config.pixel_l1_weight * pixel_l1)
  kl = jnp.mean(vaegan_models.kl_divergence(mu, logvar))
  d_loss = vaegan_models.hinge_discriminator_loss(logits_real, logits_fake)
  g_adv = vaegan_models.hinge_generator_loss(logits_fake)

  losses = {
      "discriminator": d_loss,
      "generator": loss_config.adv_weight * g_adv + recon_loss,
      "encoder": kl_weight * kl + recon_loss + (
          loss_config.adv_weight * g_adv if loss_config.adversarial_to_encoder else 0.0),
  }
  new_batch_stats = {"encoder": encoder_stats, "generator": generator_stats,
                     "discriminator": discriminator_stats}
  metrics = {
      "d_loss": d_loss, "g_loss": losses["generator"], "e_loss": losses["encoder"],
      "g_adv": g_adv, "feature_recon": feature_recon, "pixel_l1": pixel_l1, "kl": kl,
      "kl_weight": kl_weight,
      "recon_mse": jnp.mean(jnp.square((recon - images) / 2)),  # On the [0, 1] pixel scale.
      "d_acc_real": jnp.mean(logits_real > 0), "d_acc_fake": jnp.mean(logits_fake < 0),
      "d_acc_recon": jnp.mean(logits_recon < 0),
      "sigma_mean": jnp.mean(jnp.exp(0.5 * logvar)),
  }
  return losses, (new_batch_stats, metrics)


def compute_grads(model, params, batch_stats, images, key, loss_config, kl_weight):
  """Gradient of each network's own loss w.r.t. its own parameters, from one forward pass.

  D's gradient comes from the hinge loss only (none from G's loss), G's from its adversarial
  and reconstruction terms, E's from KL + reconstruction (+ adversarial when the switch is on).
  Taking one backward pass per loss and keeping only that network's part is the same as
  stop_gradient on everything else; XLA prunes the parts of each pass that are not kept.
  """
  def forward(params):
    return compute_losses(model, params, batch_stats, images, key, loss_config, kl_weight)

  losses, backward, (new_batch_stats, metrics) = jax.vjp(forward, params, has_aux=True)
  grads = {}
  for net in NETS:
    only_this_loss = {name: jnp.float32(name == net) for name in losses}
    grads[net] = backward(only_this_loss)[0][net]
  return grads, new_batch_stats, metrics


# ================================================================================================
# Train step (jitted once, data-parallel)
# ================================================================================================
def make_train_step(model, config, mesh, num_examples: int):
  """`train_step(state, images) -> (state, metrics)`: jitted, state donated.

  `images` is the resident uint8 train set (`parallel.put_rows`: split by rows over the mesh,
  padded; its first `num_examples` rows are real); the batch is drawn, flipped and converted
  on the device, then split along the mesh's `data` axis.
  """
  optimizers = make_optimizers(config)
  loss_config = config.loss
  batch_size, ema_decay = config.train.batch_size, config.optim.ema_decay
  batch_sharding = parallel.batch_sharding(mesh)

  def train_step(state, images):
    TRACE_COUNTS["train_step"] += 1
    step = state["step"]
    index_key, flip_key, loss_key = jax.random.split(jax.random.fold_in(state["rng"], step), 3)

    # --- input: sample, gather, flip, all on the device ---
    index = pipeline.sample_uniform(index_key, num_examples, batch_size)
    index = jax.lax.with_sharding_constraint(index, batch_sharding)
    batch = pipeline.random_flip(flip_key, images[index])
    batch = jax.lax.with_sharding_constraint(pipeline.to_float(batch), batch_sharding)

    # --- gradients and updates ---
    kl_weight = kl_weight_at(step, loss_config)
    grads, batch_stats, metrics = compute_grads(
        model, state["params"], state["batch_stats"], batch, loss_key, loss_config, kl_weight)
    params, opt_state = {}, {}
    for net in NETS:
      updates, opt_state[net] = optimizers[net].update(grads[net], state["opt_state"][net],
                                                       state["params"][net])
      params[net] = optax.apply_updates(state["params"][net], updates)
      metrics[f"grad_norm_{net[0]}"] = optax.tree.norm(grads[net])
      # A non-finite parameter shows up here at once (the NaN guard reads it).
      metrics[f"param_norm_{net[0]}"] = optax.tree.norm(params[net])

    # --- EMA of E and G (params and batch stats) for validation and sampling ---
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    new = {net: {"params": params[net], "batch_stats": batch_stats[net]} for net in EMA_NETS}
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], new)

    new_state = {"step": step + 1, "rng": state["rng"], "params": params,
                 "batch_stats": batch_stats, "opt_state": opt_state, "ema": ema}
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated))


# ================================================================================================
# Validation and sample grids (EMA parameters, eval-mode BatchNorm)
# ================================================================================================
def make_eval_step(model, mesh):
  """`eval_step(ema, images uint8) -> (squared error [B], KL [B])`, reconstructing from mu."""
  def eval_step(ema, images):
    x = pipeline.to_float(images)
    mu, logvar = model.encode(ema["encoder"]["params"], ema["encoder"]["batch_stats"], x)
    recon = model.decode(ema["generator"]["params"], ema["generator"]["batch_stats"], mu)
    squared_error = jnp.mean(jnp.square((recon - x) / 2), axis=(1, 2, 3))  # [0, 1] pixel scale.
    return squared_error, vaegan_models.kl_divergence(mu, logvar)

  return jax.jit(eval_step, out_shardings=parallel.replicated(mesh))


def evaluate(eval_step, ema, images: np.ndarray, batch_size: int, mesh) -> dict:
  """Reconstruction MSE, PSNR (dB, pixels in [0, 1]) and KL over a whole split."""
  n = len(images)
  padded = -(-n // batch_size) * batch_size
  images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), np.uint8)])
  sharding = parallel.batch_sharding(mesh)
  errors, kls = [], []
  for start in range(0, padded, batch_size):
    batch = jax.device_put(images[start:start + batch_size], sharding)
    error, kl = eval_step(ema, batch)
    errors.append(error)
    kls.append(kl)
  mse = float(np.mean(np.concatenate(jax.device_get(errors))[:n]))
  kl = float(np.mean(np.concatenate(jax.device_get(kls))[:n]))
  return {"val_mse": mse, "val_psnr": 10.0 * math.log10(1.0 / max(mse, 1e-12)), "val_kl": kl}


def make_sample_fn(model):
  """`sample(ema, real uint8 [R], prior_z [P, d], eps [E, d]) -> (recon, prior, perturbed)`.

  perturbed[e, a] decodes the first real image's latent mu + alpha_a * sigma * eps_e.
  """
  def sample(ema, real, prior_z, eps):
    mu, logvar = model.encode(ema["encoder"]["params"], ema["encoder"]["batch_stats"], real)
    decode = lambda z: model.decode(ema["generator"]["params"], ema["generator"]["batch_stats"], z)
    alphas = jnp.asarray(PERTURB_ALPHAS)[None, :, None]
    z = vaegan_models.perturb(mu[0], logvar[0], eps[:, None, :], alphas)
    perturbed = decode(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:2], *real.shape[1:])
    return decode(mu), decode(prior_z), perturbed

  return jax.jit(sample)


def save_sample_grids(sample_fn, ema, fixed, out_dir: pathlib.Path, step: int) -> dict:
  """Writes the three grids for `step`; returns {kind: path}."""
  real = fixed["real"]
  recon, prior, perturbed = jax.device_get(sample_fn(ema, real, fixed["prior_z"], fixed["eps"]))
  real = np.asarray(jax.device_get(real))
  ncol = 8
  # Rows alternate: 8 real images, then their 8 reconstructions.
  pairs = np.concatenate([np.stack([plots.to_uint8(real[i:i + ncol]),
                                    plots.to_uint8(recon[i:i + ncol])])
                          for i in range(0, len(real), ncol)])
  paths = {
      "reconstructions": plots.save_image_grid(
          pairs.reshape(-1, *real.shape[1:]), out_dir / f"reconstructions_{step:07d}.png",
          ncol=ncol),
      "prior_samples": plots.save_image_grid(
          prior, out_dir / f"prior_samples_{step:07d}.png", ncol=ncol),
  }
  # Each row: the source image, then alpha = 0, 0.5, 1, 2, 3 with one eps per row.
  source = np.repeat(plots.to_uint8(real[:1])[None], len(perturbed), axis=0)
  rows = np.concatenate([source, plots.to_uint8(perturbed)], axis=1)
  paths["perturbation"] = plots.save_image_grid(
      rows.reshape(-1, *real.shape[1:]), out_dir / f"perturbation_{step:07d}.png",
      ncol=rows.shape[1])
  return paths


# ================================================================================================
# Main loop
# ================================================================================================
def train_and_evaluate(config, workdir) -> dict:
  """Trains (or resumes from the latest checkpoint in `workdir`) and returns a summary dict."""
  validate_config(config)
  t_start = time.perf_counter()
  TRACE_COUNTS.clear()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    configs.save_config(config, workdir / "config.json")
  t = config.train

  # --- mesh, data, model, state ---
  mesh = parallel.make_mesh(t.num_devices)
  parallel.check_batch_size(t.batch_size, mesh, "train.batch_size")
  train_images = load_images(config, config.data.split, config.data.num_examples)
  val_images = None
  if config.data.val_split is not None:
    val_images = load_images(config, config.data.val_split, config.data.val_examples)
  model = build_model(config)
  state = create_state(model, make_optimizers(config), config.seed, mesh)

  ckpts = checkpoint.Checkpoints(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                 best_metric=BEST_METRIC if val_images is not None else None)
  start_step = 0
  if ckpts.latest_step() is not None:
    state, _ = ckpts.restore(state, "latest")
    start_step = int(state["step"])
    if is_main:
      _drop_metrics_after(workdir, start_step)  # Steps after the checkpoint are replayed.
    print(f"vaegan: resuming from step {start_step} in {workdir}")
  state = jax.device_put(state, parallel.replicated(mesh))

  images = parallel.put_rows(train_images, mesh)
  train_step = make_train_step(model, config, mesh, len(train_images))
  eval_step = make_eval_step(model, mesh)
  sample_fn = make_sample_fn(model)
  fixed = _fixed_sample_inputs(config, val_images if val_images is not None else train_images)
  writer = monitor.MetricWriter(workdir)
  samples_dir = workdir / "samples"

  # --- loop ---
  step, pending, val_metrics, train_metrics = start_step, [], {}, {}
  throughput, steps_since_log = monitor.Throughput(), 0
  grids = {}
  try:
    with monitor.progress(t.num_steps, initial=start_step, desc="vaegan") as bar:
      while step < t.num_steps:
        state, metrics = train_step(state, images)
        pending.append(metrics)  # Device arrays; fetched only at logging points.
        step += 1
        steps_since_log += 1
        bar.update(1)
        last = step == t.num_steps
        if step % t.log_every == 0 or step % t.checkpoint_every == 0 or last:
          # Fetching blocks on the step; the NaN guard runs before any checkpoint is written.
          history = jax.device_get(pending)
          pending = []
          for i, m in enumerate(history):
            monitor.check_finite(step - len(history) + 1 + i, m)
          train_metrics = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
          train_metrics.update(throughput.tick(steps_since_log, t.batch_size))
          steps_since_log = 0
          if is_main:
            writer.write(step, train_metrics)
          bar.set_postfix(d=f"{train_metrics['d_loss']:.2f}",
                          l1=f"{train_metrics['pixel_l1']:.3f}",
                          kl=f"{train_metrics['kl']:.1f}", refresh=False)
        if val_images is not None and (step % t.eval_every == 0 or last):
          val_metrics = evaluate(eval_step, state["ema"], val_images, t.batch_size, mesh)
          if is_main:
            writer.write(step, val_metrics)
        if is_main and (step % t.sample_every == 0 or last):
          grids = save_sample_grids(sample_fn, state["ema"], fixed, samples_dir, step)
        if step % t.checkpoint_every == 0 or last:
          fresh_val = val_metrics if (step % t.eval_every == 0 or last) else None
          ckpts.save(step, state, metrics=fresh_val)
  finally:
    ckpts.close()

  # --- summary files ---
  if is_main:
    for kind, path in grids.items():  # The final grids, where a person looks first.
      shutil.copyfile(path, workdir / f"{kind}.png")
    plots.save_curves(monitor.read_metrics(workdir), CURVE_KEYS, workdir / "curves.png",
                      title="VAE-GAN")
  result = {"step": step, "wall_s": round(time.perf_counter() - t_start, 1),
            "workdir": str(workdir), "train": train_metrics, "val": val_metrics,
            "train_step_traces": TRACE_COUNTS["train_step"]}
  if is_main:
    (workdir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


CURVE_KEYS = ("d_loss", "g_adv", "feature_recon", "pixel_l1", "kl", "d_acc_real", "d_acc_fake",
              "val_mse", "val_psnr", "val_kl")


def _fixed_sample_inputs(config, images: np.ndarray) -> dict:
  """The same images and noise at every sampling point, so grids compare across steps."""
  prior_key, eps_key = jax.random.split(jax.random.PRNGKey(config.seed + 1))
  d = config.model.latent_dim
  return {"real": jnp.asarray(images[:16]), "prior_z": jax.random.normal(prior_key, (32, d)),
          "eps": jax.random.normal(eps_key, (4, d))}


def _drop_metrics_after(workdir: pathlib.Path, step: int) -> None:
  records = monitor.read_metrics(workdir)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) != len(records):
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def cli_main(args) -> int:
  """`ferjax train-vaegan --config FILE --workdir DIR [--config.x=y ...]`."""
  config = configs.load_config(args.config, getattr(args, "overrides", None) or ())
  result = train_and_evaluate(config, args.workdir)
  val = result["val"]
  line = f"vaegan: {result['step']} steps in {result['wall_s']:.0f} s"
  if val:
    line += (f"; validation recon MSE {val['val_mse']:.4f}, PSNR {val['val_psnr']:.2f} dB, "
             f"KL {val['val_kl']:.1f}")
  print(line)
  print(f"vaegan: wrote {result['workdir']}/ (reconstructions.png, prior_samples.png, "
        "perturbation.png, curves.png, metrics.jsonl, checkpoints/)")
  return 0


# ================================================================================================
# Benchmark
# ================================================================================================
def bench(config, batch_size=None, steps: int = 20) -> dict:
  """Images/s of the real train step (on-device sampling included) on random data."""
  config = ml_collections.ConfigDict(config.to_dict())
  if batch_size is not None:
    config.train.batch_size = int(batch_size)
  validate_config(config)
  mesh = parallel.make_mesh(config.train.num_devices)
  d = config.data
  num_examples = max(4 * config.train.batch_size, 256)
  images = np.random.default_rng(0).integers(
      0, 256, (num_examples, d.image_size, d.image_size, d.channels), dtype=np.uint8)
  model = build_model(config)
  state = create_state(model, make_optimizers(config), config.seed, mesh)
  train_step = make_train_step(model, config, mesh, num_examples)

  def step_fn(carry):
    state, images = carry
    state, _ = train_step(state, images)
    return state, images

  carry = (state, parallel.put_rows(images, mesh))
  return bench_lib.time_step(
      step_fn, carry, what="vaegan", batch=config.train.batch_size, dtype=config.model.dtype,
      steps=steps, extra={"arch": config.model.arch, "image_size": d.image_size,
                          "channels": d.channels,
                          "widths": list(config.model.widths or
                                         vaegan_models.default_widths(d.image_size))})


# ================================================================================================
# Loading a trained model for sampling
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class TrainedVAEGAN:
  """EMA encoder and generator of a run, with eval-mode encode/decode.

  `encode(images)` / `decode(z)` use the stored variables; inside your own jitted code use
  `model.encode(encoder['params'], encoder['batch_stats'], images)` and `model.decode(...)`,
  which are pure functions of explicit variables (jit and vmap friendly).
  """
  config: ml_collections.ConfigDict
  model: vaegan_models.VAEGAN
  step: int
  encoder: dict  # {"params", "batch_stats"}
  generator: dict

  def encode(self, images):
    """images uint8 (0..255) or float in [-1, 1], [B, S, S, C] -> (mu, logvar) [B, latent_dim]."""
    return _encode(self.model, self.encoder, jnp.asarray(images))

  def decode(self, z):
    """latents [B, latent_dim] -> float32 images in [-1, 1]."""
    return _decode(self.model, self.generator, jnp.asarray(z))


@jax.jit(static_argnums=0)
def _encode(model, variables, images):
  return model.encode(variables["params"], variables["batch_stats"], images)


@jax.jit(static_argnums=0)
def _decode(model, variables, z):
  return model.decode(variables["params"], variables["batch_stats"], z)


def read_config(workdir) -> ml_collections.ConfigDict:
  return configs.read_saved(default_config(), pathlib.Path(workdir) / "config.json",
                            "train-vaegan")


def restore_state(workdir, which="latest", config=None):
  """(config, model, state, meta) of the checkpoint `which` ("latest", "best" or a step)."""
  config = config or read_config(workdir)
  model = build_model(config)
  # Shapes only (nothing is initialised or compiled), placed on one device.
  abstract = jax.eval_shape(lambda: init_state(model, make_optimizers(config), config.seed))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract)
  ckpts = checkpoint.Checkpoints(pathlib.Path(workdir) / "checkpoints",
                                 best_metric=BEST_METRIC if config.data.val_split else None)
  try:
    state, meta = ckpts.restore(target, which)
  finally:
    ckpts.close()
  return config, model, state, meta


def load_for_sampling(workdir, which="latest") -> TrainedVAEGAN:
  """The EMA encoder/generator of a run's checkpoint `which` ("latest", "best" or a step)."""
  config, model, state, meta = restore_state(workdir, which)
  return TrainedVAEGAN(config=config, model=model, step=int(meta["step"]),
                       encoder=state["ema"]["encoder"], generator=state["ema"]["generator"])


def untrained_for_sampling(channels: int = 1, seed: int = 0) -> TrainedVAEGAN:
  """A freshly initialised VAE-GAN of the default config (for benchmarks: same cost)."""
  config = default_config()
  config.data.channels = channels
  model = build_model(config)
  state = create_state(model, make_optimizers(config), seed, parallel.make_mesh(1))
  return TrainedVAEGAN(config=config, model=model, step=0, encoder=state["ema"]["encoder"],
                       generator=state["ema"]["generator"])
