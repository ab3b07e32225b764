"""The `ferjax` command: one entry point, one verb per job.

Handlers live beside the code they drive and are imported lazily, so `ferjax --help` is quick.
A `UserError` ends in one line on stderr and exit code 2; anything else is a bug (exit 1).
"""

import argparse
import importlib
import os
import signal
import sys

from ferjax.core import interrupt
from ferjax.errors import Interrupted, UserError

EPILOG_CONFIG = ("Config fields are overridden with --config.FIELD=VALUE (typed by the field; "
                 "unknown fields and wrong types are errors).")
# The kinds of run, as `ferjax config show` names them (each kind module's KIND;
# tests/test_reference.py checks that they agree with ferjax.reference.KINDS).
CONFIG_KINDS = ("classifier", "semisup", "retrain-head", "vaegan", "pretrain")


class _Parser(argparse.ArgumentParser):
  """argparse, but a bad flag is one line (not usage + message) and exit code 2."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _verb(subparsers, name, handler, help_text, example, **kwargs):
  p = subparsers.add_parser(
      name, help=help_text, allow_abbrev=False, description=f"{help_text}\n\nexample:\n  {example}",
      formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
  p.set_defaults(handler=handler)
  return p


def _add_config_args(p, required=True):
  p.add_argument("--config", required=required, metavar="FILE",
                 help="Python config file defining get_config() (see experiments/configs/)")


def _add_distributed_args(p):
  g = p.add_argument_group("multi-host (optional; also read from JAX_COORDINATOR_ADDRESS etc.)")
  g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
  g.add_argument("--num-processes", type=int, default=None,
                 help="number of processes (one per host) in the job")
  g.add_argument("--process-id", type=int, default=None,
                 help="this process's index, 0..num-processes - 1")
  g.add_argument("--init-timeout", type=float, default=300, metavar="SECONDS",
                 help="give up (one line, exit 2) when the processes have not all joined by then "
                      "(default 300)")


def _add_dataset_args(p, help_text):
  p.add_argument("--dataset", default=None, metavar="NAME", help=f"{help_text}; one of "
                 "fer2013, ferplus, rafdb, affectnet, affectnet8, ckplus, synthetic, folder "
                 "(default: the run's own dataset)")
  p.add_argument("--data-dir", default=None,
                 help="where prepared datasets live (default: the run's data.data_dir, else "
                      "$FERJAX_DATA_DIR or ~/.ferjax/datasets)")
  p.add_argument("--manual-dir", default=None, metavar="DIR",
                 help="with --dataset folder: the folder holding <split>/<class>/*.png")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="ferjax", allow_abbrev=False,
      description="Long-tailed facial expression recognition in JAX: VAE-GAN semantic "
                  "augmentation, long-tail baselines, per-class evaluation.",
      epilog="Run `ferjax VERB --help` for each verb's options and an example.")
  parser.add_argument("--version", action="version", version=_version())
  verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

  # --- data ---------------------------------------------------------------------------------
  data = verbs.add_parser("data", help="prepare real datasets and show dataset statistics",
                          description="Prepare real datasets and show dataset statistics.")
  data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", parser_class=_Parser)
  p = _verb(data_verbs, "prepare", "ferjax.data.commands:prepare",
            "Prepare a real dataset once from its raw files into TFDS array_record form.",
            "ferjax data prepare fer2013 --manual-dir ~/downloads/fer2013")
  p.add_argument("name", help="fer2013, ferplus, rafdb, affectnet or ckplus")
  p.add_argument("--manual-dir", required=True, help="folder holding the raw files as downloaded")
  p.add_argument("--data-dir", default=None,
                 help="where prepared datasets live (default $FERJAX_DATA_DIR or "
                      "~/.ferjax/datasets)")
  p.add_argument("--force", action="store_true",
                 help="prepare again even when already prepared (the old data is replaced only "
                      "once the new is complete); without it an earlier preparation is reused")
  p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                 help="when another process is preparing the same dataset, wait up to SECONDS "
                      "for it (default 0: refuse at once, naming that process)")
  p = _verb(data_verbs, "stats", "ferjax.data.commands:stats",
            "Print per-split class counts and the imbalance ratio; write a class histogram PNG "
            "(and, for the synthetic set, a per-class sample grid).",
            "ferjax data stats synthetic --out runs/synthetic_stats")
  p.add_argument("name", help="synthetic, fer2013, ferplus, rafdb, affectnet or ckplus")
  p.add_argument("--split", default=None, help="one split only (default: all available)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.add_argument("--data-dir", default=None, help="where prepared datasets live")
  p.add_argument("--out", default=None,
                 help="folder for the PNGs (default: <data dir>/stats/<name>, the data dir being "
                      "--data-dir, $FERJAX_DATA_DIR or ~/.ferjax/datasets)")
  data.set_defaults(handler=None, group_parser=data)

  # --- configs ------------------------------------------------------------------------------
  config = verbs.add_parser(
      "config", help="show the config of a kind of run: each field's value, meaning and rule",
      description="Show the config of a kind of run: each field's value, meaning and allowed "
                  "values.\n\nexample:\n  ferjax config show classifier",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  config_verbs = config.add_subparsers(dest="config_verb", metavar="ACTION", parser_class=_Parser)
  p = _verb(config_verbs, "show", "ferjax.reference:show_main",
            "Print a config one field a line: its value, meaning and allowed values (and the "
            "default where the value differs). KIND alone: that kind's defaults; --config FILE: "
            "the config of the file and the --config.FIELD=VALUE overrides, read as KIND when "
            "given, else as the kind whose top-level groups the file's config has. Each field is "
            "checked against its rule; rules tying fields together are checked when a run "
            "starts.",
            "ferjax config show --config experiments/configs/classifier_synthetic_tiny.py "
            "--config.optim.lr=0.05", epilog=EPILOG_CONFIG)
  p.add_argument("kind", nargs="?", choices=CONFIG_KINDS, metavar="KIND",
                 help=f"{', '.join(CONFIG_KINDS[:-1])} or {CONFIG_KINDS[-1]} (default: the "
                      "kind of the --config file)")
  p.add_argument("--config", default=None, metavar="FILE",
                 help="Python config file defining get_config() (see experiments/configs/)")
  config.set_defaults(handler=None, group_parser=config)

  # --- training and evaluation ----------------------------------------------------------------
  p = _verb(verbs, "train-vaegan", "ferjax.train.vaegan:cli_main",
            "Train the VAE-GAN (encoder, generator, discriminator) on a dataset's train split; "
            "resumes from the workdir's latest checkpoint. --config.model.num_classes=K makes it "
            "class-conditional; --config.loss.classifier_workdir=RUN with "
            "loss.class_consistency_weight / loss.perceptual_weight trains the generator against "
            "a frozen classifier's judgement.",
            "ferjax train-vaegan --config experiments/configs/vaegan_synthetic_tiny.py "
            "--workdir runs/vaegan_tiny", epilog=EPILOG_CONFIG)
  _add_config_args(p)
  p.add_argument("--workdir", required=True, help="run folder: config.json, metrics.jsonl, "
                 "checkpoints/, PNG grids")
  _add_distributed_args(p)

  p = _verb(verbs, "pretrain", "ferjax.train.pretrain:cli_main",
            "Pre-train a ViT encoder as a masked autoencoder (MAE) on unlabeled faces (the "
            "synthetic set, prepared datasets with labels ignored, folders of images); resumes "
            "from the workdir's latest checkpoint. A classifier starts from it with "
            "--config.model.init_from=WORKDIR.",
            "ferjax pretrain --config experiments/configs/pretrain_synthetic_tiny.py "
            "--workdir runs/pretrain_tiny", epilog=EPILOG_CONFIG)
  _add_config_args(p)
  p.add_argument("--workdir", required=True, help="run folder: config.json, metrics.jsonl, "
                 "checkpoints/, reconstruction grids")
  _add_distributed_args(p)

  p = _verb(verbs, "train", "ferjax.train.classifier:cli_main",
            "Train a classifier (ResNet or ViT, long-tail losses and samplers, optional semantic "
            "augmentation); keeps the last checkpoints and the best one on the validation split.",
            "ferjax train --config experiments/configs/classifier_synthetic_tiny.py "
            "--workdir runs/classifier_tiny", epilog=EPILOG_CONFIG)
  _add_config_args(p)
  p.add_argument("--workdir", required=True, help="run folder: config.json, metrics.jsonl, "
                 "checkpoints/, curves")
  _add_distributed_args(p)

  p = _verb(verbs, "train-semisup", "ferjax.train.semisup:cli_main",
            "Train a classifier semi-supervised (FixMatch with an EMA teacher, optionally "
            "FlexMatch thresholds): data.label_fraction of train keeps its labels, the rest is an "
            "unlabeled pool; resumes from the workdir's latest checkpoint; evaluate it with "
            "ferjax evaluate (the teacher's weights).",
            "ferjax train-semisup --config experiments/configs/semisup_synthetic_tiny.py "
            "--workdir runs/semisup_tiny", epilog=EPILOG_CONFIG)
  _add_config_args(p)
  p.add_argument("--workdir", required=True, help="run folder: config.json, metrics.jsonl, "
                 "checkpoints/, curves")
  _add_distributed_args(p)

  p = _verb(verbs, "evaluate", "ferjax.evaluate:cli_main",
            "Evaluate a trained classifier's checkpoint on a split of its dataset or, with "
            "--dataset, of another one (classes matched by emotion name): writes eval_<tag>.json "
            "(accuracy, mean class accuracy, macro-F1, per-class, confusion, head/medium/tail; "
            "the tag names the split, dataset and settings) and a confusion-matrix PNG. No "
            "retraining needed to change --tta, --logit-adjust or --tau-norm.",
            "ferjax evaluate --workdir runs/classifier_tiny --split test --logit-adjust 1.0")
  p.add_argument("--workdir", required=True, help="a `ferjax train` run folder")
  p.add_argument("--split", default="test", help="split to evaluate (default: test)")
  p.add_argument("--checkpoint", default="best", help="best (on validation), last, or a step")
  p.add_argument("--tta", default="none", choices=("none", "flip"), help="test-time augmentation")
  p.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                 help="post-hoc logit adjustment: subtract TAU * log(train class prior)")
  p.add_argument("--tau-norm", type=float, default=0.0, metavar="TAU",
                 help="tau-normalised classifier (Kang et al. 2020): each class weight divided by "
                      "its norm^TAU, bias dropped (0: off; 1: unit-norm class weights)")
  p.add_argument("--features", action="store_true",
                 help="also write penultimate-layer features to features_<tag>.npz")
  _add_dataset_args(p, "score another dataset (cross-dataset evaluation): classes matched by "
                       "canonical emotion name, images converted to the run's size and channels")
  p.add_argument("--all-classes", action="store_true",
                 help="cross-dataset: take the argmax over all the model's classes (default: "
                      "only the classes the two datasets share)")
  _add_distributed_args(p)

  p = _verb(verbs, "features", "ferjax.features:features_main",
            "Write a trained classifier's penultimate features, logits, labels and ids (file, "
            "subject and fold where the dataset has them) of one split of any dataset to an "
            ".npz file, for linear probes (`ferjax probe`).",
            "ferjax features --workdir runs/fer2013 --dataset ckplus --split all "
            "--out runs/ckplus_features.npz")
  p.add_argument("--workdir", required=True, help="a `ferjax train` run folder")
  p.add_argument("--out", required=True, metavar="FILE", help=".npz file to write (must not "
                 "exist)")
  p.add_argument("--split", default="test", help="split to read (default: test)")
  p.add_argument("--checkpoint", default="best", help="best (on validation), last, or a step")
  p.add_argument("--tta", default="none", choices=("none", "flip"), help="test-time augmentation")
  _add_dataset_args(p, "read another dataset's split (every class it has, labels in its own "
                       "class list)")

  p = _verb(verbs, "retrain-head", "ferjax.train.retrain_head:cli_main",
            "Re-train a finished classifier's head on its frozen backbone's penultimate features "
            "(cRT: class-balanced batches by default), optionally with synthetic minority-class "
            "features from a small VAE trained on those features (--config.synth.mode=feature) "
            "or the features of a VAE-GAN's synthetic faces (--config.synth.mode=pixel "
            "--config.synth.vaegan_workdir=DIR); writes a new classifier workdir that evaluate, "
            "predict and export use unchanged.",
            "ferjax retrain-head --workdir runs/classifier_tiny --out runs/classifier_tiny_crt "
            "--config.synth.mode=feature",
            epilog=EPILOG_CONFIG + " Without --config, the stage's defaults "
                                   "(ferjax.kinds.retrain_head).")
  p.add_argument("--workdir", required=True, metavar="RUN",
                 help="a finished `ferjax train` run folder (its backbone is kept)")
  p.add_argument("--out", required=True, metavar="NEWRUN",
                 help="new run folder to write (must not exist)")
  _add_config_args(p, required=False)

  p = _verb(verbs, "probe", "ferjax.probe:cli_main",
            "Linear probe on frozen features (files from `ferjax features`): multinomial "
            "logistic regression, L2 chosen by cross-validation on the training part; k-fold "
            "(subject-disjoint where subjects are known) or train/test evaluation; mean ± std "
            "over folds of accuracy, mean class accuracy and macro-F1.",
            "ferjax probe --train runs/ckplus_features.npz --folds fold "
            "--out runs/ckplus_probe.json")
  p.add_argument("--train", required=True, metavar="FILE",
                 help="features .npz (from `ferjax features`) to fit on")
  p.add_argument("--test", metavar="FILE", help="features .npz to score (same class names); "
                 "without it, --folds cross-validates --train")
  p.add_argument("--folds", metavar="fold|K",
                 help="'fold': the file's own fold ids (CK+'s 10 subject-disjoint folds); K: K "
                      "folds stratified by label, grouped by subject where known")
  p.add_argument("--l2", type=float, default=None, help="fixed L2 weight (default: chosen by "
                 "inner cross-validation over 1e-6..1e1)")
  p.add_argument("--seed", type=int, default=0, help="seed of the folds (default 0)")
  p.add_argument("--allow-other-run", action="store_true",
                 help="with --test: accept features written by another run (or checkpoint) "
                      "than --train's, for a deliberate transfer (default: refuse)")
  p.add_argument("--out", metavar="FILE",
                 help="write the result here (JSON) and FILE_confusion.png beside it (not an "
                      "input; an existing file only if an earlier probe wrote it)")

  p = _verb(verbs, "import-weights", "ferjax.models.import_weights:cli_main",
            "Convert a pretrained torchvision/timm ResNet state dict (.safetensors; .pth/.pt "
            "when torch is installed) into a weights folder for model.init_from.",
            "ferjax import-weights resnet18.safetensors --arch resnet18 --out weights/resnet18")
  p.add_argument("file", help="the state dict: .safetensors, or .pth/.pt when torch is installed")
  p.add_argument("--arch", required=True, metavar="NAME",
                 help="the file's ResNet: resnet10, resnet18, resnet34 or resnet50")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="new folder to write (weights.npz, import.json); must not exist")
  p.add_argument("--channels", type=int, default=3, choices=(1, 3),
                 help="input channels of the model to start (default 3; 1: the RGB filters of "
                      "the first conv are summed for gray input)")
  p.add_argument("--stem", default="standard", choices=("small", "standard"),
                 help="ferjax stem (default standard: torchvision's 7x7/2 conv + max-pool; small "
                      "takes only files whose conv1 is 3x3)")
  p.add_argument("--num-classes", type=int, default=None, metavar="K",
                 help="classes of the model to start: the file's head is kept only when it has K "
                      "classes (default: keep it whatever its size)")

  p = _verb(verbs, "export", "ferjax.export:cli_export",
            "Export a trained classifier's checkpoint to one file (jax.export, weights included) "
            "that `ferjax predict --model FILE` and ferjax.export.load_exported run without "
            "the run's config or checkpoints.",
            "ferjax export --workdir runs/classifier_tiny --out classifier_tiny.ferjax")
  p.add_argument("--workdir", required=True, help="a `ferjax train` run folder")
  p.add_argument("--out", required=True, metavar="FILE", help="file to write (must not exist)")
  p.add_argument("--checkpoint", default="best", help="best (on validation), last, or a step")

  p = _verb(verbs, "synthesize", "ferjax.synthesize:cli_main",
            "Export a balanced synthetic set from a trained VAE-GAN: N faces per class made by "
            "perturbing the latents of real seed images of that class, written as a folder "
            "dataset (<out>/train/<class>/*.png, loadable with ferjax.data.load) plus a per-class "
            "grid PNG.",
            "ferjax synthesize --vaegan runs/demo/vaegan --per-class 200 "
            "--out runs/synthetic_faces",
            epilog=EPILOG_CONFIG + " Without --config, the seeds come from the VAE-GAN's own "
            "dataset and the perturbation is the classifier default (augment.mode, .alpha).")
  p.add_argument("--vaegan", required=True, metavar="DIR", help="a `ferjax train-vaegan` workdir")
  p.add_argument("--per-class", type=int, required=True, metavar="N",
                 help="synthetic faces per class")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
  _add_config_args(p, required=False)
  p.add_argument("--seed", type=int, default=0, help="random seed of seeds and noise")

  p = _verb(verbs, "evaluate-synthetic", "ferjax.evaluate_synthetic:cli_main",
            "Measure synthetic faces against real ones with a classifier trained on real data: "
            "class consistency, per-class Frechet distance and diversity of its penultimate "
            "features, and the classification accuracy score (a classifier trained on synthetic "
            "faces only, tested on the real test split). Writes synthetic_quality.json.",
            "ferjax evaluate-synthetic --vaegan runs/demo/vaegan --classifier runs/demo/baseline "
            "--per-class 200 --out runs/quality")
  p.add_argument("--vaegan", required=True, metavar="DIR", help="a `ferjax train-vaegan` workdir")
  p.add_argument("--classifier", required=True, metavar="DIR",
                 help="a `ferjax train` workdir trained on real data (no semantic augmentation)")
  p.add_argument("--per-class", type=int, default=200, metavar="N",
                 help="synthetic faces per class (default 200)")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder")
  p.add_argument("--cas-steps", type=int, default=None, metavar="N",
                 help="train steps of the synthetic-only classifier (default: the real "
                      "classifier's; 0 skips the accuracy score)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--decode", choices=("full", "residual"), default=None,
                 help="full: the generator's own decodings G(z'); residual: seed + G(z') - "
                      "G(mu) (default: the classifier config's augment.decode)")

  p = _verb(verbs, "demo", "ferjax.demo:cli_main",
            "The main job, no download: synthetic long-tailed faces, a small VAE-GAN, a baseline, "
            "logit adjustment and semantic augmentation in pixels and in feature space (the one "
            "chosen on validation reported beside the other two), all tested; writes report.md "
            "(about 8 minutes on an idle 2-core CPU; finished stages are reused when run again).",
            "ferjax demo --workdir runs/demo")
  p.add_argument("--workdir", default="runs/demo", help="output folder (default runs/demo)")
  p.add_argument("--quick", action="store_true",
                 help="a few steps per stage, to check the pipeline (about 1 minute; the numbers "
                      "mean nothing)")
  p.add_argument("--seed", type=int, default=0)

  p = _verb(verbs, "bench", "ferjax.bench:cli_main",
            "Measure throughput (images/s after warm-up, median of repeats) of a train step, the "
            "augmentation sampler or evaluation; one JSON line per measurement.",
            "ferjax bench classifier --config.model.name=resnet18 --config.model.stem=small "
            "--config.data.image_size=48 --config.data.channels=1 --batch 64",
            epilog=EPILOG_CONFIG + " Without --config, the trainer's default config is measured.")
  p.add_argument("what", choices=("classifier", "vaegan", "pretrain", "sampler", "evaluate",
                                  "predict"))
  _add_config_args(p, required=False)
  p.add_argument("--batch", type=int, default=None, help="global batch size (default: config's; "
                 "predict: photos per pass, default 64)")
  p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 20; "
                 "predict: passes over the photos, default 1)")

  p = _verb(verbs, "predict", "ferjax.predict:cli_main",
            "Predict the expression of every face in some images (files, folders, glob "
            "patterns): faces found by OpenCV's Haar cascade (or given by --boxes, or "
            "--whole-image), one JSON or CSV row per face; --out adds annotated copies and a "
            "contact sheet.",
            "ferjax predict --workdir runs/demo/baseline photos/ --out runs/predicted")
  p.add_argument("paths", nargs="*", metavar="PATH",
                 help="image files, folders (searched recursively) or quoted glob patterns")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", metavar="RUN", help="a `ferjax train` run folder")
  source.add_argument("--model", metavar="FILE", help="a file written by `ferjax export`")
  p.add_argument("--checkpoint", default=None,
                 help="with --workdir: best (on validation, the default), last, or a step")
  faces = p.add_mutually_exclusive_group()
  faces.add_argument("--boxes", metavar="CSV",
                     help="face boxes instead of detection: a CSV with header file,x,y,w,h (file "
                          "relative to the CSV's folder); the images are those it names")
  faces.add_argument("--whole-image", action="store_true",
                     help="each image is one aligned face crop (no detection)")
  p.add_argument("--margin", type=float, default=0.2, metavar="FRACTION",
                 help="context added on each side of a box, as a fraction of its size "
                      "(default 0.2)")
  p.add_argument("--tta", default="none", choices=("none", "flip"), help="test-time augmentation")
  p.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                 help="post-hoc logit adjustment: subtract TAU * log(train class prior)")
  p.add_argument("--format", default="jsonl", choices=("jsonl", "csv"),
                 help="row format (default jsonl)")
  p.add_argument("--output", metavar="FILE", help="write the rows here (default: stdout)")
  p.add_argument("--out", metavar="DIR",
                 help="also write annotated copies of the images and faces.png, a contact sheet")
  return parser


def _version() -> str:
  from ferjax import __version__
  return f"ferjax {__version__}"


def _run_handler(spec: str, args) -> int:
  module_name, func_name = spec.split(":")
  handler = getattr(importlib.import_module(module_name), func_name)
  return handler(args) or 0


def main(argv=None) -> int:
  # First: a signal at any later moment (the imports included) ends in one line and 130 or 143.
  previous_handlers = interrupt.install()
  try:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
      raise UserError(f"ferjax: unrecognized arguments: {' '.join(unknown)} (see ferjax --help)")
    if args.overrides and not hasattr(args, "config"):
      raise UserError(f"ferjax {args.verb}: takes no --config overrides")
    if args.verb is None:
      parser.print_help()
      return 2
    if getattr(args, "handler", None) is None:
      args.group_parser.print_help()
      return 2
    if hasattr(args, "coordinator_address"):
      from ferjax.core import parallel
      parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                      args.process_id, args.init_timeout)
    code = _run_handler(args.handler, args)
    interrupt.check()  # A signal whose exception a library swallowed still stops with the line.
    return code
  except Interrupted as e:  # Stopped on a signal after saving (ferjax.core.interrupt).
    print(f"ferjax: interrupted: {e}", file=sys.stderr)
    return e.exit_code
  except BaseException as e:  # A signal may surface as any exception (inside an import...).
    signum = interrupt.received()
    if signum is None and isinstance(e, KeyboardInterrupt):
      signum = signal.SIGINT
    if signum is not None:
      print(f"ferjax: interrupted: {interrupt.stopped_message(signum)}", file=sys.stderr)
      if argv is None:
        # This process's own command: end it here, as work the signal cut short (e.g. an XLA
        # compile) can crash the interpreter's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)
      return 128 + signum
    if isinstance(e, UserError):
      print(f"ferjax: error: {e}", file=sys.stderr)
      return 2
    raise
  finally:
    interrupt.uninstall(previous_handlers)


if __name__ == "__main__":
  sys.exit(main())
