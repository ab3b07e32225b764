"""The paper's protocol: one classifier recipe, every rebalancing method, several seeds.

  python experiments/protocol.py --dataset synthetic --out runs/protocol_synthetic
  python experiments/protocol.py --dataset fer2013 --out runs/protocol_fer2013      # GPU
  python experiments/protocol.py --dataset fer2013 --lt 100 --out runs/protocol_fer2013_lt100

--lt R builds the *-LT variant (methods.md section 7): the train split subsampled per class to a
geometric profile with max/min ratio R (fixed subset, classes in natural frequency order) for
the VAE-GAN and every classifier; validation and test untouched.

Methods (each a set of config overrides on the same recipe):
  none          instance sampling, cross-entropy
  ros           random over-sampling of every class to the largest
  cb_loss       effective-number class-balanced weights (Cui et al. 2019)
  ldam_drw      LDAM loss with deferred re-weighting from 3/4 of training
  logit_adj     logit-adjusted loss (Menon et al. 2021, tau = 1)
  semantic      semantic augmentation: every class topped up to the largest with VAE-GAN
                faces (alpha = 1 posterior perturbation of real seeds; the config file's
                augment.decode: residual for the synthetic set, chosen on validation)
  semantic_la   semantic augmentation filling half of each gap, plus the logit-adjusted loss
                on the resulting (still imbalanced) batch prior

One VAE-GAN is trained (seed 0) and shared by the semantic runs. Checkpoints are chosen on the
validation split; every number is on the test split. Writes results.md (mean ± std over seeds,
per-class recall, head / medium / tail), results.json and per_class_recall.png.
Expected time: synthetic on a 2-core CPU about 4 minutes per run (21 runs: ~1.5 h; use
--seeds 0 or --methods to shorten); FER-2013 on one H200 about 1-2 minutes per run.
"""

import argparse
import pathlib

import runner


def methods(num_steps: int, vaegan_workdir: pathlib.Path) -> dict:
  semantic = [f"config.augment.vaegan_workdir={vaegan_workdir}"]
  return {
      "none": [],
      "ros": ["config.sampler.name=oversample"],
      "cb_loss": ["config.loss.class_weights=effective"],
      "ldam_drw": ["config.loss.name=ldam", "config.loss.class_weights=effective",
                   f"config.loss.drw_start_step={int(0.75 * num_steps)}"],
      "logit_adj": ["config.loss.name=logit_adjusted"],
      "semantic": semantic,
      "semantic_la": [*semantic, "config.augment.fill=0.5", "config.loss.name=logit_adjusted"],
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="synthetic", choices=sorted(runner.DATASETS))
  parser.add_argument("--out", default=None, help="output folder (default runs/protocol_DATASET)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods")
  parser.add_argument("--vaegan-workdir", default=None, help="reuse a trained VAE-GAN")
  parser.add_argument("--lt", type=float, default=None, metavar="R",
                      help="long-tailed variant: train split subsampled to imbalance ratio R")
  parser.add_argument("overrides", nargs="*", help="config.field=value for every classifier run")
  args = parser.parse_args()
  out = pathlib.Path(args.out or f"runs/protocol_{args.dataset}")
  out.mkdir(parents=True, exist_ok=True)
  classifier_config, vaegan_config = runner.DATASETS[args.dataset]
  lt = [f"config.data.imbalance_ratio={args.lt}"] if args.lt else []
  args.overrides = [*lt, *args.overrides]
  num_steps = runner.load(classifier_config, args.overrides).train.num_steps
  all_methods = methods(num_steps, pathlib.Path(args.vaegan_workdir or out / "vaegan"))
  chosen = runner.select(all_methods, args.methods, "--methods")
  if any(m.startswith("semantic") for m in chosen) and args.vaegan_workdir is None:
    runner.train_vaegan(vaegan_config, out / "vaegan", lt)
  evals = runner.run_grid(classifier_config, out, all_methods, chosen, args.seeds, args.overrides)
  notes = (f"Dataset `{args.dataset}`, classifier config `{classifier_config}`, seeds "
           f"{args.seeds}. Checkpoints chosen on validation mean class accuracy; all numbers on "
           "the test split. Command: `python experiments/protocol.py --dataset "
           f"{args.dataset}`.")
  print(runner.write_results(out, evals, f"Protocol on {args.dataset}", notes))
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
