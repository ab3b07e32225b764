"""The paper's protocol: one classifier recipe, every rebalancing method, several seeds.

  python experiments/protocol.py --dataset synthetic --out runs/protocol_synthetic
  python experiments/protocol.py --dataset fer2013 --out runs/protocol_fer2013      # GPU
  python experiments/protocol.py --dataset fer2013 --lt 100 --out runs/protocol_fer2013_lt100

--noise R is the noisy-label protocol: that share of train labels flipped to another class
(data.label_noise; seeded, the same flips for every method at a seed; validation and test
clean; on the synthetic set the generator's own noise, the same for every seed).

--lt R builds the *-LT variant (as long-tailed FER benchmarks do): the train split subsampled
per class to a geometric profile with max/min ratio R (fixed subset, classes in natural
frequency order) for the VAE-GAN and every classifier; validation and test untouched.

Methods (each a set of config overrides on the same recipe):
  none          instance sampling, cross-entropy
  ros           random over-sampling of every class to the largest
  cb_loss       effective-number class-balanced weights (Cui et al. 2019)
  ldam_drw      LDAM-DRW as published (Cao et al. 2019; github.com/kaidic/LDAM-DRW,
                cifar_train.py): the normalised cosine head (model.head=cosine), LDAM with
                s = 30 and a largest margin of 0.5 on its cosines, effective-number class
                weights (beta 0.9999) deferred to 4/5 of training (their epoch 160 of 200),
                the weighted batch averaged as their F.cross_entropy(weight=...)
                (loss.weight_average=normalized)
  ldam_drw_linear  the variant this protocol reported as ldam_drw before: a plain linear head,
                LDAM with s = 1 and a largest margin of 0.5 logit, the same class weights
                deferred to 3/4 of training, the batch mean (loss.weight_average=mean)
  logit_adj     logit-adjusted loss (Menon et al. 2021, tau = 1)
  eac           erasing attention consistency (Zhang et al. 2022; github.com/zyh-uaiaaaa/
                Erasing-Attention-Consistency): random erasing (p 0.5, box scale 0.02-0.25 as
                published) and the CAM consistency loss with its image's mirror, weight 5 as
                published; with --noise, the mirror view erased with its own box, as their
                noisy-label training does (loss.eac_flip_erasing=independent)
  rul           relative uncertainty learning's head (Zhang et al. 2021; github.com/zyh-uaiaaaa/
                Relative-Uncertainty-Learning): uncertainty-weighted feature mixing, add-up loss
  rul_cw_cbam   the same with inverse-frequency class weights and CBAM in every block
                (arXiv 2212.07751's combination)
  dan           DAN (Wen et al. 2021; github.com/yaoing/DAN): 4 attention heads, affinity and
                partition losses at weight 1 as published
  EAC, RUL, RUL with CBAM and DAN erase boxes of 0.02-0.25 of the image area, as their code
  does (augment.erasing_scale; the recipe's other runs keep torchvision's 0.02-0.33).
  coupling      coupling-regulation loss: focal (gamma 2) to LDAM (largest margin 0.5) on
                BBN's schedule 1 - (t/T)^2 (ferjax.losses; no published code)
  semantic      semantic augmentation: every class topped up to the largest with VAE-GAN
                faces (alpha = 1 posterior perturbation of real seeds; the config file's
                augment.decode: residual for the synthetic set, chosen on validation)
  semantic_la   semantic augmentation filling half of each gap, plus the logit-adjusted loss
                on the resulting (still imbalanced) batch prior

One VAE-GAN is trained (seed 0) and shared by the semantic runs. Checkpoints are chosen on the
validation split; every number is on the test split. Writes results.md (mean ± std over seeds,
per-class recall, head / medium / tail), results.json and per_class_recall.png.
Expected time: synthetic on a 2-core CPU about 4 minutes per run (24 runs: ~1.6 h; use
--seeds 0 or --methods to shorten); FER-2013 on one H200 about 95 s per run alone, or 4
runs in parallel in about 5 minutes (XLA_PYTHON_CLIENT_MEM_FRACTION=0.2, one process per
--methods entry, same --out). Runs made on several machines: copy their folders into one --out
and add --collect to tabulate without training.

The shared FER-2013 folders hold only PublicTest (the validation split, no test split); there:
  python experiments/protocol.py --dataset fer2013 --report-split validation \
      config.data.val_split=None config.train.best_metric=mean_class_accuracy
chooses checkpoints on a 10% hold-out of train and reports PublicTest, which selects nothing.

Each method is described in docs/methods.md.
"""

import argparse
import pathlib

import runner


def methods(num_steps: int, vaegan_workdir: pathlib.Path, noise: float | None = None) -> dict:
  """Each method's config overrides; `noise` (the --noise share) switches EAC to its noisy-label
  training."""
  semantic = [f"config.augment.vaegan_workdir={vaegan_workdir}"]
  erasing = ["config.augment.erasing_scale=(0.02,0.25)"]  # EAC, RUL and DAN's RandomErasing.
  eac_noisy = ["config.loss.eac_flip_erasing=independent"] if noise else []
  return {
      "none": [],
      "ros": ["config.sampler.name=oversample"],
      "cb_loss": ["config.loss.class_weights=effective"],
      "ldam_drw": ["config.model.head=cosine", "config.loss.name=ldam",
                   "config.loss.ldam_scale=30", "config.loss.ldam_max_margin=0.5",
                   "config.loss.class_weights=effective", "config.loss.beta=0.9999",
                   f"config.loss.drw_start_step={int(0.8 * num_steps)}",
                   "config.loss.weight_average=normalized"],
      "ldam_drw_linear": ["config.loss.name=ldam", "config.loss.class_weights=effective",
                          f"config.loss.drw_start_step={int(0.75 * num_steps)}"],
      "logit_adj": ["config.loss.name=logit_adjusted"],
      "eac": ["config.loss.eac_weight=5", "config.augment.erasing_prob=0.5", *erasing,
              *eac_noisy],
      "rul": ["config.model.head=rul", *erasing],
      "rul_cw_cbam": ["config.model.head=rul", "config.model.cbam=True",
                      "config.loss.class_weights=inverse", *erasing],
      "dan": ["config.model.head=dan", *erasing],
      "coupling": ["config.loss.name=coupling"],
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
  parser.add_argument("--noise", type=float, default=None, metavar="R",
                      help="noisy-label protocol: that share of train labels flipped")
  parser.add_argument("--collect", action="store_true",
                      help="train nothing: tabulate the finished runs found in --out")
  runner.add_report_split_flag(parser)
  parser.add_argument("overrides", nargs="*", help="config.field=value for every classifier run")
  args = parser.parse_args()
  out = pathlib.Path(args.out or f"runs/protocol_{args.dataset}")
  classifier_config, vaegan_config = runner.DATASETS[args.dataset]
  lt = [f"config.data.imbalance_ratio={args.lt}"] if args.lt else []
  if args.noise:  # Train labels only: the VAE-GAN (unlabelled training) is unaffected.
    args.overrides = [f"config.data.label_noise={args.noise}", *args.overrides]
  args.overrides = [*lt, *args.overrides]
  config = runner.load(classifier_config, args.overrides)
  num_steps = config.train.num_steps
  vaegan_overrides = lt
  if config.data.val_split is None:
    # The reported split must select nothing, the VAE-GAN's checkpoint included: it then keeps
    # no validation split and the semantic runs sample from its last checkpoint.
    vaegan_overrides = [*lt, "config.data.val_split=None"]
    args.overrides = [*args.overrides, "config.augment.vaegan_checkpoint=last"]
  all_methods = methods(num_steps, pathlib.Path(args.vaegan_workdir or out / "vaegan"),
                        noise=args.noise)
  chosen = runner.select(all_methods, args.methods, "--methods")
  out.mkdir(parents=True, exist_ok=True)  # Only once the arguments are known to be good.
  if args.collect:
    evals = runner.collect(out, chosen, args.seeds, args.report_split)
  else:
    if any(m.startswith("semantic") for m in chosen) and args.vaegan_workdir is None:
      runner.train_vaegan(vaegan_config, out / "vaegan", vaegan_overrides)
    evals = runner.run_grid(classifier_config, out, all_methods, chosen, args.seeds,
                            args.overrides, args.report_split)
  val = config.data.val_split or f"a {config.data.val_fraction:.0%} stratified hold-out of train"
  runs = ", ".join(f"{m} x{len(e)}" for m, e in evals.items())
  notes = (f"Dataset `{args.dataset}`, classifier config `{classifier_config}`, runs (method x "
           f"seeds): {runs}. Checkpoints chosen on validation ({val}) "
           f"{config.train.best_metric.replace('_', ' ')}; all numbers on the "
           f"{args.report_split} split. Command: `python experiments/protocol.py --dataset "
           f"{args.dataset}{'' if args.report_split == 'test' else ' --report-split ' + args.report_split}"
           f"{''.join(' ' + o for o in args.overrides)}`.")
  print(runner.write_results(out, evals, f"Protocol on {args.dataset}", notes, args.report_split))
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
