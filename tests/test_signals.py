"""Ctrl-C and SIGTERM at any moment: one line, exit 130 or 143, a trainer saves, and the resumed
run is indistinguishable from an uninterrupted one (its metrics.jsonl included).

The fast tests drive the loop in this process with a stand-in train step; the slow ones signal
real `ferjax` processes (each verb, the demo) at seeded random moments and rerun them.
"""

import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import types

import flax
import jax.numpy as jnp
import pytest

from ferjax import cli, configs
from ferjax.core import interrupt, loop, monitor
from ferjax.core.checkpoint import Checkpoints
from ferjax.errors import Interrupted
from ferjax.kinds import classifier as classifier_kind
from ferjax.train import classifier, semisup

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
TIMING_KEYS = {"steps_per_s", "images_per_s"}  # Wall-clock: the only fields allowed to differ.
PROGRESS = re.compile(r"^\s*[\w-]*:\s+\d+%\|")


def metric_records(workdir) -> list[dict]:
  """metrics.jsonl without the wall-clock fields."""
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in monitor.read_metrics(workdir)]


# --- The loop, in this process -----------------------------------------------------------------
@flax.struct.dataclass
class _State:
  step: jnp.ndarray
  w: jnp.ndarray


def _step(state, signal_at=None):
  """A stand-in train step; sends this process `signal_at` = (step, signal) during that step."""
  step = int(state.step) + 1
  if signal_at is not None and signal_at[0] == step:
    os.kill(os.getpid(), signal_at[1])
  w = state.w * 0.9 + jnp.float32(step) / 7
  loss = jnp.sum(w) / 3
  return _State(step=state.step + 1, w=w), {"loss": loss, "acc": jnp.float32(step % 3) / 3}


def _train(workdir, *, signal_at=None, stop_after=None, num_steps=12, validate=None):
  """Runs (or resumes) the stand-in run in `workdir`; returns loop.run's Done."""
  state = _State(step=jnp.int32(0), w=jnp.arange(3, dtype=jnp.float32))
  schedule = loop.Schedule(num_steps, log_every=4, eval_every=8, checkpoint_every=8,
                           stop_after=stop_after)
  with Checkpoints(workdir / "checkpoints") as ckpt:
    state, _ = loop.resume(ckpt, state, workdir, "train")
    return loop.run(lambda s: _step(s, signal_at), state, schedule=schedule, workdir=workdir,
                    is_main=True, checkpoints=ckpt, images_per_step=2,
                    validate=validate or (lambda s: {"score": float(jnp.sum(s.w))}))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_logging_points_saves_and_the_resumed_run_logs_the_same(tmp_path,
                                                                                 signum):
  _train(tmp_path / "whole")
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, else the default handler.
  with pytest.raises(Interrupted) as stopped:
    _train(tmp_path / "w", signal_at=(6, signum))  # Between the logging points 4 and 8.
  assert stopped.value.exit_code == 128 + signum
  assert "stopped after step 6, saved in" in str(stopped.value)
  assert max(r["step"] for r in monitor.read_metrics(tmp_path / "w")) == 4  # Nothing at 6.
  assert signal.getsignal(signal.SIGINT) is before  # Put back.
  done = _train(tmp_path / "w")
  assert done.step == 12
  assert metric_records(tmp_path / "w") == metric_records(tmp_path / "whole")
  assert [r["step"] for r in monitor.read_metrics(tmp_path / "w") if "loss" in r] == [4, 8, 12]


def test_stop_after_between_logging_points_resumes_to_the_same_metrics(tmp_path):
  _train(tmp_path / "whole")
  for stop_after in (3, 5, 7):  # Each between two logging points, resumed from the last one.
    assert _train(tmp_path / "w", stop_after=stop_after).step == stop_after
  _train(tmp_path / "w")
  assert metric_records(tmp_path / "w") == metric_records(tmp_path / "whole")


def test_a_signal_before_the_loop_stops_it_at_once(tmp_path):
  previous = interrupt.install()
  try:
    with pytest.raises(interrupt.Stopped):  # Outside a loop: raised at once.
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
    with pytest.raises(interrupt.Stopped):  # Swallowed above, say: the loop does not start.
      _train(tmp_path / "w")
  finally:
    interrupt.uninstall(previous)
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_signal_after_the_last_step_read_it_still_stops_the_run(tmp_path):
  def validate(state):  # At the last step, after the loop read the stop requests.
    if int(state.step) == 12:
      os.kill(os.getpid(), signal.SIGINT)
    return {"score": float(jnp.sum(state.w))}

  with pytest.raises(Interrupted, match="SIGINT: stopped after step 12, saved in"):
    _train(tmp_path / "w", validate=validate)
  assert _train(tmp_path / "w").step == 12  # Finished: the rerun has nothing left to do.


def test_a_signal_inside_an_import_is_one_line_not_an_import_error(monkeypatch, capsys):
  def handler(args):  # A library turns the signal's exception into another one.
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
    except KeyboardInterrupt:
      raise ImportError("initialization failed") from None
    return 0

  monkeypatch.setattr(cli, "_run_handler", lambda spec, args: handler(args))
  assert cli.main(["data", "stats", "synthetic"]) == 143
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [err.strip()], err
  assert err.startswith("ferjax: interrupted: SIGTERM: stopped"), err
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # Put back.


def test_a_signal_during_an_import_is_raised_once_the_import_is_done(tmp_path, monkeypatch,
                                                                     capsys):
  """C code that imports a module (numpy's C API) prints an exception raised in the import as a
  traceback: the signal waits for the import to finish, then stops the verb in one line."""
  (tmp_path / "ferjax_slow_import.py").write_text(
      "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)\n"
      "DONE = True\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "ferjax_slow_import", raising=False)
  imported = []

  def handler(args):
    import ferjax_slow_import  # pylint: disable=import-outside-toplevel,import-error
    imported.append(ferjax_slow_import.DONE)
    time.sleep(5)
    return 0

  monkeypatch.setattr(cli, "_run_handler", lambda spec, args: handler(args))
  try:
    assert cli.main(["data", "stats", "synthetic"]) == 143
  finally:
    sys.modules.pop("ferjax_slow_import", None)
  assert imported == [True]  # The import ran to its end.
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [err.strip()], err
  assert err.startswith("ferjax: interrupted: SIGTERM: stopped"), err


def test_the_unraisable_exception_hooks_never_call_each_other_in_a_cycle(monkeypatch):
  """The CLI installs the signal handler per verb and checkpoint reads add their own hook: however
  often both happen, an unraisable exception reaches the first hook once (it used to recurse
  until the recursion limit)."""
  from ferjax.core import checkpoint  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  monkeypatch.setattr(interrupt, "_hook_installed", False)
  monkeypatch.setattr(interrupt, "_python_unraisablehook", interrupt._python_unraisablehook)
  for _ in range(3):
    previous = interrupt.install()
    checkpoint._drop_failed_read_leftovers()
    interrupt.uninstall(previous)
  unraisable = types.SimpleNamespace(exc_value=ValueError("x"), object=None)
  sys.unraisablehook(unraisable)
  assert seen == [unraisable]


def test_a_signal_a_library_swallowed_still_ends_the_verb_with_its_code(monkeypatch, capsys):
  def handler(args):
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    except KeyboardInterrupt:
      pass
    return 0

  monkeypatch.setattr(cli, "_run_handler", lambda spec, args: handler(args))
  assert cli.main(["data", "stats", "synthetic"]) == 130
  assert capsys.readouterr().err.startswith("ferjax: interrupted: SIGINT: stopped")


# --- A real trainer, in this process -----------------------------------------------------------
def _tiny_classifier():
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.update(image_size=32, channels=1, num_examples=140)
  config.optim.warmup_steps = 1
  config.train.update(num_steps=8, batch_size=16, num_devices=1, log_every=4, eval_every=8,
                      checkpoint_every=8)
  config.eval.batch_size = 64
  return config


def test_a_classifier_stopped_between_logging_points_logs_what_an_uninterrupted_one_does(
    tmp_path):
  classifier.train_and_evaluate(_tiny_classifier(), tmp_path / "whole")
  classifier.train_and_evaluate(_tiny_classifier(), tmp_path / "w", stop_after=3)
  classifier.train_and_evaluate(_tiny_classifier(), tmp_path / "w")
  assert metric_records(tmp_path / "w") == metric_records(tmp_path / "whole")


@pytest.mark.slow
def test_a_semisup_run_stopped_between_logging_points_logs_the_same_pseudo_label_sums(tmp_path):
  """The trainer's own sums between logging points (pseudo-labels per class) are carried over
  the stop too. flexmatch: its thresholds start at 0, so pseudo-labels are used from step 1."""
  config = lambda: configs.load_config(CONFIGS / "semisup_synthetic_tiny.py", [
      "config.train.num_steps=20", "config.semisup.threshold_mode=flexmatch"])
  semisup.train_and_evaluate(config(), tmp_path / "whole")
  semisup.train_and_evaluate(config(), tmp_path / "w", stop_after=5)
  semisup.train_and_evaluate(config(), tmp_path / "w")
  records = metric_records(tmp_path / "whole")
  assert any(sum(r.get("pseudo_count", [])) > 0 for r in records)
  assert metric_records(tmp_path / "w") == records


# --- Real processes: every trainer and the demo, signalled at random moments -------------------
STOP_WITHIN_S = 90  # One step (a compile, on a loaded 2-core CPU, included), or the one in flight.


def _messages(err: str) -> list[str]:
  """The stderr lines that are not progress bars."""
  lines = [line.split("\r")[-1] for line in err.split("\n")]
  return [line for line in lines if line.strip() and not PROGRESS.match(line)]


def _verb_args(verb, tmp_path, tiny_runs) -> list:
  """The command line of a small run of `verb` into tmp_path / "w"."""
  w = tmp_path / "w"
  if verb == "train":
    return ["train", "--config", CONFIGS / "classifier_synthetic_tiny.py", "--workdir", w,
            "--config.train.num_steps=60", "--config.train.eval_every=30",
            "--config.train.checkpoint_every=30", "--config.train.log_every=10"]
  if verb == "train-vaegan":
    return ["train-vaegan", "--config", CONFIGS / "vaegan_synthetic_tiny.py", "--workdir", w,
            "--config.train.num_steps=60", "--config.train.eval_every=30",
            "--config.train.sample_every=30", "--config.train.checkpoint_every=30",
            "--config.data.num_examples=256", "--config.data.val_examples=64"]
  if verb == "pretrain":
    return ["pretrain", "--config", CONFIGS / "pretrain_synthetic_tiny.py", "--workdir", w]
  if verb == "train-semisup":
    return ["train-semisup", "--config", CONFIGS / "semisup_synthetic_tiny.py", "--workdir", w]
  assert verb == "retrain-head"
  return ["retrain-head", "--workdir", tiny_runs.classifier, "--out", w,
          "--config.head.steps=300", "--config.head.eval_every=100"]


def _signal_once(args, log, signum, *, after_s=None, after_text=None):
  """Starts `ferjax args`, sends `signum` after `after_s` seconds or once stdout shows
  `after_text`; returns (exit code, stderr, seconds from the signal to the exit), or None when
  the run finished before the signal went."""
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "ferjax.cli", *map(str, args)], stdout=out,
                            stderr=subprocess.PIPE, text=True)
    try:
      start = time.time()
      while proc.poll() is None and time.time() - start < 600:
        if after_s is not None and time.time() - start >= after_s:
          break
        if after_text is not None and after_text in pathlib.Path(log).read_text():
          break
        time.sleep(0.05)
      if proc.poll() is not None:
        err = proc.stderr.read()
        assert proc.returncode == 0, err
        return None
      sent = time.time()
      proc.send_signal(signum)
      _, err = proc.communicate(timeout=STOP_WITHIN_S)
      return proc.returncode, err, time.time() - sent
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _check_stopped(stopped, signum, context):
  if stopped is None:  # Finished before the signal: nothing to check.
    return
  code, err, seconds = stopped
  name = signal.Signals(signum).name
  assert code == 128 + signum, f"{context}: exit {code}\n{err}"
  assert "Traceback" not in err, f"{context}:\n{err}"
  lines = _messages(err)
  assert len(lines) == 1, f"{context}: {len(lines)} lines\n{err}"
  assert lines[0].startswith(f"ferjax: interrupted: {name}: stopped"), f"{context}: {lines[0]}"
  assert seconds < STOP_WITHIN_S, context


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["train", "train-vaegan", "pretrain", "train-semisup",
                                  "retrain-head"])
def test_a_signal_at_any_moment_stops_a_trainer_in_one_line_and_the_rerun_finishes(
    verb, tmp_path, tiny_runs):
  args = _verb_args(verb, tmp_path, tiny_runs)
  rng = random.Random(verb)
  # Start-up (imports, the handler's first second), then later moments: data, compile, steps.
  delays = [rng.uniform(0.3, 1.5), rng.uniform(2, 8), rng.uniform(8, 25)]
  for i, delay in enumerate(delays):
    signum = (signal.SIGINT, signal.SIGTERM)[i % 2]
    stopped = _signal_once(args, tmp_path / f"stop{i}.log", signum, after_s=delay)
    _check_stopped(stopped, signum, f"ferjax {verb}, {signal.Signals(signum).name} after "
                   f"{delay:.1f} s")
  if verb == "retrain-head" and (tmp_path / "w" / "head.json").exists():
    return  # The last signal came as it finished: its output is written whole, or not at all.
  done = subprocess.run([sys.executable, "-m", "ferjax.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_signal_at_any_moment_of_the_demo_stops_it_in_one_line_and_the_rerun_finishes(
    tmp_path):
  args = ["demo", "--quick", "--workdir", tmp_path / "demo"]
  rng = random.Random("demo")
  moments = [{"after_s": rng.uniform(0.3, 1.5)},  # Start-up.
             {"after_text": f"=== {rng.randrange(2, 5)}/8"},  # A trainer's start.
             {"after_text": "=== 6/8"},  # Evaluation, after every trainer.
             {"after_text": "=== 8/8"}]  # Writing the report.
  for i, moment in enumerate(moments):
    signum = (signal.SIGTERM, signal.SIGINT)[i % 2]
    stopped = _signal_once(args, tmp_path / f"stop{i}.log", signum, **moment)
    _check_stopped(stopped, signum, f"ferjax demo, {signal.Signals(signum).name} at {moment}")
  done = subprocess.run([sys.executable, "-m", "ferjax.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "demo" / "report.md").exists()
