"""VAE-GAN trainer: one jitted, data-parallel step updates E, G and D; orbax checkpoints.

  ferjax train-vaegan --config experiments/configs/vaegan_synthetic_tiny.py --workdir runs/tiny

The train split lives on the devices as uint8 (split by rows over them, `parallel.put_rows`);
each step draws its batch there with a key folded from the step number, so a resumed run
replays the uninterrupted one exactly. The step is `state, images -> state, metrics` with the
state donated; the batch is split over the mesh axis `data`, parameters are replicated, and
XLA inserts the gradient all-reduce (BatchNorm statistics are over the global batch). The test
split is never loaded.

What a VAE-GAN run is (config, model, optimizers, state, random streams) lives in
ferjax.kinds.vaegan; reopening a finished run for sampling in ferjax.runs; benchmarks in
ferjax.bench.

Losses (weights in `config.loss`; see ferjax.kinds.vaegan for which choices are ours):
  D: hinge loss, real images against reconstructions and prior samples.
  G: hinge generator loss + reconstruction (D-feature MSE, Larsen et al. 2016, + pixel L1).
  E: beta * KL(q(z|x) || N(0, I)) with a linear warm-up + the same reconstruction terms
     (+ G's adversarial loss only when loss.adversarial_to_encoder).
  G, with loss.classifier_workdir (class-preserving synthesis, ours): + a frozen classifier's
     cross-entropy of G's decodings of posterior samples against their seeds' labels, and the
     squared distance between its penultimate features of decoding and seed.
A class-conditional model (model.num_classes) sees each image's label in E and D, and G draws
reconstructions and prior samples for the batch's labels.
One forward pass feeds all three; each network then takes the gradient of its own loss only.

See docs/methods.md (Semantic augmentation with a VAE-GAN, Class-conditional VAE-GAN, Classifier
consistency and perceptual terms).
"""

import json
import math
import pathlib
import shutil
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import configs, plots, runs
from ferjax.augment import synthesis
from ferjax.core import checkpoint, loop, parallel
from ferjax.data import pipeline, splits
from ferjax.errors import UserError
from ferjax.kinds import vaegan as kind
from ferjax.kinds.vaegan import EMA_NETS, NETS, TrainState
from ferjax.models import vaegan as vaegan_models

PERTURB_ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0)


# ================================================================================================
# Losses and per-network gradients
# ================================================================================================
def kl_weight_at(step, loss_config):
  """beta, ramped linearly from 0 over kl_warmup_steps."""
  if loss_config.kl_warmup_steps == 0:
    return jnp.float32(loss_config.beta)
  ramp = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / loss_config.kl_warmup_steps)
  return loss_config.beta * ramp


def compute_losses(model, params, batch_stats, images, key, loss_config, kl_weight, labels=None,
                   judge=None):
  """One train-mode forward pass of E, G and D on a batch of images in [-1, 1].

  `labels` [B]: the images' classes (read by a class-conditional model and the judge; prior
  samples are drawn for the same classes). `judge`: (apply, variables) of the frozen classifier
  for the class-consistency and perceptual terms (`make_judge`), or None.
  Returns (losses, (new_batch_stats, metrics)); `losses` maps each network to its own loss.
  """
  eps_key, prior_key = jax.random.split(key)
  batch = images.shape[0]
  conditional = model.num_classes > 0

  def apply(net, *args, labels=None):
    variables = {"params": params[net], "batch_stats": batch_stats[net]}
    out, updates = getattr(model, net).apply(variables, *args, train=True, labels=labels,
                                             mutable=["batch_stats"])
    return out, updates["batch_stats"]

  cond = lambda *parts: jnp.concatenate(parts) if conditional else None
  (mu, logvar), encoder_stats = apply("encoder", images, labels=cond(labels))
  eps = jax.random.normal(eps_key, mu.shape)
  z = vaegan_models.perturb(mu, logvar, eps, 1.0)
  z_prior = jax.random.normal(prior_key, mu.shape)
  # One G pass and one D pass over everything: BatchNorm normalises real and fake together,
  # so D cannot tell them apart by batch statistics.
  fakes, generator_stats = apply("generator", jnp.concatenate([z, z_prior]),
                                 labels=cond(labels, labels))
  recon = fakes[:batch]
  (logits, features), discriminator_stats = apply("discriminator",
                                                  jnp.concatenate([images, fakes]),
                                                  labels=cond(labels, labels, labels))
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
  judged, judge_metrics = jnp.float32(0.0), {}
  if judge is not None:  # The frozen classifier's view of the decodings (G's loss only).
    judge_apply, judge_variables = judge
    judge_logits, judge_features = judge_apply(judge_variables, jnp.concatenate([images, recon]))
    consistency = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        judge_logits[batch:], labels))
    perceptual = jnp.mean(jnp.square(judge_features[batch:]
                                     - jax.lax.stop_gradient(judge_features[:batch])))
    judged = (loss_config.class_consistency_weight * consistency
              + loss_config.perceptual_weight * perceptual)
    judge_metrics = {"class_consistency": consistency, "perceptual": perceptual,
                     "judge_acc_recon": jnp.mean(jnp.argmax(judge_logits[batch:], -1) == labels)}

  losses = {
      "discriminator": d_loss,
      "generator": loss_config.adv_weight * g_adv + recon_loss + judged,
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
      **judge_metrics,
  }
  return losses, (new_batch_stats, metrics)


def compute_grads(model, params, batch_stats, images, key, loss_config, kl_weight, labels=None,
                  judge=None):
  """Gradient of each network's own loss w.r.t. its own parameters, from one forward pass.

  D's gradient comes from the hinge loss only (none from G's loss), G's from its adversarial
  and reconstruction terms, E's from KL + reconstruction (+ adversarial when the switch is on).
  Taking one backward pass per loss and keeping only that network's part is the same as
  stop_gradient on everything else; XLA prunes the parts of each pass that are not kept.
  """
  def forward(params):
    return compute_losses(model, params, batch_stats, images, key, loss_config, kl_weight,
                          labels, judge)

  losses, backward, (new_batch_stats, metrics) = jax.vjp(forward, params, has_aux=True)
  grads = {}
  for net in NETS:
    only_this_loss = {name: jnp.float32(name == net) for name in losses}
    grads[net] = backward(only_this_loss)[0][net]
  return grads, new_batch_stats, metrics


# ================================================================================================
# Train step (jitted once, data-parallel)
# ================================================================================================
def make_train_step(model, config, mesh, num_examples: int, *, jit: bool = True,
                    judge_apply=None):
  """`train_step(state, images, labels=None, judge_variables=None) -> (state, metrics)`: pure;
  jitted with the state donated.

  `images` is the resident uint8 train set (`parallel.put_rows`: split by rows over the mesh,
  padded; its first `num_examples` rows are real) and `labels` its int32 labels, placed the same
  way (needed by a class-conditional model and the judge); the batch is drawn, flipped and
  converted on the device, then split along the mesh's `data` axis. `judge_apply` and
  `judge_variables`: the frozen classifier of the class-consistency terms (`make_judge`).
  """
  optimizers = kind.make_optimizers(config)
  loss_config = config.loss
  batch_size, ema_decay = config.train.batch_size, config.optim.ema_decay
  batch_sharding = parallel.batch_sharding(mesh)
  train_key = kind.rng_streams(config.seed).train

  def train_step(state: TrainState, images, labels=None, judge_variables=None):
    chex.assert_rank(images, 4)  # The train set on the device: uint8 rows, int32 labels.
    chex.assert_type(images, jnp.uint8)
    if labels is not None:
      chex.assert_type(labels, jnp.int32)
      chex.assert_equal_shape_prefix([images, labels], 1)
    step = state.step
    index_key, flip_key, loss_key = jax.random.split(jax.random.fold_in(train_key, step), 3)

    # --- input: sample, gather, flip, all on the device ---
    index = pipeline.sample_uniform(index_key, num_examples, batch_size)
    index = jax.lax.with_sharding_constraint(index, batch_sharding)
    batch = pipeline.random_flip(flip_key, images[index])
    batch = jax.lax.with_sharding_constraint(pipeline.to_float(batch), batch_sharding)
    batch_labels = labels[index] if labels is not None else None
    judge = (judge_apply, judge_variables) if judge_apply is not None else None

    # --- gradients and updates ---
    kl_weight = kl_weight_at(step, loss_config)
    grads, batch_stats, metrics = compute_grads(
        model, state.params, state.batch_stats, batch, loss_key, loss_config, kl_weight,
        batch_labels, judge)
    params, opt_state = {}, {}
    for net in NETS:
      updates, opt_state[net] = optimizers[net].update(grads[net], state.opt_state[net],
                                                       state.params[net])
      params[net] = optax.apply_updates(state.params[net], updates)
      metrics[f"grad_norm_{net[0]}"] = optax.tree.norm(grads[net])
      # A non-finite parameter shows up here at once (the NaN guard reads it).
      metrics[f"param_norm_{net[0]}"] = optax.tree.norm(params[net])

    # --- EMA of E and G (params and batch stats) for validation and sampling ---
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    new = {net: {"params": params[net], "batch_stats": batch_stats[net]} for net in EMA_NETS}
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
    new_state = state.replace(step=step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema=ema)
    return new_state, metrics

  if not jit:  # The caller jits it (e.g. ferjax.bench, inside its own timed loop).
    return train_step
  # Compiled once: a second trace (a shape, dtype or static value that changed) is an error.
  replicated = parallel.replicated(mesh)
  return parallel.jit_once(train_step, donate_argnums=0, out_shardings=(replicated, replicated))


def make_judge(config, num_classes: int):
  """(apply, variables) of the frozen classifier in loss.classifier_workdir, or (None, None).

  `apply(variables, images)` takes float images in [-1, 1] in the VAE-GAN's format and returns
  the classifier's (logits, penultimate features), eval mode, the images converted to its own
  size and channels first.
  """
  lo = config.loss
  if not (lo.class_consistency_weight > 0 or lo.perceptual_weight > 0):
    return None, None
  judge = runs.open_classifier(lo.classifier_workdir, "best")
  judge_classes = len(judge.meta["class_names"])
  if judge_classes != num_classes:
    raise UserError(f"config field 'loss.classifier_workdir': expected a classifier of this "
                    f"dataset's {num_classes} classes, got {lo.classifier_workdir} with "
                    f"{judge_classes}")
  size, channels = judge.config.data.image_size, judge.config.data.channels

  def apply(variables, images):
    return judge.model.apply(variables, synthesis.to_format(images, size, channels), train=False)

  return apply, judge.variables


# ================================================================================================
# Validation and sample grids (EMA parameters, eval-mode BatchNorm)
# ================================================================================================
def make_eval_step(model, mesh):
  """`eval_step(ema, images uint8, labels) -> (squared error [B], KL [B])`, reconstructing from
  mu (labels are read by a class-conditional model only)."""
  def eval_step(ema, images, labels):
    x = pipeline.to_float(images)
    mu, logvar = model.encode(ema["encoder"]["params"], ema["encoder"]["batch_stats"], x, labels)
    recon = model.decode(ema["generator"]["params"], ema["generator"]["batch_stats"], mu, labels)
    squared_error = jnp.mean(jnp.square((recon - x) / 2), axis=(1, 2, 3))  # [0, 1] pixel scale.
    return squared_error, vaegan_models.kl_divergence(mu, logvar)

  return jax.jit(eval_step, out_shardings=parallel.replicated(mesh))


def evaluate(eval_step, ema, images: np.ndarray, batch_size: int, mesh, labels=None) -> dict:
  """Reconstruction MSE, PSNR (dB, pixels in [0, 1]) and KL over a whole split."""
  n = len(images)
  padded = -(-n // batch_size) * batch_size
  images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), np.uint8)])
  labels = np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32)
  labels = np.concatenate([labels, np.zeros(padded - n, np.int32)])
  sharding = parallel.batch_sharding(mesh)
  errors, kls = [], []
  for start in range(0, padded, batch_size):
    batch = jax.device_put(images[start:start + batch_size], sharding)
    error, kl = eval_step(ema, batch, jax.device_put(labels[start:start + batch_size], sharding))
    errors.append(error)
    kls.append(kl)
  mse = float(np.mean(np.concatenate(jax.device_get(errors))[:n]))
  kl = float(np.mean(np.concatenate(jax.device_get(kls))[:n]))
  return {"val_mse": mse, "val_psnr": 10.0 * math.log10(1.0 / max(mse, 1e-12)), "val_kl": kl}


def make_sample_fn(model):
  """`sample(ema, real uint8 [R], real_labels [R], prior_z [P, d], prior_labels [P], eps [E, d])
  -> (recon, prior, perturbed)`.

  perturbed[e, a] decodes the first real image's latent mu + alpha_a * sigma * eps_e (labels are
  read by a class-conditional model only).
  """
  def sample(ema, real, real_labels, prior_z, prior_labels, eps):
    mu, logvar = model.encode(ema["encoder"]["params"], ema["encoder"]["batch_stats"], real,
                              real_labels)
    decode = lambda z, y: model.decode(ema["generator"]["params"],
                                       ema["generator"]["batch_stats"], z, y)
    alphas = jnp.asarray(PERTURB_ALPHAS)[None, :, None]
    z = vaegan_models.perturb(mu[0], logvar[0], eps[:, None, :], alphas)
    first = jnp.full((z.shape[0] * z.shape[1],), real_labels[0])
    perturbed = decode(z.reshape(-1, z.shape[-1]), first).reshape(*z.shape[:2], *real.shape[1:])
    return decode(mu, real_labels), decode(prior_z, prior_labels), perturbed

  return jax.jit(sample)


def save_sample_grids(sample_fn, ema, fixed, out_dir: pathlib.Path, step: int) -> dict:
  """Writes the three grids for `step`; returns {kind: path}."""
  real = fixed["real"]
  recon, prior, perturbed = jax.device_get(sample_fn(ema, real, fixed["real_labels"],
                                                     fixed["prior_z"], fixed["prior_labels"],
                                                     fixed["eps"]))
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
# The run
# ================================================================================================
def train_and_evaluate(config, workdir, *, stop_after: int | None = None) -> dict:
  """Trains (or resumes from the latest checkpoint in `workdir`) and returns a summary dict.
  `stop_after`: see ferjax.core.loop.Schedule."""
  t_start = time.perf_counter()
  t = config.train
  with loop.open_workdir(workdir, config, kind) as (workdir, is_main):
    # --- mesh, data, model, state, steps ---
    mesh = parallel.make_mesh(t.num_devices)
    parallel.check_batch_size(t.batch_size, mesh, "train.batch_size")
    train_ds, val_ds = splits.load_splits(config.data, config.seed)
    num_classes = len(train_ds.class_names)
    if config.model.num_classes not in (None, num_classes):
      raise UserError(f"config field 'model.num_classes': expected {num_classes} (the classes of "
                      f"{config.data.name}) or None (unconditional), got "
                      f"{config.model.num_classes}")
    model = kind.build_model(config)
    state = kind.init_state(config, model, mesh)
    images = parallel.put_rows(train_ds.images, mesh)
    labels = parallel.put_rows(np.asarray(train_ds.labels, np.int32), mesh)
    judge_apply, judge_variables = make_judge(config, num_classes)
    if judge_variables is not None:
      judge_variables = parallel.put_replicated(judge_variables, mesh)
    train_step = make_train_step(model, config, mesh, len(train_ds.images),
                                 judge_apply=judge_apply)
    eval_step = make_eval_step(model, mesh)
    sample_fn = make_sample_fn(model)
    shown = val_ds if val_ds is not None else train_ds
    fixed = _fixed_sample_inputs(config, shown.images, shown.labels, num_classes)

    def validate(state):
      return evaluate(eval_step, state.ema, val_ds.images, t.batch_size, mesh, val_ds.labels)

    def draw(state, step):
      return save_sample_grids(sample_fn, state.ema, fixed, workdir / "samples", step)

    # --- loop ---
    with checkpoint.Checkpoints(
        workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
        best_metric=kind.BEST_METRIC if val_ds is not None else None) as ckpts:
      state, _ = loop.resume(ckpts, state, workdir, "vaegan")
      done = loop.run(lambda state: train_step(state, images, labels, judge_variables), state,
                      schedule=loop.Schedule.from_config(t, stop_after=stop_after,
                                                         draw_every=t.sample_every),
                      workdir=workdir, is_main=is_main, checkpoints=ckpts,
                      images_per_step=t.batch_size, watch=("d_loss", "g_loss", "e_loss"),
                      validate=validate if val_ds is not None else None, draw=draw,
                      desc="vaegan", postfix=("d_loss", "pixel_l1", "kl"),
                      curves=(CURVE_KEYS, "VAE-GAN"))

  # --- summary files ---
  if is_main:
    for name, path in done.drawn.items():  # The final grids, where a person looks first.
      shutil.copyfile(path, workdir / f"{name}.png")
  result = {"step": done.step, "wall_s": round(time.perf_counter() - t_start, 1),
            "workdir": str(workdir), "train": done.train, "val": done.val}
  if is_main:
    (workdir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


CURVE_KEYS = ("d_loss", "g_adv", "feature_recon", "pixel_l1", "kl", "d_acc_real", "d_acc_fake",
              "val_mse", "val_psnr", "val_kl")


def _fixed_sample_inputs(config, images: np.ndarray, labels: np.ndarray,
                        num_classes: int) -> dict:
  """The same images and noise at every sampling point, so grids compare across steps. A
  class-conditional model draws its prior samples for classes 0, 1, 2, 3 (one per grid row of
  8), wrapping around."""
  prior_key, eps_key = jax.random.split(jax.random.PRNGKey(config.seed + 1))
  d = config.model.latent_dim
  return {"real": jnp.asarray(images[:16]), "real_labels": jnp.asarray(labels[:16], jnp.int32),
          "prior_z": jax.random.normal(prior_key, (32, d)),
          "prior_labels": jnp.arange(32, dtype=jnp.int32) // 8 % num_classes,
          "eps": jax.random.normal(eps_key, (4, d))}


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
        "perturbation.png, curves.png, metrics.jsonl, tensorboard/, checkpoints/)")
  return 0
