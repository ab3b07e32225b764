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
