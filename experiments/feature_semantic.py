"""Semantic augmentation in feature space, used decoupled: every head variant on the same backbones.

  python experiments/protocol.py --dataset synthetic --methods none logit_adj --out runs/fsa_base
  python experiments/feature_semantic.py --base runs/fsa_base --out runs/fsa
  python experiments/feature_semantic.py --dataset fer2013 --base runs/fer_lt100 \
      --out runs/fer_lt100_heads --report-split validation config.data.val_split=None \
      config.data.imbalance_ratio=100        # GPU; the shared FER-2013 copy (PublicTest only)

Takes the protocol's finished runs (`none` and `logit_adj`, one per seed; trained if missing)
and, on each run's frozen backbone, re-trains the classifier head with `ferjax retrain-head`
under every variant below (ferjax.train.head; nothing of the backbone changes). Each variant is
evaluated, at its head chosen on validation, on validation (for choices) and test (reported).
Methods (backbone / head stage):

  none, logit_adj           the protocol's runs as they are (no second stage)
  crt                       none's backbone, head re-trained on class-balanced real features
  crt_la                    none's backbone, head re-trained with the logit-adjusted loss
  feat_a{0.5,1,2}           none's backbone, class-balanced real features + synthetic tail
                            features (posterior perturbation, alpha) from a VAE on the features
  feat_la_a{0.5,1,2}        the same with instance sampling and the logit-adjusted loss
  la_crt, la_feat_a1        logit_adj's backbone, then cRT / feature synthesis (class-balanced)
  tau_norm                  none's classifier tau-normalised (Kang et al. 2020; post-hoc, no
                            training), tau in {0.5, 1, 1.5, 2} chosen per seed on validation
  wd                        weight balancing's first stage (Alshammari et al. 2022): the recipe
                            with a strong weight decay, optim.weight_decay=0.05 (AdamW; one
                            value, not tuned: the recipe's own is 1e-4)
  wd_crt, wb                wd's backbone, then cRT / weight balancing's second stage (cRT with
                            every class's weights held in an L2 ball, head.max_norm=1.0)

"feat_best" and "feat_la_best" pick, per seed, the alpha with the best validation mean class
accuracy (test never selects). Writes results.md / results.json / per_class_recall.png.
Expected time on a 2-core CPU: about 30 s per head (3 seeds x 11 heads: ~20 minutes).
"""

import argparse
import pathlib

import runner

from ferjax import evaluate, report

ALPHAS = (0.5, 1.0, 2.0)
TAUS = (0.5, 1.0, 1.5, 2.0)
BACKBONES = {"none": [], "logit_adj": ["config.loss.name=logit_adjusted"],
             "wd": ["config.optim.weight_decay=0.05"]}
FAST = []  # Extra overrides for every head (tests pass tiny sizes).


def heads() -> dict:
  """variant -> (backbone method, retrain-head overrides)."""
  out = {"crt": ("none", []),
         "crt_la": ("none", ["config.head.sampler=instance",
                             "config.head.loss=logit_adjusted"])}
  for a in ALPHAS:
    feat = ["config.synth.mode=feature", f"config.synth.alpha={a:g}"]
    out[f"feat_a{a:g}"] = ("none", feat)
    out[f"feat_la_a{a:g}"] = ("none", [*feat, "config.head.sampler=instance",
                                       "config.head.loss=logit_adjusted"])
  out["la_crt"] = ("logit_adj", [])
  out["la_feat_a1"] = ("logit_adj", ["config.synth.mode=feature", "config.synth.alpha=1"])
  out["wd_crt"] = ("wd", [])
  out["wb"] = ("wd", ["config.head.max_norm=1.0"])
  return out


def tau_norm(backbone: pathlib.Path, report_split: str = "test") -> dict:
  """The backbone's own classifier tau-normalised, tau chosen on validation mean class accuracy
  from TAUS; {report split metrics..., "val": ..., "tau": ...} (evaluations written, tagged)."""
  best = None
  for tau in TAUS:
    val = evaluate.evaluate_run(backbone, "val", tta="none", tau_norm=tau, quiet=True)
    if best is None or val["mean_class_accuracy"] > best[1]["mean_class_accuracy"]:
      best = (tau, val)
  tau, val = best
  test = evaluate.evaluate_run(backbone, report_split, tta="none", tau_norm=tau, quiet=True)
  return {**test, "val": val, "tau": tau}


def run_head(backbone: pathlib.Path, out: pathlib.Path, overrides,
             report_split: str = "test") -> dict:
  """Re-trains (unless done) and evaluates one head; {report split metrics..., "val": ...}."""
  from ferjax.train import head
  if not (out / f"eval_{report_split}.json").exists():
    if not out.exists():
      head.cli_main(argparse.Namespace(workdir=str(backbone), out=str(out), config=None,
                                       overrides=[f"--{o}" for o in [*overrides, *FAST]]))
    for split in ("val", report_split):
      evaluate.evaluate_run(out, split, checkpoint="best", tta="none")
  return {**report.read_eval(out / f"eval_{report_split}.json"),
          "val": report.read_eval(out / "eval_val.json")}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", required=True, help="the protocol's output folder (none and "
                      "logit_adj runs, trained there if missing)")
  parser.add_argument("--out", required=True, help="output folder for the heads and tables")
  parser.add_argument("--dataset", default="synthetic", choices=sorted(runner.DATASETS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--variants", nargs="+", default=None, help="subset of the head variants")
  runner.add_report_split_flag(parser)
  parser.add_argument("overrides", nargs="*", help="config.field=value for the backbone runs "
                      "(e.g. config.data.imbalance_ratio=100 for FER-2013-LT)")
  args = parser.parse_args(argv)
  base, out = pathlib.Path(args.base), pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  config_name = runner.DATASETS[args.dataset][0]
  chosen = runner.select(heads(), args.variants, "--variants")
  needed = {"none", "logit_adj", *(heads()[name][0] for name in chosen)}
  evals = {}
  for seed in args.seeds:
    for method in [m for m in BACKBONES if m in needed]:
      extra = BACKBONES[method]
      evals.setdefault(method, []).append(runner.train_and_test(
          config_name, base / f"{method}_seed{seed}",
          [*args.overrides, *extra, f"config.seed={seed}"], report_split=args.report_split))
  for seed in args.seeds:
    evals.setdefault("tau_norm", []).append(
        tau_norm(base / f"none_seed{seed}", args.report_split))
    for name in chosen:
      method, overrides = heads()[name]
      print(f"=== {name}, seed {seed} ===", flush=True)
      evals.setdefault(name, []).append(run_head(
          base / f"{method}_seed{seed}", out / f"{name}_seed{seed}",
          [*overrides, f"config.seed={seed}"], args.report_split))
  for family in ("feat", "feat_la"):  # Alpha chosen per seed on validation, never on test.
    names = [f"{family}_a{a:g}" for a in ALPHAS if f"{family}_a{a:g}" in evals]
    if names:
      evals[f"{family}_best"] = [
          max((evals[n][i] for n in names), key=lambda e: e["val"]["mean_class_accuracy"])
          for i in range(len(args.seeds))]
  notes = (f"Backbones: `python experiments/protocol.py --dataset {args.dataset} --methods none "
           f"logit_adj --out {base}` (checkpoints chosen on validation; `wd`, when a head needs "
           f"it, trained into the same folder). Heads: `python "
           f"experiments/feature_semantic.py --base {base} --out {out}`; each head re-trained on "
           f"the frozen backbone's features (`ferjax retrain-head`), chosen on validation mean "
           f"class accuracy; *_best: alpha chosen per seed on validation. Seeds "
           f"{', '.join(map(str, args.seeds))}; numbers on {args.report_split}.")
  print(runner.write_results(out, evals, f"Feature-space semantic augmentation on {args.dataset}",
                             notes, args.report_split))
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
