"""Semantic augmentation in feature space, used decoupled: every head variant on the same backbones.

  python experiments/protocol.py --dataset synthetic --methods none logit_adj --out runs/fsa_base
  python experiments/feature_semantic.py --base runs/fsa_base --out runs/fsa
  python experiments/feature_semantic.py --dataset fer2013 --base runs/fer_lt100 \
      --out runs/fer_lt100_heads --report-split validation config.data.val_split=None \
      config.data.imbalance_ratio=100        # GPU; the shared FER-2013 copy (PublicTest only)

The dosage sweep and the pixel-space heads are off by default; `--sweep` adds
all of them (SWEEP below) to the default variants, `--variants` names any subset:

  python experiments/feature_semantic.py --base runs/fsa_base --out runs/fsa --sweep
  python experiments/feature_semantic.py --base runs/fsa_base --out runs/fsa \
      --variants feat_la_a1 feat_la_res pix_la_res pix_la_full pix_res --vaegan runs/vaegan

The pix_* heads need a VAE-GAN: `--vaegan DIR` (a finished `ferjax train-vaegan` run, used as
it is), by default BASE/vaegan, trained there if missing (runner.DATASETS' VAE-GAN config, with
the backbone overrides' config.data.{imbalance_ratio, num_examples, data_dir, manual_dir}; with
config.data.val_split=None it keeps no validation split either and the heads use its last
checkpoint, as experiments/protocol.py does). Finished heads in --out are reused, so adding
--sweep later trains only the new ones.

Takes the protocol's finished runs (`none` and `logit_adj`, one per seed; trained if missing;
with --variants only the backbones those heads need, and tau_norm only with `none`) and, on
each run's frozen backbone, re-trains the classifier head with `ferjax retrain-head`
under every variant below (ferjax.train.retrain_head; nothing of the backbone changes). Each variant is
evaluated, at its head chosen on validation, on validation (for choices) and test (reported).
Methods (backbone / head stage):

  none, logit_adj           the protocol's runs as they are (no second stage)
  crt                       none's backbone, head re-trained on class-balanced real features
  crt_la                    none's backbone, head re-trained with the logit-adjusted loss
  feat_a{0.5,1,2}           none's backbone, class-balanced real features + synthetic tail
                            features (posterior perturbation, alpha) from a VAE on the features
  feat_la_a{0.5,1,2}        the same with instance sampling and the logit-adjusted loss
  (--sweep) the feat_la family at alpha 1 with one dosage / synthesis setting changed:
  feat_la_all               every class below the largest synthesized (synth.tail_only=False)
  feat_la_share25           at most a quarter of each batch synthetic (synth.max_share=0.25)
  feat_la_fill50            half of each class's gap filled (synth.fill=0.5)
  feat_la_interp            interpolation towards a second seed (synth.perturb=interpolate)
  feat_la_cg                class-conditional Gaussian latents (synth.perturb=class_gaussian)
  feat_la_res               residual decoding, seed + D(z') - D(mu) (synth.decode=residual)
  (--sweep) pixel-space synthesis used decoupled (synth.mode=pixel): synthetic tail faces of a
  trained VAE-GAN (alpha 1 posterior, synth.pool_per_class per class) through none's frozen
  backbone, their features filling the synthetic slots:
  pix_la_res, pix_la_full   instance sampling, logit-adjusted loss; residual / full decoding
  pix_res                   class-balanced sampling, cross-entropy (cRT's); residual decoding
  la_crt, la_feat_a1        logit_adj's backbone, then cRT / feature synthesis (class-balanced)
  tau_norm                  none's classifier tau-normalised (Kang et al. 2020; post-hoc, no
                            training), tau in {0.5, 1, 1.5, 2} chosen per seed on validation
  wd                        weight balancing's first stage (Alshammari et al. 2022): the recipe
                            with a strong weight decay, optim.weight_decay=0.05 (AdamW; one
                            value, not tuned: the recipe's own is 1e-4)
  wd_crt, wb                wd's backbone, then cRT / weight balancing's second stage as their
                            code has it (cRT with every class's weights held in an L2 ball whose
                            radius is relative to the class norms at its start, threshold 0.1 as
                            their stage-2 demo, projected once per epoch: head.max_norm_thresh)
  wb_radius                 the same with an absolute radius of 1.0 projected after every step
                            (head.max_norm_radius=1.0, head.max_norm_every=1; what this script
                            ran as wb before)

Selections, per seed on validation mean class accuracy (test never selects): "feat_best"
among the feat_a* alphas, "feat_la_best" among every feat_la_* variant that ran (alphas and,
with --sweep, the dosage settings), "pix_best" among the pix_* variants that ran. Writes
results.md / results.json / per_class_recall.png. Expected time on a 2-core CPU: about 30 s per
head (3 seeds x 13 heads: ~20 minutes; --sweep adds 9 heads per seed and, for the pix_* heads,
the VAE-GAN when it is trained here).

See docs/methods.md (Feature-space semantic augmentation, Pixel-space faces in a decoupled head,
cRT and tau-normalisation, Weight balancing).
"""

import argparse
import json
import pathlib
import re

import runner

from ferjax import configs, evaluate, report
from ferjax.errors import UserError
from ferjax.kinds import retrain_head as retrain_head_kind

ALPHAS = (0.5, 1.0, 2.0)
TAUS = (0.5, 1.0, 1.5, 2.0)
BACKBONES = {"none": [], "logit_adj": ["config.loss.name=logit_adjusted"],
             "wd": ["config.optim.weight_decay=0.05"]}
FAST = []  # Extra overrides for every head (tests pass tiny sizes).
LA = ["config.head.sampler=instance", "config.head.loss=logit_adjusted"]
# The dosage sweep and the pixel heads (--sweep), each a change to feat_la_a1 / the pixel mode.
SWEEP_FEATURE = {"feat_la_all": ["config.synth.tail_only=False"],
                 "feat_la_share25": ["config.synth.max_share=0.25"],
                 "feat_la_fill50": ["config.synth.fill=0.5"],
                 "feat_la_interp": ["config.synth.perturb=interpolate"],
                 "feat_la_cg": ["config.synth.perturb=class_gaussian"],
                 "feat_la_res": ["config.synth.decode=residual"]}
SWEEP_PIXEL = {"pix_la_res": ["config.synth.decode=residual", *LA],
               "pix_la_full": ["config.synth.decode=full", *LA],
               "pix_res": ["config.synth.decode=residual"]}
SWEEP = (*SWEEP_FEATURE, *SWEEP_PIXEL)
# Chosen per seed on validation: selection -> which variants it chooses among.
SELECTIONS = {"feat_best": lambda n: re.fullmatch(r"feat_a[0-9.]+", n),
              "feat_la_best": lambda n: n.startswith("feat_la_"),
              "pix_best": lambda n: n.startswith("pix_")}
# Backbone overrides that also shape the VAE-GAN's data (the same train images).
VAEGAN_DATA = ("imbalance_ratio", "num_examples", "data_dir", "manual_dir")


def heads(pixel=()) -> dict:
  """variant -> (backbone method, retrain-head overrides). `pixel`: the pix_* heads' VAE-GAN
  overrides (config.synth.vaegan_workdir=..., maybe its checkpoint)."""
  out = {"crt": ("none", []), "crt_la": ("none", LA)}
  for a in ALPHAS:
    feat = ["config.synth.mode=feature", f"config.synth.alpha={a:g}"]
    out[f"feat_a{a:g}"] = ("none", feat)
    out[f"feat_la_a{a:g}"] = ("none", [*feat, *LA])
  out["la_crt"] = ("logit_adj", [])
  out["la_feat_a1"] = ("logit_adj", ["config.synth.mode=feature", "config.synth.alpha=1"])
  out["wd_crt"] = ("wd", [])
  out["wb"] = ("wd", ["config.head.max_norm_thresh=0.1"])
  out["wb_radius"] = ("wd", ["config.head.max_norm_radius=1.0", "config.head.max_norm_every=1"])
  for name, change in SWEEP_FEATURE.items():
    out[name] = ("none", ["config.synth.mode=feature", "config.synth.alpha=1", *LA, *change])
  for name, change in SWEEP_PIXEL.items():
    out[name] = ("none", ["config.synth.mode=pixel", "config.synth.alpha=1", *pixel, *change])
  return out


DEFAULT_VARIANTS = tuple(name for name in heads() if name not in SWEEP)


def vaegan_setup(dataset: str, base: pathlib.Path, vaegan, overrides):
  """(VAE-GAN workdir, whether to train it here, its overrides, the pix_* heads' overrides)."""
  config = runner.load(runner.DATASETS[dataset][0], overrides)
  fields = {f"config.data.{f}" for f in VAEGAN_DATA}
  vaegan_overrides = [o for o in overrides if o.split("=", 1)[0] in fields]
  head_overrides = []
  if config.data.val_split is None:  # The reported split must select nothing (protocol.py).
    vaegan_overrides.append("config.data.val_split=None")
    head_overrides.append("config.synth.vaegan_checkpoint=last")
  workdir = pathlib.Path(vaegan) if vaegan else base / "vaegan"
  head_overrides.insert(0, f"config.synth.vaegan_workdir={workdir}")
  return workdir, vaegan is None, vaegan_overrides, head_overrides


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


def check_head(out: pathlib.Path, config, overrides) -> None:
  """Refuses the finished head in `out` when its head.json lacks a value of `overrides`."""
  done = json.loads((out / "head.json").read_text())["config"]
  wanted = configs.to_dict(config)
  for item in overrides:
    path = item.split("=", 1)[0].removeprefix("config.").split(".")
    have, want = done, wanted
    for key in path:
      have, want = (have or {}).get(key), want[key]
    if have != want:
      raise UserError(f"{out}: a head trained with {'.'.join(path)}={have!r}, not {want!r}: "
                      "move it away (or use another --out) to train this variant")


def run_head(backbone: pathlib.Path, out: pathlib.Path, overrides,
             report_split: str = "test") -> dict:
  """Re-trains (unless done) and evaluates one head; {report split metrics..., "val": ...}.
  A head already in `out` is reused only if its head.json has the overrides' values (a variant
  whose settings changed is refused, not silently reported)."""
  from ferjax.train import retrain_head
  config = retrain_head_kind.default_config()
  configs.apply_overrides(config, [f"--{o}" for o in [*overrides, *FAST]])
  if (out / "head.json").exists():
    check_head(out, config, overrides)
  if not (out / f"eval_{report_split}.json").exists():
    if not out.exists():
      retrain_head.retrain_head(config, backbone, out)
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
  parser.add_argument("--variants", nargs="+", default=None, help="head variants (default: "
                      "all but the --sweep ones)")
  parser.add_argument("--sweep", action="store_true", help="add the dosage sweep and the "
                      f"pixel heads: {', '.join(SWEEP)}")
  parser.add_argument("--vaegan", default=None, help="VAE-GAN workdir of the pix_* heads, used "
                      "as it is (default BASE/vaegan, trained there if missing)")
  runner.add_report_split_flag(parser)
  parser.add_argument("overrides", nargs="*", help="config.field=value for the backbone runs "
                      "(e.g. config.data.imbalance_ratio=100 for FER-2013-LT)")
  args = parser.parse_args(argv)
  base, out = pathlib.Path(args.base), pathlib.Path(args.out)
  config_name, vaegan_config = runner.DATASETS[args.dataset]
  vaegan, train_vaegan, vaegan_overrides, pixel = vaegan_setup(args.dataset, base, args.vaegan,
                                                               args.overrides)
  grid = heads(pixel)
  names = list(args.variants or DEFAULT_VARIANTS)
  names += [n for n in SWEEP if args.sweep and n not in names]
  chosen = runner.select(grid, names, "--variants")
  out.mkdir(parents=True, exist_ok=True)  # Only once the arguments are known to be good.
  needed = {grid[name][0] for name in chosen}
  if args.variants is None:  # The full table: plain training and logit adjustment beside.
    needed |= {"none", "logit_adj"}
  evals = {}
  for seed in args.seeds:
    for method in [m for m in BACKBONES if m in needed]:
      extra = BACKBONES[method]
      evals.setdefault(method, []).append(runner.train_and_test(
          config_name, base / f"{method}_seed{seed}",
          [*args.overrides, *extra, f"config.seed={seed}"], report_split=args.report_split))
  if train_vaegan and any(name in SWEEP_PIXEL for name in chosen):
    runner.train_vaegan(vaegan_config, vaegan, vaegan_overrides)
  for seed in args.seeds:
    if "none" in needed:
      evals.setdefault("tau_norm", []).append(
          tau_norm(base / f"none_seed{seed}", args.report_split))
    for name in chosen:
      method, overrides = grid[name]
      print(f"=== {name}, seed {seed} ===", flush=True)
      evals.setdefault(name, []).append(run_head(
          base / f"{method}_seed{seed}", out / f"{name}_seed{seed}",
          [*overrides, f"config.seed={seed}"], args.report_split))
  ran = list(evals)
  for best, among in SELECTIONS.items():  # Chosen per seed on validation, never on test.
    names = [n for n in ran if among(n)]
    if names:
      evals[best] = [
          max((evals[n][i] for n in names), key=lambda e: e["val"]["mean_class_accuracy"])
          for i in range(len(args.seeds))]
  overrides = "".join(f" {o}" for o in args.overrides)
  command = (f"python experiments/feature_semantic.py --dataset {args.dataset} --base {base} "
             f"--out {out}" + (" --sweep" if args.sweep else "")
             + (f" --vaegan {vaegan}" if args.vaegan else "")
             + ("" if args.report_split == "test" else f" --report-split {args.report_split}")
             + overrides  # Before --variants, which takes a list.
             + (" --variants " + " ".join(args.variants) if args.variants else ""))
  pixel_note = (f"; the pix_* heads' faces from the VAE-GAN {vaegan}"
                if any(n in SWEEP_PIXEL for n in chosen) else "")
  trained = [m for m in BACKBONES if m in needed]
  notes = (f"Backbones ({', '.join(trained)}): the protocol's recipe in {base}, as `python "
           f"experiments/protocol.py --dataset {args.dataset} --methods none logit_adj --out "
           f"{base}{overrides}` trains none and logit_adj, with config.optim.weight_decay=0.05 "
           f"for wd (checkpoints chosen on validation). Heads: `{command}`; each head "
           f"re-trained on the frozen backbone's features (`ferjax retrain-head`), chosen on "
           f"validation mean class accuracy{pixel_note}; *_best: chosen per seed on validation "
           f"mean class accuracy (feat_best among the feat_a* alphas, feat_la_best among every "
           f"feat_la_*, pix_best among every pix_*). Seeds {', '.join(map(str, args.seeds))}; "
           f"numbers on {args.report_split}.")
  print(runner.write_results(out, evals, f"Feature-space semantic augmentation on {args.dataset}",
                             notes, args.report_split))
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
