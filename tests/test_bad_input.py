"""The standing bad-input suite (issue 15): flags, config files and overrides, workdirs, the
verbs that reopen a run, and multi-process start-up. Every case: exit 2, one stderr line naming
the file or field, no traceback, nothing that existed changed (tests/badinput.py).

The data layer's cases are in test_bad_input_data.py, damaged checkpoints in
test_bad_input_checkpoints.py. A new verb adds its cases to a table here.
"""

import fcntl
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from badinput import PROGRESS, copy_run, expect_one_line
from ferjax.core import monitor


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def config_file(t, body: str, name="c.py"):
  return write(t / name, body)


TINY = "from ferjax.kinds import classifier\n\ndef get_config():\n  c = classifier.default_config()\n"
PRETRAIN = "from ferjax.kinds import pretrain\n\ndef get_config():\n  return pretrain.default_config()\n"


def folder_dataset(t, counts: dict, size=32):
  """<t>/faces/train/<class>/*.png with `counts` images per class, classes.txt listing all."""
  root = t / "faces"
  for name, n in counts.items():
    (root / "train" / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
      Image.fromarray(np.full((size, size), 40 * i % 256, np.uint8)).save(
          root / "train" / name / f"{i}.png")
  write(root / "classes.txt", "".join(f"{n}\n" for n in counts))
  return root


def train(r, t, *overrides, workdir=None):
  workdir = t / "w" if workdir is None else workdir
  return ["train", "--config", r.classifier_config, "--workdir", workdir, *overrides]


def folder_train(r, t, counts):
  root = folder_dataset(t, counts)
  return train(r, t, "--config.data.name=folder", f"--config.data.manual_dir={root}",
               "--config.data.val_split=None", "--config.data.num_examples=None"), [root]


def held_lock(t, r):
  w = copy_run(r.classifier, t / "w")
  handle = open(w / "train.lock", "a+")
  fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  handle.seek(0)
  handle.truncate()
  handle.write("pid 4242 on elsewhere since 2026-12-02 06:00:00\n")
  handle.flush()
  _HELD.append(handle)  # Closed (released) when the test module ends.
  return train(r, t, workdir=w), [w]


_HELD = []


def garble(path, text="{not json"):
  path.write_text(text)
  return path


def damaged(t, r, name, text):
  w = copy_run(r.classifier, t / "w")
  garble(w / name, text)
  return train(r, t, workdir=w), [w]


def without_last(t, r):
  w = copy_run(r.classifier, t / "w")
  shutil.rmtree(w / "checkpoints" / "last")
  return train(r, t, workdir=w), [w]


def without_checkpoints(t, r, argv, vaegan=False):
  """A copy of a finished run without its checkpoints/ folder (reading must not recreate it)."""
  w = copy_run(r.vaegan if vaegan else r.classifier, t / "w")
  shutil.rmtree(w / "checkpoints")
  return [*argv, "--vaegan" if vaegan else "--workdir", w], [w, t]


def a_file(t, name="file.txt"):
  return write(t / name, "not a folder\n")


# Each case: id -> (setup(tmp_path, tiny_runs) -> (argv, protected paths), what the line names).
CASES = {
    # --- flags ------------------------------------------------------------------------------
    "unknown-verb": (lambda t, r: (["frobnicate"], []), "invalid choice"),
    "missing-required-flag": (lambda t, r: (["train", "--config", r.classifier_config], []),
                              "--workdir"),
    "unknown-flag": (lambda t, r: (train(r, t, "--bogus"), []), "--bogus"),
    "bad-choice": (lambda t, r: (["evaluate", "--workdir", r.classifier, "--tta", "rotate"],
                                 [r.classifier]), "--tta"),
    "int-flag-not-int": (lambda t, r: (["bench", "classifier", "--steps", "many"], []), "--steps"),
    "bench-zero-steps": (lambda t, r: (["bench", "classifier", "--steps", "0"], []), "--steps"),
    "bench-negative-steps": (lambda t, r: (["bench", "classifier", "--steps", "-3"], []),
                             "--steps"),
    "bench-zero-batch": (lambda t, r: (["bench", "classifier", "--batch", "0"], []), "batch"),
    "bench-bad-override": (lambda t, r: (["bench", "classifier", "--config.model.width=0"], []),
                           "model.width"),
    "overrides-on-a-verb-without-config": (lambda t, r: (["demo", "--config.seed=1"], []),
                                           "--config"),
    "prepare-folder": (lambda t, r: (["data", "prepare", "folder", "--manual-dir", t], []),
                       "folder"),
    "stats-unknown-dataset": (lambda t, r: (["data", "stats", "nope", "--out", t / "s"], []),
                              "nope"),
    "stats-unknown-split": (lambda t, r: (["data", "stats", "synthetic", "--split", "dev",
                                           "--out", t / "s"], []), "dev"),
    # --- config files ---------------------------------------------------------------------------
    "config-missing": (lambda t, r: (train(r, t)[:1] + ["--config", t / "no.py", "--workdir",
                                                         t / "w"], []), "no.py"),
    "config-syntax-error": (lambda t, r: (["train", "--config", config_file(t, "def get_config(:\n"),
                                           "--workdir", t / "w"], []), "c.py"),
    "config-import-error": (lambda t, r: (["train", "--config",
                                           config_file(t, "import no_such_module\n"),
                                           "--workdir", t / "w"], []), "no_such_module"),
    "config-without-get-config": (lambda t, r: (["train", "--config", config_file(t, "x = 1\n"),
                                                 "--workdir", t / "w"], []), "get_config"),
    "get-config-raises": (lambda t, r: (["train", "--config", config_file(
        t, "def get_config():\n  raise RuntimeError('boom')\n"), "--workdir", t / "w"], []),
                          "boom"),
    "get-config-returns-dict": (lambda t, r: (["train", "--config", config_file(
        t, "def get_config():\n  return {}\n"), "--workdir", t / "w"], []), "ConfigDict"),
    "config-misspelled-field": (lambda t, r: (["train", "--config", config_file(
        t, TINY + "  c.train.num_stepz = 3\n  return c\n"), "--workdir", t / "w"], []),
                                "num_stepz"),
    "config-wrong-type-in-file": (lambda t, r: (["train", "--config", config_file(
        t, TINY + "  c.train.num_steps = 'ten'\n  return c\n"), "--workdir", t / "w"], []),
                                  "num_steps"),
    "vaegan-config-for-classifier": (lambda t, r: (["train", "--config", r.vaegan_config,
                                                    "--workdir", t / "w"], []),
                                     "unknown config field"),
    # --- overrides --------------------------------------------------------------------------
    "override-unknown-field": (lambda t, r: (train(r, t, "--config.train.num_stepz=3"), []),
                               "num_stepz"),
    "override-a-group": (lambda t, r: (train(r, t, "--config.train=3"), []), "train"),
    "override-without-value": (lambda t, r: (train(r, t, "--config.train.num_steps"), []),
                               "train.num_steps"),
    "override-int-not-int": (lambda t, r: (train(r, t, "--config.data.image_size=abc"), []),
                             "data.image_size"),
    "override-float-a-list": (lambda t, r: (train(r, t, "--config.model.width=[1]"), []),
                              "model.width"),
    "override-bool-not-bool": (lambda t, r: (train(r, t, "--config.augment.flip=maybe"), []),
                               "augment.flip"),
    "override-tuple-a-scalar": (lambda t, r: (train(r, t,
                                                    "--config.augment.resized_crop_scale=0.5"),
                                              []), "augment.resized_crop_scale"),
    "override-tuple-of-3": (lambda t, r: (train(
        r, t, "--config.augment.resized_crop_scale=(0.1,0.2,0.3)"), []),
                            "augment.resized_crop_scale"),
    "override-tuple-of-strings": (lambda t, r: (train(
        r, t, "--config.augment.resized_crop_scale=('a','b')"), []),
                                  "augment.resized_crop_scale"),
    "override-text-given-digits": (lambda t, r: (train(r, t, "--config.data.data_dir=2024"), []),
                                   "data.data_dir"),
    "override-none-where-required": (lambda t, r: (train(r, t, "--config.train.num_steps=None"),
                                                   []), "train.num_steps"),
    "negative-learning-rate": (lambda t, r: (train(r, t, "--config.optim.lr=-1"), []),
                               "optim.lr"),
    "image-size-too-small": (lambda t, r: (train(r, t, "--config.data.image_size=4"), []),
                             "data.image_size"),
    "two-channels": (lambda t, r: (train(r, t, "--config.data.channels=2"), []),
                     "data.channels"),
    "zero-batch": (lambda t, r: (train(r, t, "--config.train.batch_size=0"), []),
                   "train.batch_size"),
    "zero-steps": (lambda t, r: (train(r, t, "--config.train.num_steps=0"), []),
                   "train.num_steps"),
    "select-on-test": (lambda t, r: (train(r, t, "--config.data.val_split=test"), []),
                       "data.val_split"),
    "unknown-loss": (lambda t, r: (train(r, t, "--config.loss.name=nope"), []), "loss.name"),
    "unknown-dataset": (lambda t, r: (train(r, t, "--config.data.name=nope"), []), "data.name"),
    "unknown-model": (lambda t, r: (train(r, t, "--config.model.name=resnet7"), []),
                      "model.name"),
    "vaegan-bad-override": (lambda t, r: (["train-vaegan", "--config", r.vaegan_config,
                                           "--workdir", t / "v", "--config.model.latent_dim=0"],
                                          []), "model.latent_dim"),
    "pretrain-bad-override": (lambda t, r: (["pretrain", "--config", config_file(t, PRETRAIN),
                                             "--workdir", t / "p", "--config.mae.mask_ratio=1"],
                                            [t]), "mae.mask_ratio"),
    # --- data named by the config ---------------------------------------------------------------
    "folder-without-manual-dir": (lambda t, r: (train(r, t, "--config.data.name=folder"), []),
                                  "manual_dir"),
    "folder-missing": (lambda t, r: (train(r, t, "--config.data.name=folder",
                                           f"--config.data.manual_dir={t / 'gone'}"), []),
                       "gone"),
    "folder-class-without-images": (lambda t, r: folder_train(r, t, {"a": 3, "b": 3, "c": 0}),
                                    "'c'"),
    "folder-without-any-image": (lambda t, r: folder_train(r, t, {"a": 0, "b": 0}), "no images"),
    "real-dataset-not-prepared": (lambda t, r: (train(r, t, "--config.data.name=fer2013",
                                                      f"--config.data.data_dir={t / 'data'}"),
                                                []), "data prepare"),
    "data-dir-is-a-file": (lambda t, r: (train(r, t, "--config.data.name=fer2013",
                                               f"--config.data.data_dir={a_file(t)}"), [t]),
                           "file.txt"),
    # --- workdirs -----------------------------------------------------------------------------
    "workdir-empty-name": (lambda t, r: (train(r, t, workdir=""), []), "--workdir"),
    "workdir-is-a-file": (lambda t, r: (train(r, t, workdir=a_file(t)), [t]), "file.txt"),
    "workdir-under-a-file": (lambda t, r: (train(r, t, workdir=a_file(t) / "w"), [t]),
                             "file.txt"),
    "classifier-into-vaegan-workdir": (lambda t, r: (train(r, t, workdir=r.vaegan),
                                                     [r.vaegan]), "VAE-GAN run"),
    "vaegan-into-classifier-workdir": (lambda t, r: (["train-vaegan", "--config", r.vaegan_config,
                                                      "--workdir", r.classifier],
                                                     [r.classifier]), "classifier run"),
    "other-width-into-a-run": (lambda t, r: (train(r, t, "--config.model.width=0.5",
                                                   workdir=r.classifier), [r.classifier]),
                               "model.width"),
    "other-seed-into-a-run": (lambda t, r: (train(r, t, "--config.seed=5", workdir=r.classifier),
                                            [r.classifier]), "seed"),
    "other-loss-into-a-run": (lambda t, r: (train(r, t, "--config.loss.name=logit_adjusted",
                                                  workdir=r.classifier), [r.classifier]),
                              "loss.name"),
    "fewer-steps-into-a-run": (lambda t, r: (train(r, t, "--config.train.num_steps=2",
                                                   workdir=r.classifier), [r.classifier]),
                               "train.num_steps"),
    "vaegan-other-config": (lambda t, r: (["train-vaegan", "--config", r.vaegan_config,
                                           "--workdir", r.vaegan, "--config.seed=3"],
                                          [r.vaegan]), "seed"),
    "checkpoints-deleted": (without_last, "checkpoints/last"),
    "run-record-garbled": (lambda t, r: damaged(t, r, "run.json", "{not json"), "run.json"),
    "config-record-garbled": (lambda t, r: damaged(t, r, "config.json", "[1, 2"), "config.json"),
    "config-record-not-utf8": (lambda t, r: damaged_bytes(t, r), "config.json"),
    "second-trainer": (held_lock, "pid 4242 on elsewhere"),
    # --- evaluate -----------------------------------------------------------------------------
    "evaluate-missing-workdir": (lambda t, r: (["evaluate", "--workdir", t / "gone"], []), "gone"),
    "evaluate-empty-folder": (lambda t, r: (["evaluate", "--workdir", (t / "e").mkdir() or t / "e"],
                                            [t]), "config.json"),
    "evaluate-a-file": (lambda t, r: (["evaluate", "--workdir", a_file(t)], [t]), "file.txt"),
    "evaluate-a-vaegan-run": (lambda t, r: (["evaluate", "--workdir", r.vaegan], [r.vaegan]),
                              "VAE-GAN run"),
    "evaluate-without-checkpoints": (lambda t, r: without_checkpoints(t, r, ["evaluate"]),
                                     "no checkpoint"),
    "synthesize-without-checkpoints": (lambda t, r: without_checkpoints(
        t, r, ["synthesize", "--per-class", "2", "--out", t / "o"], vaegan=True),
                                       "no checkpoint"),
    "evaluate-checkpoint-word": (lambda t, r: (["evaluate", "--workdir", r.classifier,
                                                "--checkpoint", "newest"], [r.classifier]),
                                 "newest"),
    "evaluate-checkpoint-not-kept": (lambda t, r: (["evaluate", "--workdir", r.classifier,
                                                    "--checkpoint", "999"], [r.classifier]),
                                     "999"),
    "evaluate-logit-adjust-nan": (lambda t, r: (["evaluate", "--workdir", r.classifier,
                                                 "--logit-adjust", "nan"], [r.classifier]),
                                  "--logit-adjust"),
    "evaluate-logit-adjust-not-a-number": (lambda t, r: (["evaluate", "--workdir", r.classifier,
                                                          "--logit-adjust", "x"],
                                                         [r.classifier]), "--logit-adjust"),
    "evaluate-unknown-split": (lambda t, r: (["evaluate", "--workdir", r.classifier, "--split",
                                              "dev"], [r.classifier]), "dev"),
    # --- synthesize and evaluate-synthetic ---------------------------------------------------
    "synthesize-from-a-classifier": (lambda t, r: (["synthesize", "--vaegan", r.classifier,
                                                    "--per-class", "2", "--out", t / "o"],
                                                   [r.classifier]), "classifier run"),
    "synthesize-missing-vaegan": (lambda t, r: (["synthesize", "--vaegan", t / "gone",
                                                 "--per-class", "2", "--out", t / "o"], []),
                                  "gone"),
    "synthesize-zero-per-class": (lambda t, r: (["synthesize", "--vaegan", r.vaegan,
                                                 "--per-class", "0", "--out", t / "o"], []),
                                  "--per-class"),
    "synthesize-out-exists": (lambda t, r: (["synthesize", "--vaegan", r.vaegan, "--per-class",
                                             "2", "--out", r.classifier], [r.classifier]),
                              "already exists"),
    "synthesize-out-under-a-file": (lambda t, r: (["synthesize", "--vaegan", r.vaegan,
                                                   "--per-class", "2", "--out",
                                                   a_file(t) / "o"], [t]), "file.txt"),
    "synthesize-bad-config-field": (lambda t, r: (["synthesize", "--vaegan", r.vaegan,
                                                   "--per-class", "2", "--out", t / "o",
                                                   "--config", r.classifier_config,
                                                   "--config.augment.alpha=-1"], []),
                                    "augment.alpha"),
    "evaluate-synthetic-swapped": (lambda t, r: (["evaluate-synthetic", "--vaegan", r.classifier,
                                                  "--classifier", r.vaegan, "--out", t / "q"],
                                                 [r.classifier, r.vaegan]), "holds a"),
    "evaluate-synthetic-out-a-file": (lambda t, r: (["evaluate-synthetic", "--vaegan", r.vaegan,
                                                     "--classifier", r.classifier, "--out",
                                                     a_file(t)], [t]), "file.txt"),
    "evaluate-synthetic-zero-per-class": (lambda t, r: (["evaluate-synthetic", "--vaegan",
                                                         r.vaegan, "--classifier", r.classifier,
                                                         "--per-class", "0", "--out", t / "q"],
                                                        []), "--per-class"),
    "demo-workdir-a-file": (lambda t, r: (["demo", "--workdir", a_file(t)], [t]), "file.txt"),
    "demo-negative-seed": (lambda t, r: (["demo", "--workdir", t / "d", "--seed", "-1"], []),
                           "seed"),
    # --- multi-process start-up ------------------------------------------------------------
    "process-id-out-of-range": (lambda t, r: (train(r, t, "--process-id", "3", "--num-processes",
                                                    "2", "--coordinator-address",
                                                    "localhost:1"), []), "--process-id 3"),
    "processes-without-coordinator": (lambda t, r: (train(r, t, "--process-id", "1",
                                                          "--num-processes", "2"), []),
                                      "--coordinator-address"),
    "coordinator-without-processes": (lambda t, r: (train(r, t, "--coordinator-address",
                                                          "localhost:1"), []), "--num-processes"),
    "coordinator-without-port": (lambda t, r: (train(r, t, "--coordinator-address", "nohost",
                                                     "--num-processes", "2", "--process-id",
                                                     "0"), []), "host:port"),
    "zero-processes": (lambda t, r: (train(r, t, "--coordinator-address", "localhost:1",
                                           "--num-processes", "0", "--process-id", "0"), []),
                       "--num-processes"),
}


def damaged_bytes(t, r):
  w = copy_run(r.classifier, t / "w")
  (w / "config.json").write_bytes(b"\xff\xfe{")
  return train(r, t, workdir=w), [w]


ENV_CASES = {
    "JAX_NUM_PROCESSES-not-a-number": ({"JAX_NUM_PROCESSES": "abc"}, "JAX_NUM_PROCESSES"),
    "JAX_PROCESS_ID-not-a-number": ({"JAX_PROCESS_ID": "x"}, "JAX_PROCESS_ID"),
    "JAX_PROCESS_ID-out-of-range": ({"JAX_COORDINATOR_ADDRESS": "localhost:1",
                                     "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
                                    "--process-id 2"),
}


# `ferjax config show` reads no run: its cases need no tiny run. Each: id -> (setup(tmp_path) ->
# argv after `config show`, what the line names).
NO_KIND = ("import ml_collections\n\ndef get_config():\n"
           "  return ml_collections.ConfigDict({'x': 1})\n")
CONFIG_SHOW_CASES = {
    "unknown-kind": (lambda t: ["nokind"], "invalid choice: 'nokind'"),
    "neither-kind-nor-file": (lambda t: [], "KIND"),
    "unknown-flag": (lambda t: ["classifier", "--bogus"], "--bogus"),
    "file-missing": (lambda t: ["--config", t / "no.py"], "no.py"),
    "file-syntax-error": (lambda t: ["--config", config_file(t, "def get_config(:\n")], "c.py"),
    "file-wrong-type": (lambda t: ["--config", config_file(
        t, TINY + "  c.train.num_steps = 'ten'\n  return c\n")], "num_steps"),
    "file-of-no-kind": (lambda t: ["--config", config_file(t, NO_KIND)], "no kind"),
    "file-of-another-kind": (lambda t: ["vaegan", "--config",
                                        config_file(t, TINY + "  return c\n")],
                             "unknown config field"),
    "override-unknown-field": (lambda t: ["classifier", "--config.optim.lrr=1"], "optim.lrr"),
    "override-wrong-type": (lambda t: ["vaegan", "--config.train.num_steps=many"],
                            "train.num_steps"),
    "override-out-of-range": (lambda t: ["pretrain", "--config.mae.mask_ratio=1"],
                              "mae.mask_ratio"),
    "override-without-value": (lambda t: ["classifier", "--config.seed"], "seed"),
    "override-on-a-file": (lambda t: ["--config", config_file(t, PRETRAIN),
                                      "--config.model.width=0"], "model.width"),
}


@pytest.mark.parametrize("case", CONFIG_SHOW_CASES)
def test_config_show_bad_input_is_one_line(case, tmp_path, capsys):
  setup, needle = CONFIG_SHOW_CASES[case]
  expect_one_line(["config", "show", *setup(tmp_path)], needle, capsys, protect=[tmp_path])


@pytest.fixture(scope="module", autouse=True)
def _release_locks():
  yield
  for handle in _HELD:
    handle.close()


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case, tiny_runs, tmp_path, capsys):
  setup, needle = CASES[case]
  argv, protect = setup(tmp_path, tiny_runs)
  expect_one_line(argv, needle, capsys, protect=[*protect, tiny_runs.classifier,
                                                 tiny_runs.vaegan])


@pytest.mark.parametrize("case", ENV_CASES)
def test_bad_environment_is_one_line(case, tiny_runs, tmp_path, capsys, monkeypatch):
  env, needle = ENV_CASES[case]
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  expect_one_line(train(tiny_runs, tmp_path), needle, capsys)
  assert not (tmp_path / "w").exists()


def test_a_run_failing_on_its_data_leaves_no_record_so_the_fix_may_change_the_config(
    tiny_runs, tmp_path, capsys):
  argv, _ = folder_train(tiny_runs, tmp_path, {"a": 3, "b": 0})
  expect_one_line(argv, "'b'", capsys)
  assert not (tmp_path / "w").exists()  # Not even run.json: the next command starts afresh.


@pytest.fixture
def read_only(tmp_path):
  """make(folder): makes `folder` read-only for this process (chmod, or a read-only bind mount
  where the tests run as root); skips where neither is possible."""
  mounts = []

  def make(folder):
    folder.chmod(0o555)
    try:
      (folder / ".probe").write_text("")
      (folder / ".probe").unlink()
    except OSError:
      return folder
    rc = subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode
    if rc == 0:
      mounts.append(folder)
      rc = subprocess.run(["mount", "-o", "remount,ro,bind", folder],
                          capture_output=True).returncode
    if rc != 0:
      pytest.skip("cannot make a folder read-only here (root without mount rights)")
    return folder

  yield make
  for folder in mounts:
    subprocess.run(["umount", folder], capture_output=True)


def test_evaluate_into_a_read_only_workdir_refuses_before_the_work(tiny_runs, tmp_path, capsys,
                                                                   read_only, monkeypatch):
  from ferjax import evaluate
  w = read_only(copy_run(tiny_runs.classifier, tmp_path / "w"))
  monkeypatch.setattr(evaluate, "predict_logits", lambda *a, **k: pytest.fail("did the work"))
  expect_one_line(["evaluate", "--workdir", w], "cannot write", capsys, protect=[w])


def test_training_into_a_read_only_parent_is_one_line(tiny_runs, tmp_path, capsys, read_only):
  (tmp_path / "ro").mkdir()
  parent = read_only(tmp_path / "ro")
  expect_one_line(train(tiny_runs, tmp_path, workdir=parent / "w"), "cannot write", capsys,
                  protect=[parent])


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_keeps_the_checkpoint(tiny_runs, tmp_path,
                                                                         capsys, monkeypatch):
  import errno
  w = copy_run(tiny_runs.classifier, tmp_path / "w")
  write_metrics = monitor.MetricWriter.write

  def full(self, step, metrics):
    if step >= 6:
      raise OSError(errno.ENOSPC, "No space left on device")
    return write_metrics(self, step, metrics)

  monkeypatch.setattr(monitor.MetricWriter, "write", full)
  extend = train(tiny_runs, tmp_path, "--config.train.num_steps=8", workdir=w)
  expect_one_line(extend, "No space left", capsys)
  # The resume point is intact (resuming from it is exact: test_trust kills runs mid-save).
  assert (w / "checkpoints" / "last" / "4").is_dir()
  assert max(r["step"] for r in monitor.read_metrics(w)) == 4


# --- Signals, hangs and a real full disk: real processes ---------------------------------------
def _ferjax(*args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "ferjax.cli", *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _messages(err: str) -> list[str]:
  """The stderr lines that are not progress bars."""
  lines = [line.split("\r")[-1] for line in err.split("\n")]
  return [line for line in lines if line.strip() and not PROGRESS.match(line)]


@pytest.fixture
def small_disk(tmp_path):
  """mount(size_kib) -> a folder on a new tmpfs of that size (skips where mounting is not
  allowed, e.g. without root)."""
  mounted = []

  def mount(size_kib: int):
    folder = tmp_path / f"disk{len(mounted)}"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                           str(folder)], capture_output=True)
    if done.returncode != 0:
      pytest.skip("cannot mount a small tmpfs here (needs root)")
    mounted.append(folder)
    return folder
  yield mount
  for folder in mounted:
    subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_checkpoint(tiny_runs,
                                                                                  small_disk):
  """A real full disk while orbax writes: its writer threads' tracebacks and asyncio's leftovers
  stay off stderr; the one line is all a user sees."""
  size = sum(p.stat().st_size for p in tiny_runs.classifier.rglob("*") if p.is_file()) // 1024
  w = small_disk(size + 400) / "w"  # Room for the run and its metrics, not for a new step.
  shutil.copytree(tiny_runs.classifier, w)
  proc = _ferjax("train", "--config", tiny_runs.classifier_config, "--workdir", w,
                 "--config.train.num_steps=8")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err
  assert "Traceback" not in out + err
  assert len(_messages(err)) == 1, err
  assert _messages(err)[0].startswith("ferjax: error: ") and "No space left" in err
  assert (w / "checkpoints" / "last" / "4").is_dir()


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_exits_with_one_line(tiny_runs, tmp_path):
  w = tmp_path / "w"
  proc = _ferjax("train", "--config", tiny_runs.classifier_config, "--workdir", w,
                 "--config.train.num_steps=2000", "--config.train.checkpoint_every=1000",
                 "--config.train.eval_every=1000")
  deadline = time.time() + 240
  while not (w / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "Traceback" not in out + err
  assert len(_messages(err)) == 1, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("ferjax: interrupted: SIGINT: stopped after step"), last
  step = int(last.split("after step ")[1].split(",")[0])
  saved = sorted(int(p.name) for p in (w / "checkpoints" / "last").iterdir() if p.name.isdigit())
  assert saved[-1] == step and step < 2000


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_peers_that_never_start_end_in_one_line_not_a_stack_trace(tiny_runs, tmp_path):
  proc = _ferjax("train", "--config", tiny_runs.classifier_config, "--workdir", tmp_path / "w",
                 "--coordinator-address", f"localhost:{_free_port()}", "--num-processes", "2",
                 "--process-id", "1", "--init-timeout", "3")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, err
  assert "waiting up to 3 s for the coordinator" in out  # Said at once, before the wait.
  assert err.strip().splitlines() == [err.strip()] and "timed out after 3 s" in err
  assert not (tmp_path / "w").exists()
