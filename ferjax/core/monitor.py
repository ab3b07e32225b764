"""What a trainer reports while it runs: metrics.jsonl, TensorBoard events, a progress bar, and
the NaN guard."""

import json
import math
import pathlib
import sys
import time

import jax
import numpy as np
import tensorboardX
from PIL import Image
from tqdm import tqdm

from ferjax.errors import UserError


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` and logs scalars (and
  images) as TensorBoard events under `workdir/tensorboard/`.

  Nothing is written until the first write. `purge_step` (a resumed run's first step) makes
  TensorBoard hide the events an earlier run logged at or after that step.
  """

  def __init__(self, workdir, *, purge_step: int | None = None):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.tensorboard_dir = pathlib.Path(workdir) / "tensorboard"
    self.purge_step = purge_step
    self._tb = None

  def _summary_writer(self) -> tensorboardX.SummaryWriter:
    if self._tb is None:  # Created here: it opens an event file as soon as it exists.
      self._tb = tensorboardX.SummaryWriter(str(self.tensorboard_dir), purge_step=self.purge_step)
    return self._tb

  def write(self, step: int, metrics: dict, **extra) -> None:
    """Logs `metrics` (and `extra`, JSON only) at `step`; non-scalar metrics go only to JSON."""
    record = {"step": int(step), **extra}
    tb = self._summary_writer()
    for k, v in metrics.items():
      v = np.asarray(v)
      if v.ndim == 0:
        record[k] = float(v)
        tb.add_scalar(k, record[k], int(step))
      else:
        record[k] = v.tolist()
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    tb.flush()

  def write_images(self, step: int, images: dict) -> None:
    """Logs images at `step`: each value is an image file (read as RGB) or a uint8 array, HW or
    HWC with 1, 3 or 4 channels."""
    tb = self._summary_writer()
    for name, image in images.items():
      if isinstance(image, (str, pathlib.Path)):
        with Image.open(image) as f:
          image = np.asarray(f.convert("RGB"))
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image {name!r}: expected a uint8 HW or HWC array, got "
                         f"{image.dtype} {image.shape}")
      tb.add_image(name, image, int(step), dataformats="HW" if image.ndim == 2 else "HWC")
    tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir, *, torn: list | None = None) -> list[dict]:
  """The records of metrics.jsonl. A line that is not a JSON record with a step (e.g. the last
  line torn by a kill or a full disk) is skipped, and appended to `torn` when given."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      int(record["step"])
    except (ValueError, KeyError, TypeError):
      if torn is not None:
        torn.append(number)
      continue
    records.append(record)
  return records


def drop_metrics_after(workdir, step: int) -> None:
  """Keeps metrics.jsonl to the records up to `step`, so a resumed run does not log twice.

  TensorBoard event files are append-only, so events past `step` cannot be dropped: TensorBoard
  shows both runs' values at those steps unless the resumed run's MetricWriter is opened with
  `purge_step=step + 1`, which hides the earlier run's.
  """
  torn = []
  records = read_metrics(workdir, torn=torn)
  kept = [r for r in records if r["step"] <= step]
  if torn:
    print(f"{pathlib.Path(workdir) / 'metrics.jsonl'}: dropped {len(torn)} unreadable line(s) "
          f"(line {', '.join(map(str, torn))}: torn by an interrupted write)", file=sys.stderr)
  if len(kept) < len(records) or torn:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class NonFiniteLoss(UserError):
  """Training diverged: the message names the step and the metric."""


def check_finite(step: int, metrics: dict) -> None:
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
      bad = float(v[~np.isfinite(v)][0])
      raise NonFiniteLoss(f"step {step}: {k} is {bad}")


def progress(total: int, initial: int = 0, desc: str = "train"):
  """A tqdm bar with ETA on stderr; when stderr is not a terminal, only periodic lines."""
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)


class Throughput:
  """Steps/s and images/s between logging points (host time, after blocking on results)."""

  def __init__(self):
    self.t, self.steps = time.perf_counter(), 0

  def tick(self, steps: int, batch_size: int) -> dict:
    now = time.perf_counter()
    dt, self.t = now - self.t, now
    rate = steps / dt if dt > 0 else math.nan
    return {"steps_per_s": rate, "images_per_s": rate * batch_size}


class IntervalMetrics:
  """The train metrics of every step since the last logging point, as both trainers log them.

  `add(metrics)` keeps the step's device arrays (nothing is fetched, so the host does not wait
  on the device); `check(step)` fetches them and runs the guards on each step (before any
  checkpoint of that state is written); `flush(step)` checks, and returns the means over the
  interval with the throughput (steps/s, images/s) since the last flush or `restart_clock()`.
  A run stopped between two logging points saves `interval()` with its checkpoint, and the
  resumed run's `resume_interval` takes it back, so both log the same means.

  Guards: any non-finite value stops training (`check_finite`), and so does an explosion: a
  watched loss (`watch`) above EXPLOSION times its running mean after WARMUP steps (a loss of
  4.9e14 is finite, but the state that made it is garbage). `last_checkpoint()` gives the step
  of the checkpoint that is kept, for the message.
  """

  EXPLOSION = 1e4
  WARMUP = 5

  def __init__(self, batch_size: int, *, watch=(), last_checkpoint=lambda: None):
    self.batch_size = batch_size
    self.watch = tuple(watch)
    self.last_checkpoint = last_checkpoint
    self.pending = []  # Device arrays, not yet checked.
    self.fetched = []  # Host values, checked, not yet logged.
    self.throughput = Throughput()
    self.running = {k: (0.0, 0) for k in self.watch}  # (mean of |value|, count)

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)

  def check(self, step: int) -> None:
    """Fetches the steps added since the last call and runs the guards on them (`step`: the
    last one's number), keeping them for the next `flush`."""
    history = jax.device_get(self.pending)
    self.pending = []
    for i, m in enumerate(history):
      at = step - len(history) + 1 + i
      try:
        check_finite(at, m)
        self._check_explosion(at, m)
      except NonFiniteLoss as e:
        kept = self.last_checkpoint()
        where = (f"the last good checkpoint, step {kept}, is kept" if kept is not None else
                 "no checkpoint had been saved yet")
        raise NonFiniteLoss(f"{e}; training stopped, {where} (lower the learning rate or check "
                            "the data)") from None
    self.fetched.extend(history)

  def flush(self, step: int) -> dict:
    self.check(step)
    history, self.fetched = self.fetched, []
    means = {k: float(np.mean([m[k] for m in history])) for k in history[0]} if history else {}
    means.update(self.throughput.tick(len(history), self.batch_size))
    return means

  def interval(self) -> dict:
    """The checked steps not yet logged, as JSON ({name: {"dtype", "values"}}, one value per
    step), to save with a checkpoint taken between two logging points."""
    if not self.fetched:
      return {}
    return {k: {"dtype": np.asarray(self.fetched[0][k]).dtype.name,
                "values": [np.asarray(m[k]).tolist() for m in self.fetched]}
            for k in self.fetched[0]}

  def resume_interval(self, saved: dict) -> None:
    """Takes back the steps `interval()` gave (a resumed run): the next `flush` averages them
    with the new ones, exactly as the uninterrupted run did."""
    if not saved:
      return
    columns = {k: np.asarray(v["values"], dtype=v["dtype"]) for k, v in saved.items()}
    count = len(next(iter(columns.values())))
    self.fetched = [{k: column[i] for k, column in columns.items()} for i in range(count)]

  def _check_explosion(self, step: int, metrics: dict) -> None:
    for k in self.watch:
      value = abs(float(np.asarray(metrics[k])))
      mean, count = self.running[k]
      if count >= self.WARMUP and value > self.EXPLOSION * max(mean, 1e-8):
        raise NonFiniteLoss(f"step {step}: {k} is {value:.3g}, {value / max(mean, 1e-8):.0e} "
                            f"times its running mean {mean:.3g} (exploded)")
      self.running[k] = ((mean * count + value) / (count + 1), count + 1)

  def restart_clock(self) -> None:
    """Time from now on (e.g. after validation, which is not training time)."""
    self.throughput = Throughput()
