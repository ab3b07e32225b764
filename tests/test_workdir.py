"""A workdir guards itself (ferjax.core.workdir): one kind, one config, one trainer at a time;
no silent restart when its checkpoints are gone. Checked before anything is written."""

import hashlib
import json
import multiprocessing
import pathlib

import pytest

from ferjax.core import workdir as workdir_lib
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import vaegan as vaegan_kind
from ferjax.train import classifier, vaegan


def digest(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def recorded(tmp_path):
  """A workdir that recorded a classifier run (what a trainer writes before step 1)."""
  config = classifier_kind.default_config()
  config.train.num_steps = 40
  workdir, is_main = workdir_lib.open_for_training(tmp_path / "w", config, "classifier")
  assert is_main and json.loads((workdir / "run.json").read_text()) == {"kind": "classifier"}
  return workdir, config


def test_the_same_run_reopens_and_writes_nothing_new(recorded):
  workdir, config = recorded
  before = digest(workdir)
  workdir_lib.open_for_training(workdir, config, "classifier")
  assert digest(workdir) == before


@pytest.mark.parametrize("field,value,needle", [
    ("model.width", 0.5, r"model\.width \(1\.0 -> 0\.5\)"),
    ("seed", 5, r"seed \(0 -> 5\)"),
    ("loss.name", "logit_adjusted", r"loss\.name \('ce' -> 'logit_adjusted'\)"),
    ("train.num_steps", 20, r"train\.num_steps \(40 -> 20\)"),
])
def test_another_config_is_refused_naming_the_fields_before_anything_is_written(recorded, field,
                                                                               value, needle):
  workdir, config = recorded
  before = digest(workdir)
  group, _, leaf = field.rpartition(".")
  (config[group] if group else config)[leaf] = value
  with pytest.raises(UserError, match=needle + r".*nothing was written"):
    workdir_lib.open_for_training(workdir, config, "classifier")
  assert digest(workdir) == before


def test_a_field_added_after_the_run_was_made_resumes_at_its_default_only(recorded):
  """An older run's config.json lacks a field ferjax added since (e.g. loss.eac_weight): at its
  default it is the same run; set to anything else it is another run."""
  workdir, config = recorded
  saved = json.loads((workdir / "config.json").read_text())
  del saved["loss"]["eac_weight"]
  (workdir / "config.json").write_text(json.dumps(saved))
  defaults = classifier_kind.default_config()
  workdir_lib.open_for_training(workdir, config, "classifier", defaults)
  with pytest.raises(UserError, match=r"loss\.eac_weight \(None -> 0\.0\)"):
    workdir_lib.open_for_training(workdir, config, "classifier")  # Without the defaults.
  config.loss.eac_weight = 5.0
  with pytest.raises(UserError, match=r"loss\.eac_weight \(0\.0 -> 5\.0\)"):
    workdir_lib.open_for_training(workdir, config, "classifier", defaults)


def test_more_steps_extend_the_run_and_are_recorded(recorded, capsys):
  workdir, config = recorded
  config.train.num_steps = 60
  workdir_lib.open_for_training(workdir, config, "classifier")
  assert "extending the run from train.num_steps=40 to 60" in capsys.readouterr().out
  record = json.loads((workdir / "run.json").read_text())
  assert record["extensions"] == [{"from_num_steps": 40, "to_num_steps": 60}]
  assert classifier_kind.read_config(workdir).train.num_steps == 60


@pytest.mark.parametrize("logged_past_the_old_end", [False, True])
def test_an_extension_refused_before_it_trained_is_taken_back(recorded, logged_past_the_old_end):
  workdir, config = recorded
  (workdir / "checkpoints" / "last").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n')  # A finished run.
  before = digest(workdir)
  config.train.num_steps = 60
  workdir_lib.open_for_training(workdir, config, "classifier")
  if logged_past_the_old_end:
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write('{"step": 41, "loss": 1.0}\n')
  with pytest.raises(UserError, match="bad data"):
    with workdir_lib.training_lock(workdir):
      raise UserError("bad data")
  steps = classifier_kind.read_config(workdir).train.num_steps
  if logged_past_the_old_end:  # The extension trained: it stays.
    assert steps == 60 and "extensions" in json.loads((workdir / "run.json").read_text())
  else:
    assert steps == 40
    after = digest(workdir)
    assert {k: after[k] for k in before} == before  # run.json and config.json as they were.


def test_where_the_data_lives_and_the_device_count_may_change_on_resume(recorded):
  workdir, config = recorded
  config.data.data_dir = "/elsewhere"
  config.train.num_devices = 2
  workdir_lib.open_for_training(workdir, config, "classifier")


def test_a_trainer_of_another_kind_is_refused_before_it_writes(recorded):
  workdir, _ = recorded
  before = digest(workdir)
  with pytest.raises(UserError, match=r"holds a classifier run \(ferjax train\), not a VAE-GAN "
                                      r"run \(ferjax train-vaegan\)"):
    vaegan.train_and_evaluate(vaegan_kind.default_config(), workdir)
  assert digest(workdir) == before
  vae_dir, _ = workdir_lib.open_for_training(workdir.parent / "v", vaegan_kind.default_config(),
                                             "vaegan")
  with pytest.raises(UserError, match=r"holds a VAE-GAN run"):
    classifier.train_and_evaluate(classifier_kind.default_config(), vae_dir)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(UserError, match="expected a folder, found a file"):
    workdir_lib.open_for_training(path, classifier_kind.default_config(), "classifier")


def _hold_lock(workdir, ready, release):
  with workdir_lib.training_lock(pathlib.Path(workdir)):
    ready.set()
    release.wait(30)


def test_a_second_trainer_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(recorded):
  workdir, _ = recorded
  ctx = multiprocessing.get_context("spawn")
  ready, release = ctx.Event(), ctx.Event()
  holder = ctx.Process(target=_hold_lock, args=(str(workdir), ready, release))
  holder.start()
  try:
    assert ready.wait(60)
    with pytest.raises(UserError, match=rf"is being trained by pid {holder.pid} on "):
      with workdir_lib.training_lock(workdir):
        pass
  finally:
    holder.kill()  # Dies holding the lock: the OS releases it.
    holder.join()
  with workdir_lib.training_lock(workdir):  # Not blocked by the dead holder's lock file.
    pass


def test_metrics_without_checkpoints_is_refused_but_a_run_killed_before_its_first_save_restarts(
    recorded):
  workdir, config = recorded
  (workdir / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n')
  with pytest.raises(UserError, match=r"records steps up to 20 but .*checkpoints/last is missing"):
    workdir_lib.open_for_training(workdir, config, "classifier")
  (workdir / "checkpoints" / "last").mkdir(parents=True)  # Opened, never saved into.
  workdir_lib.open_for_training(workdir, config, "classifier")


def test_reopening_a_run_of_the_other_kind_is_one_line(recorded, capsys):
  """`ferjax evaluate` on a VAE-GAN workdir, or evaluate-synthetic with --vaegan and
  --classifier swapped, is refused naming what the workdir holds."""
  from ferjax import cli, runs
  workdir, _ = recorded
  with pytest.raises(UserError, match=r"holds a classifier run \(ferjax train\), not a VAE-GAN "
                                      r"run .*: pass a VAE-GAN workdir"):
    runs.open_vaegan(workdir)
  vae_dir, _ = workdir_lib.open_for_training(workdir.parent / "v", vaegan_kind.default_config(),
                                             "vaegan")
  assert cli.main(["evaluate", "--workdir", str(vae_dir), "--split", "test"]) == 2
  err = capsys.readouterr().err.strip()
  assert "holds a VAE-GAN run (ferjax train-vaegan), not a classifier run" in err
  assert len(err.splitlines()) == 1


# --- A run is what it reads, not how its paths were spelled ---------------------------------------
def fake_run(folder: pathlib.Path, kind="vaegan", seed=0) -> pathlib.Path:
  """A folder with what names a run (run.json and config.json): all the workdir guard reads."""
  folder.mkdir(parents=True)
  (folder / "run.json").write_text(json.dumps({"kind": kind}))
  (folder / "config.json").write_text(json.dumps({"seed": seed, "train": {"num_steps": 2}}))
  return folder


def linked(tree: pathlib.Path, vaegan_spelling: str):
  """A classifier run in tree/run reading the VAE-GAN run tree/vaegan, spelled as given."""
  fake_run(tree / "vaegan")
  config = classifier_kind.default_config()
  config.augment.vaegan_workdir = vaegan_spelling
  workdir, _ = workdir_lib.open_for_training(tree / "run", config, "classifier")
  return workdir, config


def test_a_run_resumes_whichever_way_the_other_run_is_spelled(tmp_path, monkeypatch):
  workdir, config = linked(tmp_path / "tree", str(tmp_path / "tree" / "vaegan"))
  monkeypatch.chdir(tmp_path)
  for spelling in ("tree/vaegan", "tree/../tree/vaegan/", str(tmp_path / "tree" / "vaegan")):
    config.augment.vaegan_workdir = spelling
    workdir_lib.open_for_training("tree/run", config, "classifier")
  (tmp_path / "link").symlink_to(tmp_path / "tree")
  config.augment.vaegan_workdir = "link/vaegan"
  workdir_lib.open_for_training(workdir, config, "classifier")


def test_a_run_recorded_with_a_relative_path_resumes_spelled_absolutely(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir, config = linked(pathlib.Path("tree"), "tree/vaegan")
  assert json.loads((workdir / "run.json").read_text())["links"] == {
      "augment.vaegan_workdir": {"path": "../vaegan", "identity": workdir_lib.run_identity(
          tmp_path / "tree" / "vaegan")}}
  config.augment.vaegan_workdir = str(tmp_path / "tree" / "vaegan")
  workdir_lib.open_for_training(tmp_path / "tree" / "run", config, "classifier")


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_tree_of_runs_moved_or_copied_together_keeps_working(tmp_path, how):
  import shutil
  workdir, config = linked(tmp_path / "tree", str(tmp_path / "tree" / "vaegan"))
  (shutil.move if how == "moved" else shutil.copytree)(tmp_path / "tree", tmp_path / "new")
  before = digest(tmp_path / "new")
  config.augment.vaegan_workdir = str(tmp_path / "new" / "vaegan")
  workdir_lib.open_for_training(tmp_path / "new" / "run", config, "classifier")  # Resumes.
  assert digest(tmp_path / "new") == before
  config.train.num_steps += 10
  workdir_lib.open_for_training(tmp_path / "new" / "run", config, "classifier")  # Extends.
  record = json.loads((tmp_path / "new" / "run" / "run.json").read_text())
  assert record["links"]["augment.vaegan_workdir"]["path"] == "../vaegan"


def test_the_other_run_moved_on_its_own_is_known_by_its_identity(tmp_path):
  workdir, config = linked(tmp_path / "tree", str(tmp_path / "tree" / "vaegan"))
  (tmp_path / "tree" / "vaegan").rename(tmp_path / "elsewhere")
  config.augment.vaegan_workdir = str(tmp_path / "elsewhere")
  workdir_lib.open_for_training(workdir, config, "classifier")


def test_another_run_in_its_place_is_refused_naming_the_field(tmp_path):
  workdir, config = linked(tmp_path / "tree", str(tmp_path / "tree" / "vaegan"))
  before = digest(workdir)
  config.augment.vaegan_workdir = str(fake_run(tmp_path / "other", seed=1))
  with pytest.raises(UserError, match=r"augment\.vaegan_workdir .*nothing was written"):
    workdir_lib.open_for_training(workdir, config, "classifier")
  assert digest(workdir) == before


def test_a_run_recorded_before_links_were_recorded_compares_real_paths(tmp_path, monkeypatch):
  workdir, config = linked(tmp_path / "tree", str(tmp_path / "tree" / "vaegan"))
  record = json.loads((workdir / "run.json").read_text())
  del record["links"]
  (workdir / "run.json").write_text(json.dumps(record))
  monkeypatch.chdir(tmp_path / "tree")
  config.augment.vaegan_workdir = "vaegan"
  workdir_lib.open_for_training(workdir, config, "classifier")
  config.augment.vaegan_workdir = str(fake_run(tmp_path / "other", seed=1))
  with pytest.raises(UserError, match=r"augment\.vaegan_workdir"):
    workdir_lib.open_for_training(workdir, config, "classifier")


# --- A run's data is part of the run --------------------------------------------------------------
def faces(folder: pathlib.Path, names=("fear", "happy", "sad"), size=10) -> pathlib.Path:
  for name in names:
    (folder / "train" / name).mkdir(parents=True)
    (folder / "train" / name / "0.png").write_bytes(b"x" * size)
  return folder


def folder_run(tmp_path):
  config = classifier_kind.default_config()
  config.data.update(name="folder", manual_dir=str(faces(tmp_path / "faces")))
  workdir, _ = workdir_lib.open_for_training(tmp_path / "w", config, "classifier")
  return workdir, config


def test_a_folder_dataset_with_other_files_is_refused_naming_both_places(tmp_path):
  workdir, config = folder_run(tmp_path)
  assert json.loads((workdir / "run.json").read_text())["data"]["folder"]["files"] == 3
  before = digest(workdir)
  other = faces(tmp_path / "animals", ("bird", "cat", "dog"))
  config.data.manual_dir = str(other)
  with pytest.raises(UserError, match=rf"data\.manual_dir \('{tmp_path}/faces' -> "
                                      rf"'{other}'\).*nothing was written"):
    workdir_lib.open_for_training(workdir, config, "classifier")
  config.train.num_steps += 10  # Nor as an extension.
  with pytest.raises(UserError, match=r"data\.manual_dir"):
    workdir_lib.open_for_training(workdir, config, "classifier")
  assert digest(workdir) == before


def test_a_folder_dataset_moved_with_the_same_files_resumes(tmp_path):
  workdir, config = folder_run(tmp_path)
  (tmp_path / "faces").rename(tmp_path / "moved")
  config.data.manual_dir = str(tmp_path / "moved")
  workdir_lib.open_for_training(workdir, config, "classifier")
  (tmp_path / "moved" / "train" / "sad" / "0.png").write_bytes(b"x" * 11)  # Another size.
  with pytest.raises(UserError, match=r"data\.manual_dir"):
    workdir_lib.open_for_training(workdir, config, "classifier")


def test_a_prepared_dataset_is_known_by_the_source_it_was_prepared_from(tmp_path, monkeypatch):
  from ferjax.data import builders
  sources = {"/a": {"manual_dir": "/raw", "files": 9, "fingerprint": "sha256:1"},
             "/b": {"manual_dir": "/raw", "files": 9, "fingerprint": "sha256:1"},
             "/c": {"manual_dir": "/other", "files": 7, "fingerprint": "sha256:2"}}
  monkeypatch.setattr(builders, "prepared_source", lambda name, data_dir, size: sources[data_dir])
  config = classifier_kind.default_config()
  config.data.update(name="fer2013", data_dir="/a")
  workdir, _ = workdir_lib.open_for_training(tmp_path / "w", config, "classifier")
  config.data.data_dir = "/b"  # A copy of the same preparation.
  workdir_lib.open_for_training(workdir, config, "classifier")
  config.data.data_dir = "/c"
  with pytest.raises(UserError, match=r"data\.data_dir \('/a' -> '/c'\): dataset 'fer2013' "
                                      r"there holds 7 files, not the 9"):
    workdir_lib.open_for_training(workdir, config, "classifier")


def test_an_unlabeled_folder_source_moved_with_the_same_files_resumes(tmp_path):
  from ferjax.kinds import pretrain as pretrain_kind
  config = pretrain_kind.default_config()
  config.data.sources = f"synthetic,folder:{faces(tmp_path / 'faces')}:2"
  workdir, _ = workdir_lib.open_for_training(tmp_path / "w", config, "pretrain")
  (tmp_path / "faces").rename(tmp_path / "moved")
  config.data.sources = f"synthetic,folder:{tmp_path / 'moved'}:2"
  workdir_lib.open_for_training(workdir, config, "pretrain")
  config.data.sources = f"synthetic,folder:{faces(tmp_path / 'other', ('a',))}:2"
  with pytest.raises(UserError, match=r"data\.sources"):
    workdir_lib.open_for_training(workdir, config, "pretrain")
  config.data.sources = f"synthetic,folder:{tmp_path / 'moved'}:3"  # Another weight.
  with pytest.raises(UserError, match=r"data\.sources"):
    workdir_lib.open_for_training(workdir, config, "pretrain")


def test_a_user_error_or_crash_before_step_1_takes_the_new_record_back(tmp_path):
  for error in (UserError("bad data"), TypeError("jax said no")):
    workdir, _ = workdir_lib.open_for_training(tmp_path / "w", classifier_kind.default_config(),
                                               "classifier")
    with pytest.raises(type(error)):
      with workdir_lib.training_lock(workdir):
        raise error
    assert not workdir.exists()
