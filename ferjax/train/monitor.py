"""What a trainer reports while it runs: metrics.jsonl, a progress bar, and the NaN guard."""

import json
import math
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

from ferjax.errors import UserError


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl`."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"

  def write(self, step: int, metrics: dict, **extra) -> None:
    record = {"step": int(step), **extra}
    for k, v in metrics.items():
      v = np.asarray(v)
      record[k] = float(v) if v.ndim == 0 else v.tolist()
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class NonFiniteLoss(UserError):
  """Training diverged: the message names the step and the metric."""


def check_finite(step: int, metrics: dict) -> None:
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
      raise NonFiniteLoss(f"step {step}: {k} is {float(np.ravel(v)[0])}; training stopped, the last "
                          "good checkpoint is kept (lower the learning rate or check the data)")


def progress(total: int, initial: int = 0, desc: str = "train"):
  """A tqdm bar with ETA on stderr; quiet when stderr is not a terminal except for periodic lines."""
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
