"""`ferjax demo`: the whole method on the embedded synthetic faces, in minutes on a CPU.

1. the synthetic long-tailed train split (RAF-DB proportions), balanced validation and test;
   a small VAE-GAN trained on the train split;
2. a baseline classifier (instance sampling, cross-entropy);
3. the same recipe with the logit-adjusted loss (Menon et al. 2021, tau 1): the one-line
   long-tail baseline semantic augmentation has to beat;
4. semantic augmentation in pixels: the same recipe with minority-class slots of each batch
   filled with faces decoded (residual decoding) from perturbed VAE-GAN latents of real seeds,
   half of each class's gap filled, the logit-adjusted loss on the batches' prior, and the
   baseline as the teacher filter (a synthetic face it does not give its class with p >= 0.5
   is dropped): the in-batch variant with the best mean validation score over 3 seeds in
   docs/results.md (class-preserving generation and pixel faces);
5. semantic augmentation in feature space, used decoupled (`ferjax retrain-head`): on the
   baseline's frozen backbone, the head re-trained with instance sampling, the logit-adjusted
   loss and synthetic tail-class features from a small VAE on the backbone's features (alpha 2;
   the best head variant on validation in `experiments/feature_semantic.py`);
6. the semantic variant used is the one with the better VALIDATION mean class accuracy (the test
   split never selects); all four runs are evaluated on the balanced test split (checkpoints
   chosen on validation);
7. synthetic samples: the pixel variant's seed/synthetic grid judged by the baseline, the
   feature variant's nearest real neighbours of synthetic features, and the class distribution
   before and after rebalancing;
8. `report.md` with the comparison, the choice, per-class recall and the pictures.

The configs are the repository's experiment files (`experiments/configs/*_synthetic.py`) and
retrain-head's defaults (ferjax.kinds.retrain_head), so the demo runs exactly what they document.
Running it again reuses finished stages (the trainers resume; a finished head is kept).
"""

import json
import pathlib
import time

import numpy as np

from ferjax import configs, evaluate, plots, report, runs
from ferjax.augment import quality, synthesis
from ferjax.core import interrupt
from ferjax.core import workdir as workdir_lib
from ferjax.data import splits
from ferjax.errors import UserError
from ferjax.kinds import retrain_head as head_kind
from ferjax.train import classifier, retrain_head, vaegan

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
STAGES = 8

BASELINE, LOGIT_ADJ = "baseline", "logit adjustment"
PIXELS, FEATURES = "semantic augmentation (pixels)", "semantic augmentation (features)"
CHOSEN = " (chosen on validation)"
# method -> its folder under the demo's workdir.
FOLDERS = {BASELINE: "baseline", LOGIT_ADJ: "logit_adjustment", PIXELS: "semantic_pixels",
           FEATURES: "semantic_features"}
# The pixel variant: the protocol's semantic_la with the baseline as the teacher filter (the
# in-batch variant with the best mean validation score over 3 seeds, see docs/results.md).
PIXEL_OVERRIDES = ["config.augment.fill=0.5", "config.loss.name=logit_adjusted"]
# The feature variant: retrain-head on the baseline, as `experiments/feature_semantic.py`'s
# feat_la_a2 (the best head variant on validation over 3 seeds).
FEATURE_OVERRIDES = ["config.synth.mode=feature", "config.head.sampler=instance",
                     "config.head.loss=logit_adjusted", "config.synth.alpha=2"]


def _config(name: str, overrides=()):
  path = CONFIGS / name
  if not path.is_file():
    raise UserError(f"{path} not found: ferjax demo runs the repository's experiment configs "
                    "(install from a clone with `pip install -e .`)")
  return configs.load_config(path, overrides)


def _banner(k: int, text: str) -> None:
  interrupt.check()  # A signal that a stage's library swallowed stops the demo here.
  print(f"\n=== {k}/{STAGES} {text} ===", flush=True)


def run(workdir, *, quick: bool = False, seed: int = 0) -> dict:
  """Runs the demo into `workdir`; returns the test evaluations (method -> eval). Steps already
  done resume."""
  workdir = workdir_lib.check_writable(workdir, "--workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  # --quick: a smoke run of every stage (20 steps each, two validations), numbers meaningless.
  shrink = ["config.train.num_steps=20", "config.train.eval_every=10",
            "config.train.checkpoint_every=10", "config.train.log_every=5"] if quick else []
  seed_override = [f"config.seed={seed}"]
  dirs = {m: workdir / f for m, f in FOLDERS.items()}

  _banner(1, "VAE-GAN on the synthetic train split")
  vae_config = _config("vaegan_synthetic.py", [*seed_override, *shrink])
  if quick:
    configs.apply_overrides(vae_config, ["config.train.sample_every=10"])
  vaegan.train_and_evaluate(vae_config, workdir / "vaegan")

  if quick:  # The classifier's warm-up (50 steps) must end before the run does.
    shrink = [*shrink, "config.optim.warmup_steps=5"]
  recipes = {
      BASELINE: _config("classifier_synthetic.py", [*seed_override, *shrink]),
      LOGIT_ADJ: _config("classifier_synthetic.py", [*seed_override, *shrink,
                                                     "config.loss.name=logit_adjusted"]),
      PIXELS: _config("classifier_synthetic.py", [
          *seed_override, *shrink, *PIXEL_OVERRIDES,
          f"config.augment.vaegan_workdir={workdir / 'vaegan'}",
          f"config.augment.filter_workdir={dirs[BASELINE]}"]),  # Trained before this one.
  }
  for i, (method, config) in enumerate(recipes.items()):
    _banner(2 + i, f"classifier: {method}")
    classifier.train_and_evaluate(config, dirs[method])

  _banner(5, "semantic augmentation in feature space: head re-trained on the baseline's backbone")
  head_result = _feature_head(dirs[BASELINE], dirs[FEATURES], seed, quick)

  _banner(6, "choosing the semantic variant on validation; testing")
  val = {m: evaluate.evaluate_run(dirs[m], "val", checkpoint="best", tta="none")
         for m in (PIXELS, FEATURES)}
  chosen = max(val, key=lambda m: val[m]["mean_class_accuracy"])  # A tie keeps the pixels.
  other = FEATURES if chosen == PIXELS else PIXELS
  choice = {"chosen": chosen, "other": other, "metric": "mean_class_accuracy", "split": "val",
            "val": {m: val[m]["mean_class_accuracy"] for m in val},
            "folder": FOLDERS[chosen]}
  (workdir / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
  print(f"chosen on validation: {chosen} (mean class accuracy "
        f"{100 * val[chosen]['mean_class_accuracy']:.2f}% vs {other} "
        f"{100 * val[other]['mean_class_accuracy']:.2f}%)", flush=True)
  evals = {m: evaluate.evaluate_run(dirs[m], "test", checkpoint="best", tta="none")
           for m in FOLDERS}

  _banner(7, "synthetic samples and class distributions")
  train_config = recipes[PIXELS]
  train_ds = splits.load_split(train_config.data, "train", train=True)
  grid, judged = _synthetic_samples(train_config, train_ds, dirs[BASELINE], workdir)
  plan = synthesis.plan_for(train_config, train_ds.labels, train_ds.num_classes)
  hist = plots.save_class_histogram(
      {"real train": train_ds.class_counts(),
       "rebalanced (real)": np.round(plan.real_counts).astype(int),
       "rebalanced (synthetic)": np.round(plan.synthetic_counts).astype(int)},
      train_ds.class_names, workdir / "class_distribution.png",
      title="train class distribution before / after rebalancing (pixel variant)")

  _banner(8, "report")
  summary = report.summarize({m + (CHOSEN if m == chosen else ""): [e] for m, e in evals.items()})
  recall_png = report.recall_plot(summary, workdir / "per_class_recall.png",
                                  title="test recall per class")
  pngs = {"grid": grid, "hist": hist, "recall": recall_png,
          "neighbours": dirs[FEATURES] / head_result["neighbours"]["png"]}
  text = _report_text(summary, choice, judged, head_result, train_ds, plan,
                      train_config.train.batch_size, time.time() - start, pngs, workdir)
  (workdir / "report.md").write_text(text)
  print(text)
  print(f"\nwrote {workdir / 'report.md'} in {time.time() - start:.0f} s")
  return evals


def _feature_head(baseline_dir, out, seed: int, quick: bool) -> dict:
  """Re-trains the baseline's head with feature-space semantic augmentation into `out` unless
  a finished one is there (retrain-head writes `out` whole, head.json last); returns head.json.
  A finished head with another config (e.g. from --quick) is refused, as the trainers do."""
  config = head_kind.default_config()
  shrink = (["config.head.steps=20", "config.head.eval_every=10", "config.synth.vae.steps=20"]
            if quick else [])
  configs.apply_overrides(config, [*FEATURE_OVERRIDES, *shrink, f"config.seed={seed}"])
  done = out / "head.json"
  if not done.exists():
    return retrain_head.retrain_head(config, baseline_dir, out)
  result = json.loads(done.read_text())
  if result.get("config") != json.loads(json.dumps(configs.to_dict(config))):
    raise UserError(f"{out} holds a head re-trained with another config (a --quick run?): "
                    "choose another --workdir, or remove that folder to re-train it")
  print(f"{out}: finished head reused (validation mean class accuracy "
        f"{result['best']['mean_class_accuracy']:.4f} at step {result['best_step']})")
  return result


def _synthetic_samples(config, train_ds, baseline_dir, workdir, per_class: int = 100):
  """Synthesizes `per_class` faces per class outside training, saves the seed/face grid and
  judges them with the baseline (trained on real faces only): class consistency, Frechet
  distance and diversity of its features (see ferjax.augment.quality)."""
  a = config.augment
  vae = runs.open_vaegan(a.vaegan_workdir, a.vaegan_checkpoint)
  fake, labels, seed_idx = synthesis.synthesize_per_class(
      vae, train_ds.images, train_ds.labels, train_ds.num_classes, per_class,
      **synthesis.options(config))
  grid = plots.save_seed_grid(workdir / "synthetic_samples.png",
                              synthesis.seeds_like(train_ds.images[seed_idx], fake), fake,
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


def _report_text(summary, choice, judged, head_result, train_ds, plan, batch_size, seconds, pngs,
                 workdir) -> str:
  names = train_ds.class_names
  counts = train_ds.class_counts()
  dist = ["| class | real train | rebalanced: real | rebalanced: synthetic |",
          "|---|---:|---:|---:|"]
  for k, n in enumerate(names):
    dist.append(f"| {n} | {counts[k]} | {plan.real_counts[k]:.0f} | {plan.synthetic_counts[k]:.0f} |")
  rel = lambda p: pathlib.Path(p).relative_to(workdir).as_posix()
  chosen, other = choice["chosen"], choice["other"]
  won, lost = 100 * choice["val"][chosen], 100 * choice["val"][other]
  neighbours = head_result["neighbours"]
  feat_plan = head_result["plan"]
  h = head_result["config"]["head"]
  return "\n".join([
      "# ferjax demo: semantic augmentation on long-tailed synthetic faces",
      "",
      f"Train split long-tailed (imbalance ratio {counts.max() / counts.min():.1f}); validation "
      "and test balanced. Four methods on one recipe: the baseline (cross-entropy); logit "
      "adjustment (`loss.name=logit_adjusted`); semantic augmentation in pixels (minority-class "
      "slots of each batch filled with VAE-GAN faces decoded from perturbed latents of real "
      "seeds, residual decoding, half of each gap, the logit-adjusted loss, faces the baseline "
      "does not give their class with p >= 0.5 dropped); semantic augmentation in feature space, used decoupled (the "
      "baseline's backbone frozen, its head re-trained with instance sampling, the "
      "logit-adjusted loss and synthetic tail-class features from a VAE on the backbone's "
      "features, alpha 2: `ferjax retrain-head`). Checkpoints and heads chosen on validation "
      "mean class accuracy; numbers below are on the test split, one seed "
      "(`experiments/protocol.py` and `experiments/feature_semantic.py` run 3 seeds). "
      f"Total time {seconds / 60:.1f} min.",
      "",
      "## Which semantic augmentation",
      "",
      f"Chosen on validation: **{chosen}**, validation mean class accuracy {won:.2f}% vs "
      f"{lost:.2f}% for {other} ({won - lost:+.2f} points). The test split never selects; "
      "the choice is in `choice.json`.",
      "",
      "## Test results (%)",
      "",
      report.markdown_table(summary),
      "",
      "## Per-class recall on test (%)",
      "",
      report.recall_table(summary),
      "",
      f"![per-class recall]({rel(pngs['recall'])})",
      "",
      "## Synthetic samples: pixels",
      "",
      "Each row: real seed faces of a class, then faces synthesized from them (z = mu + "
      "alpha * sigma * eps).",
      "",
      f"![synthetic samples]({rel(pngs['grid'])})",
      "",
      "Judged by the baseline (trained on real faces only; `synthetic_quality.json`): "
      "consistency = share assigned to the intended class; Frechet distance of its features to "
      "real train faces of the class, next to two halves of the real faces (the floor); "
      "diversity = mean pairwise feature distance, synthetic vs real.",
      "",
      *_quality_rows(judged),
      "",
      "## Synthetic samples: feature space",
      "",
      "Synthetic features have no image, so each row pairs, for a synthesized class, the real "
      "seed face whose feature was perturbed with the train face whose backbone feature is "
      "nearest to the synthetic one; a neighbour of the intended expression that is not the seed "
      "means the synthetic feature is new yet still of its class "
      f"({100 * neighbours['nearest_same_class']:.0f}% of "
      f"nearest neighbours have the intended class, {100 * neighbours['nearest_is_seed']:.0f}% "
      "are the seed itself or its mirror).",
      "",
      f"![nearest real neighbours of synthetic features]({rel(pngs['neighbours'])})",
      "",
      f"Each head batch of {h['batch_size']} holds {feat_plan['num_synthetic']} synthetic "
      f"features ({h['steps']} steps; `{FOLDERS[FEATURES]}/head.json`).",
      "",
      "## Class distribution before and after rebalancing (pixels)",
      "",
      *dist,
      "",
      f"Each training batch of {batch_size} holds {plan.num_synthetic} synthetic faces, drawn "
      "fresh every step.",
      "",
      f"![class distribution]({rel(pngs['hist'])})",
      "",
      "Evaluations: " + ", ".join(f"`{f}/eval_test.json`" for f in FOLDERS.values()) +
      " (validation: `eval_val.json` of the two semantic variants).",
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
