"""`ferjax predict` (issue 20): faces of any images through a finished run, rows per face,
annotated pictures, and one-line errors for bad input. Uses the session's tiny classifier run
(conftest `tiny_runs`); trains nothing."""

import csv
import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from badinput import expect_one_line
from ferjax import cli
from ferjax.data import synthetic

# Test-split synthetic face 7 at 96 px, pasted at (112, 60) on a plain 320x240 photo: OpenCV
# 4.14's frontal-face cascade finds it (at about x 123, y 75, 65x65); many other faces it misses.
FACE_INDEX, FACE_AT = 7, (112, 60)
HAS_CV2 = importlib.util.find_spec("cv2") is not None


def _face(size=96, channels=3, index=FACE_INDEX) -> np.ndarray:
  ds = synthetic.load("test", image_size=size, channels=channels, num_examples=40)
  return np.asarray(ds.images[index])


def _photo() -> np.ndarray:
  photo = np.full((240, 320, 3), 200, np.uint8)
  x, y = FACE_AT
  photo[y:y + 96, x:x + 96] = _face()
  return photo


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
  """A folder of face crops in several formats, depths, channels and sizes (one in a
  subfolder), plus a text file; {name: (width, height)} of the images."""
  root = tmp_path_factory.mktemp("faces")
  (root / "sub").mkdir()
  Image.fromarray(_face(96, 3)).save(root / "rgb.png")
  Image.fromarray(_face(64, 1, 3)[..., 0]).save(root / "sub" / "gray.png")
  Image.fromarray(_face(48, 1, 4)[..., 0].astype(np.uint16) * 257).save(root / "deep16.png")
  Image.fromarray(_face(80, 3, 5)).save(root / "photo.jpg", quality=90)
  Image.fromarray(_face(72, 3, 6)).convert("L").resize((60, 72)).save(root / "narrow.jpg")
  (root / "notes.txt").write_text("not an image\n")
  sizes = {"rgb.png": (96, 96), "gray.png": (64, 64), "deep16.png": (48, 48),
           "photo.jpg": (80, 80), "narrow.jpg": (60, 72)}
  return root, sizes


def _predict(argv, capsys) -> tuple[list[dict], str, str]:
  """(JSON rows on stdout, stdout, stderr) of a successful `ferjax predict`."""
  capsys.readouterr()
  assert cli.main(["predict", *map(str, argv)]) == 0
  out, err = capsys.readouterr()
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")], out, err


def test_whole_image_folder_one_row_per_image(tiny_runs, faces, capsys):
  root, sizes = faces
  rows, _, err = _predict(["--workdir", tiny_runs.classifier, "--whole-image", root], capsys)
  assert sorted(r["file"].rsplit("/", 1)[-1] for r in rows) == sorted(sizes)
  for row in rows:
    probs = row["probabilities"]
    assert list(probs) == list(synthetic.CLASS_NAMES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert row["label"] == max(probs, key=probs.get) and row["confidence"] == probs[row["label"]]
    assert row["face"] == 0 and row["box"] == [0, 0, *sizes[row["file"].rsplit("/", 1)[-1]]]
  assert "ferjax: warning: 1 file skipped: " in err and "notes.txt" in err
  assert "5 images read, 5 faces found, 0 images with no face, 1 unreadable file skipped" in err


def test_boxes_crop_the_given_boxes(tiny_runs, tmp_path, capsys):
  Image.fromarray(_photo()).save(tmp_path / "photo.png")
  Image.fromarray(_face(64, 1)[..., 0]).save(tmp_path / "face.png")
  (tmp_path / "boxes.csv").write_text(
      "file,x,y,w,h\nphoto.png,112,60,96,96\nphoto.png,0,0,40,30\n"
      f"{tmp_path / 'face.png'},4,4,56,56\n")
  rows, _, err = _predict(["--workdir", tiny_runs.classifier, "--boxes", tmp_path / "boxes.csv",
                           "--tta", "flip"], capsys)
  assert [(r["file"].rsplit("/", 1)[-1], r["face"], r["box"]) for r in rows] == [
      ("photo.png", 0, [112, 60, 96, 96]), ("photo.png", 1, [0, 0, 40, 30]),
      ("face.png", 0, [4, 4, 56, 56])]
  assert "2 images read, 3 faces found" in err


@pytest.mark.skipif(not HAS_CV2, reason="OpenCV (the 'predict' extra) is not installed")
def test_detection_finds_the_face_on_a_photo(tiny_runs, tmp_path, capsys):
  Image.fromarray(_photo()).save(tmp_path / "photo.png")
  Image.fromarray(np.full((120, 160), 90, np.uint8)).save(tmp_path / "wall.png")
  rows, _, err = _predict(["--workdir", tiny_runs.classifier, tmp_path], capsys)
  assert len(rows) == 1 and rows[0]["file"].endswith("photo.png")
  x, y, w, h = rows[0]["box"]
  fx, fy = FACE_AT
  assert fx <= x and x + w <= fx + 96 and fy <= y and y + h <= fy + 96 and w >= 40
  assert "2 images read, 1 face found, 1 image with no face" in err


def test_deterministic_csv_and_pictures(tiny_runs, faces, tmp_path, capsys):
  root, sizes = faces
  argv = ["--workdir", tiny_runs.classifier, "--whole-image", f"{root}/*.png", root / "sub",
          "--format", "csv", "--out", tmp_path / "pictures"]
  outputs = []
  for name in ("a.csv", "b.csv"):
    _, out, err = _predict([*argv, "--output", tmp_path / name], capsys)
    assert "3 images read, 3 faces found" in out and err == ""  # Rows in a file: summary on stdout.
    outputs.append((tmp_path / name).read_text())
  assert outputs[0] == outputs[1]
  table = list(csv.DictReader(outputs[0].splitlines()))
  assert len(table) == 3 and {f"prob_{n}" for n in synthetic.CLASS_NAMES} <= set(table[0])
  assert sum(float(table[0][f"prob_{n}"]) for n in synthetic.CLASS_NAMES) == pytest.approx(1, 1e-4)
  annotated = sorted(p.name for p in (tmp_path / "pictures" / "annotated").iterdir())
  assert annotated == ["deep16.png", "gray.png", "rgb.png"]
  with Image.open(tmp_path / "pictures" / "annotated" / "rgb.png") as img:
    assert img.mode == "RGB" and img.width == img.height >= 96
  with Image.open(tmp_path / "pictures" / "faces.png") as sheet:
    assert sheet.mode == "RGB" and sheet.width > 3 * 96


def test_exported_model_gives_the_run_s_rows(tiny_runs, faces, tmp_path, capsys):
  root, _ = faces
  assert cli.main(["export", "--workdir", str(tiny_runs.classifier),
                   "--out", str(tmp_path / "m.ferjax")]) == 0
  from_run, _, _ = _predict(["--workdir", tiny_runs.classifier, "--whole-image", root], capsys)
  exported, _, _ = _predict(["--model", tmp_path / "m.ferjax", "--whole-image", root], capsys)
  assert exported == from_run


# --- Bad input: one line, exit 2 ----------------------------------------------------------------
def _write(path, text):
  path.write_text(text)
  return path


def _no_checkpoints(tmp_path, runs):
  run = tmp_path / "run"
  shutil.copytree(runs.classifier, run)
  shutil.rmtree(run / "checkpoints")
  return run


BAD = {
    "only input unreadable": lambda t, r, i: (
        ["--workdir", r.classifier, "--whole-image", _write(t / "x.png", "text")],
        ["x.png", "not an image"]),
    "empty folder": lambda t, r, i: (
        ["--workdir", r.classifier, "--whole-image", t], [str(t), "no files found"]),
    "missing path": lambda t, r, i: (
        ["--workdir", r.classifier, "--whole-image", t / "nope.png"], ["nope.png", "no such file"]),
    "boxes name a missing image": lambda t, r, i: (
        ["--workdir", r.classifier, "--boxes",
         _write(t / "b.csv", "file,x,y,w,h\ngone.png,1,1,9,9\n")],
        ["b.csv line 2", "gone.png", "not found"]),
    "box outside the image": lambda t, r, i: (
        ["--workdir", r.classifier, "--boxes",
         _write(t / "b.csv", f"file,x,y,w,h\n{i}/rgb.png,1,1,9,9\n{i}/rgb.png,50,50,60,20\n")],
        ["b.csv line 3", "outside", "96x96"]),
    "boxes without the header": lambda t, r, i: (
        ["--workdir", r.classifier, "--boxes", _write(t / "b.csv", "rgb.png,1,1,9,9\n")],
        ["b.csv line 1", "file,x,y,w,h"]),
    "boxes with a word for a number": lambda t, r, i: (
        ["--workdir", r.classifier, "--boxes",
         _write(t / "b.csv", "file,x,y,w,h\na.png,1,one,9,9\n")],
        ["b.csv line 2", "numbers"]),
    "workdir with no checkpoint": lambda t, r, i: (
        ["--workdir", _no_checkpoints(t, r), "--whole-image", i], ["checkpoint"]),
    "VAE-GAN workdir": lambda t, r, i: (
        ["--workdir", r.vaegan, "--whole-image", i], ["classifier"]),
    "both --workdir and --model": lambda t, r, i: (
        ["--workdir", r.classifier, "--model", t / "m.ferjax", i], ["--model", "--workdir"]),
    "neither --workdir nor --model": lambda t, r, i: (
        ["--whole-image", i], ["--workdir", "--model", "required"]),
    "--logit-adjust nan": lambda t, r, i: (
        ["--workdir", r.classifier, "--logit-adjust", "nan", i], ["--logit-adjust", "finite"]),
    "--out is a file": lambda t, r, i: (
        ["--workdir", r.classifier, "--out", _write(t / "taken", ""), i], ["--out", "taken"]),
    "--checkpoint with --model": lambda t, r, i: (
        ["--model", t / "m.ferjax", "--checkpoint", "last", "--whole-image", i], ["--checkpoint"]),
    "--margin negative": lambda t, r, i: (
        ["--workdir", r.classifier, "--margin", "-1", i], ["--margin"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(case, tiny_runs, faces, tmp_path, capsys):
  root, _ = faces
  argv, needle = BAD[case](tmp_path, tiny_runs, root)
  expect_one_line(["predict", *argv], needle, capsys,
                  protect=[root, tiny_runs.classifier, tiny_runs.vaegan])


def test_detection_without_opencv_names_the_extra(tiny_runs, faces, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now fails.
  expect_one_line(["predict", "--workdir", tiny_runs.classifier, faces[0]],
                  ["pip install 'ferjax[predict]'", "--whole-image"], capsys)
