"""Semantic augmentation in feature space: synthetic minority-class features for a classifier
head, made by perturbing the latents of a small VAE trained on the classifier's own penultimate
features (ferjax.models.feature_vae).

The pixel mode (ferjax.augment.synthesis) decodes perturbed latents into faces, whose decoder
blur then reaches the backbone. Here the backbone is frozen and only the head sees synthetic
samples: each one takes a real seed feature of its class, encodes it, perturbs the latent exactly
as the pixel mode does (`semantic.perturb_latents`: posterior, interpolate or class_gaussian,
scaled by alpha) and decodes it, all inside the head's jitted train step. Cheap enough for a CPU.

Dosage (`plan`): how many synthetic slots a batch has and which classes they carry.
  - per class, the pixel mode's count: `fill` of the gap between the target
    (`semantic.target_counts`: largest, sqrt, uniform) and the real train count;
  - `tail_only`: only the classes whose train count is below the median get any;
  - the batch's synthetic slots S follow the synthetic share of the rebalanced epoch, capped at
    `max_share` of the batch (and at B - 1);
  - the B - S real slots keep the head's sampler; the synthetic slots are the last S of the batch.
The class prior of the batches (for logit adjustment, and post-hoc adjustment later) is the
sum of both parts: `plan.prior_counts`.

Everything that runs per step is a pure function of keys and arrays; `train_vae` and `plan` run
once, on the host side.

See docs/methods.md (Feature-space semantic augmentation, Pixel-space faces in a decoupled head).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import evaluate
from ferjax.augment import semantic, synthesis
from ferjax.core import parallel
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.kinds import retrain_head as head_kind
from ferjax.models import feature_vae


# =================================================================================================
# The plan (host side, once)
# =================================================================================================
@dataclasses.dataclass(frozen=True)
class FeaturePlan:
  """How each batch of B features is composed (all counts float [K] unless said otherwise).

  num_synthetic: S, synthetic slots per batch (the last S; static, so shapes are too);
  synth_probs: class distribution of the synthetic slots; real_probs: the sampler's, of the real
  slots; real_per_batch / synthetic_per_batch: expected counts of a batch; prior_counts: the
  class distribution the head is trained under, scaled to the real train total (the classifier
  trainer's convention).
  """
  num_synthetic: int
  synth_probs: np.ndarray
  real_probs: np.ndarray
  real_per_batch: np.ndarray
  synthetic_per_batch: np.ndarray
  prior_counts: np.ndarray

  def report(self, class_names) -> dict:
    names = list(class_names)
    rounded = lambda a: dict(zip(names, np.round(np.asarray(a, np.float64), 3).tolist()))
    return {"num_synthetic": self.num_synthetic, "synthetic_per_batch": rounded(
        self.synthetic_per_batch), "real_per_batch": rounded(self.real_per_batch),
            "prior_counts": rounded(self.prior_counts)}


def plan(train_counts, *, batch_size: int, sampler: str, synthesize: bool, target: str = "largest",
         fill: float = 1.0, tail_only: bool = True, max_share: float = 0.5) -> FeaturePlan:
  """The batch composition of the head's training (module docstring). Without `synthesize`,
  the plain sampler's batches (S = 0). A plan with synthesis that leaves no synthetic slot is a
  UserError naming the field to change."""
  counts = np.asarray(train_counts, np.float64)
  total = counts.sum()
  real_probs = head_kind.sampled_probs(sampler, counts)
  zeros = np.zeros_like(counts)
  if not synthesize:
    return FeaturePlan(0, zeros, real_probs, batch_size * real_probs, zeros, total * real_probs)
  gap = semantic.plan_batches(counts, batch_size=batch_size, target=target,
                              fill=fill).synthetic_counts
  if tail_only:
    gap = np.where(counts < np.median(counts), gap, 0.0)
  if gap.sum() <= 0:
    why = (" among the classes below the median count (synth.tail_only)" if tail_only else "")
    raise UserError(f"config field 'synth.target': no class falls short of the {target!r} target"
                    f"{why} (train counts {counts.astype(int).tolist()}): nothing to synthesize; "
                    "use synth.mode=none, or another target")
  share = gap.sum() / (total + gap.sum())
  num_synthetic = min(int(round(batch_size * share)), int(np.floor(max_share * batch_size)),
                      batch_size - 1)
  if num_synthetic < 1:
    field = "synth.fill" if round(batch_size * share) < 1 else "synth.max_share"
    raise UserError(f"config field {field!r}: a batch of {batch_size} gets no synthetic slot "
                    f"(synthetic share {share:.3g}, cap synth.max_share={max_share:g}): nothing "
                    "to synthesize; raise head.batch_size, synth.fill or synth.max_share")
  synth_probs = gap / gap.sum()
  real_per_batch = (batch_size - num_synthetic) * real_probs
  synthetic_per_batch = num_synthetic * synth_probs
  prior = (real_per_batch + synthetic_per_batch) * total / (batch_size - num_synthetic)
  return FeaturePlan(num_synthetic, synth_probs, real_probs, real_per_batch, synthetic_per_batch,
                     prior)


def plan_for(config, train_counts) -> FeaturePlan:
  """`plan` from a head config (ferjax.kinds.retrain_head): the feature and pixel modes share it (S
  synthetic slots, their class distribution, the batches' prior); synth.mode=none: no slot."""
  s = config.synth
  return plan(train_counts, batch_size=config.head.batch_size, sampler=config.head.sampler,
              synthesize=s.mode != "none", target=s.target, fill=s.fill,
              tail_only=s.tail_only, max_share=s.max_share)


# =================================================================================================
# The feature VAE: training (a jitted step, a few thousand steps in seconds on a CPU)
# =================================================================================================
@dataclasses.dataclass(frozen=True)
class TrainedVAE:
  model: feature_vae.FeatureVAE
  variables: dict  # {"params", "stats"}
  curve: list  # {"step", "loss", "reconstruction", "kl"}: means over each logging interval

  @property
  def first_loss(self) -> float:
    return self.curve[0]["loss"]

  @property
  def final_loss(self) -> float:
    return self.curve[-1]["loss"]


def train_vae(features, *, init_key, train_key, latent_dim: int = 32, hidden: int = 256,
              steps: int = 2000, lr: float = 1e-3, batch_size: int = 256, beta: float = 1.0,
              log_every: int | None = None) -> TrainedVAE:
  """Trains the feature VAE on features [N, D] (uniform batches with replacement, Adam), keyed
  by `init_key` (parameters) and fold_in(train_key, step) (batches, noise). Float32 features
  already on the device (the head's data["features"]) are used as they are, not copied."""
  features = jnp.asarray(features, jnp.float32)
  model = feature_vae.build(features.shape[1], latent_dim=latent_dim, hidden=hidden)
  variables = model.init(init_key, features)
  stats = variables["stats"]
  tx = optax.adam(lr)
  log_every = log_every or max(1, steps // 20)

  def step_fn(params, opt_state, step, features):
    batch_key, noise_key = jax.random.split(jax.random.fold_in(train_key, step))
    batch = features[pipeline.sample_uniform(batch_key, features.shape[0], batch_size)]
    (loss, parts), grads = jax.value_and_grad(model.loss, has_aux=True)(
        params, stats, noise_key, batch, beta)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **parts}

  step_fn = parallel.jit_once(step_fn, donate_argnums=(0, 1))
  params, opt_state = variables["params"], tx.init(variables["params"])
  curve, pending = [], []
  for step in range(steps):
    params, opt_state, metrics = step_fn(params, opt_state, jnp.int32(step), features)
    pending.append(metrics)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      history = jax.device_get(pending)
      pending = []
      means = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
      if not np.isfinite(means["loss"]):
        raise UserError(f"feature VAE: loss is {means['loss']} at step {step + 1}; lower "
                        "synth.vae.lr")
      curve.append({"step": step + 1, **means})
  return TrainedVAE(model, {"params": params, "stats": stats}, curve)


def class_latent_stats(model, variables, features, labels, num_classes: int):
  """Per-class mean and standard deviation [K, latent_dim] of the encoder's latent means
  (class_gaussian); a class with one example gets std 1, one with none mean 0 and std 1.
  `features`: float32 on the device (the head's data["features"], not copied) or host."""
  mu = np.asarray(jax.jit(model.encode)(variables, jnp.asarray(features, jnp.float32))[0])
  return semantic.class_stats(mu, labels, num_classes)


def stage_data(vae: TrainedVAE, feature_plan: FeaturePlan, mode: str, features, labels,
               num_classes: int) -> dict:
  """The stage's arrays (the train step's data["synthesis"]): the VAE variables, the synthetic
  slots' class distribution and (class_gaussian) the latent class statistics."""
  no_stats = (jnp.zeros((num_classes, 1)), jnp.zeros((num_classes, 1)))
  return {
      "vae": vae.variables,
      "synth_probs": jnp.asarray(feature_plan.synth_probs, jnp.float32),
      "class_stats": (class_latent_stats(vae.model, vae.variables, features, labels, num_classes)
                      if mode == "class_gaussian" else no_stats),
  }


# =================================================================================================
# The stage: encode -> perturb -> decode, inside the jitted step
# =================================================================================================
def generate(model, aux, seeds, classes, key, *, mode: str, alpha: float, partners=None,
             residual: bool = False):
  """Synthetic features [M, D] from real seed features [M, D] of `classes` [M]: encode, perturb
  (`semantic.perturb_latents`, vmapped over the examples), decode. `residual`: seed + D(z') -
  D(mu) instead of D(z'), clipped to the train range."""
  variables = aux["vae"]
  mu, logvar = model.encode(variables, seeds)
  partner_mu = model.encode(variables, partners)[0] if partners is not None else None
  z = semantic.perturb_latents(key, mode, alpha, mu, logvar, partner_mu, classes,
                               aux["class_stats"])
  if not residual:
    return model.decode(variables, z)
  change = model.decode(variables, z, clip=False) - model.decode(variables, mu, clip=False)
  stats = variables["stats"]
  return jnp.clip(seeds + change, stats["low"], stats["high"])


def make_synthesize(model, num_synthetic: int, *, mode: str, alpha: float,
                    residual: bool = False, weight: float = 1.0):
  """The stage: `synthesize(key, features, labels, weights, data) -> the same, with the last
  `num_synthetic` slots overwritten` by synthetic features of classes drawn from the plan.

  `data` is the head's device data: "features" [N, D] and "labels" [N] (the real pool),
  "class_index" (`pipeline.class_index` of the labels) and "synthesis" (`stage_data`). The
  other slots are returned untouched; the synthetic ones carry weight `weight`.
  """
  def synthesize(key, features, labels, weights, data):
    aux = data["synthesis"]
    class_key, seed_key, partner_key, latent_key = jax.random.split(key, 4)
    classes = jax.random.categorical(class_key, jnp.log(jnp.maximum(aux["synth_probs"], 1e-30)),
                                     shape=(num_synthetic,))
    pool = data["features"]
    seeds = pool[pipeline.sample_by_class(seed_key, data["class_index"], classes)]
    partners = (pool[pipeline.sample_by_class(partner_key, data["class_index"], classes)]
                if mode == "interpolate" else None)
    fake = generate(model, aux, seeds, classes, latent_key, mode=mode, alpha=alpha,
                    partners=partners, residual=residual)
    first = features.shape[0] - num_synthetic
    return (features.at[first:].set(fake.astype(features.dtype)),
            labels.at[first:].set(classes.astype(labels.dtype)),
            weights.at[first:].set(jnp.asarray(weight, weights.dtype)))

  return synthesize


# =================================================================================================
# Outside training: a few synthetic features per class (the nearest-neighbour picture)
# =================================================================================================
def synthesize_per_class(model, aux, features, index, classes, per_class: int, key, *,
                         mode: str, alpha: float, residual: bool = False):
  """`per_class` synthetic features of each class in `classes`: (features [M, D], classes [M],
  seed indices into `features` [M]). `features` [N, D] and `index` (`pipeline.class_index` of
  their labels) are the head's device data["features"] and data["class_index"]."""
  wanted = jnp.repeat(jnp.asarray(classes, jnp.int32), per_class)
  seed_key, partner_key, latent_key = jax.random.split(key, 3)
  seed_idx = pipeline.sample_by_class(seed_key, index, wanted)
  partners = (features[pipeline.sample_by_class(partner_key, index, wanted)]
              if mode == "interpolate" else None)
  make = jax.jit(lambda aux, seeds, partners: generate(
      model, aux, seeds, wanted, latent_key, mode=mode, alpha=alpha, partners=partners,
      residual=residual))
  fake = make(aux, features[seed_idx], partners)
  return np.asarray(fake), np.asarray(wanted), np.asarray(seed_idx)


def nearest(queries, pool, stats) -> np.ndarray:
  """Index into `pool` [N, D] of the nearest row (Euclidean, standardized units) of each query."""
  scale = np.asarray(stats["std"])
  q = np.asarray(queries) / scale
  p = np.asarray(pool) / scale
  dist = (q ** 2).sum(1)[:, None] - 2 * q @ p.T + (p ** 2).sum(1)[None, :]
  return np.argmin(dist, axis=1)


# --- Pixel mode: a pool of synthetic-face features, made once before training ---------------------
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
  features = [evaluate.extract_features(run, faces)]
  if config.head.flip:
    features.append(evaluate.extract_features(run, faces, flip=True))
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
  """The pixel stage, with the feature stage's signature (`make_synthesize`):
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
