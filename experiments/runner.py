"""Shared by the experiment scripts: train a config into a folder (resuming), evaluate, tabulate.

Every run gets its own workdir under the experiment's output folder; a finished run (one with
eval_test.json) is not trained again, so an interrupted protocol resumes where it stopped.
"""

import json
import pathlib
import sys

from ferjax import configs, report
from ferjax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"

# dataset -> (classifier config, VAE-GAN config) used by the protocol and the ablation.
DATASETS = {
    "synthetic": ("classifier_synthetic.py", "vaegan_synthetic.py"),
    "synthetic_tiny": ("classifier_synthetic_tiny.py", "vaegan_synthetic_tiny.py"),
    "fer2013": ("classifier_fer2013.py", "vaegan_fer2013.py"),
    "fer2013_cpu": ("classifier_fer2013_cpu.py", "vaegan_fer2013_cpu.py"),  # 2-core CPU sized.
}


def load(name_or_path, overrides=()):
  path = pathlib.Path(name_or_path)
  if not path.is_file():
    path = CONFIGS / name_or_path
  return configs.load_config(path, overrides)


def train_vaegan(config_name, workdir, overrides=()) -> pathlib.Path:
  from ferjax.train import vaegan
  workdir = pathlib.Path(workdir)
  config = load(config_name, overrides)
  if not (workdir / "checkpoints").is_dir() or _unfinished(workdir, config.train.num_steps):
    vaegan.train_and_evaluate(config, workdir)
  return workdir


def train_pretrain(config_name, workdir, overrides=()) -> pathlib.Path:
  """Trains (or resumes) an MAE pre-training run (`ferjax pretrain`) unless it is finished."""
  from ferjax.train import pretrain
  workdir = pathlib.Path(workdir)
  config = load(config_name, overrides)
  if not (workdir / "checkpoints").is_dir() or _unfinished(workdir, config.train.num_steps):
    pretrain.train_and_evaluate(config, workdir)
  return workdir


def _unfinished(workdir, num_steps) -> bool:
  from ferjax.core import monitor
  records = monitor.read_metrics(workdir)
  return not records or max(r["step"] for r in records) < num_steps


def add_report_split_flag(parser) -> None:
  parser.add_argument(
      "--report-split", default="test",
      help="split the results are reported on (default test). FER-2013 folders holding only "
           "PublicTest have no test split: pass --report-split validation "
           "config.data.val_split=None (checkpoints then chosen on a hold-out of train)")


def train_and_test(config_name, workdir, overrides=(), *, logit_adjust: float = 0.0,
                   report_split: str = "test", semisup: bool = False) -> dict:
  """Trains (or resumes) a classifier (`ferjax train-semisup` when `semisup`) and evaluates its
  validation-chosen checkpoint on the validation split and on `report_split`; returns the
  latter's evaluation with the validation one under "val" (choices between runs are made on
  "val", never on the reported split)."""
  from ferjax import evaluate
  from ferjax.train import classifier, semisup as semisup_trainer
  trainer = semisup_trainer if semisup else classifier
  workdir = pathlib.Path(workdir)
  config = load(config_name, overrides)
  if config.data.val_split == report_split:
    raise UserError(f"--report-split {report_split}: checkpoints are chosen on that split "
                    "(data.val_split); add config.data.val_split=None to choose them on a "
                    "hold-out of train instead")
  outs = {split: workdir / f"eval_{evaluate.output_tag(split, logit_adjust=logit_adjust)}.json"
          for split in ("val", report_split)}
  if not all(out.exists() for out in outs.values()):
    trainer.train_and_evaluate(config, workdir)  # Resumes if begun.
    for split in outs:
      evaluate.evaluate_run(workdir, split, checkpoint="best", tta="none",
                            logit_adjust=logit_adjust)
  return {**report.read_eval(outs[report_split]), "val": report.read_eval(outs["val"])}


def select(grid: dict, chosen, flag: str) -> list:
  """The grid entries named in `chosen` (all when None), checked: unknown names are an error."""
  chosen = list(chosen or grid)
  unknown = sorted(set(chosen) - set(grid))
  if unknown:
    raise UserError(f"{flag}: unknown {unknown}; expected some of {list(grid)}")
  return chosen


def run_grid(config_name, out_dir: pathlib.Path, grid: dict, chosen, seeds, overrides=(),
             report_split: str = "test") -> dict:
  """Trains and tests every chosen grid entry (name -> its overrides) for every seed, seed by
  seed, each in `<out_dir>/<name>_seed<seed>`; returns {name: [evaluations]}."""
  evals = {name: [] for name in chosen}
  for seed in seeds:
    for name in chosen:
      print(f"\n=== {name}, seed {seed} ===", flush=True)
      evals[name].append(train_and_test(
          config_name, out_dir / f"{name.replace('=', '_')}_seed{seed}",
          [*overrides, *grid[name], f"config.seed={seed}"], report_split=report_split))
  return evals


def collect(out_dir: pathlib.Path, chosen, seeds, report_split: str = "test") -> dict:
  """{name: [evaluations]} of the finished runs in `out_dir` (runs done elsewhere, e.g. seeds
  spread over machines, copied in with their eval_*.json); trains nothing."""
  evals = {}
  for name in chosen:
    for seed in seeds:
      workdir = out_dir / f"{name.replace('=', '_')}_seed{seed}"
      outs = [workdir / "eval_val.json", workdir / f"eval_{report_split}.json"]
      if all(out.exists() for out in outs):
        evals.setdefault(name, []).append(
            {**report.read_eval(outs[1]), "val": report.read_eval(outs[0])})
  if not evals:
    raise UserError(f"--collect: no finished runs (eval_val.json and eval_{report_split}.json) "
                    f"in {out_dir}")
  return evals


def write_results(out_dir: pathlib.Path, evals_by_method: dict, title: str, notes: str,
                  report_split: str = "test") -> str:
  summary = report.summarize(evals_by_method)
  plot = report.recall_plot(summary, out_dir / "per_class_recall.png", title=title)
  val_summary = report.summarize({m: [e["val"] for e in evals]
                                  for m, evals in evals_by_method.items()})
  text = "\n".join([f"# {title}", "", notes, "",
                    f"## {report_split.capitalize()} split (%; mean ± std over seeds)", "",
                    report.markdown_table(summary), "",
                    f"## Per-class recall on {report_split} (%)", "",
                    report.recall_table(summary), "", f"![per-class recall]({plot.name})", "",
                    "## Selection split (%; the validation data checkpoints and any choice "
                    "between runs are made on)", "",
                    report.markdown_table(val_summary), ""])
  (out_dir / "results.md").write_text(text)
  (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
  return text


def main_guard(fn):
  """Runs an experiment's main; user errors end in one line and exit code 2."""
  try:
    sys.exit(fn())
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
