"""ferjax.api's own paths: configs from kinds or files, checked arrays for probes and crops,
and `compare` reusing, resuming or refusing the runs in its folder (docs/python.md runs the
rest end to end: tests/test_python_docs.py)."""

import json

import numpy as np
import pytest

from ferjax import api, configs, runs
from ferjax.errors import UserError

CLASSES = ("angry", "happy", "sad")


# --- Configs ----------------------------------------------------------------------------------
def test_make_config_from_a_kind_with_overrides_in_every_form():
  assert api.make_config("classifier", {"optim.lr": 0.5, "model.name": "resnet10"}).optim.lr == 0.5
  assert api.make_config("classifier", ["config.optim.lr=0.5"]).optim.lr == 0.5
  assert api.make_config("classifier", "train.num_steps=7").train.num_steps == 7
  assert api.make_config("vaegan", {"model.widths": (4, 8)}).model.widths == (4, 8)
  assert api.make_config("classifier", {"data.val_split": None}).data.val_split is None


def test_make_config_from_a_file(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text("from ferjax.kinds import classifier\n\n\ndef get_config():\n"
                  "  config = classifier.default_config()\n  config.train.num_steps = 3\n"
                  "  return config\n")
  config = api.make_config(path, {"train.batch_size": 8})
  assert (config.train.num_steps, config.train.batch_size) == (3, 8)


@pytest.mark.parametrize("file_or_kind, overrides, needle", [
    ("classifer", (), "expected a kind of run (classifier, semisup, vaegan, pretrain)"),
    ("missing.py", (), "config file missing.py not found"),
    ("classifier", {"optim.lrr": 1}, "optim has no field 'lrr'"),
    ("classifier", {"train.num_steps": 2.5}, "config field 'train.num_steps': expected int"),
])
def test_make_config_refuses_in_one_line(file_or_kind, overrides, needle):
  with pytest.raises(UserError) as error:
    api.make_config(file_or_kind, overrides)
  assert needle in str(error.value)


def test_train_refuses_an_unknown_kind(tmp_path):
  with pytest.raises(UserError, match="kind 'gan': expected one of classifier"):
    api.train(api.make_config(), tmp_path / "run", kind="gan")


# --- Probes and crops -------------------------------------------------------------------------
def _separable(n_per_class: int, seed: int):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
  features = np.eye(len(CLASSES), 5)[labels] * 10 + rng.normal(0, 0.1, (len(labels), 5))
  return features.astype(np.float32), labels


def test_linear_probe_separates_separable_features():
  x, y = _separable(8, 0)
  x_test, y_test = _separable(4, 1)
  result = api.linear_probe(x, y, x_test, y_test, class_names=CLASSES, l2=1e-3)
  assert result["mean_class_accuracy"] == result["accuracy"] == 1.0
  assert (result["l2"], result["num_train"], result["num_test"]) == (1e-3, 24, 12)
  unnamed = api.linear_probe(x, y, x_test, y_test, l2=1e-3)  # Classes 0..2 from the labels.
  assert unnamed["confusion"] == result["confusion"]


@pytest.mark.parametrize("change, needle", [
    (lambda x, y, xt, yt: (x[:, :4], y, xt, yt), "test features are 5-d, train features 4-d"),
    (lambda x, y, xt, yt: (x, y[:-1], xt, yt), "train: expected features [N, D] and labels [N]"),
    (lambda x, y, xt, yt: (x, y, xt, yt + 3), "test: expected integer labels in 0..2"),
    (lambda x, y, xt, yt: (x * np.nan, y, xt, yt), "train: features hold NaN"),
])
def test_linear_probe_refuses_bad_arrays(change, needle):
  x, y = _separable(4, 0)
  with pytest.raises(UserError) as error:
    api.linear_probe(*change(x, y, x.copy(), y.copy()), class_names=CLASSES, l2=1.0)
  assert needle in str(error.value)


def test_crops_at_the_run_size_pass_and_others_are_converted():
  ready = np.zeros((2, 8, 8, 1), np.uint8)
  assert api.as_crops(ready, 8, 1) is ready
  converted = api.as_crops([np.full((20, 12, 3), 200, np.uint8)], 8, 1)
  assert converted.shape == (1, 8, 8, 1) and converted.dtype == np.uint8
  assert (converted == 200).all()


def test_open_run_features_and_predict_on_the_shared_runs(tiny_runs):
  run = api.open_run(tiny_runs.classifier)
  assert isinstance(run, runs.ClassifierRun)
  assert api.open_run(tiny_runs.classifier, checkpoint="last").step == 4
  assert isinstance(api.open_run(tiny_runs.vaegan), runs.VAEGANRun)
  assert api.extract_features(run, np.zeros((3, 50, 40), np.uint8)).shape[0] == 3
  predictions = api.predict(tiny_runs.classifier, np.zeros((2, 32, 32, 1), np.uint8))
  assert predictions.probabilities.shape == (2, len(run.class_names))
  assert predictions.class_names == run.class_names
  assert set(predictions.labels) <= set(run.class_names)


# --- compare: reuse, resume, refuse -------------------------------------------------------------
def _config(**fields):
  return api.make_config("classifier", {"train.num_steps": 4, **fields})


def _fake_run(workdir, config, steps_done: int, accuracy: float):
  """A workdir as a trainer and `ferjax evaluate` leave it, without training anything."""
  workdir.mkdir(parents=True)
  (workdir / "run.json").write_text(json.dumps({"kind": "classifier"}))
  configs.save_config(config, workdir / "config.json")
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": steps_done}) + "\n")
  _fake_eval(workdir, accuracy)


def _fake_eval(workdir, accuracy: float):
  per_class = {name: {"recall": accuracy} for name in CLASSES}
  (workdir / "eval_test.json").write_text(json.dumps({
      "accuracy": accuracy, "mean_class_accuracy": accuracy, "macro_f1": accuracy,
      "per_class": per_class}))


@pytest.fixture
def no_training(monkeypatch):
  """Trainer and evaluation replaced: each call is recorded, finishes the run and writes an
  evaluation of accuracy 0.5."""
  calls = []

  def train(config, workdir, **_):
    calls.append(("train", workdir.name))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": config.train.num_steps}) + "\n")

  def evaluate_run(workdir, split, **_):
    calls.append(("evaluate", workdir.name))
    _fake_eval(workdir, 0.5)

  monkeypatch.setattr(api.classifier_trainer, "train_and_evaluate", train)
  monkeypatch.setattr(api.evaluate_lib, "evaluate_run", evaluate_run)
  return calls


def test_compare_reuses_finished_runs_and_resumes_the_others(tmp_path, no_training):
  base = _config()
  _fake_run(tmp_path / "none_seed0", _config(seed=0), 4, 0.25)  # finished
  _fake_run(tmp_path / "none_seed1", _config(seed=1), 2, 0.75)  # evaluated mid-run
  result = api.compare({"none": {}, "la": ["loss.name=logit_adjusted"]}, config=base,
                       out=tmp_path, seeds=(0, 1))
  assert no_training == [("train", "la_seed0"), ("evaluate", "la_seed0"),
                         ("train", "none_seed1"), ("evaluate", "none_seed1"),
                         ("train", "la_seed1"), ("evaluate", "la_seed1")]
  assert result.summary["none"]["accuracy"] == pytest.approx((37.5, 17.6776695))
  assert result.summary["la"]["runs"] == 2
  assert result.workdirs["la"] == [tmp_path / "la_seed0", tmp_path / "la_seed1"]
  assert (tmp_path / "comparison.md").read_text() == result.table + "\n"
  assert result.table.splitlines()[2].startswith("| none | 2 | 37.50 ± 17.68 |")
  no_training.clear()
  api.compare({"none": {}}, config=base, out=tmp_path, seeds=(0, 1))
  assert no_training == []


def test_compare_refuses_a_workdir_of_another_config(tmp_path, no_training):
  _fake_run(tmp_path / "none_seed0", _config(seed=0, **{"optim.lr": 0.5}), 4, 0.25)
  with pytest.raises(UserError, match=r"holds a run with another config: optim.lr"):
    api.compare({"none": {}}, config=_config(), out=tmp_path, seeds=(0,))
  assert no_training == []


@pytest.mark.parametrize("methods, split, needle", [
    ({"none": {}}, "val", "split 'val': checkpoints are chosen on that split"),
    ({"none": {}}, "validation", "split 'validation': checkpoints are chosen"),
    ({"a/b": {}}, "test", "method name 'a/b'"),
    ({}, "test", "expected at least one method and one seed, got 0 and 1"),
    ({"none": {"loss.nam": "ce"}}, "test", "unknown config field 'loss.nam'"),
])
def test_compare_refuses_before_training(tmp_path, no_training, methods, split, needle):
  config = _config(**{"data.val_split": "validation"})
  with pytest.raises(UserError) as error:
    api.compare(methods, config=config, out=tmp_path, seeds=(0,), split=split)
  assert needle in str(error.value)
  assert no_training == []
