"""Ablation of the semantic augmentation, all points reusing ONE trained VAE-GAN checkpoint.

  python experiments/ablation.py --dataset synthetic --out runs/ablation_synthetic
  python experiments/ablation.py --dataset fer2013 --vaegan-workdir runs/vaegan_fer2013   # GPU

Grids (one axis at a time around the paper's point: decode = full, alpha = 1, fill = 1,
mode = posterior):
  alpha in {0, 0.5, 1, 2, 3}   (z = mu + alpha * sigma * eps; 0 = plain reconstruction)
  fill  in {0, 0.5, 1}         (share of each class's gap filled with synthetic faces)
  mode  in {posterior, interpolate, class_gaussian}
plus ours: decode=residual (seed + G(z') - G(mu)), start=half (synthesis from mid-training),
weight=0.5 (half loss weight on synthetic faces).
No VAE-GAN is retrained per point: each run restores the same checkpoint
(--config.augment.vaegan_workdir). Validation picks each run's checkpoint; numbers are on test.
Expected time: synthetic on a 2-core CPU about 2.5 minutes per point (12 points per seed, ~30 min).

See docs/methods.md (Semantic augmentation with a VAE-GAN and the sections after it).
"""

import argparse
import pathlib

import runner

ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0)
FILLS = (0.0, 0.5, 1.0)
MODES = ("posterior", "interpolate", "class_gaussian")


def points(num_steps: int) -> dict:
  grid = {}
  full = "config.augment.decode=full"  # The paper's decoding, whatever the config file chose.
  for alpha in ALPHAS:
    grid[f"alpha={alpha:g}"] = [full, f"config.augment.alpha={alpha}"]
  for fill in FILLS:
    grid.setdefault(f"fill={fill:g}", [full, f"config.augment.fill={fill}"])
  for mode in MODES:
    grid.setdefault(f"mode={mode}", [full, f"config.augment.mode={mode}"])
  # fill=1 and mode=posterior are the default point, the same run as alpha=1.
  grid.pop("fill=1", None)
  grid.pop("mode=posterior", None)
  # Our additions (ferjax.augment.synthesis): the change added to the sharp seed instead of
  # the decoding; synthesis deferred to the second half; half loss weight on synthetic faces.
  grid["decode=residual"] = ["config.augment.decode=residual"]
  grid["start=half"] = [full, f"config.augment.start_step={num_steps // 2}"]
  grid["weight=0.5"] = [full, "config.augment.synthetic_weight=0.5"]
  return grid


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="synthetic", choices=sorted(runner.DATASETS))
  parser.add_argument("--out", default=None, help="output folder (default runs/ablation_DATASET)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--vaegan-workdir", default=None, help="reuse a trained VAE-GAN")
  parser.add_argument("--points", nargs="+", default=None,
                      help="run these grid points only, in this order (e.g. alpha=1 fill=0.5)")
  runner.add_report_split_flag(parser)
  parser.add_argument("overrides", nargs="*", help="config.field=value for every classifier run")
  args = parser.parse_args()
  out = pathlib.Path(args.out or f"runs/ablation_{args.dataset}")
  out.mkdir(parents=True, exist_ok=True)
  classifier_config, vaegan_config = runner.DATASETS[args.dataset]
  vaegan_dir = pathlib.Path(args.vaegan_workdir) if args.vaegan_workdir else runner.train_vaegan(
      vaegan_config, out / "vaegan")
  num_steps = runner.load(classifier_config, args.overrides).train.num_steps
  grid = points(num_steps)
  chosen = runner.select(grid, args.points, "--points")
  evals = runner.run_grid(classifier_config, out, grid, chosen, args.seeds,
                          [*args.overrides, f"config.augment.vaegan_workdir={vaegan_dir}"],
                          args.report_split)
  notes = (f"Dataset `{args.dataset}`, one VAE-GAN ({vaegan_dir}) for every point. Points "
           "alpha/fill/mode vary one axis around the paper's point (decode = full, alpha = 1, "
           "fill = 1, mode = posterior); decode=residual, start=half and weight=0.5 are ours. "
           f"Seeds {args.seeds}. Command: `python experiments/ablation.py --dataset "
           f"{args.dataset}`.")
  print(runner.write_results(out, evals, f"Semantic augmentation ablation on {args.dataset}", notes,
                             args.report_split))
  return 0


if __name__ == "__main__":
  runner.main_guard(main)
