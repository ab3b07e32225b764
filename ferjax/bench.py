"""Throughput benchmarks: time a jitted function after warm-up, median of repeats.

    ferjax bench classifier --config.model.dtype=bfloat16 --batch 512

Speed targets are checked here, never in timed tests. Every benchmark lives in this module: it
builds the real train steps from the trainers and times them on random data. Each measurement is one JSON line with
`what`, `batch`, `dtype`, `device`, `images_per_s`, `compile_s`, `flops_per_image` (XLA's cost
analysis) and `mfu` (share of the device's peak bf16/fp32 throughput, where known);
`ferjax bench predict` times the host-side work of `ferjax predict` instead (`faces_per_s` with
and without face detection, see `bench_predict`).
"""

import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ferjax import configs
from ferjax import evaluate as evaluate_lib
from ferjax import inference
from ferjax import predict as predict_lib
from ferjax.augment import synthesis
from ferjax.core import parallel
from ferjax.data import synthetic
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import classifier_batches
from ferjax.kinds import pretrain as pretrain_kind
from ferjax.kinds import vaegan as vaegan_kind
from ferjax.models import vaegan as vaegan_models
from ferjax.runs import VAEGANRun, open_vaegan
from ferjax.train import classifier as classifier_trainer
from ferjax.train import pretrain as pretrain_trainer
from ferjax.train import vaegan as vaegan_trainer

# Dense peak FLOP/s by device kind (bf16 / fp32). The H200 figure is the one measured on our card.
PEAK_FLOPS = {
    "NVIDIA H200": {"bfloat16": 790e12, "float32": 67e12},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 790e12, "float32": 67e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
}


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.device_kind} x{jax.device_count()}" if jax.device_count() > 1 else d.device_kind


def peak_flops(dtype: str) -> float | None:
  table = PEAK_FLOPS.get(jax.devices()[0].device_kind)
  return None if table is None else table.get(dtype, table.get("float32")) * jax.device_count()


def flops_of(stage) -> float | None:
  """Total FLOPs of one call from XLA's cost analysis of a lowered or compiled function (None
  when the backend gives none)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # Some backends do not implement it; the figure is then omitted.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def time_step(step_fn, carry, *, what: str, batch: int, dtype: str, steps: int = 20,
              repeats: int = 3, extra: dict | None = None) -> dict:
  """Times `carry = step_fn(carry)` (jitted, donating its carry) and returns the JSON record.

  `step_fn` takes and returns the whole carry (state, key, ...), so the loop runs on the device
  with no host work between steps; we block once per repeat.
  """
  t0 = time.perf_counter()
  lowered = jax.jit(step_fn, donate_argnums=0).lower(carry)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # FLOPs of the program as written: on GPU the compiled module's analysis misses convolutions
  # that became cuDNN calls (it reported 0.05 of the 7 GFLOP of a ResNet-18 step on an H200).
  flops = flops_of(lowered) or flops_of(compiled)
  carry = compiled(carry)  # Warm-up call (first run allocates).
  jax.block_until_ready(carry)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      carry = compiled(carry)
    jax.block_until_ready(carry)
    times.append((time.perf_counter() - t0) / steps)
  per_step = statistics.median(times)
  images_per_s = batch / per_step
  peak = peak_flops(dtype)
  record = {
      "what": what, "batch": batch, "dtype": dtype, "device": device_name(),
      "images_per_s": round(images_per_s, 1), "step_ms": round(per_step * 1e3, 3),
      "compile_s": round(compile_s, 2),
      "flops_per_image": None if flops is None else round(flops / batch),
      "mfu": None if (flops is None or peak is None) else round(flops / per_step / peak, 4),
  }
  record.update(extra or {})
  return record


# --- Classifier: train step, batch pipeline, evaluation ------------------------------------------
def bench_classifier(config, batch_size=None, steps: int = 20, what=("classifier", "evaluate"),
                     stage=None) -> list[dict]:
  """Throughput records (see `time_step`) on random data of the configured shape
  (data.image_size, data.channels; 7 classes in RAF-DB's long-tailed proportions), batch
  `batch_size` (default train.batch_size), for each of `what`:

  - "classifier": the full train step (on-device sampling, gather, [synthesis], augmentation,
    forward, backward, update);
  - "sampler": the batch pipeline alone (sampling, gather, [synthesis], augmentation);
  - "evaluate": one jitted batch of predictions (config.eval.tta).

  `stage(config, images, labels, num_classes) -> (synthesize, synthesis_data, extra)` plugs a
  synthesis stage into the batch (`bench_sampler` does).
  """
  batch = int(batch_size or config.train.batch_size)
  config = ml_collections.ConfigDict(config.to_dict())  # Do not touch the caller's config.
  config.train.batch_size = batch
  classifier_kind.validate_config(config)
  mesh = parallel.make_mesh(config.train.num_devices)
  size, channels, num_classes = config.data.image_size, config.data.channels, 7
  rng = np.random.default_rng(0)
  num_examples = max(4 * batch, 512)
  images = rng.integers(0, 256, (num_examples, size, size, channels), dtype=np.uint8)
  counts = synthetic.class_counts("train", num_examples)
  labels = rng.permutation(np.repeat(np.arange(num_classes), counts)).astype(np.int32)
  num_steps = config.train.num_steps
  model = classifier_kind.build_model(config, num_classes)
  setup = dict(model=config.model.name, stem=config.model.stem, width=config.model.width,
               cbam=config.model.cbam, head=config.model.head, pooling=config.model.pooling,
               loss=config.loss.name, eac_weight=config.loss.eac_weight, image_size=size,
               channels=channels)

  tx, _ = classifier_kind.make_optimizer(config, num_steps)
  state = classifier_kind.init_state(config, model, tx, mesh)
  variables = jax.tree.map(jnp.copy, classifier_kind.eval_variables(state))  # State is donated.
  data = classifier_batches.device_data(config, images, labels, num_classes, mesh)
  synthesize = None
  if stage is not None:
    synthesize, synthesis_data, stage_extra = stage(config, images, labels, num_classes)
    data["synthesis"] = parallel.put_replicated(synthesis_data, mesh)
    setup.update(stage_extra)
  timed = lambda fn, carry, name, extra=setup: time_step(
      fn, carry, what=name, batch=batch, dtype=config.model.dtype, steps=steps, extra=extra)
  records = []

  if "sampler" in what:
    train_key = classifier_kind.rng_streams(config.seed).train

    def pipeline_carry(carry):
      data, step, checksum = carry
      make_batch = classifier_batches.batch_maker(config, data, num_steps=num_steps,
                                                  synthesize=synthesize, mesh=mesh)
      images, labels, weights = make_batch(jax.random.fold_in(train_key, step), step)
      return data, step + 1, checksum + jnp.sum(images) + jnp.sum(weights) + jnp.sum(labels)

    pipeline_data = jax.tree.map(jnp.copy, data)  # The carry is donated; keep `data`.
    records.append(timed(pipeline_carry, (pipeline_data, jnp.zeros((), jnp.int32),
                                          jnp.zeros((), jnp.float32)), "sampler"))

  if "classifier" in what:
    train_step = classifier_trainer.make_train_step(config, model, tx, counts, num_steps, mesh,
                                                    synthesize=synthesize, jit=False)

    def train_carry(carry):
      state, data = carry
      state, _ = train_step(state, data)
      return state, data

    records.append(timed(train_carry, (state, data), "classifier"))

  if "evaluate" in what:
    eval_images = jax.device_put(images[:batch], parallel.batch_sharding(mesh))

    def eval_carry(carry):
      variables, images, checksum = carry
      logits, _ = evaluate_lib._predict_batch(model, variables, images, config.eval.tta)
      return variables, images, checksum + jnp.sum(logits)

    records.append(timed(eval_carry, (variables, eval_images, jnp.zeros((), jnp.float32)),
                         "evaluate", {**setup, "tta": config.eval.tta}))
  return records


# --- Semantic augmentation: the synthesis stage against the step it feeds -----------------------
def untrained_vaegan(channels: int = 1, seed: int = 0) -> VAEGANRun:
  """A freshly initialised VAE-GAN of the default config (for benchmarks: same cost)."""
  config = vaegan_kind.default_config()
  config.data.channels = channels
  config.seed = seed
  model = vaegan_kind.build_model(config)
  state = vaegan_kind.init_state(config, model, parallel.make_mesh(1))
  return VAEGANRun(config=config, model=model, step=0, encoder=state.ema["encoder"],
                   generator=state.ema["generator"])


def bench_sampler(config, batch_size=None, steps: int = 20) -> list[dict]:
  """Cost of the augmentation pipeline against the classifier step it feeds.

  Three records on random long-tailed data: "sampler" (the batch pipeline alone: sampling,
  gather, synthesis of a quarter of the batch, augmentation), "classifier+synthesis" (the full
  train step with that pipeline) and "classifier" (the same step without synthesis). The
  sampler record's `share_of_step` is its time over the full step's; the full step's
  `synthesis_overhead` is its time over the plain step's, minus 1. Uses the trained VAE-GAN of
  config.augment.vaegan_workdir, else an untrained one of the default VAE-GAN architecture
  (64 px, the classifier's channels): same cost, meaningless faces.
  """
  a = config.augment

  def stage(config, images, labels, num_classes):
    if a.vaegan_workdir:
      vae = open_vaegan(a.vaegan_workdir, a.vaegan_checkpoint)
    else:
      vae = untrained_vaegan(channels=config.data.channels)
    plan = synthesis.plan_for(config, labels, num_classes)
    num_synthetic = config.train.batch_size // 4  # Fixed share, comparable across datasets.
    synthesize = synthesis.make_synthesize(
        vae.model, num_synthetic, config.data.image_size, config.data.channels, mode=a.mode,
        alpha=float(a.alpha), residual=a.decode == "residual",
        synthetic_weight=float(a.synthetic_weight))
    data = synthesis.stage_data(vae, plan, a.mode, images, labels, num_classes)
    return synthesize, data, {"synthetic_per_batch": num_synthetic, "mode": a.mode,
                              "vaegan_image_size": vae.model.image_size,
                              "vaegan_trained": bool(a.vaegan_workdir)}

  plain = bench_classifier(config, batch_size, steps, what=("classifier",))[0]
  pipeline, full = bench_classifier(config, batch_size, steps, what=("sampler", "classifier"),
                                    stage=stage)
  pipeline["share_of_step"] = round(pipeline["step_ms"] / full["step_ms"], 4)
  full["what"] = "classifier+synthesis"
  full["synthesis_overhead"] = round(full["step_ms"] / plain["step_ms"] - 1.0, 4)
  return [pipeline, full, plain]


# --- VAE-GAN and MAE pre-training: steps over a device-resident image pool ---------------------
def _sized(config, batch_size):
  """A copy of `config` with train.batch_size set to `batch_size` (when given)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if batch_size is not None:
    config.train.batch_size = int(batch_size)
  return config


def _time_pool_step(make_step, state, config, mesh, *, what: str, steps: int, extra: dict,
                    num_classes: int = 0):
  """Times `make_step(num_examples)`'s `(state, images) -> (state, metrics)` over a random
  uint8 pool of the configured shape (at least 4 batches), split by rows over the mesh; with
  `num_classes`, `(state, images, labels)` with random labels."""
  d = config.data
  num_examples = max(4 * config.train.batch_size, 256)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, d.image_size, d.image_size, d.channels),
                        dtype=np.uint8)
  pool = (parallel.put_rows(images, mesh),)
  if num_classes:
    pool += (parallel.put_rows(rng.integers(0, num_classes, num_examples, dtype=np.int32), mesh),)
  train_step = make_step(num_examples)

  def step_fn(carry):
    state, pool = carry
    state, _ = train_step(state, *pool)
    return state, pool

  return time_step(step_fn, (state, pool), what=what,
                   batch=config.train.batch_size, dtype=config.model.dtype, steps=steps,
                   extra={"image_size": d.image_size, "channels": d.channels, **extra})


def bench_vaegan(config, batch_size=None, steps: int = 20) -> dict:
  """Images/s of the real VAE-GAN train step (on-device sampling included) on random data (a
  class-conditional model on random labels; the class-consistency terms' frozen classifier is
  not part of the timed step)."""
  config = _sized(config, batch_size)
  vaegan_kind.validate_config(config)
  mesh = parallel.make_mesh(config.train.num_devices)
  model = vaegan_kind.build_model(config)
  state = vaegan_kind.init_state(config, model, mesh)
  widths = config.model.widths or vaegan_models.default_widths(config.data.image_size)
  return _time_pool_step(
      lambda n: vaegan_trainer.make_train_step(model, config, mesh, n, jit=False), state, config,
      mesh, what="vaegan", steps=steps, num_classes=model.num_classes,
      extra={"arch": config.model.arch, "widths": list(widths),
             "num_classes": model.num_classes})


def bench_pretrain(config, batch_size=None, steps: int = 20) -> dict:
  """Images/s of the real MAE pre-training step (on-device sampling, flip, masking, encoder on
  the visible patches, decoder, update) on random data of the configured shape."""
  config = _sized(config, batch_size)
  pretrain_kind.validate_config(config)
  mesh = parallel.make_mesh(config.train.num_devices)
  models = pretrain_kind.build_models(config)
  state = pretrain_kind.init_state(config, models, mesh)
  m, a = config.model, config.mae
  return _time_pool_step(
      lambda n: pretrain_trainer.make_train_step(models, config, mesh, n, jit=False), state,
      config, mesh, what="pretrain", steps=steps,
      extra={"model": m.name, "width": m.width, "depth": models.encoder.depth,
             "patch_size": models.encoder.patch_size, "mask_ratio": a.mask_ratio,
             "decoder": [a.decoder_width, a.decoder_depth, a.decoder_heads]})


# --- `ferjax predict` -----------------------------------------------------------------------------
def untrained_predictor(config, num_classes: int = 7) -> inference.Predictor:
  """A freshly initialised classifier of `config` as an inference.Predictor (same cost as a
  trained one, meaningless answers), on one device."""
  mesh = parallel.make_mesh(1)
  model = classifier_kind.build_model(config, num_classes)
  tx, _ = classifier_kind.make_optimizer(config, config.train.num_steps)
  variables = classifier_kind.eval_variables(classifier_kind.init_state(config, model, tx, mesh))
  return inference.from_model(model, variables, class_names=synthetic.CLASS_NAMES[:num_classes],
                              image_size=config.data.image_size, channels=config.data.channels,
                              prior_counts=None, source="untrained classifier")


def bench_predict(config, batch_size=None, steps: int = 1, repeats: int = 3) -> list[dict]:
  """Faces/s of `ferjax predict`'s work on images in memory (file reading and writing left
  out), for an untrained classifier of `config`, two records:

  - detect=True: `batch` 320x240 RGB photos, each a 96 px synthetic face on a plain background:
    Haar-cascade detection, square crops, conversion and the batched model call;
  - detect=False: the same 96 px faces as aligned crops (--whole-image): conversion and model.

  `faces_per_s` counts the faces found (the cascade misses some synthetic faces), `images_per_s`
  the photos; timed after a warm-up pass (which compiles), median of `repeats` of `steps`
  passes.
  """
  n = int(batch_size or 64)
  faces = np.asarray(synthetic.load("test", image_size=96, channels=3,
                                    num_examples=max(n, 7)).images[:n])
  photos = np.full((n, 240, 320, 3), 200, np.uint8)
  photos[:, 60:156, 112:208] = faces
  detect = predict_lib.face_detector()
  predictor = untrained_predictor(config)
  path = pathlib.Path("photo.png")

  def with_detection():
    found = [predict_lib.Face(path, i, box, predict_lib.square_crop(photo, box, 0.2))
             for photo in photos for i, box in enumerate(detect(photo))]
    return len(found), predict_lib.predict(predictor, found)

  def whole_images():
    found = [predict_lib.Face(path, 0, (0, 0, 96, 96), face) for face in faces]
    return len(found), predict_lib.predict(predictor, found)

  setup = dict(batch=n, dtype=config.model.dtype, device=device_name(), model=config.model.name,
               width=config.model.width, image_size=config.data.image_size,
               channels=config.data.channels)
  records = []
  for detected, run in ((True, with_detection), (False, whole_images)):
    found, _ = run()  # Warm-up: compiles the model's batch.
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        run()
      times.append((time.perf_counter() - t0) / steps)
    per_pass = statistics.median(times)
    records.append({"what": "predict", "detect": detected, **setup, "faces": found,
                    "faces_per_s": round(found / per_pass, 1),
                    "images_per_s": round(n / per_pass, 1), "pass_ms": round(per_pass * 1e3, 2)})
  return records


# --- `ferjax bench` -------------------------------------------------------------------------------
BENCH_TARGETS = ("classifier", "vaegan", "pretrain", "sampler", "evaluate", "predict")


def _config_for(what: str, path, overrides):
  """The config under measurement: a file (as for training) or the run kind's defaults."""
  if path is not None:
    return configs.load_config(path, overrides)
  kinds = {"vaegan": vaegan_kind, "pretrain": pretrain_kind}
  config = kinds.get(what, classifier_kind).default_config()
  configs.apply_overrides(config, overrides)
  return config


def cli_main(args) -> int:
  if args.batch is not None and args.batch <= 0:
    raise UserError(f"--batch: expected a positive number of images, got {args.batch}")
  if args.steps is not None and args.steps < 1:
    raise UserError(f"--steps: expected at least 1 timed step, got {args.steps}")
  config = _config_for(args.what, args.config, args.overrides)
  steps = args.steps or (1 if args.what == "predict" else 20)
  if args.what == "vaegan":
    records = [bench_vaegan(config, batch_size=args.batch, steps=steps)]
  elif args.what == "pretrain":
    records = [bench_pretrain(config, batch_size=args.batch, steps=steps)]
  elif args.what == "sampler":
    records = bench_sampler(config, batch_size=args.batch, steps=steps)
  elif args.what == "predict":
    records = bench_predict(config, batch_size=args.batch, steps=steps)
  else:
    records = [r for r in bench_classifier(config, batch_size=args.batch, steps=steps)
               if r["what"] == args.what]
  for record in records:
    print(json.dumps(record))
  return 0
