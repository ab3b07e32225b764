"""Every speed target of the project in one go: `ferjax bench` per target, one Markdown table.

  python experiments/bench_targets.py --out runs/bench_h200          # one H200: a few minutes
  python experiments/bench_targets.py --out runs/bench_cpu --cpu     # 2-core CPU: ~6 minutes

Each row runs `ferjax bench` in its own process (so one failure or out-of-memory does not end
the rest) and compares images/s with the plain-Flax and PyTorch-eager references measured on
one H200 (GPU_ROWS below; measured with reference_resnet18.py). The augmentation row is the
share of the FER-2013 recipe's train step taken by its batch pipeline (sampling, gather,
synthesis of a quarter of the batch with an untrained DCGAN-64 VAE-GAN of the same cost,
crop/flip/erasing); the target is at most 15%.
The MAE rows time SSFER's stage 1 (pretrain_fer2013.py: ViT-S, 75% of the patches masked) at
48 px with 4 px patches and at 112 px with 16 px patches; the target is MFU >= 40% in bf16.
--cpu measures the CPU rows instead (small-stem ResNet-18, 48 px gray, batch 64, f32; the network
of the FER-2013 CPU recipe, classifier_fer2013_cpu.py, its full train step; the MAE rows at batch
16, f32) and, CPU speed moving with the machine and its load, measures each ResNet row's
references (the same network) in the same run, one after the other:
experiments/reference_resnet18.py for plain Flax, and for PyTorch eager with the interpreter
given by --torch-python (torch is not a ferjax dependency; without it that column stays empty).
A second table times the train step with each toolbox method (METHOD_ROWS) against the plain
linear head on the same backbone and batch. Writes bench.jsonl and bench.md.
--match TEXT measures only the rows whose name contains TEXT, without the method table:

  python experiments/bench_targets.py --out runs/bench_cpu --cpu --match "CPU recipe" \
      --torch-python /path/to/python-with-torch                    # ~2 minutes
"""

import argparse
import json
import pathlib
import subprocess
import sys

SMALL = ["--config.model.name=resnet18", "--config.model.stem=small",
         "--config.data.image_size=48", "--config.data.channels=1"]
STANDARD = ["--config.model.name=resnet18", "--config.model.stem=standard",
            "--config.data.image_size=112", "--config.data.channels=3"]
BF16 = ["--config.model.dtype=bfloat16"]
PRETRAIN = "experiments/configs/pretrain_fer2013.py"  # ViT-S/4 at 48 px gray, bf16, batch 512.
VIT_112 = ["--config.data.image_size=112", "--config.model.patch_size=16"]  # 49 patches.

# (row name, `ferjax bench` arguments, record "what", plain-Flax reference, PyTorch reference)
GPU_ROWS = [
    ("ResNet-18 small stem, 48 px gray, batch 512, bf16",
     ["classifier", *SMALL, *BF16, "--batch", "512"], "classifier", 41611, 30054),
    ("ResNet-18 standard stem, 112 px RGB, batch 256, bf16",
     ["classifier", *STANDARD, *BF16, "--batch", "256"], "classifier", 48113, 40223),
    ("VAE-GAN DCGAN-64, 64 px RGB, batch 256, bf16",
     ["vaegan", "--config.data.channels=3", *BF16, "--batch", "256"], "vaegan", 30548, 14843),
    ("Augmentation pipeline, FER-2013 recipe, batch 256, bf16",
     ["sampler", "--config", "experiments/configs/classifier_fer2013.py"], "sampler", None, None),
    ("Evaluation (flip TTA), FER-2013 recipe, batch 512, bf16",
     ["evaluate", "--config", "experiments/configs/classifier_fer2013.py", "--batch", "512"],
     "evaluate", None, None),
    # SSFER stage 1 (target: MFU >= 40% in bf16 on the H200).
    ("MAE pre-training, ViT-S/4, 48 px gray, batch 512, bf16",
     ["pretrain", "--config", PRETRAIN], "pretrain", None, None),
    ("MAE pre-training, ViT-S/16, 112 px gray, batch 512, bf16",
     ["pretrain", "--config", PRETRAIN, *VIT_112], "pretrain", None, None),
]
CPU_RECIPE = "experiments/configs/classifier_fer2013_cpu.py"
# CPU rows: (row name, `ferjax bench` arguments, record "what", reference_resnet18.py arguments
# for the same network, or None). The references are measured in the same run
# (measure_cpu_references), one after the other.
CPU_ROWS = [
    ("ResNet-18 small stem, 48 px gray, batch 64, f32",
     ["classifier", *SMALL, "--batch", "64", "--steps", "3"], "classifier", []),
    ("FER-2013 CPU recipe: ResNet-18 x0.25 strided stem, 48 px gray, batch 64, f32",
     ["classifier", "--config", CPU_RECIPE, "--steps", "20"], "classifier",
     ["--depth", "18", "--width", "0.25", "--stem", "strided", "--steps", "20"]),
    ("MAE pre-training, ViT-S/4, 48 px gray, batch 16, f32",
     ["pretrain", "--config", PRETRAIN, "--config.model.dtype=float32", "--batch", "16",
      "--steps", "2"], "pretrain", None),
    ("MAE pre-training, ViT-S/16, 112 px gray, batch 16, f32",
     ["pretrain", "--config", PRETRAIN, *VIT_112, "--config.model.dtype=float32", "--batch",
      "16", "--steps", "2"], "pretrain", None),
]
REFERENCE = pathlib.Path(__file__).with_name("reference_resnet18.py")
# The toolbox's cost on the train step: each method against the plain linear head, same
# backbone and batch (GPU: SMALL + bf16, batch 512; --cpu: SMALL, batch 64). Target: at most
# 15% slower; EAC's second (mirror) forward and backward pass is the stated exception.
METHOD_ROWS = [
    ("linear head (baseline)", []),
    ("cosine head", ["--config.model.head=cosine", "--config.model.cosine_scale=30"]),
    ("attentive patch pooling", ["--config.model.pooling=app"]),
    ("CBAM", ["--config.model.cbam=True"]),
    ("RUL head", ["--config.model.head=rul"]),
    ("DAN head (4)", ["--config.model.head=dan"]),
    ("coupling-regulation loss", ["--config.loss.name=coupling"]),
    ("EAC (exception: 2 passes)", ["--config.loss.eac_weight=5",
                                   "--config.augment.erasing_prob=0.5"]),
]


def measure_cpu_references(torch_python, log, reference_args) -> tuple:
  """images/s of the plain-Flax and (given an interpreter with torch) PyTorch references."""
  speeds = []
  for python, framework in ((sys.executable, "flax"), (torch_python, "torch")):
    if python is None or reference_args is None:
      speeds.append(None)
      continue
    command = [str(REFERENCE), "--framework", framework, *reference_args]
    print(f"$ {python} {' '.join(command)}", flush=True)
    result = subprocess.run([python, *command], capture_output=True, text=True)
    log.write(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    speeds.append(json.loads(lines[-1])["images_per_s"] if result.returncode == 0 and lines
                  else None)
  return tuple(speeds)


def run_row(args: list, log) -> list:
  command = [sys.executable, "-m", "ferjax.cli", "bench", *args]
  print("$", " ".join(command[1:]), flush=True)
  result = subprocess.run(command, capture_output=True, text=True)
  log.write(result.stdout + result.stderr)
  if result.returncode != 0:
    print(f"  failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    return []
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def method_table(cpu: bool, jsonl, log, devices) -> list:
  """Markdown rows: each METHOD_ROWS entry's train step against the linear head's."""
  base_args = ([*SMALL, "--batch", "64", "--steps", "3"] if cpu
               else [*SMALL, *BF16, "--batch", "512"])
  lines = [f"Train step per method (ResNet-18 small stem, 48 px gray, "
           f"{'batch 64, f32' if cpu else 'batch 512, bf16'}; target: at most 15% slower than "
           "the linear head, EAC excepted):", "",
           "| method | images/s | step ms | slower than linear |", "|---|---|---|---|"]
  base = None
  for name, overrides in METHOD_ROWS:
    records = [r for r in run_row(["classifier", *base_args, *overrides], log)
               if r["what"] == "classifier"]
    if not records:
      lines.append(f"| {name} | failed | | see bench.log |")
      continue
    record = records[0]
    jsonl.write(json.dumps({"row": f"method: {name}", **record}) + "\n")
    devices.add(record["device"])
    if not overrides:  # The linear head: what the others are compared with.
      base = record["step_ms"]
    slower = "" if base is None else f"{100 * (record['step_ms'] / base - 1):+.1f}%"
    lines.append(f"| {name} | {record['images_per_s']:,.1f} | {record['step_ms']} | {slower} |")
    print(lines[-1], flush=True)
  return lines


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/bench", help="output folder")
  parser.add_argument("--cpu", action="store_true", help="the CPU row, with its references")
  parser.add_argument("--torch-python", help="--cpu: a Python with torch, for the PyTorch column")
  parser.add_argument("--match", help="only the rows whose name contains this text (no method "
                      "table)")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lines = ["| work | images/s | target (plain Flax) | PyTorch eager | ratio to target | "
           "compile s | GFLOP/image | MFU | notes |", "|---|---|---|---|---|---|---|---|---|"]
  devices = set()
  with open(out / "bench.jsonl", "w") as jsonl, open(out / "bench.log", "w") as log:
    rows = GPU_ROWS
    if args.cpu:
      rows = [(name, bench_args, what,
               *measure_cpu_references(args.torch_python, log, reference_args))
              for name, bench_args, what, reference_args in CPU_ROWS
              if args.match is None or args.match in name]
    elif args.match is not None:
      rows = [row for row in rows if args.match in row[0]]
    for name, bench_args, what, target, torch in rows:
      records = run_row(bench_args, log)
      for record in records:
        jsonl.write(json.dumps({"row": name, **record}) + "\n")
      devices.update(r["device"] for r in records)
      record = next((r for r in records if r["what"] == what), None)
      if record is None:
        lines.append(f"| {name} | failed | {target or ''} | {torch or ''} | | | | | see bench.log |")
        continue
      speed = record["images_per_s"]
      notes = []
      if "share_of_step" in record:
        notes.append(f"share of step {100 * record['share_of_step']:.1f}% (target <= 15%)")
      overhead = next((r.get("synthesis_overhead") for r in records
                       if r["what"] == "classifier+synthesis"), None)
      if overhead is not None:
        notes.append(f"synthesis adds {100 * overhead:.1f}% to the step")
      flops = record.get("flops_per_image")
      mfu = record.get("mfu")
      lines.append(
          f"| {name} | {speed:,.1f} | {f'{target:,}' if target else ''} | "
          f"{f'{torch:,}' if torch else ''} | {f'{speed / target:.2f}' if target else ''} | "
          f"{record['compile_s']} | {'' if flops is None else f'{flops / 1e9:.2f}'} | "
          f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {'; '.join(notes)} |")
      print(lines[-1], flush=True)
    method_lines = [] if args.match is not None else method_table(args.cpu, jsonl, log, devices)
  table = (f"Device: {', '.join(sorted(devices)) or 'none measured'}\n\n" + "\n".join(lines)
           + "\n\n" + "\n".join(method_lines) + "\n")
  (out / "bench.md").write_text(table)
  print("\n" + table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
