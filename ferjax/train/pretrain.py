"""Masked-autoencoder pre-training of a ViT on unlabeled faces (stage 1 of SSFER).

  ferjax pretrain --config experiments/configs/pretrain_synthetic_tiny.py --workdir runs/mae_tiny

The unlabeled images (`data.sources`, ferjax.data.unlabeled) live on the devices as uint8 (split
by rows over them, `parallel.put_rows`); each step draws its batch there, flips it (and, with
`augment.crop_scale`, cuts a random-resized crop of each image as MAE does), masks
`mae.mask_ratio` of every image's patches at random, encodes the visible ones with the ViT and
predicts the pixels of the masked ones with the MAE decoder. All of its randomness is folded from
the step number, so a resumed run replays the uninterrupted one exactly. The step is
`state, images -> state, metrics`, jitted once with the state donated; the batch is split over
the mesh axis `data`, parameters are replicated and XLA inserts the gradient all-reduce.

Validation: the mean masked-patch loss over a held-out `data.val_fraction` of every source, with
the same masks at every evaluation (a fixed key), so the numbers compare across steps; the best
checkpoint is the one with the lowest. Each evaluation also writes
samples/reconstructions_<step>.png (rows of 8: originals, masked inputs, reconstructions).

What a pre-training run is (config, models, optimizer, state, random streams) lives in
ferjax.kinds.pretrain; reopening a finished run in ferjax.runs (`open_pretrain`); a classifier
starts from its encoder with `model.init_from=<this workdir>`; benchmarks in ferjax.bench.

Workdir: config.json, metrics.jsonl, tensorboard/, checkpoints/, samples/, reconstructions.png,
curves.png, summary.json. Training again in a workdir that has checkpoints resumes.

See docs/methods.md (MAE pre-training).
"""

import json
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferjax import configs, plots, writing
from ferjax.core import checkpoint, loop, parallel
from ferjax.data import pipeline, unlabeled
from ferjax.errors import UserError
from ferjax.kinds import pretrain as kind
from ferjax.kinds.pretrain import TrainState
from ferjax.models import mae, vit

GRID_IMAGES = 8  # Images in each reconstruction grid.
CURVE_KEYS = ("loss", "lr", "grad_norm", "val_loss")


# ================================================================================================
# Train step (jitted once, data-parallel)
# ================================================================================================
def masked_loss(models, params, images, mask_key, config):
  """(loss, per-image loss [B], predicted patches, mask) of float images [B, H, W, C]."""
  patch = models.encoder.patch_size
  target = vit.patchify(images, patch)
  keep, mask, ids_restore = mae.random_masking(mask_key, images.shape[0], target.shape[1],
                                               config.mae.mask_ratio)
  pred = mae.predict(models.encoder, models.decoder, params, images, keep, ids_restore)
  per_image = mae.per_image_loss(pred, target, mask, config.mae.norm_pix_loss)
  return jnp.mean(per_image), (per_image, pred, mask)


def make_train_step(models, config, mesh, num_examples: int, *, jit: bool = True):
  """`train_step(state, images) -> (state, metrics)`: pure; jitted with the state donated.

  `images` is the resident uint8 pool (`parallel.put_rows`; its first `num_examples` rows are
  real); the batch is drawn, flipped, converted and (augment.crop_scale) random-resized-cropped
  on the device, split along `data`.
  """
  tx, schedule = kind.make_optimizer(config)
  batch_size = config.train.batch_size
  batch_sharding = parallel.batch_sharding(mesh)
  train_key = kind.rng_streams(config.seed).train
  crop_scale = config.augment.crop_scale
  crop_scale = None if crop_scale is None else tuple(crop_scale)

  def train_step(state: TrainState, images):
    chex.assert_rank(images, 4)  # The unlabeled images on the device: uint8 rows.
    chex.assert_type(images, jnp.uint8)
    step = state.step
    step_key = jax.random.fold_in(train_key, step)
    index_key, flip_key, mask_key = jax.random.split(step_key, 3)
    index = pipeline.sample_uniform(index_key, num_examples, batch_size)
    index = jax.lax.with_sharding_constraint(index, batch_sharding)
    batch = pipeline.random_flip(flip_key, images[index])
    batch = jax.lax.with_sharding_constraint(pipeline.to_float(batch), batch_sharding)
    if crop_scale is not None:  # Its own key, so runs without crops keep their numbers.
      batch = pipeline.random_resized_crop(jax.random.fold_in(step_key, 3), batch, crop_scale)
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)

    loss_fn = lambda params: masked_loss(models, params, batch, mask_key, config)[0]
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(step), "grad_norm": optax.tree.norm(grads),
               # A non-finite parameter shows up here at once (the NaN guard reads it).
               "param_norm": optax.tree.norm(params)}
    return state.replace(step=step + 1, params=params, opt_state=opt_state), metrics

  if not jit:  # The caller jits it (e.g. ferjax.bench, inside its own timed loop).
    return train_step
  # Compiled once: a second trace (a shape, dtype or static value that changed) is an error.
  replicated = parallel.replicated(mesh)
  return parallel.jit_once(train_step, donate_argnums=0, out_shardings=(replicated, replicated))


# ================================================================================================
# Validation and reconstruction grids
# ================================================================================================
def make_eval_step(models, config, mesh):
  """`eval_step(params, images uint8, key) -> (per-image loss [B], reconstructions, masked)`."""
  patch, norm = models.encoder.patch_size, config.mae.norm_pix_loss

  def eval_step(params, images, key):
    x = pipeline.to_float(images)
    _, (per_image, pred, mask) = masked_loss(models, params, x, key, config)
    recon = mae.reconstruct(pred, x, mask, patch, norm)
    return per_image, recon, mae.masked_images(x, mask, patch)

  return jax.jit(eval_step, out_shardings=parallel.replicated(mesh))


def _batches(images: np.ndarray, batch_size: int):
  """`images` cut into batches of `batch_size`, the last one padded with black images (so every
  call has one shape and the step compiles once)."""
  padded = -(-len(images) // batch_size) * batch_size
  images = np.concatenate([images, np.zeros((padded - len(images), *images.shape[1:]), np.uint8)])
  return [images[start:start + batch_size] for start in range(0, padded, batch_size)]


def evaluate(eval_step, params, images: np.ndarray, batch_size: int, mesh, key) -> dict:
  """The mean masked-patch loss over `images`; batch i is masked with fold_in(key, i), so every
  evaluation of the same images uses the same masks."""
  sharding = parallel.batch_sharding(mesh)
  losses = [eval_step(params, jax.device_put(batch, sharding), jax.random.fold_in(key, i))[0]
            for i, batch in enumerate(_batches(images, batch_size))]
  return {"val_loss": float(np.mean(np.concatenate(jax.device_get(losses))[:len(images)]))}


def save_grid(eval_step, params, images: np.ndarray, batch_size: int, mesh, key, path):
  """Writes the first GRID_IMAGES of `images` as three rows (originals, masked inputs,
  reconstructions, with the masks of the first validation batch) to `path`, atomically."""
  batch = jax.device_put(_batches(images[:batch_size], batch_size)[0],
                         parallel.batch_sharding(mesh))
  _, recon, masked = jax.device_get(eval_step(params, batch, jax.random.fold_in(key, 0)))
  n = min(GRID_IMAGES, len(images))
  rows = np.concatenate([plots.to_uint8(images[:n]), plots.to_uint8(masked[:n]),
                         plots.to_uint8(recon[:n])])
  path.parent.mkdir(parents=True, exist_ok=True)
  with writing.atomic_path(path) as partial:
    plots.save_image_grid(rows, partial, ncol=n, scale=3)
  return path


# ================================================================================================
# The run
# ================================================================================================
def check_pool(pool, data) -> None:
  """Refuses, in one line naming data.sources, a pool a run cannot train on: a source whose
  weight leaves it no train row (a small weight times few images rounds to none). Called before
  step 1, so the refused run leaves no record behind (ferjax.core.workdir)."""
  for source in unlabeled.parse_sources(data.sources):
    n, held = pool.counts[str(source)]
    whole = int(source.weight)
    rows = whole * n + int(round((source.weight - whole) * n))
    if rows == 0:
      raise UserError(f"config field 'data.sources': {source} gives 0 train rows ({n} images "
                      f"after {held} held out, times weight {source.weight:g}): expected a "
                      "weight that keeps at least one row, or leave the source out")
  if not len(pool.train):
    raise UserError("config field 'data.sources': 0 train rows to pre-train on")


def train_and_evaluate(config, workdir, *, stop_after: int | None = None) -> dict:
  """Pre-trains (or resumes from the latest checkpoint in `workdir`); returns a summary dict.
  `stop_after`: see ferjax.core.loop.Schedule."""
  t_start = time.perf_counter()
  t = config.train
  with loop.open_workdir(workdir, config, kind) as (workdir, is_main):
    # --- mesh, data, models, state, steps ---
    mesh = parallel.make_mesh(t.num_devices)
    parallel.check_batch_size(t.batch_size, mesh, "train.batch_size")
    pool = unlabeled.load_pool(config.data, config.seed)
    check_pool(pool, config.data)
    models = kind.build_models(config)
    state = kind.init_state(config, models, mesh)
    images = parallel.put_rows(pool.train, mesh)
    train_step = make_train_step(models, config, mesh, len(pool.train))
    eval_step = make_eval_step(models, config, mesh)
    val_key = kind.rng_streams(config.seed).val
    shown = pool.val if pool.val is not None else pool.train

    def validate(state):
      return evaluate(eval_step, state.params, pool.val, t.batch_size, mesh, val_key)

    def draw(state, step):
      return {"reconstructions": save_grid(
          eval_step, state.params, shown, t.batch_size, mesh, val_key,
          workdir / "samples" / f"reconstructions_{step:07d}.png")}

    # --- loop ---
    with checkpoint.Checkpoints(
        workdir / "checkpoints", max_to_keep=t.keep_checkpoints, best_mode="min",
        best_metric=kind.BEST_METRIC if pool.val is not None else None) as ckpts:
      state, _ = loop.resume(ckpts, state, workdir, "pretrain")
      done = loop.run(lambda state: train_step(state, images), state,
                      schedule=loop.Schedule.from_config(t, stop_after=stop_after),
                      workdir=workdir, is_main=is_main, checkpoints=ckpts,
                      images_per_step=t.batch_size,
                      validate=validate if pool.val is not None else None, draw=draw,
                      desc="pretrain", curves=(CURVE_KEYS, "MAE pre-training"))
      best_step = ckpts.best_step()

  # --- summary files ---
  result = {"step": done.step, "num_steps": t.num_steps, "best_step": best_step,
            "wall_s": round(time.perf_counter() - t_start, 1), "workdir": str(workdir),
            "train": done.train, "val": done.val,
            "images": {name: {"train": n, "held_out": held}
                       for name, (n, held) in pool.counts.items()}}
  grid = done.drawn.get("reconstructions")
  if is_main and grid is not None:  # The final grid, where a person looks first.
    writing.write_atomic(workdir / "reconstructions.png", grid.read_bytes())
  if is_main and done.step == t.num_steps:
    writing.write_atomic(workdir / "summary.json", json.dumps(result, indent=2) + "\n")
  return result


def cli_main(args) -> int:
  """`ferjax pretrain --config FILE --workdir DIR [--config.x=y ...]`."""
  config = configs.load_config(args.config, getattr(args, "overrides", None) or ())
  result = train_and_evaluate(config, args.workdir)
  line = f"pretrain: {result['step']} steps in {result['wall_s']:.0f} s"
  if result["val"]:
    line += (f"; validation loss {result['val']['val_loss']:.4f} (best at step "
             f"{result['best_step']})")
  print(line)
  print(f"pretrain: wrote {result['workdir']}/ (reconstructions.png, curves.png, metrics.jsonl, "
        "tensorboard/, checkpoints/); start a ViT classifier from it with "
        f"--config.model.init_from={result['workdir']}")
  return 0
