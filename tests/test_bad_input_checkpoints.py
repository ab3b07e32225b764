"""Damaged checkpoints: resuming skips them with one warning line, asking for one is one error line.

Each case damages a private copy of a shared tiny run (conftest `tiny_runs`): the classifier run
keeps steps 2 and 4 in `last/` and step 2 as the best; the VAE-GAN run keeps step 2 only.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badinput import copy_run, digest, expect_one_line
from ferjax import cli, runs
from ferjax.core import parallel
from ferjax.core.checkpoint import Checkpoints
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind


def _largest_array_file(step: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _truncate_array(step):
  path = _largest_array_file(step)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garble(relative):
  return lambda step: (step / relative).write_text("{garbled")


# Damage kind -> (how, what the one line says about it).
DAMAGE = {
    "truncated-array": (_truncate_array, "arrays unreadable"),
    "deleted-array": (lambda step: _largest_array_file(step).unlink(), "arrays unreadable"),
    "garbled-state-metadata": (_garble("state/_METADATA"), "state metadata unreadable"),
    "deleted-state-metadata": (lambda step: (step / "state" / "_METADATA").unlink(),
                               "state/_METADATA) is missing"),
    "empty-manifest": (lambda step: (step / "state" / "manifest.ocdbt").write_bytes(b""),
                       "state metadata unreadable"),
    "garbled-meta": (_garble("meta/metadata"), "meta unreadable"),
    "missing-meta": (lambda step: [p.unlink() for p in (step / "meta").iterdir()],
                     "meta unreadable"),
}


def _damage(step: pathlib.Path, kind: str) -> str:
  how, says = DAMAGE[kind]
  how(step)
  return says


@pytest.fixture(scope="module")
def target(tiny_runs):
  """The abstract train state of the tiny classifier run (what `ferjax evaluate` restores into)."""
  config = classifier_kind.read_config(tiny_runs.classifier)
  with runs.classifier_checkpoints(tiny_runs.classifier, config) as ckpt:
    classes = len(ckpt.read_meta(2)["class_names"])
  model = classifier_kind.build_model(config, classes)
  return classifier_kind.abstract_state(config, model, parallel.make_mesh(1))


def _stderr_lines(capsys) -> list[str]:
  return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_latest_skips_a_damaged_step_with_one_line(kind, tiny_runs, target, tmp_path, capsys):
  """The newest step damaged: "latest" restores step 2 with one warning and leaves the damaged
  folder on disk; asking for step 4 by number is one error line naming its folder."""
  work = copy_run(tiny_runs.classifier, tmp_path / "run")
  step4 = work / "checkpoints" / "last" / "4"
  says = _damage(step4, kind)
  before = digest(work)
  capsys.readouterr()
  with Checkpoints(work / "checkpoints", best_metric="mean_class_accuracy") as ckpt:
    _, meta = ckpt.restore(target, "latest")
    assert meta["step"] == 2 and ckpt.latest_step() == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ferjax: warning: checkpoint {step4} is damaged ("), lines[0]
    assert says in lines[0] and lines[0].endswith("skipped it, using step 2"), lines[0]
    with pytest.raises(UserError) as error:
      ckpt.restore(target, 4)
  message = str(error.value)
  assert len(message.splitlines()) == 1 and len(message) < 400, message
  assert message.startswith(f"checkpoint {step4} is damaged (") and says in message, message
  assert "another config" not in message and "Traceback" not in message
  assert _stderr_lines(capsys) == []
  assert digest(work) == before, "a damaged checkpoint was changed or removed"


def test_garbled_orbax_bookkeeping_is_not_damage(tiny_runs, target, tmp_path, capsys):
  """`_CHECKPOINT_METADATA` (orbax's commit time) is not needed to restore: step 4 is used,
  and orbax's error log about it stays off stderr."""
  work = copy_run(tiny_runs.classifier, tmp_path / "run")
  (work / "checkpoints" / "last" / "4" / "_CHECKPOINT_METADATA").write_text("{garbled")
  capsys.readouterr()
  with Checkpoints(work / "checkpoints", best_metric="mean_class_accuracy") as ckpt:
    assert ckpt.restore(target, "latest")[1]["step"] == 4
  assert _stderr_lines(capsys) == []


@pytest.mark.slow
def test_resume_replays_from_the_newest_intact_step(tiny_runs, tmp_path, capsys):
  """`ferjax train` extending a run whose newest step is damaged: one warning line, training
  resumes from step 2, saves step 4 again (replacing the damaged one) and reaches step 6."""
  work = copy_run(tiny_runs.classifier, tmp_path / "run")
  _damage(work / "checkpoints" / "last" / "4", "truncated-array")
  capsys.readouterr()
  assert cli.main(["train", "--config", str(tiny_runs.classifier_config), "--workdir", str(work),
                   "--config.train.num_steps=6"]) == 0
  err = capsys.readouterr().err
  said = [line for line in err.splitlines() if "ferjax" in line or "absl" in line]
  assert "Traceback" not in err and len(said) == 1, err
  assert said[0].startswith(f"ferjax: warning: checkpoint {work}/checkpoints/last/4 is damaged")
  assert said[0].endswith("using step 2"), said[0]
  steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert max(steps) == 6 and steps.count(4) == steps.count(2), steps  # Step 4 logged once.
  with Checkpoints(work / "checkpoints") as ckpt:
    assert ckpt.latest_step() == 6 and 4 in ckpt.steps()
    assert ckpt.read_meta(4)["step"] == 4  # The replayed step 4 replaced the damaged one.
  assert _stderr_lines(capsys) == []


@pytest.mark.parametrize("extend", [(), ("--config.train.num_steps=6",)],
                         ids=["resume", "extend"])
def test_no_intact_step_left_is_one_line(extend, tiny_runs, tmp_path, capsys):
  """Also when the command extends the run: the refused extension is taken back from run.json
  and config.json."""
  work = copy_run(tiny_runs.classifier, tmp_path / "run")
  _damage(work / "checkpoints" / "last" / "2", "garbled-meta")
  _damage(work / "checkpoints" / "last" / "4", "deleted-state-metadata")
  # train.lock records the newest trainer's pid: everything else stays as it was.
  keep = [work / name for name in ("checkpoints", "metrics.jsonl", "run.json", "config.json")]
  expect_one_line(["train", "--config", tiny_runs.classifier_config, "--workdir", work, *extend],
                  [f"{work}/checkpoints/last: no intact checkpoint is left", "newest, 4",
                   "restore its files"], capsys, protect=keep)


@pytest.mark.parametrize("which, folder, kind", [
    ("best", "best/2", "truncated-array"),
    ("4", "last/4", "deleted-state-metadata"),
])
def test_evaluating_a_damaged_step_is_one_line(which, folder, kind, tiny_runs, tmp_path, capsys):
  """An explicitly chosen damaged checkpoint is not replaced by another one: one line naming
  it (a missing metadata file says so, not "written by another config?")."""
  work = copy_run(tiny_runs.classifier, tmp_path / "run")
  says = _damage(work / "checkpoints" / folder, kind)
  line = expect_one_line(["evaluate", "--workdir", work, "--checkpoint", which],
                         [f"checkpoint {work}/checkpoints/{folder} is damaged", says,
                          "choose another checkpoint"], capsys, protect=[work])
  assert "another config" not in line


def test_synthesizing_from_a_damaged_vaegan_is_one_line(tiny_runs, tmp_path, capsys):
  work = copy_run(tiny_runs.vaegan, tmp_path / "vaegan")
  _damage(work / "checkpoints" / "last" / "2", "empty-manifest")
  out = tmp_path / "out"
  expect_one_line(["synthesize", "--vaegan", work, "--per-class", 2, "--out", out],
                  [f"{work}/checkpoints/last: no intact checkpoint is left", "state metadata"],
                  capsys, protect=[work, out])
  assert not out.exists()


def test_a_garbled_best_meta_is_one_warning_then_replaced(tiny_runs, target, tmp_path, capsys):
  """Opening the checkpoints never reads the best; the first save offering a best candidate
  warns once and the candidate becomes the best."""
  work = copy_run(tiny_runs.classifier, tmp_path / "run")
  _damage(work / "checkpoints" / "best" / "2", "garbled-meta")
  capsys.readouterr()
  with Checkpoints(work / "checkpoints", best_metric="mean_class_accuracy") as ckpt:
    state, meta = ckpt.restore(target, "latest")
    assert meta["step"] == 4 and _stderr_lines(capsys) == []
    ckpt.save(6, state, metrics={"mean_class_accuracy": 0.01})
    ckpt.save(8, state, metrics={"mean_class_accuracy": 0.001})  # Worse: not the best.
    assert ckpt.best_step() == 6
  lines = _stderr_lines(capsys)
  assert len(lines) == 1 and lines[0].startswith(
      f"ferjax: warning: checkpoint {work}/checkpoints/best/2 is damaged (meta unreadable"), lines
  assert lines[0].endswith("the next validated step replaces it as the best"), lines[0]


def _small(value):
  """A state with an array file big enough to damage (random: zeros compress to nothing)."""
  noise = jax.random.normal(jax.random.PRNGKey(value), (64, 64))
  return {"w": noise, "step": jnp.array(value, jnp.int32)}


def test_saving_past_damaged_steps_replaces_them(tmp_path, capsys):
  """Steps 4 and 6 damaged: "latest" gives step 2 (one line each); the replayed run saves 4
  below the damaged 6 and then replaces 6, and both restore again."""
  ckpt = Checkpoints(tmp_path, max_to_keep=5)
  for step in (2, 4, 6):
    ckpt.save(step, _small(step))
  ckpt.close()
  _damage(tmp_path / "last" / "4", "garbled-meta")
  _damage(tmp_path / "last" / "6", "truncated-array")
  capsys.readouterr()
  with Checkpoints(tmp_path, max_to_keep=5) as ckpt:
    state, meta = ckpt.restore(_small(0), "latest")
    assert meta["step"] == 2 and int(state["step"]) == 2 and ckpt.latest_step() == 2
    lines = _stderr_lines(capsys)
    assert [line.split(" is damaged")[0] for line in lines] == [
        f"ferjax: warning: checkpoint {tmp_path}/last/6", f"ferjax: warning: checkpoint "
        f"{tmp_path}/last/4"], lines
    assert all(line.endswith("using step 2") for line in lines), lines
    ckpt.save(4, _small(4))
    assert ckpt.latest_step() == 4
    ckpt.save(6, _small(6))
    for step in (4, 6):
      state, meta = ckpt.restore(_small(0), step)
      assert meta["step"] == step and np.array_equal(state["w"], _small(step)["w"])
  assert _stderr_lines(capsys) == []
