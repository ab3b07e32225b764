"""Run monitoring: metrics.jsonl, TensorBoard event files, dropping replayed steps, NaN guard."""

import json
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from ferjax.core import monitor


def _events(logdir) -> list:
  """Every Event in `logdir`'s event files, read through the TFRecord framing (length, its
  crc, data, its crc) so the test needs no TensorBoard."""
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      pos += 12
      events.append(event_pb2.Event.FromString(data[pos:pos + length]))
      pos += length + 4
  return events


def _summaries(logdir) -> list[tuple]:
  return [(e.step, v) for e in _events(logdir) for v in e.summary.value]


def test_metric_writer_writes_json_and_tensorboard(tmp_path):
  writer = monitor.MetricWriter(tmp_path)
  assert list(tmp_path.iterdir()) == []  # Constructing writes nothing.
  writer.write(10, {"loss": np.float32(0.5), "recall": np.array([0.25, 0.75])}, phase="train")
  writer.write(20, {"loss": 0.25})
  Image.fromarray(np.full((6, 5), 128, np.uint8)).save(tmp_path / "gray.png")
  writer.write_images(20, {"samples": np.zeros((4, 3, 3), np.uint8),
                           "gray": tmp_path / "gray.png"})
  writer.close()

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 10, "phase": "train", "loss": 0.5, "recall": [0.25, 0.75]},
      {"step": 20, "loss": 0.25}]
  summaries = _summaries(tmp_path / "tensorboard")
  scalars = [(step, v.tag, v.simple_value) for step, v in summaries if v.HasField("simple_value")]
  assert scalars == [(10, "loss", 0.5), (20, "loss", 0.25)]  # The vector stays in JSON only.
  images = {v.tag: (step, v.image.height, v.image.width) for step, v in summaries
            if v.HasField("image")}
  assert images == {"samples": (20, 4, 3), "gray": (20, 6, 5)}


def test_write_images_rejects_float_arrays(tmp_path):
  with monitor.MetricWriter(tmp_path) as writer, pytest.raises(ValueError, match="'x'.*uint8"):
    writer.write_images(1, {"x": np.zeros((4, 4, 3), np.float32)})


def test_drop_metrics_after_keeps_steps_up_to_the_checkpoint(tmp_path):
  with monitor.MetricWriter(tmp_path) as writer:
    for step in (10, 20, 30):
      writer.write(step, {"loss": step / 10})
  path = tmp_path / "metrics.jsonl"
  mtime = path.stat().st_mtime_ns
  monitor.drop_metrics_after(tmp_path, 30)
  assert [r["step"] for r in monitor.read_metrics(tmp_path)] == [10, 20, 30]
  assert path.stat().st_mtime_ns == mtime  # Nothing dropped: the file is not rewritten.
  monitor.drop_metrics_after(tmp_path, 25)
  assert [r["step"] for r in monitor.read_metrics(tmp_path)] == [10, 20]
  assert path.read_text().count("\n") == 2
  monitor.drop_metrics_after(tmp_path / "empty", 5)  # No metrics yet: nothing to do.
  assert not (tmp_path / "empty").exists()


def test_purge_step_hides_a_resumed_runs_replayed_events(tmp_path):
  """A resumed run marks a restart at its first step; TensorBoard drops older events from it on."""
  with monitor.MetricWriter(tmp_path, purge_step=21) as writer:
    writer.write(21, {"loss": 1.0})
  starts = [e.step for e in _events(tmp_path / "tensorboard")
            if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [21]


def test_check_finite_names_the_step_and_metric():
  monitor.check_finite(3, {"loss": 1.0, "count": np.int32(2)})
  with pytest.raises(monitor.NonFiniteLoss, match=r"step 7: grad_norm is inf"):
    monitor.check_finite(7, {"loss": 1.0, "grad_norm": np.array([1.0, np.inf])})
  with pytest.raises(monitor.NonFiniteLoss, match=r"step 8: loss is nan"):
    monitor.check_finite(8, {"loss": np.float32("nan")})


def test_interval_metrics_are_means_and_an_explosion_stops_naming_the_kept_checkpoint():
  logged = monitor.IntervalMetrics(8, watch=("loss",), last_checkpoint=lambda: 10)
  for value in (1.0, 2.0, 3.0):
    logged.add({"loss": np.float32(value)})
  means = logged.flush(3)
  assert means["loss"] == 2.0 and means["images_per_s"] > 0
  for value in (1.0, 1.5, 0.8):
    logged.add({"loss": np.float32(value)})
  logged.flush(6)
  # 4.9e14 is finite, but the state that produced it is garbage: stop before it is saved.
  logged.add({"loss": np.float32(0.9)})
  logged.add({"loss": np.float32(4.9e14)})
  with pytest.raises(monitor.NonFiniteLoss, match=r"step 8: loss is 4\.9e\+14, .* times its "
                                                  r"running mean .*exploded.*checkpoint, step 10, "
                                                  r"is kept"):
    logged.flush(8)
  nan = monitor.IntervalMetrics(8, last_checkpoint=lambda: None)
  nan.add({"loss": np.float32("nan")})
  with pytest.raises(monitor.NonFiniteLoss, match=r"step 1: loss is nan.*no checkpoint had been "
                                                  r"saved yet"):
    nan.flush(1)


def test_a_loss_that_varies_normally_is_not_an_explosion():
  logged = monitor.IntervalMetrics(8, watch=("loss",))
  for step, value in enumerate([2.0, 1.9, 5.0, 40.0, 3.0, 0.01, 100.0, 1.0], start=1):
    logged.add({"loss": np.float32(value)})
  logged.flush(8)


def test_a_torn_metrics_line_is_dropped_and_reported(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [r["step"] for r in monitor.read_metrics(tmp_path)] == [1, 2]
  monitor.drop_metrics_after(tmp_path, 2)
  assert "dropped 1 unreadable line(s) (line 3" in capsys.readouterr().err
  assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
