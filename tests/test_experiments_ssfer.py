"""experiments/ssfer.py end to end at tiny sizes: stage 1, every method, the table and the plot.

  pytest tests/test_experiments_ssfer.py
"""

import json
import math
import pathlib
import sys

import pytest

from ferjax.errors import UserError
from ferjax.train import classifier as classifier_trainer
from ferjax.train import pretrain as pretrain_trainer
from ferjax.train import semisup as semisup_trainer

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import ssfer  # noqa: E402

pytestmark = pytest.mark.slow  # The whole module: see pyproject.toml's markers.

SHAPE = ["config.model.width=0.25", "config.model.depth=1"]  # Both stages: the same tiny ViT.
STEPS = ["config.train.num_steps=3", "config.train.batch_size=8", "config.train.log_every=1",
         "config.train.eval_every=3", "config.train.checkpoint_every=3",
         "config.train.num_devices=1"]
TINY = [*SHAPE, *STEPS, "config.data.num_examples=210", "config.optim.warmup_steps=1",
        "config.eval.batch_size=64"]
PRETRAIN = [*SHAPE, *STEPS, "config.data.num_examples=128", "config.data.val_fraction=0.125",
            "config.optim.warmup_steps=1", "config.mae.decoder_width=32",
            "config.mae.decoder_depth=1", "config.mae.decoder_heads=4"]


def test_ssfer_every_method_one_fraction_then_collect(tmp_path, monkeypatch):
  out = tmp_path / "ssfer"
  argv = ["--out", str(out), "--fractions", "0.25", "--seeds", "0",
          *(f"--pretrain-set={o}" for o in PRETRAIN), "--semisup-set=config.semisup.ratio=1",
          *TINY]
  assert ssfer.main(argv) == 0
  summary = json.loads((out / "results.json").read_text())
  assert list(summary) == ["0.25"] and set(summary["0.25"]) == set(ssfer.METHODS)
  for rows in summary.values():
    for row in rows.values():
      for key in ("accuracy", "mean_class_accuracy", "weakest_recall"):
        assert math.isfinite(row[key][0]) and 0 <= row[key][0] <= 100
  text = (out / "results.md").read_text()
  for method in ssfer.METHODS:
    assert f"| 25% | {method} | 1 |" in text
  assert (out / "mca_vs_fraction.png").stat().st_size > 0
  runs = out / "frac0.25"
  config = json.loads((runs / "ssfer_seed0" / "config.json").read_text())
  assert config["model"]["init_from"] == str(runs / "mae_mixup_seed0")
  assert config["data"]["label_fraction"] == 0.25
  assert config["semisup"]["ratio"] == 1  # --semisup-set reaches stage 3 only.
  mixup = json.loads((runs / "mae_mixup_seed0" / "config.json").read_text())
  assert mixup["model"]["init_from"] == str(out / "pretrain")
  assert mixup["augment"]["face_mixup_alpha"] == 1.0
  resnet = json.loads((runs / "resnet_seed0" / "config.json").read_text())
  assert resnet["model"]["name"] == "resnet10" and not resnet["model"]["init_from"]
  assert resnet["model"]["depth"] is None  # SHAPE (config.model.*) shapes the ViTs only.
  assert resnet["data"]["label_fraction"] == 0.25 and resnet["train"]["num_steps"] == 3

  for module in (classifier_trainer, semisup_trainer, pretrain_trainer):  # Resumes: no training.
    monkeypatch.setattr(module, "train_and_evaluate",
                        lambda *a, **k: pytest.fail("a finished run was trained again"))
  assert ssfer.main(argv) == 0
  assert ssfer.main([*argv, "--collect"]) == 0
  assert json.loads((out / "results.json").read_text()) == summary


def test_full_labels_have_no_ssfer_run_and_a_dash_in_the_table(tmp_path):
  assert ssfer.overrides_for("supervised", 1.0, 2, "p", tmp_path) == ["config.seed=2"]
  row = {k: (50.0, 1.0) for k in ("accuracy", "mean_class_accuracy", "weakest_recall")}
  text = ssfer.table({"1": {"mae": {"runs": 3, **row}}}, ["mae", "ssfer"])
  assert "| 100% | mae | 3 | 50.00 ± 1.00 |" in text
  assert "| 100% | ssfer | 0 | — | — | — |" in text


def test_ssfer_refuses_a_mismatched_encoder_and_bad_flags(tmp_path):
  with pytest.raises(UserError, match="model.width 0.25 vs 0.5"):
    ssfer.main(["config.model.width=0.25", "--out", str(tmp_path), "--fractions", "0.25"])
  with pytest.raises(UserError, match="--fractions"):
    ssfer.main(["--out", str(tmp_path), "--fractions", "0"])
  with pytest.raises(UserError, match="--methods"):
    ssfer.main(["--out", str(tmp_path), "--methods", "nope"])
  with pytest.raises(UserError, match="no finished runs"):
    ssfer.main(["--out", str(tmp_path / "typo"), "--collect"])
  assert not (tmp_path / "typo").exists()  # --collect reads only: no folder left behind.
