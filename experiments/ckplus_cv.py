"""CK+ 10-fold subject-disjoint cross-validation: one classifier per fold, one table.

  ferjax data prepare ckplus --manual-dir ~/downloads/CK+48            # once
  python experiments/ckplus_cv.py --out runs/ckplus_cv
  python experiments/ckplus_cv.py --out runs/ckplus_cv --seeds 0 1 2 --folds 0-4
  python experiments/ckplus_cv.py --out runs/ckplus_cv_ft --init-from runs/fer_cpu
  python experiments/ckplus_cv.py --out runs/ckplus_cv --probe-features runs/fer_cpu

For each fold k (`--folds`, default 0-9) and seed, a classifier (`--config`, default
experiments/configs/classifier_ckplus.py) is trained into `<out>/fold<k>_seed<seed>` with
config.data.fold=k: it trains on fold<k>_train, chooses its checkpoint on a subject-grouped
hold-out of it (the config's data.val_split=None), and is scored on fold<k>_test, whose subjects
it never saw. A finished run is reused, so an interrupted protocol resumes. The folds are
ferjax's: subjects sorted by number, round-robin into 10 folds (ferjax.data.builders.ckplus).

Reported: accuracy and mean class accuracy per fold (mean over seeds), their mean ± std over
folds, and the pooled figures (every fold's test images together, i.e. the confusion matrices
summed; mean ± std over seeds), with per-class recall of the pooled predictions.

`--init-from RUN_OR_DIR` starts every fold from those weights (config.model.init_from: a
finished `ferjax train` workdir or a `ferjax import-weights` folder; the architecture must match
the config's). `--probe-features RUN` also scores a frozen model: its penultimate features of
every CK+ image (`ferjax features --dataset ckplus --split all`) and a linear probe with the same
10-fold subject cross-validation (`ferjax.probe`; skipped with a line when not installed).
Writes results.md and results.json.

See docs/methods.md (DeepFEVER-style transfer).
"""

import argparse
import json
import pathlib

import numpy as np

import runner

from ferjax import evaluate, report
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind

NUM_FOLDS = 10
METRICS = (("accuracy", "acc"), ("mean_class_accuracy", "mean class acc"))


def parse_folds(text: str) -> list[int]:
  """"0-9", "0,2,5", "0-2,7" -> sorted fold numbers; a UserError when not in 0..9."""
  folds = set()
  for part in text.split(","):
    try:
      lo, _, hi = part.strip().partition("-")
      lo, hi = int(lo), int(hi or lo)
    except ValueError:
      raise UserError(f"--folds {text!r}: expected numbers and ranges, e.g. 0-9 or 0,3,5") \
          from None
    if lo > hi:
      raise UserError(f"--folds {text!r}: range {part.strip()} is empty")
    folds.update(range(lo, hi + 1))
  if min(folds) < 0 or max(folds) >= NUM_FOLDS:
    raise UserError(f"--folds {text!r}: expected folds in 0..{NUM_FOLDS - 1}")
  return sorted(folds)


def init_overrides(init_from) -> list[str]:
  if not init_from:
    return []
  if "init_from" not in classifier_kind.default_config().model:
    raise UserError("--init-from: this ferjax has no config.model.init_from")
  if not pathlib.Path(init_from).exists():
    raise UserError(f"--init-from {init_from}: not found (a ferjax train workdir or a "
                    "ferjax import-weights folder)")
  return [f"config.model.init_from={init_from}"]


def run_folds(config_name, out: pathlib.Path, folds, seeds, overrides=()) -> dict:
  """{fold: [evaluation of fold<k>_test per seed, each with its validation under "val"]}."""
  evals = {}
  for seed in seeds:
    for fold in folds:
      workdir = out / f"fold{fold}_seed{seed}"
      print(f"\n=== fold {fold}, seed {seed} -> {workdir} ===", flush=True)
      evals.setdefault(fold, []).append(runner.train_and_test(
          config_name, workdir, [*overrides, f"config.data.fold={fold}", f"config.seed={seed}"],
          report_split="test"))
  return evals


def pooled(evals: dict, seeds) -> list[dict]:
  """Per seed: the metrics of the summed confusion matrices of every fold's test split."""
  out = []
  for i, _ in enumerate(seeds):
    confusion = sum(np.asarray(e[i]["confusion"], np.int64) for e in evals.values())
    names = list(next(iter(evals.values()))[i]["per_class"])
    out.append(evaluate.metrics_from_confusion(confusion, class_names=names))
  return out


def summarize(evals: dict, seeds) -> dict:
  folds = {f"fold{k}": {key: report.stat([e[key] for e in es]) for key, _ in METRICS}
           | {"val_" + key: report.stat([e["val"][key] for e in es]) for key, _ in METRICS}
           | {"num_examples": es[0]["num_examples"], "step": [e["step"] for e in es]}
           for k, es in evals.items()}
  per_fold = {key: [np.mean([e[key] for e in es]) for es in evals.values()] for key, _ in METRICS}
  pool = pooled(evals, seeds)
  return {
      "folds": folds,
      "mean_over_folds": {key: report.stat(per_fold[key]) for key, _ in METRICS},
      "pooled": {key: report.stat([p[key] for p in pool]) for key, _ in METRICS},
      "pooled_recall": {n: report.stat([p["per_class"][n]["recall"] for p in pool])
                        for n in pool[0]["per_class"]},
      "seeds": list(seeds),
  }


def markdown(summary: dict, config_name, probe: dict | None) -> str:
  lines = ["# CK+ 10-fold cross-validation", "",
           f"Config {config_name}; seeds {summary['seeds']}. Subject-disjoint folds; each run "
           "chooses its checkpoint on a subject-grouped hold-out of its fold's train split and is "
           "scored on the fold's test split (%).", "",
           "| fold | test images | " + " | ".join(l for _, l in METRICS) + " | " +
           " | ".join(f"val {l}" for _, l in METRICS) + " |",
           "|---|---:|" + "---:|" * 2 * len(METRICS)]
  for fold, row in summary["folds"].items():
    lines.append(f"| {fold} | {row['num_examples']} | " +
                 " | ".join(report.fmt(row[key]) for key, _ in METRICS) + " | " +
                 " | ".join(report.fmt(row["val_" + key]) for key, _ in METRICS) + " |")
  lines += ["", "| summary | " + " | ".join(l for _, l in METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
            "| mean ± std over folds | " +
            " | ".join(report.fmt(summary["mean_over_folds"][k]) for k, _ in METRICS) + " |",
            "| pooled test images (± std over seeds) | " +
            " | ".join(report.fmt(summary["pooled"][k]) for k, _ in METRICS) + " |", "",
            "Per-class recall, pooled (%): " + ", ".join(
                f"{n} {report.fmt(v)}" for n, v in summary["pooled_recall"].items()), ""]
  if probe:
    s, pool = probe["summary"], probe["pooled"]
    lines += ["## Linear probe on frozen features", "",
              f"Multinomial logistic regression on the penultimate features of {probe['workdir']} "
              f"(step {probe['step']}) for every CK+ image, the same 10 folds, L2 chosen inside "
              "each fold's train part (ferjax probe; std over folds with ddof 0). Details: "
              "probe/probe.json.", "",
              "| probe | " + " | ".join(l for _, l in METRICS) + " |",
              "|---|" + "---:|" * len(METRICS),
              "| mean ± std over folds | " + " | ".join(
                  f"{100 * s[k]['mean']:.2f} ± {100 * s[k]['std']:.2f}" for k, _ in METRICS)
              + " |",
              "| pooled | " + " | ".join(f"{100 * pool[k]:.2f}" for k, _ in METRICS) + " |", ""]
  return "\n".join(lines)


def run_probe(run, out: pathlib.Path, data_dir) -> dict | None:
  """Features of every CK+ image from `run`, then the probe over CK+'s own 10 subject-disjoint
  folds (`ferjax probe --folds fold`); None and a printed line when ferjax.probe is missing."""
  try:
    from ferjax import features, probe
  except ImportError:
    print("--probe-features: skipped (this ferjax has no ferjax.probe)")
    return None
  path = out / "probe" / "features_ckplus-all.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists():
    features.features_run(run, path, split="all", dataset="ckplus", data_dir=data_dir)
  result = probe.run_probe(path, folds="fold")
  probe.write_outputs(result, out / "probe" / "probe.json")
  print(probe.format_table(result))
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/ckplus_cv", help="output folder")
  parser.add_argument("--config", default="classifier_ckplus.py",
                      help="classifier config (default experiments/configs/classifier_ckplus.py)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--folds", default="0-9", help="folds to run, e.g. 0-9 or 0,3 (default 0-9)")
  parser.add_argument("--init-from", default=None, metavar="RUN_OR_DIR",
                      help="start every fold from these weights (config.model.init_from)")
  parser.add_argument("--probe-features", default=None, metavar="RUN",
                      help="also a linear probe on this run's frozen features of CK+")
  parser.add_argument("--data-dir", default=None,
                      help="prepared datasets (default $FERJAX_DATA_DIR or ~/.ferjax/datasets)")
  parser.add_argument("overrides", nargs="*", help="config.field=value for every fold's run")
  args = parser.parse_args()
  folds = parse_folds(args.folds)
  overrides = [*init_overrides(args.init_from), *args.overrides]
  if args.data_dir:
    overrides.insert(0, f"config.data.data_dir={args.data_dir}")
  config = runner.load(args.config, overrides)
  if config.data.name != "ckplus":
    raise UserError(f"--config {args.config}: trains on {config.data.name!r}: expected a CK+ "
                    "config (data.name=ckplus)")
  if args.probe_features and not pathlib.Path(args.probe_features).is_dir():
    raise UserError(f"--probe-features {args.probe_features}: not a run folder")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  evals = run_folds(args.config, out, folds, args.seeds, overrides)
  summary = summarize(evals, args.seeds)
  probe = run_probe(args.probe_features, out, args.data_dir) if args.probe_features else None
  if probe is not None:
    summary["probe"] = {key: probe[key] for key in ("summary", "pooled", "workdir", "step")}
  text = markdown(summary, args.config, probe)
  (out / "results.md").write_text(text)
  (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
  print("\n" + text + f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
