"""Bad input about what a run reads, through the CLI: a run is what it reads (other runs, its
data), not how their paths were spelled; a run failing on its data before step 1 leaves no
record. Refusals keep the bad-input promise (tests/badinput.py).
"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from badinput import copy_run, expect_one_line
from ferjax import cli
from ferjax.core import monitor

TWO_STEPS = ["--config.train.num_steps=2", "--config.train.eval_every=2",
             "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def faces(root, names=("fear", "happy", "sad"), n=4, size=32):
  """A folder dataset: <root>/train/<class>/*.png, `n` images per class, and classes.txt."""
  for c, name in enumerate(names):
    (root / "train" / name).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((size, size), 30 * i + 60 * c, np.uint8)).save(
          root / "train" / name / f"{i}.png")
  (root / "classes.txt").write_text("".join(f"{name}\n" for name in names))
  return root


def train(config, workdir, *overrides) -> list[str]:
  return [str(a) for a in ("train", "--config", config, "--workdir", workdir, *overrides)]


def steps(workdir) -> int:
  return max(r["step"] for r in monitor.read_metrics(workdir))


@pytest.fixture(scope="module")
def folder_run(tiny_runs, tmp_path_factory):
  """(argv of a finished 2-step classifier run on a folder dataset, its workdir, the folder)."""
  root = tmp_path_factory.mktemp("folder_run")
  data = faces(root / "faces")
  argv = train(tiny_runs.classifier_config, root / "w", "--config.data.name=folder",
               f"--config.data.manual_dir={data}", "--config.data.val_split=None",
               "--config.data.num_examples=None", *TWO_STEPS)
  assert cli.main(argv) == 0
  return argv, root / "w", data


# --- The data a run reads is part of the run --------------------------------------------------
def test_extending_a_folder_run_on_another_folder_is_refused_naming_both(tiny_runs, tmp_path,
                                                                       capsys):
  """A finished run recorded before ferjax fingerprinted its data (the tiny run's config made a
  folder run): the folder it names now is compared with the one asked for."""
  data = faces(tmp_path / "faces")
  work = copy_run(tiny_runs.classifier, tmp_path / "w")
  saved = json.loads((work / "config.json").read_text())
  saved["data"].update(name="folder", manual_dir=str(data), val_split=None, num_examples=None)
  (work / "config.json").write_text(json.dumps(saved))
  other = faces(tmp_path / "animals", ("bird", "cat", "dog"))
  argv = train(tiny_runs.classifier_config, work, "--config.data.name=folder",
               f"--config.data.manual_dir={other}", "--config.data.val_split=None",
               "--config.data.num_examples=None", "--config.train.num_steps=5")
  line = expect_one_line(argv, ["data.manual_dir", str(data), str(other)], capsys,
                         protect=[work, data, other])
  assert "other data" in line


@pytest.mark.slow
def test_a_folder_run_resumes_and_extends_from_its_data_moved_elsewhere(folder_run, tmp_path,
                                                                       capsys):
  """The fingerprint recorded at the first start: another folder is refused; the same files
  copied elsewhere extend the run."""
  argv, workdir, data = folder_run
  other = faces(tmp_path / "animals", ("bird", "cat", "dog"))
  expect_one_line([a.replace(str(data), str(other)) for a in argv] + [
      "--config.train.num_steps=3"], ["data.manual_dir", str(data), str(other)], capsys,
      protect=[workdir, data])
  work = copy_run(workdir, tmp_path / "w")
  moved = shutil.copytree(data, tmp_path / "elsewhere" / "faces")
  argv = [a.replace(str(data), str(moved)).replace(str(workdir), str(work)) for a in argv]
  assert cli.main([*argv, "--config.train.num_steps=3"]) == 0
  assert steps(work) == 3
  meta = json.loads((work / "config.json").read_text())
  assert meta["data"]["manual_dir"] == str(moved)


# --- Other runs: what they are, not how they were spelled -------------------------------------
@pytest.mark.slow
def test_a_vaegan_dependent_run_resumes_under_any_spelling_and_after_its_tree_moved(
    tiny_runs, tmp_path, monkeypatch):
  tree = tmp_path / "tree"
  copy_run(tiny_runs.vaegan, tree / "vaegan")
  semantic = ["--config.augment.fill=0.5", "--config.augment.target=largest"]
  argv = train(tiny_runs.classifier_config, tree / "pixels", *TWO_STEPS, *semantic,
               f"--config.augment.vaegan_workdir={tree / 'vaegan'}")
  assert cli.main(argv) == 0
  # Written relatively, from the folder above: the same run, extended.
  monkeypatch.chdir(tree)
  argv = train(tiny_runs.classifier_config, "pixels", *TWO_STEPS, *semantic,
               "--config.augment.vaegan_workdir=vaegan")
  assert cli.main([*argv, "--config.train.num_steps=3"]) == 0
  assert steps(tree / "pixels") == 3
  # The whole tree moved: the same run, resumed and extended.
  monkeypatch.chdir(tmp_path)
  moved = shutil.move(tree, tmp_path / "moved")
  argv = train(tiny_runs.classifier_config, os.path.join(moved, "pixels"), *TWO_STEPS, *semantic,
               f"--config.augment.vaegan_workdir={os.path.join(moved, 'vaegan')}")
  assert cli.main([*argv, "--config.train.num_steps=3"]) == 0
  assert cli.main([*argv, "--config.train.num_steps=4"]) == 0
  assert steps(tmp_path / "moved" / "pixels") == 4


def test_another_vaegan_run_in_its_place_is_refused(tiny_runs, tmp_path, capsys):
  """A run copied with the tree but its VAE-GAN replaced by another run: refused by field."""
  tree = tmp_path / "tree"
  vae = copy_run(tiny_runs.vaegan, tree / "vaegan")
  work = copy_run(tiny_runs.classifier, tree / "run")
  saved = json.loads((work / "config.json").read_text())
  saved["augment"]["vaegan_workdir"] = str(vae)
  (work / "config.json").write_text(json.dumps(saved))
  other = copy_run(tiny_runs.vaegan, tmp_path / "other")
  saved = json.loads((other / "config.json").read_text())
  saved["seed"] += 1
  (other / "config.json").write_text(json.dumps(saved))
  expect_one_line(train(tiny_runs.classifier_config, work,
                        f"--config.augment.vaegan_workdir={other}"),
                  ["augment.vaegan_workdir", str(other)], capsys, protect=[tmp_path])


# --- A run failing on its data before step 1 leaves no record ---------------------------------
PRETRAIN = '''from ferjax.kinds import pretrain


def get_config():
  config = pretrain.default_config()
  config.data.update(sources="synthetic:0.001", image_size=32, num_examples=64)
  config.model.update(width=0.25, depth=1, patch_size=8)
  config.mae.update(decoder_width=16, decoder_depth=1, decoder_heads=4)
  config.train.update(num_steps=2, batch_size=8, num_devices=1, log_every=1, eval_every=2,
                      checkpoint_every=2)
  return config
'''


def test_a_pretrain_source_weighted_to_no_rows_is_one_line_and_leaves_no_record(tmp_path,
                                                                               capsys):
  (tmp_path / "p.py").write_text(PRETRAIN)
  argv = ["pretrain", "--config", tmp_path / "p.py", "--workdir", tmp_path / "w"]
  expect_one_line(argv, ["data.sources", "synthetic", "0 train rows"], capsys)
  assert not (tmp_path / "w").exists()  # The corrected command starts afresh.
  few = faces(tmp_path / "few", ("any",), n=4)  # 4 images times 0.01: no row.
  (few / "classes.txt").unlink()
  expect_one_line([*argv, f"--config.data.sources=synthetic,folder:{few}:0.01"],
                  ["data.sources", f"folder:{few}", "0 train rows"], capsys, protect=[few])
  assert not (tmp_path / "w").exists()


SEMISUP = '''from ferjax.kinds import semisup


def get_config():
  config = semisup.default_config()
  config.data.update(name="synthetic", image_size=32, channels=1, num_examples=70,
                     label_fraction=0.2)
  config.model.update(name="resnet10", width=0.125)
  config.train.update(num_steps=2, batch_size=8, num_devices=1, log_every=1, eval_every=2,
                      checkpoint_every=2)
  return config
'''


def test_a_semisup_extra_source_weighted_to_no_rows_is_one_line_and_leaves_no_record(tmp_path,
                                                                                    capsys):
  (tmp_path / "s.py").write_text(SEMISUP)
  few = faces(tmp_path / "few", ("any",), n=4)
  (few / "classes.txt").unlink()
  expect_one_line(["train-semisup", "--config", tmp_path / "s.py", "--workdir", tmp_path / "w",
                   f"--config.semisup.extra_sources=folder:{few}:0.01"],
                  ["semisup.extra_sources", f"folder:{few}", "0 unlabeled rows"], capsys,
                  protect=[few])
  assert not (tmp_path / "w").exists()
