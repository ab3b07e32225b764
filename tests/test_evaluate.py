"""Evaluation: metrics against hand-computed confusion matrices, padding, and `ferjax evaluate`."""

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ferjax import evaluate
from ferjax.data import Dataset, pipeline, splits
from ferjax.errors import UserError
from ferjax.models import resnet
from ferjax import bench, runs
from ferjax.core import parallel
from ferjax.kinds import classifier as classifier_kind
from ferjax.train import classifier

NAMES = ("a", "b", "c", "d", "e", "f", "g")


def stand_in_load(name, split, *, image_size=32, channels=1, **unused):
  """Long-tailed 7-class set whose class is the image's brightness (as in test_classifier)."""
  counts = {"train": [120, 80, 50, 30, 20, 12, 8], "validation": [10] * 7, "test": [13] * 7}[split]
  rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[split])
  labels = rng.permutation(np.repeat(np.arange(7), counts)).astype(np.int32)
  level = (labels + 0.5) / 7 * 255
  noise = rng.normal(0, 20, (len(labels), image_size, image_size, channels))
  images = np.clip(level[:, None, None, None] + noise, 0, 255).astype(np.uint8)
  return Dataset(images, labels, NAMES, name, split)


def tiny_config():
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.image_size = 32
  config.optim.warmup_steps = 1
  config.train.update(num_steps=4, batch_size=16, log_every=2, eval_every=2, checkpoint_every=2)
  config.eval.batch_size = 32  # 91 test images: the last batch is padded with 5 rows
  return config


# --- Metrics -----------------------------------------------------------------------------------
# Rows = true class. Class 1 has no support but is predicted once; class 3 is never predicted.
CONFUSION = np.array([[3, 1, 0, 0],
                      [0, 0, 0, 0],
                      [1, 0, 2, 0],
                      [1, 0, 1, 0]])


def test_confusion_matrix_counts_rows_true_columns_predicted():
  labels = [0, 0, 0, 0, 2, 2, 2, 3, 3]
  preds = [0, 0, 0, 1, 0, 2, 2, 0, 2]
  np.testing.assert_array_equal(evaluate.confusion_matrix(labels, preds, 4), CONFUSION)


def test_metrics_from_a_hand_computed_confusion_matrix():
  m = evaluate.metrics_from_confusion(CONFUSION, train_counts=[100, 50, 10, 5],
                                      class_names=["w", "x", "y", "z"])
  assert m["accuracy"] == pytest.approx(5 / 9)
  # Mean over the classes with support (w, y, z): (3/4 + 2/3 + 0) / 3.
  assert m["mean_class_accuracy"] == pytest.approx((0.75 + 2 / 3 + 0) / 3)
  pc = m["per_class"]
  assert pc["w"] == pytest.approx({"recall": 0.75, "precision": 0.6, "f1": 2 / 3, "support": 4})
  # No support: recall 0; predicted once, never right: precision 0.
  assert pc["x"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 0}
  assert pc["y"] == pytest.approx({"recall": 2 / 3, "precision": 2 / 3, "f1": 2 / 3, "support": 3})
  # Never predicted: precision 0 by definition, F1 0.
  assert pc["z"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 2}
  assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
  assert m["confusion"] == CONFUSION.tolist() and m["num_examples"] == 9
  # Thirds by training count: [w, x], [y], [z]; x has no support, so head is w's recall alone.
  assert m["groups"]["head"] == {"mean_recall": 0.75, "classes": ["w", "x"]}
  assert m["groups"]["medium"]["mean_recall"] == pytest.approx(2 / 3)
  assert m["groups"]["tail"] == {"mean_recall": 0.0, "classes": ["z"]}


def test_perfect_and_empty_matrices():
  m = evaluate.metrics_from_confusion(np.diag([5, 3, 1]))
  assert m["accuracy"] == m["mean_class_accuracy"] == m["macro_f1"] == 1.0
  assert "groups" not in m
  empty = evaluate.metrics_from_confusion(np.zeros((3, 3), int))
  assert empty["accuracy"] == empty["mean_class_accuracy"] == 0.0


def test_groups_are_thirds_by_training_count():
  groups = evaluate.class_groups([50, 400, 10, 200, 5, 100, 30])
  assert groups == {"head": [1, 3, 5], "medium": [0, 6], "tail": [2, 4]}


# --- Batched prediction ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained():
  """(config, model, mesh, variables) of a freshly initialised tiny ResNet on 8 devices."""
  config = tiny_config()
  model = resnet.model_from_config(config.model, 7)
  tx, _ = classifier_kind.make_optimizer(config, 4)
  mesh = parallel.make_mesh()
  variables = classifier_kind.eval_variables(classifier_kind.init_state(config, model, tx, mesh))
  return config, model, mesh, variables


def test_padding_is_not_counted_and_matches_unbatched_prediction(untrained):
  config, model, mesh, variables = untrained
  data = stand_in_load("synthetic", "test")  # 91 examples: 2 full batches of 32 and one padded
  logits, features = evaluate.predict_logits(model, variables, data.images, batch_size=32,
                                             mesh=mesh, return_features=True)
  assert logits.shape == (91, 7) and features.shape == (91, resnet.stage_widths(0.125)[-1])
  direct, _ = jax.jit(lambda v, x: model.apply(v, pipeline.to_float(x), train=False))(
      jax.device_get(variables), data.images[:40])
  np.testing.assert_allclose(logits[:40], direct, rtol=1e-4, atol=1e-4)
  result = evaluate.evaluate_params(config, variables, data, mesh=mesh, model=model)
  assert result["num_examples"] == 91 and np.sum(result["confusion"]) == 91


def test_flip_tta_is_invariant_to_mirroring_the_input(untrained):
  _, model, mesh, variables = untrained
  images = stand_in_load("synthetic", "validation").images[:16]
  a = evaluate.predict_logits(model, variables, images, batch_size=16, mesh=mesh, tta="flip")
  b = evaluate.predict_logits(model, variables, images[:, :, ::-1], batch_size=16, mesh=mesh,
                              tta="flip")
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_posthoc_adjustment_is_applied_to_precomputed_logits():
  config = tiny_config()
  data = stand_in_load("synthetic", "validation")
  counts = np.array([120, 80, 50, 30, 20, 12, 8])
  logits = np.zeros((len(data), 7), np.float32)  # no evidence: the prior decides
  plain = evaluate.evaluate_params(config, None, data, logits=logits, train_counts=counts)
  adjusted = evaluate.evaluate_params(config, None, data, logits=logits, train_counts=counts,
                                      logit_adjust=1.0)
  assert plain["per_class"]["a"]["recall"] == 1.0  # argmax of ties: class 0
  assert adjusted["per_class"]["g"]["recall"] == 1.0  # rarest class after subtracting log prior
  assert adjusted["logit_adjust"] == 1.0


# --- tau-normalisation (Kang et al. 2020) ------------------------------------------------------
def _with_bias(variables, value=0.5):
  """The variables with a non-zero head bias, so dropping it shows in the logits."""
  params = jax.device_get(variables["params"])
  head = {**params["head"], "bias": np.full_like(params["head"]["bias"], value)}
  return {**variables, "params": {**params, "head": head}}


def test_tau_zero_leaves_the_head_and_the_logits_unchanged(untrained):
  _, model, mesh, variables = untrained
  variables = _with_bias(variables)
  assert evaluate.tau_normalize(variables, 0.0) is variables
  images = stand_in_load("synthetic", "validation").images[:16]
  np.testing.assert_array_equal(
      evaluate.predict_logits(model, evaluate.tau_normalize(variables, 0.0), images,
                              batch_size=16, mesh=mesh),
      evaluate.predict_logits(model, variables, images, batch_size=16, mesh=mesh))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_tau_norm_divides_each_class_weight_by_its_norm_to_the_tau_and_drops_the_bias(untrained,
                                                                                      tau):
  """logits = features @ (w_k / ||w_k||^tau)_k, no bias: the reference's pnorm (rows of the
  torch [K, D] weight, columns of the flax [D, K] kernel) + dotproduct_similarity."""
  _, model, mesh, variables = untrained
  variables = _with_bias(variables)
  kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)  # [D, K]
  normalized = evaluate.tau_normalize(variables, tau)
  new_kernel = np.asarray(normalized["params"]["head"]["kernel"], np.float64)
  np.testing.assert_allclose(new_kernel, kernel / np.linalg.norm(kernel, axis=0) ** tau,
                             rtol=1e-5)
  if tau == 1.0:  # Every class weight unit-norm.
    np.testing.assert_allclose(np.linalg.norm(new_kernel, axis=0), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(normalized["params"]["head"]["bias"], 0.0)
  # Everything but the head is untouched.
  assert normalized["batch_stats"] is variables["batch_stats"]
  assert normalized["params"]["stem_conv"] is variables["params"]["stem_conv"]
  images = stand_in_load("synthetic", "validation").images[:16]
  logits, features = evaluate.predict_logits(model, normalized, images, batch_size=16, mesh=mesh,
                                             return_features=True)
  np.testing.assert_allclose(logits, features @ (kernel / np.linalg.norm(kernel, axis=0) ** tau),
                             rtol=1e-4, atol=1e-5)


def test_output_tag_names_tau_norm():
  assert evaluate.output_tag("test") == "test"
  assert evaluate.output_tag("test", tau_norm=0.0) == "test"
  assert evaluate.output_tag("test", tau_norm=1.0) == "test_taunorm-1"
  assert evaluate.output_tag("test", tau_norm=0.25) == "test_taunorm-0.25"
  assert (evaluate.output_tag("test", tta="flip", logit_adjust=1.0, tau_norm=0.5)
          == "test_tta-flip_tau-1_taunorm-0.5")


# --- ferjax evaluate ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  patch = pytest.MonkeyPatch()
  patch.setattr(splits, "load", stand_in_load)
  path = tmp_path_factory.mktemp("eval_run")
  try:
    classifier.train_and_evaluate(tiny_config(), path)
    yield path
  finally:
    patch.undo()


def _args(workdir, **kwargs):
  defaults = dict(workdir=str(workdir), split="test", checkpoint="best", tta=None,
                  logit_adjust=0.0, features=False)
  defaults.update(kwargs)
  return argparse.Namespace(**defaults)


def test_evaluate_writes_every_field(workdir):
  assert evaluate.cli_main(_args(workdir)) == 0
  result = json.loads((workdir / "eval_test.json").read_text())
  for field in ("accuracy", "mean_class_accuracy", "macro_f1", "per_class", "confusion", "groups",
                "step", "checkpoint", "tta", "logit_adjust", "split"):
    assert field in result, field
  assert np.sum(result["confusion"]) == 91  # 91 test images; the 5 padded rows are not counted
  assert set(result["per_class"]) == set(NAMES)
  assert set(result["per_class"]["a"]) == {"recall", "precision", "f1", "support"}
  assert result["groups"]["head"]["classes"] == ["a", "b", "c"]
  assert result["checkpoint"] == "best" and result["tta"] == "none"
  assert (workdir / "confusion_test.png").is_file()


def test_evaluate_options_need_no_retraining(workdir):
  evaluate.cli_main(_args(workdir, checkpoint="last", tta="flip", logit_adjust=1.0, features=True))
  # Each setting is in the file names: nothing overwrites an evaluation made with others.
  tag = "test_ckpt-last_tta-flip_tau-1"
  result = json.loads((workdir / f"eval_{tag}.json").read_text())
  assert result["step"] == 4 and result["tta"] == "flip" and result["logit_adjust"] == 1.0
  assert result["file"] == f"eval_{tag}.json" and (workdir / f"confusion_{tag}.png").is_file()
  assert json.loads((workdir / "eval_test.json").read_text())["tta"] == "none"  # Kept.
  with np.load(workdir / f"features_{tag}.npz", allow_pickle=False) as npz:
    assert npz["features"].shape == (91, resnet.stage_widths(0.125)[-1])
    assert npz["labels"].shape == (91,)
  evaluate.cli_main(_args(workdir, split="val", checkpoint="2"))
  assert json.loads((workdir / "eval_val_ckpt-2.json").read_text())["step"] == 2


def test_evaluate_tau_norm_from_the_finished_run(workdir):
  """Post-hoc: the stored weights are untouched, each tau has its own file."""
  plain = evaluate.evaluate_run(workdir, "test", write=False, features=True)
  assert plain["tau_norm"] == 0.0
  evaluate.cli_main(_args(workdir, tau_norm=1.0))
  result = json.loads((workdir / "eval_test_taunorm-1.json").read_text())
  assert result["tau_norm"] == 1.0 and result["file"] == "eval_test_taunorm-1.json"
  assert (workdir / "confusion_test_taunorm-1.png").is_file()
  normed = evaluate.evaluate_run(workdir, "test", write=False, features=True, tau_norm=1.0)
  kernel = np.asarray(jax.device_get(runs.open_classifier(workdir).variables)["params"]["head"][
      "kernel"])
  np.testing.assert_allclose(normed["features"], plain["features"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(normed["logits"],
                             plain["features"] @ (kernel / np.linalg.norm(kernel, axis=0)),
                             rtol=1e-4, atol=1e-5)
  assert normed["confusion"] == result["confusion"]
  for bad in (-0.5, float("nan"), float("inf")):
    with pytest.raises(UserError, match="--tau-norm: expected a finite number >= 0"):
      evaluate.cli_main(_args(workdir, tau_norm=bad))


def test_evaluate_user_errors(workdir, tmp_path):
  with pytest.raises(UserError, match="--tta"):
    evaluate.cli_main(_args(workdir, tta="ten_crop"))
  with pytest.raises(UserError, match="no checkpoint at step 3"):
    evaluate.cli_main(_args(workdir, checkpoint="3"))
  with pytest.raises(UserError, match="config.json"):
    evaluate.cli_main(_args(tmp_path))


@pytest.mark.slow
def test_bench_records_train_and_eval_throughput():
  config = tiny_config()
  config.train.num_devices = 1
  records = bench.bench_classifier(config, batch_size=8, steps=1)
  assert [r["what"] for r in records] == ["classifier", "evaluate"]
  for r in records:
    assert r["batch"] == 8 and r["images_per_s"] > 0 and r["model"] == "resnet10"
  # FLOPs from the lowered program (the compiled GPU module hides cuDNN convolutions): a train
  # step (forward + backward) costs at least twice an evaluation's forward pass.
  train, evaluation = records
  assert evaluation["flops_per_image"] > 0
  forward = evaluation["flops_per_image"] / (2 if config.eval.tta == "flip" else 1)
  assert train["flops_per_image"] > 2 * forward


@pytest.mark.slow
def test_the_plain_reference_that_the_cpu_bench_compares_with_runs_and_reports():
  """experiments/reference_resnet18.py: a JSON line like `ferjax bench`; without torch, the
  PyTorch mode ends in one line with exit code 2."""
  script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "reference_resnet18.py"
  result = subprocess.run([sys.executable, str(script), "--size", "16", "--batch", "4",
                           "--steps", "1", "--repeats", "1"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  record = json.loads(result.stdout.splitlines()[-1])
  assert record["what"] == "reference_flax" and record["images_per_s"] > 0
  assert (record["batch"], record["image_size"], record["stem"]) == (4, 16, "small")
  if importlib.util.find_spec("torch") is None:
    result = subprocess.run([sys.executable, str(script), "--framework", "torch"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --framework torch needs torch (pip install torch); it is not a ferjax dependency"]


def test_report_tables_recompute_mean_and_sample_spread_and_omit_spread_of_one_run():
  from ferjax import report
  names = ["a", "b"]
  run1 = evaluate.metrics_from_confusion([[8, 2], [1, 9]], [10, 2], names)  # 85% / 85%
  run2 = evaluate.metrics_from_confusion([[6, 4], [5, 5]], [10, 2], names)  # 55% / 55%
  summary = report.summarize({"two": [run1, run2], "one": [run1]})
  mean, std = summary["two"]["accuracy"]
  assert mean == pytest.approx(70.0) and std == pytest.approx(np.std([85, 55], ddof=1))
  assert summary["one"]["accuracy"] == (pytest.approx(85.0), None)
  table = report.markdown_table(summary)
  assert "| two | 2 | 70.00 ± 21.21 |" in table
  assert "| one | 1 | 85.00 |" in table  # One seed has no spread: none is printed.
  assert "| one | 80.00 | 90.00 |" in report.recall_table(summary)  # Recall 8/10 and 9/10.
