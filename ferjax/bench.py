"""Throughput benchmarks: time a jitted function after warm-up, median of repeats.

Speed targets are checked here, never in timed tests. Each measurement is one JSON line with
`what`, `batch`, `dtype`, `device`, `images_per_s`, `compile_s`, `flops_per_image` (XLA's cost
analysis) and `mfu` (share of the device's peak bf16/fp32 throughput, where known).
"""

import statistics
import time

import jax

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


# --- `ferjax bench` ----------------------------------------------------------------------------

BENCH_TARGETS = ("classifier", "vaegan", "sampler", "evaluate")


def _config_for(what: str, path, overrides):
  """The config under measurement: a file (as for training) or the trainer's defaults."""
  from ferjax import configs
  if what == "vaegan":
    from ferjax.train import vaegan as trainer
  else:
    from ferjax.train import classifier as trainer
  if path is not None:
    return configs.load_config(path, overrides)
  config = trainer.default_config()
  configs.apply_overrides(config, overrides)
  return config


def cli_main(args) -> int:
  import json
  if args.batch is not None and args.batch <= 0:
    from ferjax.errors import UserError
    raise UserError(f"--batch: expected a positive number of images, got {args.batch}")
  config = _config_for(args.what, args.config, args.overrides)
  if args.what == "vaegan":
    from ferjax.train import vaegan
    records = [vaegan.bench(config, batch_size=args.batch, steps=args.steps)]
  elif args.what == "sampler":
    from ferjax.augment import synthesis
    records = synthesis.bench(config, batch_size=args.batch, steps=args.steps)
  else:
    from ferjax import evaluate
    records = [r for r in evaluate.bench(config, batch_size=args.batch, steps=args.steps)
               if r["what"] == args.what]
  for record in records:
    print(json.dumps(record))
  return 0
