"""`ferjax demo`: the whole method on the embedded synthetic faces, in minutes on a CPU.

1. the synthetic long-tailed train split (RAF-DB proportions), balanced validation and test;
2. a small VAE-GAN trained on the train split;
3. a baseline classifier (instance sampling, cross-entropy);
4. the same classifier recipe with semantic augmentation: minority-class slots of each batch
   filled with faces decoded from perturbed latents of real seed images;
5. both evaluated on the balanced test split (checkpoints chosen on validation), and
   `report.md` with the comparison, per-class recall, synthetic samples and the class
   distribution before and after rebalancing.

The configs are the repository's experiment files (`experiments/configs/*_synthetic.py`), so the
demo runs exactly what those files document.
"""

import json
import pathlib
import time

import numpy as np

from ferjax import configs, evaluate, plots, report, runs
from ferjax.augment import export, quality, synthesis
from ferjax.core import workdir as workdir_lib
from ferjax.data import splits
from ferjax.errors import UserError
from ferjax.train import classifier, vaegan

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"


def _config(name: str, overrides=()):
  path = CONFIGS / name
  if not path.is_file():
    raise UserError(f"{path} not found: ferjax demo runs the repository's experiment configs "
                    "(install from a clone with `pip install -e .`)")
  return configs.load_config(path, overrides)


def _banner(text: str) -> None:
  print(f"\n=== {text} ===", flush=True)


def run(workdir, *, quick: bool = False, seed: int = 0) -> dict:
  """Runs the demo into `workdir`; returns the two test evaluations. Steps already done resume."""
  workdir = workdir_lib.check_writable(workdir, "--workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  shrink = ["config.train.num_steps=60", "config.train.eval_every=30",
            "config.train.checkpoint_every=30", "config.train.log_every=10"] if quick else []
  seed_override = [f"config.seed={seed}"]

  _banner("1/5 VAE-GAN on the synthetic train split")
  vae_config = _config("vaegan_synthetic.py", [*seed_override, *shrink])
  if quick:
    configs.apply_overrides(vae_config, ["config.train.sample_every=30"])
  vaegan.train_and_evaluate(vae_config, workdir / "vaegan")

  runs = {
      "baseline": _config("classifier_synthetic.py", [*seed_override, *shrink]),
      "semantic augmentation": _config("classifier_synthetic.py", [
          *seed_override, *shrink, f"config.augment.vaegan_workdir={workdir / 'vaegan'}"]),
  }
  evals = {}
  for i, (method, config) in enumerate(runs.items()):
    _banner(f"{2 + i}/5 classifier: {method}")
    run_dir = workdir / method.replace(" ", "_")
    classifier.train_and_evaluate(config, run_dir)
    evals[method] = evaluate.evaluate_run(run_dir, "test", checkpoint="best", tta="none")

  _banner("4/5 synthetic samples and class distributions")
  train_config = runs["semantic augmentation"]
  train_ds = splits.load_split(train_config.data, "train", train=True)
  grid, judged = _synthetic_samples(train_config, train_ds, workdir / "baseline", workdir)
  plan = synthesis.plan_for(train_config, train_ds.labels, train_ds.num_classes)
  hist = plots.save_class_histogram(
      {"real train": train_ds.class_counts(),
       "rebalanced (real)": np.round(plan.real_counts).astype(int),
       "rebalanced (synthetic)": np.round(plan.synthetic_counts).astype(int)},
      train_ds.class_names, workdir / "class_distribution.png",
      title="train class distribution before / after rebalancing")

  _banner("5/5 report")
  summary = report.summarize({m: [e] for m, e in evals.items()})
  recall_png = report.recall_plot(summary, workdir / "per_class_recall.png",
                                  title="test recall per class")
  text = _report_text(summary, evals, judged, train_ds, plan, train_config.train.batch_size,
                      time.time() - start,
                      [grid, hist, recall_png], workdir)
  (workdir / "report.md").write_text(text)
  print(text)
  print(f"\nwrote {workdir / 'report.md'} in {time.time() - start:.0f} s")
  return evals


def _synthetic_samples(config, train_ds, baseline_dir, workdir, per_class: int = 100):
  """Synthesizes `per_class` faces per class outside training, saves the seed/face grid and
  judges them with the baseline (trained on real faces only): class consistency, Frechet
  distance and diversity of its features (see ferjax.augment.quality)."""
  a = config.augment
  vae = runs.open_vaegan(a.vaegan_workdir, a.vaegan_checkpoint)
  fake, labels, seed_idx = synthesis.synthesize_per_class(
      vae, train_ds.images, train_ds.labels, train_ds.num_classes, per_class,
      **synthesis.options(config))
  grid = export.save_seed_grid(workdir / "synthetic_samples.png", train_ds.images[seed_idx], fake,
                               labels, train_ds.class_names)
  judge = runs.open_classifier(baseline_dir, "best")
  predict = lambda images: evaluate.predict_logits(judge.model, judge.variables, images,
                                                   return_features=True, batch_size=256)
  fake_logits, fake_features = predict(fake)
  _, real_features = predict(train_ds.images)
  judged = quality.measure(fake_logits, fake_features, labels, real_features, train_ds.labels,
                           train_ds.class_names)
  (workdir / "synthetic_quality.json").write_text(json.dumps(judged, indent=2) + "\n")
  return grid, judged


def _report_text(summary, evals, judged, train_ds, plan, batch_size, seconds, pngs,
                 workdir) -> str:
  names = train_ds.class_names
  counts = train_ds.class_counts()
  dist = ["| class | real train | rebalanced: real | rebalanced: synthetic |",
          "|---|---:|---:|---:|"]
  for k, n in enumerate(names):
    dist.append(f"| {n} | {counts[k]} | {plan.real_counts[k]:.0f} | {plan.synthetic_counts[k]:.0f} |")
  rel = lambda p: pathlib.Path(p).relative_to(workdir).as_posix()
  return "\n".join([
      "# ferjax demo: semantic augmentation on long-tailed synthetic faces",
      "",
      f"Train split long-tailed (imbalance ratio {counts.max() / counts.min():.1f}); validation "
      "and test balanced. Checkpoints chosen on validation mean class accuracy; numbers below are "
      "on the test split, one seed (`experiments/protocol.py` runs 3 seeds and all baselines). "
      f"Total time {seconds / 60:.1f} min.",
      "",
      "## Test results (%)",
      "",
      report.markdown_table(summary),
      "",
      "## Per-class recall on test (%)",
      "",
      report.recall_table(summary),
      "",
      f"![per-class recall]({rel(pngs[2])})",
      "",
      "## Synthetic samples",
      "",
      "Each row: real seed faces of a class, then faces synthesized from them (z = mu + "
      "alpha * sigma * eps).",
      "",
      f"![synthetic samples]({rel(pngs[0])})",
      "",
      "Judged by the baseline (trained on real faces only; `synthetic_quality.json`): "
      "consistency = share assigned to the intended class; Frechet distance of its features to "
      "real train faces of the class, next to two halves of the real faces (the floor); "
      "diversity = mean pairwise feature distance, synthetic vs real.",
      "",
      *_quality_rows(judged),
      "",
      "## Class distribution before and after rebalancing",
      "",
      *dist,
      "",
      f"Each training batch of {batch_size} holds {plan.num_synthetic} synthetic faces, drawn "
      "fresh every step.",
      "",
      f"![class distribution]({rel(pngs[1])})",
      "",
      "Evaluations: " + ", ".join(f"`{m.replace(' ', '_')}/eval_test.json`" for m in evals),
      "",
  ])


def _quality_rows(judged) -> list[str]:
  rows = ["| class | consistency (%) | Frechet | Frechet, real halves | diversity | diversity, "
          "real |", "|---|---:|---:|---:|---:|---:|"]
  for name, v in judged["per_class"].items():
    rows.append(f"| {name} | {100 * v['consistency']:.1f} | {v['frechet']:.1f} | "
                f"{v['frechet_real_halves']:.1f} | {v['diversity']:.2f} | "
                f"{v['diversity_real']:.2f} |")
  rows.append(f"| all | {100 * judged['consistency']:.1f} | {judged['mean_frechet']:.1f} | "
              f"{judged['mean_frechet_real_halves']:.1f} | {judged['mean_diversity']:.2f} | "
              f"{judged['mean_diversity_real']:.2f} |")
  return rows


def cli_main(args) -> int:
  run(args.workdir, quick=args.quick, seed=args.seed)
  return 0
