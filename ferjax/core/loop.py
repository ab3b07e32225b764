"""The training loop, written once: when a run logs, validates, draws, saves and stops.

Every trainer (classifier, VAE-GAN, MAE pre-training, semi-supervised, head re-training) runs

    with loop.open_workdir(workdir, config, kind) as (workdir, is_main):
      ...                                        # its data, model, state and pure jitted step
      with checkpoint.Checkpoints(...) as ckpt:
        state, _ = loop.resume(ckpt, state, workdir, "train")
        done = loop.run(lambda s: train_step(s, data), state, schedule=..., validate=...)

and keeps only what is its own: the step, what it validates and what it draws. The order of one
step's bookkeeping, the same for all of them:

  1. the step itself (its metrics stay device arrays until a logging point);
  2. at a logging point (every log_every steps, and at every validation, save or stop): fetch
     the metrics and run the NaN/explosion guard FIRST, so a diverged state is never saved;
  3. validation (every eval_every steps and at the last step), then the pictures (every
     draw_every steps and at the last step, process 0 only);
  4. a save: a validated step is a best candidate (kept in `last/` too when it is a resume
     point); every checkpoint_every steps, at the end of the call and on a stop signal, a resume
     point; validation time is not counted as training time;
  5. a stop: Ctrl-C or SIGTERM (read once per step, `interrupt.StopRequests`) or `stop_after`
     ends the call after saving that step; calling again resumes from it, bit-identically, its
     metrics.jsonl too: a stop logs nothing, and the train metrics of the steps since the last
     logging point are saved with the checkpoint, for the resumed run to log at the next one.
At the end: curves.png of `curves` from metrics.jsonl, and the writer is closed.

`itstime` is big_vision's rule for "is this one of every n steps, or the last".
"""

import contextlib
import dataclasses
import pathlib
from typing import Any, Callable

from ferjax import plots
from ferjax.core import interrupt, monitor
from ferjax.core import workdir as workdir_lib


def itstime(step: int, every: int | None, total: int | None = None) -> bool:
  """Whether `step` (counted from 1, after it ran) is a multiple of `every` or is `total`."""
  return bool(every) and step % every == 0 or step == total


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When a run does what (steps counted from 1). `checkpoint_every=None`: no resume points (a
  stage that writes its output whole at the end); `draw_every=None`: with each validation.
  `stop_after` ends this call after that step, saved, as a preemption would (the run's schedule,
  its last validation included, stays that of `num_steps`): calling again resumes."""
  num_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int | None
  draw_every: int | None = None
  stop_after: int | None = None

  @property
  def last_step(self) -> int:
    """The step this call stops after: the run's last, or `stop_after` when earlier."""
    return self.num_steps if self.stop_after is None else min(self.num_steps, self.stop_after)

  @classmethod
  def from_config(cls, train_config, *, stop_after: int | None = None, draw_every=None):
    """The schedule of a `config.train` block (num_steps, log_every, eval_every,
    checkpoint_every)."""
    t = train_config
    return cls(t.num_steps, t.log_every, t.eval_every, t.checkpoint_every,
               draw_every=draw_every, stop_after=stop_after)


@dataclasses.dataclass
class Done:
  """What `run` leaves: the state and step it stopped at, the last logged train metrics, the
  last validation metrics and the last pictures drawn (name -> file)."""
  state: Any
  step: int
  train: dict
  val: dict
  drawn: dict


# =================================================================================================
# Opening a workdir for training, and resuming in it
# =================================================================================================
@contextlib.contextmanager
def open_workdir(workdir, config, kind):
  """Yields (workdir Path, is_main) for training a run of `kind` (a ferjax.kinds module): the
  config validated, the workdir created or checked to be the same run (`workdir.open_for_training`),
  locked against a second trainer, and a full disk reported as one line. is_main: this process
  writes the files."""
  kind.validate_config(config)
  workdir, is_main = workdir_lib.open_for_training(workdir, config, kind.KIND,
                                                    kind.default_config())
  with workdir_lib.training_lock(workdir, is_main), workdir_lib.disk_errors(workdir):
    yield workdir, is_main


def resume(checkpoints, state, workdir, desc: str):
  """(state, resumed): the latest checkpoint restored into `state`'s shapes when there is one."""
  if checkpoints.latest_step() is None:
    return state, False
  state, _ = checkpoints.restore(state, "latest")
  print(f"{desc}: resuming from step {int(state.step)} in {workdir}")
  return state, True


# =================================================================================================
# The loop
# =================================================================================================
def run(train_step: Callable, state, *, schedule: Schedule, workdir: pathlib.Path, is_main: bool,
        checkpoints, images_per_step: int, watch=("loss",), validate: Callable | None = None,
        draw: Callable | None = None, log_extra: Callable | None = None, extra_interval=None,
        meta: dict | None = None, desc: str = "train", postfix=("loss",),
        curves: tuple | None = None, first_val: dict | None = None) -> Done:
  """Runs `train_step(state) -> (state, metrics)` from `state.step` to `schedule.last_step`.

  validate(state) -> {name: float}   the validation metrics (also what picks the best checkpoint,
                                     by the `checkpoints`' best_metric), logged as val_<name>;
  draw(state, step) -> {name: path}  pictures written (process 0 only), logged as images;
  log_extra() -> dict                more metrics logged beside the step metrics' means;
  extra_interval                     what log_extra sums between logging points, carried over a
                                     stop like the step metrics: interval() -> JSON saved with the
                                     stop's checkpoint, resume_interval(saved) given it back;
  checkpoints                        a core.checkpoint.Checkpoints (the caller opens and closes
                                     it), or None for a stage without resume points;
  meta                               stored with every checkpoint;
  curves                             (keys, title) of the curves.png drawn at the end;
  first_val                          validation metrics of the starting state, logged at its step.
  """
  s = schedule
  step = int(state.step)
  if is_main:  # Steps past the checkpoint (all, before the first one) are replayed.
    monitor.drop_metrics_after(workdir, step)
  # A resumed run hides the events an earlier run logged after its checkpoint.
  writer = (monitor.MetricWriter(workdir, purge_step=step + 1 if step else None)
            if is_main else None)
  write = writer.write if writer else (lambda *args: None)
  if first_val is not None:
    write(step, _logged(first_val))
  last_checkpoint = checkpoints.latest_step if checkpoints is not None else (lambda: None)
  logged = monitor.IntervalMetrics(images_per_step, watch=watch, last_checkpoint=last_checkpoint)
  if step and checkpoints is not None:  # Stopped between two logging points: the steps since.
    saved = _saved_meta(checkpoints, step)
    logged.resume_interval(saved.get(INTERVAL))
    if extra_interval is not None and saved.get(EXTRA_INTERVAL):
      extra_interval.resume_interval(saved[EXTRA_INTERVAL])
  train_metrics, val_metrics, drawn = {}, {}, {}
  with writer or contextlib.nullcontext(), interrupt.StopRequests() as stop, \
      monitor.progress(s.num_steps, initial=step, desc=desc) as bar:
    while step < s.last_step:
      state, metrics = train_step(state)
      logged.add(metrics)  # Device arrays: fetched only at logging points.
      step += 1
      bar.update(1)
      signalled = bool(stop)  # Read once: a signal arriving mid-step counts from the next one.
      # A stop (a signal, or stop_after before the run's end) saves this step as a resume point.
      stopping = signalled or step == s.last_step < s.num_steps
      is_eval = itstime(step, s.eval_every, s.num_steps)
      # Resume points only every checkpoint_every steps: a validation step saves just a new best
      # (a save per epoch doubled the FER-2013 recipe's wall time on an H200).
      is_save = checkpoints is not None and itstime(step, s.checkpoint_every, s.num_steps)
      # Logged where an uninterrupted run logs, so that a stopped and resumed run's metrics.jsonl
      # is the same: a stop between two logging points only runs the guards, and the steps since
      # the last logging point are saved with the checkpoint, logged by the resumed run.
      if itstime(step, s.log_every) or is_eval or is_save:
        train_metrics = logged.flush(step)  # The NaN guard first: a NaN state is never saved.
        if log_extra is not None:
          train_metrics.update(log_extra())
        write(step, train_metrics)
        bar.set_postfix({k: f"{train_metrics[k]:.4g}" for k in postfix if k in train_metrics},
                        refresh=False)
      elif stopping:
        logged.check(step)
      if is_eval and validate is not None:
        val_metrics = validate(state)
        shown = _logged(val_metrics)
        write(step, shown)
        bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
      is_draw = itstime(step, s.draw_every or s.eval_every, s.num_steps)
      if is_main and draw is not None and is_draw:
        drawn = draw(state, step)
        writer.write_images(step, drawn)
      if checkpoints is not None:
        extra = meta
        if stopping and logged.interval():  # Steps not yet logged: carried to the resumed run.
          extra = {**(meta or {}), INTERVAL: logged.interval()}
          if extra_interval is not None:
            extra[EXTRA_INTERVAL] = extra_interval.interval()
        if is_eval and validate is not None:
          checkpoints.save(step, state, metrics=val_metrics, extra=extra, last=is_save or stopping)
        elif is_save or stopping:  # Ctrl-C or SIGTERM: this step becomes a resume point too.
          checkpoints.save(step, state, extra=extra)
      if is_eval:
        logged.restart_clock()  # Validation time is not training time.
      if signalled:
        raise stop.stop(step, workdir if checkpoints is not None else None)
    if stop:  # A signal after the last step read it: that step is saved.
      raise stop.stop(step, workdir if checkpoints is not None else None)

    if writer and curves is not None:
      keys, title = curves
      plots.save_curves(monitor.read_metrics(workdir), keys, workdir / "curves.png", title=title)
      writer.write_images(step, {"curves": workdir / "curves.png"})
  return Done(state=state, step=step, train=train_metrics, val=val_metrics, drawn=drawn)


# The checkpoint meta keys of the train metrics (and extra_interval's sums) of the steps since the
# last logging point, saved by a stop between two logging points.
INTERVAL, EXTRA_INTERVAL = "interval_metrics", "interval_extra"


def _saved_meta(checkpoints, step: int) -> dict:
  """The meta saved with the checkpoint of `step` (empty when it is not the latest)."""
  if checkpoints.latest_step() != step:
    return {}
  return checkpoints.read_meta("latest")


def _logged(val_metrics: dict) -> dict:
  """Validation metrics as logged: each name prefixed val_ unless it already is."""
  return {k if k.startswith("val_") else f"val_{k}": v for k, v in val_metrics.items()}
