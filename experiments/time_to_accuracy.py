"""Minutes to X% on your own CPU: train a recipe per seed, timing every checkpoint, then score each.

  ferjax data prepare fer2013 --manual-dir ~/downloads/fer2013          # once
  python experiments/time_to_accuracy.py --out runs/tta_fer_cpu --seeds 0 1 2   # ~20 min a seed
  python experiments/time_to_accuracy.py --out runs/tta_fer_cpu --collect        # table + curve

For each seed, `ferjax train --config CONFIG --config.seed=S` runs in a child process while this
script notes the wall time (from launch: start-up, compile, data loading and validations
included) at which each resume checkpoint appears in `checkpoints/last/`. The config must keep
every checkpoint (classifier_fer2013_cpu.py saves every 500th step and keeps 14). When the run
ends, each of those checkpoints and the `best` one (chosen on the run's own validation: the
hold-out of train in the CPU recipe) is scored on `--split` (default `validation`, FER-2013's
PublicTest), so PublicTest selects nothing. A seed is resumable only as a whole: a seed folder
without its `curve.json` (a stopped run) is refused, since a resumed run's wall time would not be
one run's. Extra `--config.FIELD=VALUE` arguments go to `ferjax train` (the same for every seed).

Writes <out>/seed<S>/ (the run, `times.json`, `curve.json`) and, with --collect, <out>/curve.md
(per checkpoint: minutes and accuracy / mean class accuracy, mean ± sample std over seeds; the best
checkpoint's result; the minutes to reach each accuracy level) and <out>/curve.png.
Measure on an otherwise idle machine: the times move with the load.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

from ferjax import report

DEFAULT_CONFIG = "experiments/configs/classifier_fer2013_cpu.py"
LEVELS = (50.0, 55.0, 58.0, 60.0, 62.0)


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Finished resume checkpoints (orbax renames a step's folder to its number when complete)."""
  last = workdir / "checkpoints" / "last"
  if not last.is_dir():
    return []
  return sorted(int(p.name) for p in last.iterdir() if p.name.isdigit())


def train_timed(config: str, workdir: pathlib.Path, seed: int, overrides: list[str]) -> dict:
  """Runs `ferjax train`, returns {step: seconds from launch until that checkpoint existed}."""
  command = [sys.executable, "-m", "ferjax.cli", "train", "--config", config, "--workdir",
             str(workdir), f"--config.seed={seed}", *overrides]
  print(" ".join(command[1:]), flush=True)
  start = time.time()
  seen = {}
  with subprocess.Popen(command) as child:
    while child.poll() is None:
      for step in checkpoint_steps(workdir):
        seen.setdefault(step, time.time() - start)
      time.sleep(0.5)
  total = time.time() - start
  if child.returncode != 0:
    raise SystemExit(f"time_to_accuracy: ferjax train exited {child.returncode} ({workdir})")
  for step in checkpoint_steps(workdir):  # The final save, if it came after the last poll.
    seen.setdefault(step, total)
  return {"seconds": {str(k): round(v, 1) for k, v in sorted(seen.items())},
          "total_seconds": round(total, 1)}


def score(workdir: pathlib.Path, times: dict, split: str) -> dict:
  from ferjax import evaluate  # Imported here: the parent process needs no JAX while training.
  points = []
  for step, seconds in times["seconds"].items():
    r = evaluate.evaluate_run(workdir, split, checkpoint=int(step))
    points.append({"step": int(step), "minutes": round(seconds / 60, 2),
                   "accuracy": r["accuracy"] * 100, "mean_class_accuracy":
                   r["mean_class_accuracy"] * 100})
  best = evaluate.evaluate_run(workdir, split, checkpoint="best")
  per_class = {name: v["recall"] * 100 for name, v in best.get("per_class", {}).items()
               if isinstance(v, dict) and "recall" in v}
  return {"split": split, "points": points, "total_minutes": round(times["total_seconds"] / 60, 2),
          "best": {"step": best["step"], "accuracy": best["accuracy"] * 100,
                   "mean_class_accuracy": best["mean_class_accuracy"] * 100,
                   "recall": per_class}}


def run_seed(args, seed: int, overrides: list[str]) -> None:
  folder = args.out / f"seed{seed}"
  if (folder / "curve.json").exists():
    print(f"seed {seed}: done ({folder / 'curve.json'})")
    return
  workdir = folder / "run"
  if workdir.exists():
    raise SystemExit(f"time_to_accuracy: {workdir} holds a run that did not finish here; its wall "
                     "time cannot be measured by resuming: move it away and run the seed again")
  folder.mkdir(parents=True, exist_ok=True)
  times = train_timed(args.config, workdir, seed, overrides)
  (folder / "times.json").write_text(json.dumps(times, indent=2) + "\n")
  curve = score(workdir, times, args.split)
  curve.update(seed=seed, config=args.config, overrides=overrides)
  (folder / "curve.json").write_text(json.dumps(curve, indent=2) + "\n")
  b = curve["best"]
  print(f"seed {seed}: {curve['total_minutes']:.1f} min, best step {b['step']}: accuracy "
        f"{b['accuracy']:.2f}, mean class accuracy {b['mean_class_accuracy']:.2f}", flush=True)


def mean_std(values) -> str:
  """Mean ± sample std in the values' own units (minutes, %), formatted as every table
  (report.stat would scale fractions to percent)."""
  values = np.asarray(values, dtype=float)
  return report.fmt((values.mean(), values.std(ddof=1) if len(values) > 1 else None))


def collect(out: pathlib.Path) -> str:
  curves = [json.loads(p.read_text()) for p in sorted(out.glob("seed*/curve.json"))]
  if not curves:
    raise SystemExit(f"time_to_accuracy: no finished seed under {out}")
  lines = [f"# Time to accuracy: {curves[0]['config']} {' '.join(curves[0]['overrides'])}".rstrip(),
           "", f"Seeds {', '.join(str(c['seed']) for c in curves)}; scored on "
           f"`{curves[0]['split']}`; minutes from launch (start-up, compile, data and "
           "validations included).", "",
           "| step | minutes | accuracy | mean class accuracy |", "|---:|---:|---:|---:|"]
  steps = sorted({p["step"] for c in curves for p in c["points"]})
  for step in steps:
    at = [p for c in curves for p in c["points"] if p["step"] == step]
    lines.append(f"| {step} | {mean_std([p['minutes'] for p in at])} | "
                 f"{mean_std([p['accuracy'] for p in at])} | "
                 f"{mean_std([p['mean_class_accuracy'] for p in at])} |")
  best = [c["best"] for c in curves]
  lines += ["", f"Best checkpoint (chosen on the run's validation): accuracy "
            f"{mean_std([b['accuracy'] for b in best])}, mean class accuracy "
            f"{mean_std([b['mean_class_accuracy'] for b in best])}, steps "
            f"{', '.join(str(b['step']) for b in best)}; whole run "
            f"{mean_std([c['total_minutes'] for c in curves])} min."]
  names = sorted({k for b in best for k in b["recall"]})
  if names:
    lines += ["", "Recall per class at the best checkpoint: " + ", ".join(
        f"{n} {mean_std([b['recall'][n] for b in best if n in b['recall']])}" for n in names) + "."]
  lines += ["", "| accuracy reached | minutes (per seed) |", "|---:|---|"]
  for level in LEVELS:
    reached = []
    for c in curves:
      hit = [p["minutes"] for p in c["points"] if p["accuracy"] >= level]
      reached.append(f"{min(hit):.1f}" if hit else "not reached")
    lines.append(f"| {level:g}% | {', '.join(reached)} |")
  text = "\n".join(lines) + "\n"
  (out / "curve.md").write_text(text)
  plot(curves, out / "curve.png")
  return text


def plot(curves, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for c in curves:
    minutes = [p["minutes"] for p in c["points"]]
    ax.plot(minutes, [p["accuracy"] for p in c["points"]], "o-", label=f"seed {c['seed']} acc")
    ax.plot(minutes, [p["mean_class_accuracy"] for p in c["points"]], "x--",
            label=f"seed {c['seed']} MCA")
  ax.set_xlabel("wall minutes from launch")
  ax.set_ylabel(f"% on {curves[0]['split']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--config", default=DEFAULT_CONFIG)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--split", default="validation")
  parser.add_argument("--collect", action="store_true", help="only write curve.md / curve.png")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)} (extra arguments are --config.FIELD=VALUE)")
  if not args.collect:
    for seed in args.seeds:
      run_seed(args, seed, overrides)
  print(collect(args.out))


if __name__ == "__main__":
  main()
