"""`ferjax evaluate-synthetic`: how good are the synthesized faces, measured by a real-data model.

    ferjax evaluate-synthetic --vaegan runs/demo/vaegan --classifier runs/demo/baseline \
        --per-class 200 --out runs/quality

The metrics (class consistency, Frechet distance and diversity of the judge's features) are
ferjax.augment.quality's; this command also trains the judge's recipe on synthetic faces only
for the classification accuracy score (CAS), so it sits above the trainers. Writes
`<out>/synthetic_quality.json` and `<out>/synthetic_quality.md` (and the CAS classifier's run,
`<out>/cas_classifier`). `--out` may not lie inside either run or the judge's image folder, and
must be new, empty or an earlier evaluate-synthetic output; it is locked while written.
"""

import json
import pathlib

from ferjax import evaluate, runs, writing
from ferjax.augment import quality, synthesis
from ferjax.core import workdir as workdir_lib
from ferjax.data import Dataset, splits
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.train import classifier


OUT_FILES = ("synthetic_quality.json", "synthetic_quality.md", "cas_classifier")


def evaluate_synthetic(vaegan_workdir, classifier_workdir, out, *, per_class: int = 200,
                       cas_steps=None, seed: int = 0, decode=None) -> dict:
  out = workdir_lib.check_writable(out, "--out")
  writing.refuse_clobbering(out, input_dirs=[vaegan_workdir, classifier_workdir], what="--out",
                            folder=True)
  writing.refuse_foreign_folder(out, "evaluate-synthetic", owned=lambda name: name in OUT_FILES)
  judge = runs.open_classifier(classifier_workdir, "best")
  config = judge.config
  if config.augment.get("vaegan_workdir"):
    raise UserError(f"--classifier {classifier_workdir}: trained with semantic augmentation; the "
                    "judge must be trained on real images only")
  writing.refuse_clobbering(out, input_dirs=[config.data.get("manual_dir")], what="--out")
  with writing.output_folder(out, "evaluate-synthetic", owned=lambda name: name in OUT_FILES):
    return _evaluate(judge, vaegan_workdir, classifier_workdir, out, per_class=per_class,
                     cas_steps=cas_steps, seed=seed, decode=decode)


def _evaluate(judge, vaegan_workdir, classifier_workdir, out, *, per_class, cas_steps, seed,
              decode) -> dict:
  config, mesh = judge.config, judge.mesh
  predict = lambda images: evaluate.predict_logits(
      judge.model, judge.variables, images, tta="none", mesh=mesh,
      batch_size=evaluate.eval_batch_size(config, mesh), return_features=True)

  train_ds, val_ds = splits.load_splits(config.data, config.seed)
  test_ds = splits.load_split(config.data, "test", train=False)
  vae = runs.open_vaegan(vaegan_workdir, "latest")
  how = synthesis.options(config)  # The judge's augment fields: the trainer's defaults.
  if decode is not None:  # full: the generator's own faces; residual: seed + their change.
    how["residual"] = decode == "residual"
  fake, fake_labels, _ = synthesis.synthesize_per_class(
      vae, train_ds.images, train_ds.labels, train_ds.num_classes, per_class, seed=seed, **how)
  fake_logits, fake_features = predict(fake)
  _, real_features = predict(train_ds.images)
  test_logits, _ = predict(test_ds.images)
  judge_test = evaluate.evaluate_params(config, None, test_ds, train_counts=judge.train_counts,
                                        logits=test_logits)
  recall = {n: v["recall"] for n, v in judge_test["per_class"].items()}
  result = quality.measure(fake_logits, fake_features, fake_labels, real_features, train_ds.labels,
                   train_ds.class_names, recall, seed)
  result.update(vaegan_workdir=str(vaegan_workdir), vaegan_step=vae.step,
                classifier_workdir=str(classifier_workdir), mode=how["mode"], alpha=how["alpha"],
                residual=how["residual"],
                per_class_requested=per_class, seed=seed,
                real_classifier_test={k: judge_test[k] for k in
                                      ("accuracy", "mean_class_accuracy", "macro_f1")})

  steps = config.train.num_steps if cas_steps is None else int(cas_steps)
  if steps > 0:
    cas_config = classifier_kind.read_config(classifier_workdir)  # The same recipe.
    cas_config.train.num_steps = steps
    cas_config.train.eval_every = max(1, min(cas_config.train.eval_every, steps))
    cas_config.sampler.name = "instance"
    synthetic_ds = Dataset(fake, fake_labels, train_ds.class_names, "synthetic-faces", "train")
    summary = classifier.train_and_evaluate(cas_config, out / "cas_classifier",
                                            datasets=(synthetic_ds, val_ds))
    cas = runs.open_classifier(out / "cas_classifier", "best", mesh=mesh)
    cas_test = evaluate.evaluate_params(cas_config, cas.variables, test_ds,
                                        train_counts=judge.train_counts, mesh=mesh)
    result["cas"] = {k: cas_test[k] for k in ("accuracy", "mean_class_accuracy", "macro_f1")}
    result["cas"].update(steps=steps, best_step=summary["best_step"],
                         per_class_recall={n: v["recall"]
                                           for n, v in cas_test["per_class"].items()})
  (out / "synthetic_quality.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "synthetic_quality.md").write_text(quality.markdown(result))
  return result


def cli_main(args) -> int:
  if args.per_class < 4:
    raise UserError(f"--per-class: expected at least 4 (distances need several images), got "
                    f"{args.per_class}")
  if args.cas_steps is not None and args.cas_steps < 0:
    raise UserError(f"--cas-steps: expected >= 0, got {args.cas_steps}")
  result = evaluate_synthetic(args.vaegan, args.classifier, args.out, per_class=args.per_class,
                              cas_steps=args.cas_steps, seed=args.seed,
                              decode=getattr(args, "decode", None))
  print(quality.markdown(result), end="")
  print(f"-> {pathlib.Path(args.out) / 'synthetic_quality.json'}")
  return 0
