"""The synthesis stage of the classifier's batch: sampling -> gather -> synthesis -> augmentation.

Each batch is composed by a `semantic.BatchPlan`: B - M real slots drawn from the real part of
the rebalanced distribution, and M synthetic slots whose classes follow the gaps the target
leaves. Each synthetic slot takes a fresh real seed image of its class, encodes it with the
frozen (EMA) VAE-GAN encoder, perturbs the latent and decodes it with the frozen generator, all
inside the jitted train step. Optionally a classifier trained on real data filters the samples:
those it does not assign to the intended class with probability >= a threshold get a lower
loss weight (0 drops them).

Two choices of ours beyond the paper (config fields, off by default):
- `augment.decode = "residual"`: the synthetic face is seed + G(z') - G(mu), the change the
  perturbation makes, added to the sharp real seed, instead of the (blurrier) decoding G(z')
  itself. It keeps the seed's fine detail, which a small VAE-GAN's decoder loses.
- `augment.start_step`: batches are the plain (instance-sampled) real batches before this
  step, rebalanced with synthetic faces after it, as deferred re-weighting (DRW) defers its
  weights: features are learned on real data first.

See docs/methods.md (Semantic augmentation with a VAE-GAN, Residual decoding, Deferred synthesis,
Teacher filter).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ferjax import runs
from ferjax.augment import semantic
from ferjax.data import pipeline
from ferjax.data.images import convert_images
from ferjax.errors import UserError


DECODES = ("full", "residual")


def enabled(config) -> bool:
  return bool(config.augment.get("vaegan_workdir"))


def to_format(images, image_size: int, channels: int):
  """float images [B, H, W, C] in [-1, 1] -> [B, image_size, image_size, channels] (bilinear)."""
  b, h, w, c = images.shape
  if (h, w) != (image_size, image_size):
    images = jax.image.resize(images, (b, image_size, image_size, c), "linear")
  if c != channels:
    if channels == 1:  # luma, as ferjax.data.images.convert_images does for uint8
      images = images @ jnp.array([0.299, 0.587, 0.114], images.dtype)[:, None]
    else:
      images = jnp.repeat(images, 3, axis=-1)
  return images


@dataclasses.dataclass(frozen=True)
class Stage:
  """What `build` returns: the stage function, its device data and the plan (for reports)."""
  synthesize: callable
  data: dict
  plan: semantic.BatchPlan
  vaegan_step: int


def build(config, train_images: np.ndarray, train_labels: np.ndarray, num_classes: int) -> Stage:
  """Restores the frozen VAE-GAN (and filter classifier) and returns the synthesis stage."""
  a = config.augment
  if config.sampler.name != "instance":
    raise UserError("config field 'sampler.name': semantic augmentation composes each batch "
                    f"itself (augment.target), expected 'instance', got {config.sampler.name!r}")
  if a.mode not in semantic.MODES:
    raise UserError(f"config field 'augment.mode': expected one of {', '.join(semantic.MODES)}, "
                    f"got {a.mode!r}")
  if a.alpha < 0:
    raise UserError(f"config field 'augment.alpha': expected >= 0, got {a.alpha!r}")
  if a.decode not in DECODES:
    raise UserError(f"config field 'augment.decode': expected one of {', '.join(DECODES)}, "
                    f"got {a.decode!r}")
  if not 0 <= a.start_step < config.train.num_steps:
    raise UserError(f"config field 'augment.start_step': expected 0..train.num_steps - 1, got "
                    f"{a.start_step!r}")
  vae = runs.open_vaegan(a.vaegan_workdir, a.vaegan_checkpoint)
  check_classes(vae, num_classes,
                f"config field 'augment.vaegan_workdir' ({a.vaegan_workdir})")
  plan = plan_for(config, train_labels, num_classes)
  data = stage_data(vae, plan, a.mode, train_images, train_labels, num_classes)
  filter_model = None
  if a.filter_workdir:
    filter_model, data["filter"] = _restore_filter(a.filter_workdir)
  synthesize = make_synthesize(vae.model, plan.num_synthetic, config.data.image_size,
                               config.data.channels, mode=a.mode, alpha=float(a.alpha),
                               residual=a.decode == "residual", start_step=int(a.start_step),
                               synthetic_weight=float(a.synthetic_weight), filter_model=filter_model,
                               filter_threshold=float(a.filter_threshold),
                               filtered_weight=float(a.filtered_weight))
  return Stage(synthesize, data, plan, vae.step)


def check_classes(vae, num_classes: int, where: str) -> None:
  """A class-conditional VAE-GAN draws only the classes it was trained on: its class count must
  be the dataset's. `where` starts the message (the field or flag naming the VAE-GAN)."""
  if vae.conditional and vae.model.num_classes != num_classes:
    raise UserError(f"{where}: a class-conditional VAE-GAN of {vae.model.num_classes} classes; "
                    f"expected one of this dataset's {num_classes} classes or an unconditional "
                    "one")


def plan_for(config, train_labels, num_classes: int) -> semantic.BatchPlan:
  a = config.augment
  counts = np.bincount(train_labels, minlength=num_classes)
  return semantic.plan_batches(counts, batch_size=config.train.batch_size, target=a.target,
                               fill=a.fill, explicit=a.target_counts)


def stage_data(vae, plan, mode, train_images, train_labels, num_classes: int) -> dict:
  """The stage's device arrays: frozen EMA encoder/generator, class distributions, statistics."""
  no_stats = (jnp.zeros((num_classes, 1)), jnp.zeros((num_classes, 1)))
  return {
      "encoder": vae.encoder, "generator": vae.generator,
      "real_probs": jnp.asarray(plan.real_probs, jnp.float32),
      "synth_probs": jnp.asarray(plan.synth_probs, jnp.float32),
      "class_stats": class_latent_stats(vae, train_images, train_labels, num_classes)
      if mode == "class_gaussian" else no_stats,
  }


def make_synthesize(vae_model, num_synthetic: int, image_size: int, channels: int, *, mode: str,
                    alpha: float, residual: bool = False, start_step: int = 0,
                    synthetic_weight: float = 1.0, filter_model=None,
                    filter_threshold: float = 0.5, filtered_weight: float = 0.0):
  """The stage: `synthesize(key, step, images, labels, weights, data) -> same, recomposed`.

  `data` is the classifier's device data: "images" (uint8), "class_index", and "synthesis" (the
  VAE-GAN variables, the plan's class distributions, latent class statistics, filter).
  """
  def synthesize(key, step, images, labels, weights, data):
    recomposed = rebalance(key, data, images.shape[0], images.dtype, labels.dtype)
    if start_step == 0:
      return recomposed
    # Before start_step the sampler's plain batch; shapes stay static either way.
    return jax.tree.map(lambda new, old: jnp.where(step >= start_step, new, old), recomposed,
                        (images, labels, weights))

  def rebalance(key, data, batch, image_dtype, label_dtype):
    aux = data["synthesis"]
    num_real = batch - num_synthetic
    real_key, class_key, seed_key, partner_key, latent_key = jax.random.split(key, 5)
    # Real slots: the real part of the rebalanced distribution.
    real_idx, _ = pipeline.sample_weighted(real_key, data["class_index"], aux["real_probs"],
                                           num_real)
    real_images = pipeline.to_float(data["images"][real_idx]).astype(image_dtype)
    real_labels = data["labels"][real_idx].astype(label_dtype)
    if num_synthetic == 0:
      return real_images, real_labels, jnp.ones((batch,), jnp.float32)
    # Synthetic slots: classes by the gaps, one real seed image of that class each.
    classes = jax.random.categorical(class_key, jnp.log(jnp.maximum(aux["synth_probs"], 1e-30)),
                                     shape=(num_synthetic,))
    seeds = data["images"][pipeline.sample_by_class(seed_key, data["class_index"], classes)]
    partners = (data["images"][pipeline.sample_by_class(partner_key, data["class_index"], classes)]
                if mode == "interpolate" else None)
    fake = generate(vae_model, aux, seeds, classes, latent_key, mode=mode, alpha=alpha,
                    partners=partners, residual=residual, image_size=image_size,
                    channels=channels).astype(image_dtype)
    fake_weights = jnp.full((num_synthetic,), synthetic_weight, jnp.float32)
    if filter_model is not None:
      logits, _ = filter_model.apply(aux["filter"], fake, train=False)
      confidence = jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32)),
                                       classes[:, None], axis=1)[:, 0]
      fake_weights = jnp.where(confidence >= filter_threshold, fake_weights, filtered_weight)
    return (jnp.concatenate([real_images, fake]),
            jnp.concatenate([real_labels, classes.astype(label_dtype)]),
            jnp.concatenate([jnp.ones((num_real,), jnp.float32), fake_weights]))

  return synthesize


def generate(vae_model, aux, seeds_uint8, classes, key, *, mode: str, alpha: float,
             partners=None, residual: bool = False, image_size=None, channels=None):
  """Encode seeds, perturb, decode: float [-1, 1] images in the given format (default the
  VAE-GAN's). Seeds may have any size and channels; they are converted to the VAE-GAN's.
  `residual`: seed + G(z') - G(mu) instead of G(z') (see the module docstring)."""
  image_size = image_size or vae_model.image_size
  channels = channels or vae_model.channels

  def encode(images_uint8):  # Seeds and partners are of the slot's class.
    images = to_format(pipeline.to_float(images_uint8), vae_model.image_size, vae_model.channels)
    return vae_model.encode(aux["encoder"]["params"], aux["encoder"]["batch_stats"], images,
                            classes)

  # A class-conditional generator is told the slot's class: the latent carries the rest.
  decode = lambda z: vae_model.decode(aux["generator"]["params"],
                                      aux["generator"]["batch_stats"], z, classes)
  mu, logvar = encode(seeds_uint8)
  partner_mu = encode(partners)[0] if partners is not None else None
  z = semantic.perturb_latents(key, mode, alpha, mu, logvar, partner_mu, classes,
                               aux["class_stats"])
  if not residual:
    return to_format(decode(z), image_size, channels)
  change = to_format(decode(z) - decode(mu), image_size, channels)
  return jnp.clip(to_format(pipeline.to_float(seeds_uint8), image_size, channels) + change,
                  -1.0, 1.0)


def class_latent_stats(vae, images: np.ndarray, labels: np.ndarray, num_classes: int,
                       batch_size: int = 256):
  """Per-class mean and standard deviation of the encoder's latent means (class_gaussian)."""
  mus = []
  for start in range(0, len(images), batch_size):
    batch = pipeline.to_float(jnp.asarray(images[start:start + batch_size]))
    mus.append(np.asarray(vae.encode(to_format(batch, vae.model.image_size, vae.model.channels),
                                     labels[start:start + batch_size])[0]))
  mu = np.concatenate(mus)
  return semantic.class_stats(mu, labels, num_classes)


def _restore_filter(workdir):
  """(model, variables) of a classifier run trained on real data, for the confidence filter."""
  judge = runs.open_classifier(workdir, "best")
  return judge.model, judge.variables


def options(config, image_size=None, channels=None) -> dict:
  """synthesize_per_class's keyword arguments from a classifier config's augment and data
  fields (format overridable)."""
  a = config.augment
  return dict(mode=a.mode, alpha=float(a.alpha), residual=a.decode == "residual",
              image_size=image_size or config.data.image_size,
              channels=channels or config.data.channels)


def synthesize_per_class(vae, images: np.ndarray, labels: np.ndarray, num_classes: int,
                         per_class: int, *, mode: str = "posterior", alpha: float = 1.0,
                         seed: int = 0, image_size: int | None = None,
                         channels: int | None = None, residual: bool = False,
                         batch_size: int = 256):
  """`per_class` synthetic faces of every class that has real images, outside training.

  Each face comes from a real seed image of its class (drawn with replacement), encoded,
  perturbed (`mode`, `alpha`) and decoded by the trained VAE-GAN `vae` (a
  `ferjax.runs.VAEGANRun`). Returns (uint8 images [M, S, S, C] in the given format,
  default the VAE-GAN's; int32 labels [M]; seed indices into `images` [M]).
  """
  if mode not in semantic.MODES:
    raise UserError(f"mode: expected one of {', '.join(semantic.MODES)}, got {mode!r}")
  if alpha < 0:
    raise UserError(f"alpha: expected >= 0, got {alpha!r}")
  image_size = image_size or vae.model.image_size
  channels = channels or vae.model.channels
  check_classes(vae, num_classes, "the VAE-GAN")
  rng = np.random.default_rng(seed)
  seed_idx, partner_idx, classes = [], [], []
  for k in range(num_classes):
    members = np.flatnonzero(labels == k)
    if len(members):  # A seed and an interpolation partner of the same class per face.
      seed_idx.append(rng.choice(members, per_class, replace=True))
      partner_idx.append(rng.choice(members, per_class, replace=True))
      classes.append(np.full(per_class, k, np.int32))
  seed_idx, partner_idx = np.concatenate(seed_idx), np.concatenate(partner_idx)
  classes = np.concatenate(classes)
  aux = {"encoder": vae.encoder, "generator": vae.generator,
         "class_stats": class_latent_stats(vae, images, labels, num_classes)
         if mode == "class_gaussian" else None}

  @jax.jit
  def make(key, seeds, partners, batch_classes):
    fake = generate(vae.model, aux, seeds, batch_classes, key, mode=mode, alpha=alpha,
                    partners=partners if mode == "interpolate" else None, residual=residual,
                    image_size=image_size, channels=channels)
    return pipeline.to_uint8(fake)

  key = jax.random.PRNGKey(seed)
  out = []
  for start in range(0, len(classes), batch_size):
    part = slice(start, start + batch_size)
    n = len(classes[part])
    pad = lambda x: np.concatenate([x, x[:1].repeat(batch_size - n, 0)]) if n < batch_size else x
    batch = make(jax.random.fold_in(key, start), pad(images[seed_idx[part]]),
                 pad(images[partner_idx[part]]), pad(classes[part]))
    out.append(np.asarray(batch)[:n])  # Fixed batch shape: one compilation; padding cut off.
  return np.concatenate(out), classes, seed_idx


def seeds_like(seeds, fake):
  """The real seeds in the synthesized faces' size and channels, for a grid beside them."""
  return convert_images(seeds, image_size=fake.shape[1], channels=fake.shape[3])
