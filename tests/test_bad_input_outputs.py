"""Outputs never clobber inputs: every verb that writes refuses, in one line and changing
nothing, an output path that is one of its inputs, lies inside an input folder it reads, or
already holds something it did not write. Also: staged and atomic writes never follow a planted
link, exports racing to one path never replace each other, and two predicts into one folder
never mix. Every refusal goes through tests/badinput.py's promise (exit 2, one line, nothing
changed)."""

import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from badinput import copy_run, expect_one_line
from ferjax import cli, export, writing
from ferjax.errors import UserError


def _faces(folder, n=2) -> list:
  """`n` small gray face crops in `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(n):
    path = folder / f"face{i}.png"
    Image.fromarray(np.full((32, 32), 60 * i + 30, np.uint8)).save(path)
    paths.append(path)
  return paths


def _predict(r, *argv):
  return ["predict", "--workdir", r.classifier, *argv]


# --- predict --------------------------------------------------------------------------------------
def test_predict_output_is_an_input_image(tiny_runs, tmp_path, capsys):
  _faces(tmp_path / "faces")
  expect_one_line(_predict(tiny_runs, "--whole-image", tmp_path / "faces", "--output",
                           tmp_path / "faces" / "face0.png"),
                  ["--output", "face0.png", "is the input"], capsys, protect=[tmp_path])


def test_predict_output_is_the_boxes_file(tiny_runs, tmp_path, capsys):
  _faces(tmp_path)
  boxes = tmp_path / "b.csv"
  boxes.write_text("file,x,y,w,h\nface0.png,0,0,32,32\n")
  expect_one_line(_predict(tiny_runs, "--boxes", boxes, "--output", boxes),
                  ["--output", "b.csv", "is the input"], capsys, protect=[tmp_path])


def test_predict_output_is_an_image_named_by_the_boxes(tiny_runs, tmp_path, capsys):
  _faces(tmp_path)
  boxes = tmp_path / "b.csv"
  boxes.write_text("file,x,y,w,h\nface1.png,0,0,32,32\n")
  expect_one_line(_predict(tiny_runs, "--boxes", boxes, "--output", tmp_path / "face1.png"),
                  ["face1.png", "is the input"], capsys, protect=[tmp_path])


def test_predict_output_is_a_hard_link_to_an_input(tiny_runs, tmp_path, capsys):
  face, _ = _faces(tmp_path / "faces")
  os.link(face, tmp_path / "rows.jsonl")
  expect_one_line(_predict(tiny_runs, "--whole-image", face, "--output", tmp_path / "rows.jsonl"),
                  ["rows.jsonl", "is the input"], capsys, protect=[tmp_path])


def test_predict_output_inside_an_input_folder(tiny_runs, tmp_path, capsys):
  _faces(tmp_path / "faces")
  expect_one_line(_predict(tiny_runs, "--whole-image", tmp_path / "faces", "--output",
                           tmp_path / "faces" / "rows.jsonl"),
                  ["--output", "inside the input folder"], capsys, protect=[tmp_path])


def test_predict_out_inside_an_input_folder(tiny_runs, tmp_path, capsys):
  _faces(tmp_path / "faces")
  expect_one_line(_predict(tiny_runs, "--whole-image", tmp_path / "faces", "--out",
                           tmp_path / "faces" / "predicted"),
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def test_predict_out_inside_a_folder_matched_by_a_pattern(tiny_runs, tmp_path, capsys):
  _faces(tmp_path / "faces")
  expect_one_line(_predict(tiny_runs, "--whole-image", f"{tmp_path}/fa*", "--out",
                           tmp_path / "faces" / "predicted"),
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def test_predict_out_holding_an_input(tiny_runs, tmp_path, capsys):
  face, _ = _faces(tmp_path / "in")
  expect_one_line(_predict(tiny_runs, "--whole-image", face, "--out", tmp_path),
                  ["--out", "holds the input"], capsys, protect=[tmp_path])


def test_predict_output_inside_the_workdir(tiny_runs, tmp_path, capsys):
  run = copy_run(tiny_runs.classifier, tmp_path / "run")
  face, _ = _faces(tmp_path / "faces")
  expect_one_line(["predict", "--workdir", run, "--whole-image", face, "--output",
                   run / "rows.jsonl"],
                  ["--output", "inside the input folder"], capsys, protect=[tmp_path])


def test_predict_output_is_the_model(tmp_path, capsys):
  face, _ = _faces(tmp_path / "faces")
  model = tmp_path / "m.ferjax"
  model.write_text("a model")
  expect_one_line(["predict", "--model", model, "--whole-image", face, "--output", model],
                  ["m.ferjax", "is the input"], capsys, protect=[tmp_path])


def test_predict_output_holding_another_file(tiny_runs, tmp_path, capsys):
  face, _ = _faces(tmp_path / "faces")
  notes = tmp_path / "notes.txt"
  notes.write_text("my notes\n")
  expect_one_line(_predict(tiny_runs, "--whole-image", face, "--output", notes),
                  ["notes.txt", "not a rows file"], capsys, protect=[tmp_path])


def test_predict_output_is_a_link(tiny_runs, tmp_path, capsys):
  face, _ = _faces(tmp_path / "faces")
  (tmp_path / "elsewhere.jsonl").write_text("")
  (tmp_path / "rows.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
  expect_one_line(_predict(tiny_runs, "--whole-image", face, "--output", tmp_path / "rows.jsonl"),
                  ["rows.jsonl", "symbolic link"], capsys, protect=[tmp_path])


def test_predict_out_holding_other_files(tiny_runs, tmp_path, capsys):
  face, _ = _faces(tmp_path / "faces")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "holiday.png").write_bytes(b"mine")
  expect_one_line(_predict(tiny_runs, "--whole-image", face, "--out", tmp_path / "out"),
                  ["--out", "holiday.png", "not written by ferjax predict"], capsys,
                  protect=[tmp_path])


def test_predict_output_over_a_file_of_the_out_folder(tiny_runs, tmp_path, capsys):
  face, _ = _faces(tmp_path / "faces")
  expect_one_line(_predict(tiny_runs, "--whole-image", face, "--out", tmp_path / "out",
                           "--output", tmp_path / "out" / "faces.png"),
                  ["--output", "faces.png"], capsys, protect=[tmp_path])


@pytest.mark.slow
def test_predict_reruns_replace_their_own_outputs(tiny_runs, tmp_path, capsys):
  faces = tmp_path / "faces"
  _faces(faces)
  outputs = ["--out", tmp_path / "out", "--output", tmp_path / "rows.csv", "--format", "csv"]
  argv = _predict(tiny_runs, "--whole-image", faces, *outputs)
  assert cli.main([str(a) for a in argv]) == 0
  assert len((tmp_path / "rows.csv").read_text().splitlines()) == 3
  # Its own rows file and folder are replaced; annotated/ holds the second run's pictures only.
  argv = _predict(tiny_runs, "--whole-image", faces / "face1.png", *outputs)
  assert cli.main([str(a) for a in argv]) == 0
  assert len((tmp_path / "rows.csv").read_text().splitlines()) == 2
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      writing.marker_name("predict"), "annotated", "faces.png"]
  assert [p.name for p in (tmp_path / "out" / "annotated").iterdir()] == ["face1.png"]
  assert sorted(p.name for p in faces.iterdir()) == ["face0.png", "face1.png"]
  assert not list(tmp_path.glob(".*partial*"))


def test_predict_out_being_written_by_another_predict(tiny_runs, tmp_path, capsys):
  face, _ = _faces(tmp_path / "faces")
  out = tmp_path / "out"
  out.mkdir()
  lock = out / writing.marker_name("predict")

  def refusal(holder, wait):
    return "held"

  with writing.exclusive_lock(lock, refusal=refusal):
    expect_one_line(_predict(tiny_runs, "--whole-image", face, "--out", out),
                    ["--out", "being written by", f"pid {os.getpid()}"], capsys,
                    protect=[tmp_path / "faces"])
  assert sorted(p.name for p in out.iterdir()) == [lock.name]


# --- probe ----------------------------------------------------------------------------------------
def _features(path, labels=(0, 1, 2) * 10, workdir="/runs/a", step=10):
  labels = np.asarray(labels, np.int32)
  n = len(labels)
  rng = np.random.default_rng(0)
  np.savez(path, features=(np.eye(3, 4)[labels] * 3 + rng.normal(0, .3, (n, 4))).astype(np.float32),
           logits=np.zeros((n, 3), np.float32), labels=labels,
           class_names=np.asarray(["anger", "happy", "sad"]),
           model_class_names=np.asarray(["anger", "happy", "sad"]),
           path=np.asarray([f"s/all/{i}" for i in range(n)]), index=np.arange(n),
           subject=np.full(n, -1, np.int32), fold=np.full(n, -1, np.int32),
           dataset=np.asarray("s"), split=np.asarray("all"), workdir=np.asarray(workdir),
           step=np.asarray(step), format_version=np.asarray(1))
  return path


def test_probe_out_is_the_train_file(tmp_path, capsys):
  f = _features(tmp_path / "f.npz")
  expect_one_line(["probe", "--train", f, "--folds", "3", "--out", f],
                  ["--out", "f.npz", "is the input"], capsys, protect=[tmp_path])


def test_probe_out_is_the_test_file(tmp_path, capsys):
  a, b = _features(tmp_path / "a.npz"), _features(tmp_path / "b.npz")
  expect_one_line(["probe", "--train", a, "--test", b, "--out", b],
                  ["--out", "b.npz", "is the input"], capsys, protect=[tmp_path])


def test_probe_confusion_plot_would_be_an_input(tmp_path, capsys):
  f = _features(tmp_path / "r_confusion.png")
  expect_one_line(["probe", "--train", f, "--folds", "3", "--out", tmp_path / "r.json"],
                  ["confusion plot", "is the input"], capsys, protect=[tmp_path])


def test_probe_out_holding_another_file(tmp_path, capsys):
  f = _features(tmp_path / "f.npz")
  (tmp_path / "notes.json").write_text('{"mine": 1}')
  expect_one_line(["probe", "--train", f, "--folds", "3", "--out", tmp_path / "notes.json"],
                  ["notes.json", "not a `ferjax probe` result"], capsys, protect=[tmp_path])


def test_probe_out_beside_a_foreign_plot(tmp_path, capsys):
  f = _features(tmp_path / "f.npz")
  (tmp_path / "r_confusion.png").write_bytes(b"my plot")
  expect_one_line(["probe", "--train", f, "--folds", "3", "--out", tmp_path / "r.json"],
                  ["r_confusion.png", "not written by `ferjax probe`"], capsys,
                  protect=[tmp_path])


@pytest.mark.slow
def test_probe_replaces_its_own_result(tmp_path, capsys):
  f = _features(tmp_path / "f.npz")
  argv = ["probe", "--train", str(f), "--folds", "3", "--l2", "1e-3", "--out",
          str(tmp_path / "r.json")]
  assert cli.main(argv) == 0 and cli.main(argv) == 0
  assert json.loads((tmp_path / "r.json").read_text())["capped_fits"] == 0


def test_probe_single_class(tmp_path, capsys):
  f = _features(tmp_path / "f.npz", labels=[1] * 12)
  expect_one_line(["probe", "--train", f, "--folds", "3"],
                  ["f.npz", "one class", "'happy'"], capsys, protect=[tmp_path])


@pytest.mark.slow
def test_probe_features_of_two_runs(tmp_path, capsys):
  a = _features(tmp_path / "a.npz")
  b = _features(tmp_path / "b.npz", workdir="/runs/b")
  expect_one_line(["probe", "--train", a, "--test", b, "--l2", "1e-3"],
                  ["b.npz", "/runs/b", "/runs/a", "--allow-other-run"], capsys,
                  protect=[tmp_path])
  c = _features(tmp_path / "c.npz", step=11)
  expect_one_line(["probe", "--train", a, "--test", c, "--l2", "1e-3"],
                  ["c.npz", "step 11", "--allow-other-run"], capsys, protect=[tmp_path])
  assert cli.main(["probe", "--train", str(a), "--test", str(b), "--l2", "1e-3",
                   "--allow-other-run"]) == 0


def test_probe_features_of_an_unknown_run(tmp_path, capsys):
  a = _features(tmp_path / "a.npz", workdir="runs/a")  # Relative: written before it was resolved.
  expect_one_line(["probe", "--train", a, "--test", a, "--l2", "1e-3"],
                  ["unknown run", "--allow-other-run"], capsys, protect=[tmp_path])


# --- features, export, synthesize, evaluate-synthetic, import-weights, data stats ----------------
def test_features_out_inside_the_workdir(tiny_runs, tmp_path, capsys):
  run = copy_run(tiny_runs.classifier, tmp_path / "run")
  expect_one_line(["features", "--workdir", run, "--out", run / "f.npz"],
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def test_features_out_inside_the_image_folder_read(tiny_runs, tmp_path, capsys):
  _faces(tmp_path / "faces" / "train" / "happy")
  expect_one_line(["features", "--workdir", tiny_runs.classifier, "--dataset", "folder",
                   "--manual-dir", tmp_path / "faces", "--split", "train", "--out",
                   tmp_path / "faces" / "f.npz"],
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def test_retrain_head_out_inside_the_run_it_reads(tiny_runs, tmp_path, capsys):
  run = copy_run(tiny_runs.classifier, tmp_path / "run")
  expect_one_line(["retrain-head", "--workdir", run, "--out", run / "crt"],
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def test_export_out_inside_the_workdir(tiny_runs, tmp_path, capsys):
  run = copy_run(tiny_runs.classifier, tmp_path / "run")
  expect_one_line(["export", "--workdir", run, "--out", run / "m.ferjax"],
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def _quick_export(monkeypatch):
  """Exports serialise a few bytes instead of the model: the writing is what is tested."""
  monkeypatch.setattr(export, "_export_function", lambda *args: b"model bytes")


def test_export_loses_a_race_in_one_line(tiny_runs, tmp_path, capsys, monkeypatch):
  out = tmp_path / "m.ferjax"

  def other_export_wins(*args):
    out.write_bytes(b"the other export")  # Published meanwhile, after the checks.
    return b"model bytes"

  monkeypatch.setattr(export, "_export_function", other_export_wins)
  expect_one_line(["export", "--workdir", tiny_runs.classifier, "--out", out],
                  ["m.ferjax", "already exists"], capsys)
  assert out.read_bytes() == b"the other export"
  assert [p.name for p in tmp_path.iterdir()] == ["m.ferjax"]


def test_export_never_follows_a_planted_partial_link(tiny_runs, tmp_path, monkeypatch):
  _quick_export(monkeypatch)
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  (out_dir / ".m.partial.ferjax").symlink_to(victim)
  assert cli.main(["export", "--workdir", str(tiny_runs.classifier), "--out",
                   str(out_dir / "m.ferjax")]) == 0
  assert victim.read_text() == "precious"
  out = out_dir / "m.ferjax"
  assert not out.is_symlink() and out.read_bytes().startswith(export.MAGIC)
  assert sorted(p.name for p in out_dir.iterdir()) == [".m.partial.ferjax", "m.ferjax"]


def test_synthesize_out_inside_the_vaegan_run(tiny_runs, tmp_path, capsys):
  run = copy_run(tiny_runs.vaegan, tmp_path / "vae")
  expect_one_line(["synthesize", "--vaegan", run, "--per-class", "2", "--out", run / "faces"],
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def test_evaluate_synthetic_out_inside_a_run(tiny_runs, tmp_path, capsys):
  run = copy_run(tiny_runs.classifier, tmp_path / "run")
  expect_one_line(["evaluate-synthetic", "--vaegan", tiny_runs.vaegan, "--classifier", run,
                   "--out", run / "quality"],
                  ["--out", "inside the input folder"], capsys, protect=[tmp_path])


def test_evaluate_synthetic_out_holding_other_files(tiny_runs, tmp_path, capsys):
  (tmp_path / "q").mkdir()
  (tmp_path / "q" / "thesis.tex").write_text("mine")
  expect_one_line(["evaluate-synthetic", "--vaegan", tiny_runs.vaegan, "--classifier",
                   tiny_runs.classifier, "--out", tmp_path / "q"],
                  ["--out", "thesis.tex", "not written by ferjax evaluate-synthetic"], capsys,
                  protect=[tmp_path])


def test_import_weights_out_is_the_file(tmp_path, capsys):
  source = tmp_path / "w.safetensors"
  source.write_bytes(b"weights")
  expect_one_line(["import-weights", source, "--arch", "resnet18", "--out", source],
                  ["--out", "w.safetensors", "is the input"], capsys, protect=[tmp_path])


def test_data_stats_out_holding_other_files(tmp_path, capsys):
  (tmp_path / "o").mkdir()
  (tmp_path / "o" / "notes.txt").write_text("mine")
  expect_one_line(["data", "stats", "synthetic", "--out", tmp_path / "o"],
                  ["--out", "notes.txt", "not written by ferjax data stats"], capsys,
                  protect=[tmp_path])


# --- Staged and atomic writes -------------------------------------------------------------------
def _plant(folder, name, victim):
  (folder / name).symlink_to(victim)


def test_write_atomic_never_follows_a_planted_link(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  out = tmp_path / "out"
  out.mkdir()
  _plant(out, ".r.partial.json", victim)  # The partial name of earlier versions.
  writing.write_atomic(out / "r.json", "{}")
  assert victim.read_text() == "precious" and (out / "r.json").read_text() == "{}"
  assert not (out / "r.json").is_symlink()
  assert sorted(p.name for p in out.iterdir()) == [".r.partial.json", "r.json"]


def test_atomic_path_keeps_the_suffix_and_is_new_and_unpredictable(tmp_path):
  with writing.atomic_path(tmp_path / "plot.png") as a, writing.atomic_path(
      tmp_path / "plot.png") as b:
    assert a != b and a.suffix == b.suffix == ".png"
    assert a.is_file() and not a.is_symlink() and a.stat().st_size == 0
    assert a.parent == tmp_path and a.name.startswith(".")
    a.write_text("a")
    b.write_text("b")
  assert (tmp_path / "plot.png").read_text() == "a"  # Renamed in order: b first, then a.
  assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_write_new_never_follows_a_planted_link(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  _plant(tmp_path, ".m.partial.ferjax", victim)
  writing.write_new(tmp_path / "m.ferjax", b"model")
  assert victim.read_text() == "precious" and (tmp_path / "m.ferjax").read_bytes() == b"model"
  _plant(tmp_path, "dangling.ferjax", tmp_path / "nowhere")
  with pytest.raises(UserError, match="already exists"):
    writing.write_new(tmp_path / "dangling.ferjax", b"model")
  assert not (tmp_path / "nowhere").exists()


def test_staged_folder_never_follows_a_planted_link(tmp_path):
  victim = tmp_path / "victim"
  victim.mkdir()
  _plant(tmp_path, f".new.partial-{os.getpid()}-0", victim)
  with writing.staged_folder(tmp_path / "new") as partial:
    assert partial.is_dir() and not partial.is_symlink() and partial.parent == tmp_path
    (partial / "a.txt").write_text("a")
  assert list(victim.iterdir()) == [] and (tmp_path / "new" / "a.txt").read_text() == "a"
  with pytest.raises(UserError, match="already exists"):
    with writing.staged_folder(tmp_path / "late") as partial:
      (tmp_path / "late").symlink_to(victim)  # Planted at `out` meanwhile: never replaced.
  assert (tmp_path / "late").is_symlink() and list(victim.iterdir()) == []
  assert not partial.exists()


def test_lock_file_never_follows_a_planted_link(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  _plant(tmp_path, "x.lock", victim)
  with pytest.raises(UserError, match="symbolic link"):
    with writing.exclusive_lock(tmp_path / "x.lock", refusal=lambda holder, wait: "held"):
      pass
  assert victim.read_text() == "precious"


def test_racing_writers_to_one_new_file_exactly_one_wins(tmp_path):
  out, writers = tmp_path / "m.ferjax", 8
  start = threading.Barrier(writers)
  outcomes = [None] * writers

  def write(i):
    start.wait()
    try:
      writing.write_new(out, f"writer {i}".encode() * 1000)
      outcomes[i] = "won"
    except UserError as e:
      outcomes[i] = str(e)

  threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winner = outcomes.index("won")
  assert outcomes.count("won") == 1
  assert all("already exists" in o and "\n" not in o for o in outcomes if o != "won")
  assert out.read_bytes() == f"writer {winner}".encode() * 1000
  assert [p.name for p in tmp_path.iterdir()] == ["m.ferjax"]
