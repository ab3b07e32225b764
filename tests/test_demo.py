"""`ferjax demo --quick`: every stage runs, the semantic variant is chosen on validation, and the
report shows the four methods, the choice and the pictures it links (the numbers mean nothing at
this size)."""

import json
import re

import pytest

from ferjax import demo
from ferjax.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  return workdir, demo.run(workdir, quick=True)


def test_every_method_tested(quick_demo):
  workdir, evals = quick_demo
  assert list(evals) == [demo.BASELINE, demo.LOGIT_ADJ, demo.PIXELS, demo.FEATURES]
  for method, folder in demo.FOLDERS.items():
    assert (workdir / folder / "eval_test.json").is_file(), method
    assert evals[method]["split"] == "test"
    assert 0 <= evals[method]["mean_class_accuracy"] <= 1
  config = json.loads((workdir / "logit_adjustment" / "config.json").read_text())
  assert config["loss"]["name"] == "logit_adjusted"
  config = json.loads((workdir / "semantic_pixels" / "config.json").read_text())
  assert config["loss"]["name"] == "logit_adjusted" and config["augment"]["fill"] == 0.5
  assert config["augment"]["filter_workdir"] == str(workdir / "baseline")


def test_feature_head_is_a_retrained_baseline(quick_demo):
  workdir, _ = quick_demo
  out = workdir / "semantic_features"
  result = json.loads((out / "head.json").read_text())
  assert result["config"]["synth"]["mode"] == "feature"
  assert result["config"]["synth"]["alpha"] == 2
  assert result["config"]["head"]["loss"] == "logit_adjusted"
  assert result["config"]["head"]["sampler"] == "instance"
  assert result["source"]["workdir"] == str((workdir / "baseline").absolute())
  assert (out / "synthetic_neighbours.png").is_file()


def test_choice_on_validation(quick_demo):
  workdir, _ = quick_demo
  choice = json.loads((workdir / "choice.json").read_text())
  assert {choice["chosen"], choice["other"]} == {demo.PIXELS, demo.FEATURES}
  assert choice["split"] == "val"
  for method in (demo.PIXELS, demo.FEATURES):  # The validation numbers the choice was made on.
    val = json.loads((workdir / demo.FOLDERS[method] / "eval_val.json").read_text())
    assert val["mean_class_accuracy"] == choice["val"][method]
  assert choice["val"][choice["chosen"]] >= choice["val"][choice["other"]]


def test_report(quick_demo):
  workdir, _ = quick_demo
  text = (workdir / "report.md").read_text()
  chosen = json.loads((workdir / "choice.json").read_text())["chosen"]
  assert f"Chosen on validation: **{chosen}**" in text
  table = text.split("## Test results (%)")[1].split("##")[0]
  for method in (demo.BASELINE, demo.LOGIT_ADJ, demo.PIXELS, demo.FEATURES):
    assert f"| {method} " in table or f"| {method}{demo.CHOSEN} " in table, method
  assert f"| {chosen}{demo.CHOSEN} |" in table
  assert table.count(demo.CHOSEN) == 1
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert "semantic_features/synthetic_neighbours.png" in links
  assert {"per_class_recall.png", "synthetic_samples.png", "class_distribution.png"} <= set(links)
  for link in links:  # Every picture the report shows is there, relative to report.md.
    assert (workdir / link).is_file(), link


def test_finished_head_reused_and_another_config_refused(quick_demo):
  workdir, _ = quick_demo
  out = workdir / "semantic_features"
  before = (out / "head.json").stat().st_mtime_ns
  result = demo._feature_head(workdir / "baseline", out, seed=0, quick=True)
  assert result == json.loads((out / "head.json").read_text())
  assert (out / "head.json").stat().st_mtime_ns == before
  with pytest.raises(UserError, match="another config"):
    demo._feature_head(workdir / "baseline", out, seed=0, quick=False)
