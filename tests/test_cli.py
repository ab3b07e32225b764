"""The `ferjax` command: help on every verb, data stats, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from ferjax import cli


def _verbs(parser, prefix=()):
  """Every (sub)command path of the parser, e.g. ('data', 'stats')."""
  for action in parser._subparsers._group_actions if parser._subparsers else []:
    for name, sub in action.choices.items():
      yield prefix + (name,)
      yield from _verbs(sub, prefix + (name,))


def test_every_verb_has_help_with_an_example(capsys):
  verbs = list(_verbs(cli.build_parser()))
  assert ("data", "prepare") in verbs and ("data", "stats") in verbs
  for verb in verbs:
    with pytest.raises(SystemExit) as exit_info:
      cli.main([*verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if len(verb) > 1 or verb[0] != "data":
      assert "example:" in out and "ferjax " in out, f"{verb}: --help shows no example"


def test_data_stats_synthetic_json(tmp_path, capsys):
  assert cli.main(["data", "stats", "synthetic", "--json", "--out", str(tmp_path)]) == 0
  result = json.loads(capsys.readouterr().out)
  train = result["splits"]["train"]
  assert result["class_names"] == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
  assert train["total"] == 7000 and train["counts"]["happy"] > train["counts"]["fear"]
  assert train["imbalance_ratio"] == pytest.approx(4772 / 281, rel=0.03)
  assert result["splits"]["test"]["imbalance_ratio"] == 1.0
  assert (tmp_path / "synthetic_class_histogram.png").stat().st_size > 1000
  assert (tmp_path / "synthetic_samples_train.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, needle", [
    (["data", "stats", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["data", "stats", "synthetic", "--split", "dev"], "no split 'dev'"),
    (["data", "stats", "synthetic", "--bogus"], "unrecognized arguments: --bogus"),
    (["data", "prepare", "fer2013"], "--manual-dir"),
    (["data", "prepare", "synthetic", "--manual-dir", "x"], "synthetic and folder datasets need no"),
    (["data", "prepare", "folder", "--manual-dir", "x"], "expected one of fer2013, ferplus"),
    (["train", "--config", "experiments/configs/classifier_synthetic_tiny.py", "--workdir", ""],
     "--workdir: expected a folder, got an empty name"),
    (["nosuchverb"], "invalid choice: 'nosuchverb'"),
    (["bench", "classifier", "--steps", "0"], "--steps: expected at least 1 timed step, got 0"),
    (["bench", "vaegan", "--steps", "-3"], "--steps: expected at least 1 timed step, got -3"),
    (["bench", "classifier", "--batch", "0"], "--batch: expected a positive number"),
])
def test_user_errors_are_one_line_with_exit_2(argv, needle, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert needle in err
  assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
  missing = tmp_path / "nothing_here"
  proc = subprocess.run([sys.executable, "-m", "ferjax.cli", "data", "prepare", "fer2013",
                         "--manual-dir", str(missing), "--data-dir", str(tmp_path / "d")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in proc.stderr
