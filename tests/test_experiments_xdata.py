"""experiments/cross_dataset.py and experiments/ckplus_cv.py on tiny data (a few train steps).

  pytest tests/test_experiments_xdata.py
"""

import json
import pathlib
import sys

import numpy as np
import pytest

from ferjax.data import builders, folder, splits
from ferjax.errors import UserError
from ferjax.train import classifier as classifier_trainer

from test_builders import make_ckplus

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import ckplus_cv  # noqa: E402
import cross_dataset  # noqa: E402

pytestmark = pytest.mark.slow  # The whole module: see pyproject.toml's markers.

TINY = ["config.model.name=resnet10", "config.model.width=0.125", "config.data.image_size=32",
        "config.optim.warmup_steps=1", "config.train.num_steps=2", "config.train.batch_size=16",
        "config.train.log_every=1", "config.train.eval_every=2",
        "config.train.checkpoint_every=2", "config.train.num_devices=1",
        "config.eval.batch_size=64"]
CK_CLASSES = ("anger", "contempt", "happy", "sadness", "surprise")


def run_main(module, monkeypatch, argv) -> int:
  monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
  return module.main()


def test_cross_dataset_matrix_and_selection_on_train_data_only(tmp_path, monkeypatch, capsys):
  """Train synthetic, test synthetic + a CK+-style folder set: a 1 x 2 matrix; unprepared sets
  are skipped with a line; while training only the train dataset is read, and every cell
  scores the checkpoint chosen then; a second call trains nothing."""
  faces = tmp_path / "ck_faces"
  faces.mkdir()
  rng = np.random.default_rng(0)
  labels = np.arange(15) % len(CK_CLASSES)
  folder.write(faces, "test", rng.integers(0, 256, (15, 48, 48, 1), np.uint8), labels,
               CK_CLASSES)
  reads, phase = [], ["setup"]
  real_load, real_train = splits.load, classifier_trainer.train_and_evaluate

  def load(name, split, **kwargs):
    reads.append((phase[0], name, split, kwargs.get("manual_dir")))
    return real_load(name, split, **kwargs)

  def train(config, workdir):
    phase[0] = "train"
    try:
      return real_train(config, workdir)
    finally:
      phase[0] = "evaluate"

  monkeypatch.setattr(splits, "load", load)
  monkeypatch.setattr(classifier_trainer, "train_and_evaluate", train)
  out = tmp_path / "xdata"
  argv = ["--train", "synthetic,rafdb", "--test", "synthetic,ck,ckplus", "--folder",
          f"ck={faces}", "--out", str(out), "--data-dir", str(tmp_path / "nothing"),
          *TINY, "config.data.num_examples=140"]
  assert run_main(cross_dataset, monkeypatch, argv) == 0
  printed = capsys.readouterr().out
  assert "skipped rafdb: not prepared" in printed and "skipped ckplus: not prepared" in printed

  trained = {(name, split) for when, name, split, _ in reads if when == "train"}
  assert trained == {("synthetic", "train"), ("synthetic", "validation")}  # No test data.
  scored = {(name, split) for when, name, split, _ in reads if when == "evaluate"}
  assert ("folder", "test") in scored and ("synthetic", "test") in scored

  summary = json.loads((out / "results.json").read_text())
  assert summary["train"] == ["synthetic"] and summary["test"] == ["synthetic", "ck"]
  assert summary["splits"] == {"synthetic": "test", "ck": "test"}
  assert set(summary["skipped"]) == {"rafdb", "ckplus"}
  own, cross = summary["cells"]["synthetic"]["synthetic"], summary["cells"]["synthetic"]["ck"]
  assert own["in_domain"] and not cross["in_domain"]
  assert own["num_examples"] == 2100 and own["files"] == ["eval_test.json"]
  assert cross["classes"] == ["angry", "happy", "sad", "surprise"]  # Shared, model's names.
  assert cross["num_examples"] == 12 and "contempt" in cross["dropped"]
  assert cross["files"] == ["eval_ck_faces-test.json"]
  workdir = out / "synthetic_seed0"
  chosen = json.loads((workdir / "eval_val.json").read_text())["step"]
  for name in ("eval_test.json", "eval_ck_faces-test.json"):
    assert json.loads((workdir / name).read_text())["step"] == chosen
  for key in ("accuracy", "mean_class_accuracy"):
    assert 0 <= cross[key][0] <= 100 and cross[key][1] is None  # One seed: no spread.
  text = (out / "results.md").read_text()
  assert "| train \\ test | synthetic (test) | ck (test) |" in text
  assert "| synthetic | **" in text and "## Mean class accuracy" in text
  assert "synthetic -> ck: angry, happy, sad, surprise (12 images" in text

  monkeypatch.setattr(classifier_trainer, "train_and_evaluate",
                      lambda *a: pytest.fail("a finished run was trained again"))
  assert run_main(cross_dataset, monkeypatch, argv) == 0
  assert json.loads((out / "results.json").read_text())["cells"] == summary["cells"]


def test_cross_dataset_splits_and_configs(tmp_path):
  """CK+ is scored on `all` off the diagonal and on its test fold in its own cell; a dataset
  without a test split is scored on validation; configs come from experiments/configs."""
  ck = cross_dataset.Source("ckplus", "ckplus", data_dir=tmp_path)
  fer = cross_dataset.Source("fer2013", "fer2013", data_dir=tmp_path)
  ck.has_split = lambda split: True
  fer.has_split = lambda split: split != "test"  # The shared copy: PublicTest only.
  assert cross_dataset.report_split(ck, {}, own=False) == "all"
  assert cross_dataset.report_split(ck, {}, own=True) == "test"
  assert cross_dataset.report_split(ck, {"ckplus": "all"}, own=True) == "test"
  assert cross_dataset.report_split(ck, {"ckplus": "fold3_test"}, own=False) == "fold3_test"
  assert cross_dataset.report_split(fer, {}, own=True) == "validation"
  assert cross_dataset.config_for(ck, {})[0] == "classifier_ckplus.py"
  rafdb = cross_dataset.Source("rafdb", "rafdb")
  assert cross_dataset.config_for(rafdb, {}) == ("classifier_fer2013_cpu.py",
                                                 ["config.data.name=rafdb"])
  assert cross_dataset.config_for(rafdb, {"rafdb": "x.py"})[0] == "x.py"
  with pytest.raises(UserError, match="unknown dataset 'nope'"):
    cross_dataset.sources(["nope"], {}, None)
  with pytest.raises(UserError, match="named twice"):
    cross_dataset.parse_list("fer2013,fer2013", "--train")


def test_ckplus_cv_two_folds(tmp_path, monkeypatch):
  """Two folds of a tiny prepared CK+: per-fold and pooled results; every run trained on its
  fold's train split (validation held out of it by subject) and scored on the fold's test."""
  manual, data = tmp_path / "raw", tmp_path / "data"
  make_ckplus(manual, subjects=30)
  builders.prepare("ckplus", manual, data, progress=False)
  out = tmp_path / "cv"
  argv = ["--out", str(out), "--folds", "0-1", "--data-dir", str(data), *TINY]
  assert run_main(ckplus_cv, monkeypatch, argv) == 0
  summary = json.loads((out / "results.json").read_text())
  assert list(summary["folds"]) == ["fold0", "fold1"]
  test_sizes = [len(builders.load_prepared("ckplus", f"fold{k}_test", data)) for k in (0, 1)]
  assert [summary["folds"][f"fold{k}"]["num_examples"] for k in (0, 1)] == test_sizes
  for k in (0, 1):
    config = json.loads((out / f"fold{k}_seed0" / "config.json").read_text())
    assert config["data"]["fold"] == k and config["data"]["val_split"] is None
    assert json.loads((out / f"fold{k}_seed0" / "eval_test.json").read_text())["split"] == "test"
  assert set(summary["pooled_recall"]) == set(builders.info("ckplus")["class_names"])
  mean = summary["mean_over_folds"]["accuracy"]
  assert mean[1] is not None and 0 <= mean[0] <= 100  # Two folds: a spread.
  text = (out / "results.md").read_text()
  assert "| fold0 |" in text and "mean ± std over folds" in text and "pooled" in text

  pytest.importorskip("ferjax.probe")  # The frozen-feature probe over the same folds.
  probe = ckplus_cv.run_probe(out / "fold0_seed0", out, data)
  assert [r["fold"] for r in probe["per_fold"]] == list(range(10))
  assert (out / "probe" / "features_ckplus-all.npz").exists()
  assert "Linear probe" in ckplus_cv.markdown(summary, "x.py", probe)


def test_ckplus_cv_arguments():
  assert ckplus_cv.parse_folds("0-9") == list(range(10))
  assert ckplus_cv.parse_folds("0-2,7") == [0, 1, 2, 7]
  for bad in ("0-10", "3-1", "x", "-1"):
    with pytest.raises(UserError, match="--folds"):
      ckplus_cv.parse_folds(bad)
  assert ckplus_cv.init_overrides(None) == []
  with pytest.raises(UserError, match="--init-from /no/such/run: not found"):
    ckplus_cv.init_overrides("/no/such/run")
