"""experiments/time_to_accuracy.py: checkpoint timing, the per-seed refusal and the table.

No training here: the curves are written by hand (a real run is minutes of CPU time).
"""

import json
import pathlib
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import time_to_accuracy  # noqa: E402


def write_curve(out, seed, points, best, minutes):
  folder = out / f"seed{seed}"
  folder.mkdir(parents=True)
  curve = {"seed": seed, "split": "validation", "config": "c.py", "overrides": [],
           "total_minutes": minutes,
           "points": [{"step": s, "minutes": m, "accuracy": a, "mean_class_accuracy": c}
                      for s, m, a, c in points],
           "best": {"step": best[0], "accuracy": best[1], "mean_class_accuracy": best[2],
                    "recall": {"disgust": best[3], "fear": best[4]}}}
  (folder / "curve.json").write_text(json.dumps(curve))


def test_checkpoint_steps_skip_unfinished_saves(tmp_path):
  last = tmp_path / "checkpoints" / "last"
  for name in ("500", "1000", "1500.orbax-checkpoint-tmp-3"):
    (last / name).mkdir(parents=True)
  assert time_to_accuracy.checkpoint_steps(tmp_path) == [500, 1000]
  assert time_to_accuracy.checkpoint_steps(tmp_path / "missing") == []


def test_collect_averages_seeds_and_finds_minutes_to_each_level(tmp_path):
  write_curve(tmp_path, 0, [(500, 3.0, 50.0, 40.0), (1000, 6.0, 60.0, 55.0)],
              (1000, 60.0, 55.0, 10.0, 30.0), 7.0)
  write_curve(tmp_path, 1, [(500, 3.2, 54.0, 44.0), (1000, 6.2, 62.0, 57.0)],
              (1000, 62.0, 57.0, 20.0, 40.0), 7.4)
  text = time_to_accuracy.collect(tmp_path)
  # Mean ± sample standard deviation (two seeds: |a - b| / sqrt(2)).
  assert "| 500 | 3.10 ± 0.14 | 52.00 ± 2.83 | 42.00 ± 2.83 |" in text
  assert "| 1000 | 6.10 ± 0.14 | 61.00 ± 1.41 | 56.00 ± 1.41 |" in text
  assert "accuracy 61.00 ± 1.41, mean class accuracy 56.00 ± 1.41" in text
  assert "disgust 15.00 ± 7.07, fear 35.00 ± 7.07" in text
  assert "| 50% | 3.0, 3.2 |" in text  # Both seeds at their first checkpoint.
  assert "| 62% | not reached, 6.2 |" in text
  assert (tmp_path / "curve.md").read_text() == text
  assert (tmp_path / "curve.png").stat().st_size > 0


def test_an_unfinished_seed_is_refused_not_resumed(tmp_path, capsys):
  (tmp_path / "seed0" / "run").mkdir(parents=True)
  with pytest.raises(SystemExit, match="did not finish here"):
    time_to_accuracy.main(["--out", str(tmp_path), "--seeds", "0"])


def test_a_finished_seed_is_not_run_again_and_stray_arguments_are_refused(tmp_path, capsys):
  write_curve(tmp_path, 0, [(500, 3.0, 50.0, 40.0)], (500, 50.0, 40.0, 0.0, 20.0), 4.0)
  time_to_accuracy.main(["--out", str(tmp_path), "--seeds", "0"])
  assert "seed 0: done" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    time_to_accuracy.main(["--out", str(tmp_path), "--bogus"])
  assert "extra arguments are --config.FIELD=VALUE" in capsys.readouterr().err
