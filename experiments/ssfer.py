"""SSFER (self-supervised pre-training, face mixup, semi-supervised learning) vs label fraction.

  python experiments/ssfer.py --dataset synthetic --out runs/ssfer_synthetic
  python experiments/ssfer.py --dataset fer2013 --out runs/ssfer_fer2013             # GPU
  python experiments/ssfer.py --dataset fer2013 --out runs/ssfer_fer2013 \
      --report-split validation config.data.val_split=None   # the shared copy: PublicTest only
  python experiments/ssfer.py --dataset synthetic --out runs/ssfer_synthetic --collect

For every label fraction (--fractions, default 5 10 25 100 %: data.label_fraction, stratified
and seeded, the same labelled subset for every method at a seed) and seed, one ViT classifier
recipe (classifier_<dataset>_vit.py, the shape of the pre-trained encoder) trained four ways:

  supervised    the labelled fraction only, from scratch
  mae           the same, initialised from stage 1 (model.init_from=<pretrain workdir>)
  mae_mixup     + SSFER's IoU-weighted face mixup (augment.face_mixup_alpha=1.0)
  ssfer         all three stages: mae_mixup's validation-chosen checkpoint initialises
                `ferjax train-semisup` (semisup_<dataset>_vit.py, FixMatch + EMA teacher) on the
                same fraction, the rest of train its unlabeled pool; not run at 100% (no pool)

and, as the reference the FER-2013 targets are stated against (docs/results.md: the full pipeline at 25%
labels within 2 points of the supervised ResNet recipe at 100%), the dataset's own ResNet recipe
(classifier_<dataset>.py, from scratch) on the same labelled subset:

  resnet        given the positional overrides except config.model.* (those shape the ViT)

Stage 1 (`ferjax pretrain`, MAE, labels ignored) is trained once per dataset (seed 0, as the
protocol's shared VAE-GAN) into <out>/pretrain on all train images (pretrain_<dataset>.py:
synthetic faces / FER-2013's train and PublicTest images, never the test split) and shared by
every run; with --report-split validation the validation split (PublicTest) is left out too
(config.data.include_validation=False), so stage 1 never sees the reported images either.
--pretrain-workdir reuses one (refused when it pre-trained on the report split),
--pretrain-set config.field=value (repeatable, after those) changes it.
Positional overrides apply to every classifier and semi-supervised run; --semisup-set
config.field=value (repeatable, after those) to the semi-supervised runs only (e.g.
config.semisup.ratio=2, a field the classifier does not have). Runs live in
<out>/frac<f>/<method>_seed<s>; finished ones (eval_*.json) are not trained again, so an
interrupted run resumes; --collect tabulates what is there without training. Checkpoints are
chosen on validation; every number is on --report-split. Writes results.md (mean ± std over
seeds of accuracy, mean class accuracy and the weakest class's recall per fraction x method,
per-class recall per fraction), results.json and mca_vs_fraction.png.

Measured time, synthetic, 2-core Intel Xeon, one process per seed (3 at once). CPU-sized
(positional config.train.num_steps=500 config.train.eval_every=125
config.train.checkpoint_every=125, --semisup-set=config.semisup.ratio=2
--semisup-set=config.train.num_steps=250), idle: stage 1 3.7 min, then about 26 min per
fraction (5 min supervised, 5 min mae, 8 min mae_mixup, 8 min ssfer for the 3 seeds), 1 h 41 min
in all. The configs' 1,000 classifier steps with --semisup-set=config.semisup.ratio=2
--semisup-set=config.train.num_steps=500 (and eval/checkpoint every 125), --fractions 0.25 1:
stage 1 3.5 min, then 9-18 min per supervised or mae run, about 21 min per mae_mixup or ssfer
run and 7-17 min per resnet run (3 to 7 processes at once); about 1 h 55 min in all with the
resnet and a FlexMatch variant beside it. docs/results.md has both tables; even 1,000 steps leave
the from-scratch ViT at or near the class prior (at lr 1e-3 it starts learning near step 400 of
a 2,000-step run at 100% labels). To shorten or split: --seeds 0 or --fractions; one process
per seed (--seeds S, same --out) runs them side by side (start the others once the first has
finished stage 1, which they share) or on other machines (--pretrain-workdir), then --collect
with every seed.
FER-2013 on one H200: unmeasured; guessing from the ResNet-18 recipe's 95 s a
run, a few minutes per classifier run, 10+ min per semisup run, stage 1 (30k steps of 512)
under an hour: 3-6 h.

See docs/methods.md (SSFER and the sections after it).
"""

import argparse
import json
import pathlib

import runner

from ferjax import report
from ferjax.errors import UserError

# dataset -> (classifier config, semisup config, pretrain config, the dataset's ResNet recipe);
# the ViTs match the encoder.
DATASETS = {
    "synthetic": ("classifier_synthetic_vit.py", "semisup_synthetic_vit.py",
                  "pretrain_synthetic.py", "classifier_synthetic.py"),
    "fer2013": ("classifier_fer2013_vit.py", "semisup_fer2013_vit.py", "pretrain_fer2013.py",
                "classifier_fer2013.py"),
}
METHODS = ("supervised", "mae", "mae_mixup", "ssfer", "resnet")
SHAPE = ("data.image_size", "data.channels", "model.name", "model.width", "model.depth",
         "model.patch_size", "model.readout", "model.input_norm")


def get(config, dotted):
  for key in dotted.split("."):
    config = config[key]
  return config


def check_shapes(classifier_config, pretrain_config) -> None:
  """The classifier's ViT must be the pre-trained encoder's shape (else init_from fails late)."""
  diff = [f"{f} {get(classifier_config, f)!r} vs {get(pretrain_config, f)!r}" for f in SHAPE
          if get(classifier_config, f) != get(pretrain_config, f)]
  if diff:
    raise UserError("the classifier's ViT differs from the pre-trained encoder: "
                    + "; ".join(diff))


def overrides_for(method, fraction, seed, pretrain, out) -> list:
  fraction_ = [] if fraction >= 1 else [f"config.data.label_fraction={fraction:g}"]
  common = [*fraction_, f"config.seed={seed}"]
  mae = [f"config.model.init_from={pretrain}"]
  return {"supervised": common, "resnet": common, "mae": [*common, *mae],
          "mae_mixup": [*common, *mae, "config.augment.face_mixup_alpha=1.0"],
          "ssfer": [*common, f"config.model.init_from={out / f'mae_mixup_seed{seed}'}"]}[method]


def pretrain_overrides(report_split: str, pretrain_set) -> list:
  """Stage 1's overrides: the report split is never pre-trained on (test is left out by default;
  validation is left out here), then --pretrain-set, then the shared seed."""
  own = ["config.data.include_validation=False"] if report_split == "validation" else []
  return [*own, *pretrain_set, "config.seed=0"]


def check_pretrain_split(pretrain_config, report_split: str) -> None:
  """A reused stage 1 must not have pre-trained on the split the numbers are reported on (a
  named dataset's; the synthetic source is its train split only, a folder has no splits)."""
  from ferjax.data import unlabeled
  d = pretrain_config.data
  seen = {"test": d.get("include_test", False),
          "validation": d.get("include_validation", True)}.get(report_split, False)
  named = [str(s) for s in unlabeled.parse_sources(d.sources)
           if s.name not in ("synthetic", "folder")]
  if seen and named:
    raise UserError(f"--pretrain-workdir: it pre-trained on {', '.join(named)}'s "
                    f"{report_split} split (config.data.include_{report_split}=True), the split "
                    "reported on: train stage 1 without it")


def finished(workdir: pathlib.Path, report_split: str):
  outs = [workdir / "eval_val.json", workdir / f"eval_{report_split}.json"]
  if all(o.exists() for o in outs):
    return {**report.read_eval(outs[1]), "val": report.read_eval(outs[0])}
  return None


def weakest(e) -> float:
  return min(c["recall"] for c in e["per_class"].values())


def summarize(evals: dict) -> dict:
  """{fraction: {method: {runs, accuracy, mean_class_accuracy, weakest_recall, recall}}}."""
  out = {}
  for fraction, by_method in evals.items():
    summary = report.summarize(by_method)
    for method, row in summary.items():
      row["weakest_recall"] = report.stat([weakest(e) for e in by_method[method]])
    out[f"{fraction:g}"] = summary
  return out


def table(summary: dict, methods) -> str:
  lines = ["| labels | method | runs | acc | mean class acc | weakest class recall |",
           "|---:|---|---:|---:|---:|---:|"]
  for fraction, rows in summary.items():
    for method in methods:
      row = rows.get(method)
      cells = ([str(row["runs"])] + [report.fmt(row[k]) for k in
                                     ("accuracy", "mean_class_accuracy", "weakest_recall")]
               if row else ["0", "—", "—", "—"])
      lines.append(f"| {100 * float(fraction):g}% | {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(summary: dict, methods, path: pathlib.Path, title: str) -> pathlib.Path:
  from ferjax.plots import plt  # Headless (Agg).
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for method in methods:
    pts = [(100 * float(f), *rows[method]["mean_class_accuracy"])
           for f, rows in summary.items() if method in rows]
    if pts:
      x, mean, std = zip(*pts)
      ax.errorbar(x, mean, yerr=[s or 0.0 for s in std], marker="o", capsize=3, label=method)
  ax.set_xscale("log")
  ax.set_xticks([100 * float(f) for f in summary], [f"{100 * float(f):g}%" for f in summary])
  ax.set_xlabel("labelled share of train")
  ax.set_ylabel("mean class accuracy (%)")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS))
  parser.add_argument("--out", default=None, help="output folder (default runs/ssfer_DATASET)")
  parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS}")
  parser.add_argument("--pretrain-workdir", default=None, help="reuse a `ferjax pretrain` run")
  parser.add_argument("--pretrain-set", action="append", default=[], metavar="FIELD=VALUE",
                      help="an override for stage 1 (repeatable), e.g. config.train.num_steps=500")
  parser.add_argument("--semisup-set", action="append", default=[], metavar="FIELD=VALUE",
                      help="an override for the semi-supervised runs only (repeatable), e.g. "
                      "config.semisup.ratio=2")
  parser.add_argument("--collect", action="store_true",
                      help="train nothing: tabulate the finished runs found in --out")
  runner.add_report_split_flag(parser)
  parser.add_argument("overrides", nargs="*", help="config.field=value for every classifier "
                      "and semi-supervised run")
  args = parser.parse_args(argv)
  bad = [f for f in args.fractions if not 0 < f <= 1]
  if bad:
    raise UserError(f"--fractions: each in (0, 1], got {bad}")
  methods = runner.select(dict.fromkeys(METHODS), args.methods, "--methods")
  out = pathlib.Path(args.out or f"runs/ssfer_{args.dataset}")
  if not args.collect:  # --collect only reads: a mistyped --out must not leave a folder behind.
    out.mkdir(parents=True, exist_ok=True)
  classifier_config, semisup_config, pretrain_config, resnet_config = DATASETS[args.dataset]
  # The ResNet reference takes the positional overrides except the ViT's shape (config.model.*).
  resnet_overrides = [o for o in args.overrides if not o.startswith("config.model.")]
  pretrain = pathlib.Path(args.pretrain_workdir or out / "pretrain")
  evals = {f: {} for f in args.fractions}
  if not args.collect:
    stage1_overrides = pretrain_overrides(args.report_split, args.pretrain_set)
    if args.pretrain_workdir is None:
      pretrain_cfg = runner.load(pretrain_config, stage1_overrides)
    else:
      from ferjax.kinds import pretrain as pretrain_kind
      if not (pretrain / "config.json").is_file():
        raise UserError(f"--pretrain-workdir {pretrain}: not a `ferjax pretrain` workdir")
      pretrain_cfg = pretrain_kind.read_config(pretrain)
      check_pretrain_split(pretrain_cfg, args.report_split)
    check_shapes(runner.load(classifier_config, args.overrides), pretrain_cfg)
    if args.pretrain_workdir is None and set(methods) - {"supervised", "resnet"}:
      print("\n=== stage 1: MAE pre-training ===", flush=True)
      runner.train_pretrain(pretrain_config, pretrain, stage1_overrides)
  for seed in args.seeds:
    for fraction in args.fractions:
      folder = out / f"frac{fraction:g}"
      for method in methods:
        if method == "ssfer" and fraction >= 1:
          continue  # No unlabeled pool at 100%: the table shows "—".
        workdir = folder / f"{method}_seed{seed}"
        if args.collect:
          result = finished(workdir, args.report_split)
        else:
          print(f"\n=== {method}, {fraction:g} labelled, seed {seed} ===", flush=True)
          if method == "ssfer":  # Its initialisation: mae_mixup's run (trained if missing).
            runner.train_and_test(classifier_config, folder / f"mae_mixup_seed{seed}",
                                  [*args.overrides, *overrides_for("mae_mixup", fraction, seed,
                                                                   pretrain, folder)],
                                  report_split=args.report_split)
          if method == "ssfer":
            config_name, overrides = semisup_config, [*args.overrides, *args.semisup_set]
          elif method == "resnet":
            config_name, overrides = resnet_config, resnet_overrides
          else:
            config_name, overrides = classifier_config, args.overrides
          overrides = [*overrides, *overrides_for(method, fraction, seed, pretrain, folder)]
          result = runner.train_and_test(config_name, workdir, overrides,
                                         report_split=args.report_split,
                                         semisup=method == "ssfer")
        if result is not None:
          evals[fraction].setdefault(method, []).append(result)
  evals = {f: by_method for f, by_method in evals.items() if by_method}
  if not evals:
    raise UserError(f"--collect: no finished runs (eval_val.json and eval_{args.report_split}"
                    f".json) under {out}/frac*")
  summary = summarize(evals)
  title = f"SSFER vs label fraction on {args.dataset}"
  figure = plot(summary, methods, out / "mca_vs_fraction.png", title)
  extra = "".join(" " + o for o in args.overrides)
  stage1 = "".join(" --pretrain-set=" + o for o in args.pretrain_set)
  stage1 += "".join(" --semisup-set=" + o for o in args.semisup_set)
  notes = (f"Classifier `{classifier_config}`, semi-supervised `{semisup_config}`, stage 1 "
           f"`{pretrain_config}` in `{pretrain}` (seed 0, shared), reference `{resnet_config}` "
           "(resnet: the dataset's ResNet recipe on the same labels). Checkpoints chosen on "
           f"validation; numbers on the {args.report_split} split, mean ± std over seeds "
           f"{', '.join(map(str, args.seeds))}. ssfer is not run at 100% (no unlabeled pool). "
           f"Command: `python experiments/ssfer.py --dataset {args.dataset} --out {out} "
           f"--fractions {' '.join(f'{f:g}' for f in args.fractions)} --seeds "
           f"{' '.join(map(str, args.seeds))}{stage1}"
           f"{'' if args.report_split == 'test' else ' --report-split ' + args.report_split}"
           f"{extra}`.")
  parts = [f"# {title}", "", notes, "",
           f"## {args.report_split.capitalize()} split (%)", "", table(summary, methods), "",
           f"![mean class accuracy vs label fraction]({figure.name})", ""]
  for fraction, rows in summary.items():
    parts += [f"## Per-class recall at {100 * float(fraction):g}% labels (%)", "",
              report.recall_table(rows), ""]
  text = "\n".join(parts)
  (out / "results.md").write_text(text)
  (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
