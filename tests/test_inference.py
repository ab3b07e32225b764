"""ferjax.inference: predicting face crops from a run and from an exported file (`ferjax export`),
crop preparation, and the one-line refusals of bad exports. Uses the session's tiny runs."""

import hashlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ferjax import cli, evaluate, export, inference, losses, runs
from ferjax.core import parallel
from ferjax.data import images as images_lib
from ferjax.errors import UserError
from badinput import copy_run, expect_one_line

TOL = 1e-5


@pytest.fixture(scope="module")
def crops():
  """70 random 32x32 gray crops: more than one padded batch of 64."""
  return np.random.default_rng(0).integers(0, 256, (70, 32, 32, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(tiny_runs):
  return inference.from_run(tiny_runs.classifier)


@pytest.fixture(scope="module")
def export_file(tiny_runs, tmp_path_factory):
  out = tmp_path_factory.mktemp("export") / "tiny.ferjax"
  assert cli.main(["export", "--workdir", str(tiny_runs.classifier), "--out", str(out)]) == 0
  return out


# --- From a run -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tta,tau", [("none", 0.0), ("flip", 0.0), ("flip", 1.5)])
def test_probabilities_match_evaluate(tiny_runs, predictor, crops, tta, tau):
  run = runs.open_classifier(tiny_runs.classifier, "best", mesh=parallel.make_mesh(1))
  logits = evaluate.predict_logits(run.model, run.variables, crops, tta=tta, mesh=run.mesh,
                                   batch_size=64)
  logits = losses.posthoc_adjust(logits, losses.log_prior(run.prior_counts), tau)
  expected = np.asarray(jax.nn.softmax(logits, axis=-1))
  probs = predictor.probabilities(crops, tta=tta, logit_adjust=tau)
  assert probs.shape == (70, 7) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  assert np.abs(probs - expected).max() < TOL
  assert predictor.class_names == run.class_names
  assert (predictor.image_size, predictor.channels) == (32, 1)
  np.testing.assert_array_equal(predictor.prior_counts, run.prior_counts)
  assert "step" in predictor.source


def test_deterministic_and_batch_independent(predictor, crops):
  first = predictor.probabilities(crops, tta="flip")
  np.testing.assert_array_equal(first, predictor.probabilities(crops, tta="flip"))
  assert np.abs(first[:5] - predictor.probabilities(crops[:5], tta="flip")).max() < TOL
  assert predictor.probabilities(crops[:0]).shape == (0, 7)


def test_probabilities_refusals(predictor, crops):
  with pytest.raises(UserError, match="--tta"):
    predictor.probabilities(crops, tta="mirror")
  with pytest.raises(UserError, match="--logit-adjust"):
    predictor.probabilities(crops, logit_adjust=float("nan"))
  with pytest.raises(ValueError, match="prepare_crops"):
    predictor.probabilities(crops[..., 0])


# --- Crops ----------------------------------------------------------------------------------------
def test_prepare_crops_converts_like_training_data():
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (50, 40), dtype=np.uint8)
  rgb = rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 61, 1), dtype=np.uint8)], axis=-1)
  gray16 = rng.integers(0, 65536, (45, 45), dtype=np.uint16)
  rgb16 = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)
  convert = lambda x, c: images_lib.convert_images(x[None], image_size=32, channels=c)[0]
  to8 = lambda x: np.round(x / 257.0).astype(np.uint8)

  out = inference.prepare_crops([gray, gray[..., None], rgb, rgba, gray16, rgb16], 32, 1)
  assert out.shape == (6, 32, 32, 1) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0], convert(gray[..., None], 1))
  np.testing.assert_array_equal(out[1], out[0])
  np.testing.assert_array_equal(out[2], convert(rgb, 1))  # Resized in RGB, then ITU-R 601 luma.
  np.testing.assert_array_equal(out[3], out[2])  # Alpha dropped.
  np.testing.assert_array_equal(out[4], convert(to8(gray16)[..., None], 1))  # 0..65535 -> 0..255.
  np.testing.assert_array_equal(out[5], convert(to8(rgb16), 1))

  out = inference.prepare_crops([gray, rgb], 32, 3)
  assert out.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(out[0], np.repeat(convert(gray[..., None], 1), 3, axis=-1))
  np.testing.assert_array_equal(out[1], convert(rgb, 3))
  same = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
  np.testing.assert_array_equal(inference.prepare_crops([same], 32, 1)[0], same)
  assert inference.prepare_crops([], 32, 1).shape == (0, 32, 32, 1)
  with pytest.raises(ValueError, match="HxWxC"):
    inference.prepare_crops([np.zeros((8, 8, 2), np.uint8)], 32, 1)
  with pytest.raises(ValueError, match="image 0: .*negative"):  # Floats: in 0..1 or 0..255.
    inference.prepare_crops([np.full((8, 8), -1.0, np.float32)], 32, 1)


# --- Export ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_round_trip(predictor, export_file, crops):
  assert not [p for p in export_file.parent.iterdir() if p != export_file]  # No partial left.
  header, payload = export.read_exported(export_file)
  assert header["format"] == "ferjax-exported-model" and header["version"] == 2
  assert header["checksum"] == export.checksum(header, payload)
  assert tuple(header["class_names"]) == predictor.class_names
  assert (header["image_size"], header["channels"], header["source"]["step"]) == (32, 1, 2)
  assert header["jax_version"] == jax.__version__
  exported = export.load_exported(export_file)
  assert (exported.class_names, exported.image_size, exported.channels) == (
      predictor.class_names, 32, 1)
  np.testing.assert_array_equal(exported.prior_counts, predictor.prior_counts)
  for n, tta, tau in [(5, "none", 0.0), (70, "flip", 1.5)]:
    diff = np.abs(exported.probabilities(crops[:n], tta=tta, logit_adjust=tau)
                  - predictor.probabilities(crops[:n], tta=tta, logit_adjust=tau)).max()
    assert diff < TOL, (n, tta, tau, diff)
  np.testing.assert_array_equal(exported.probabilities(crops), exported.probabilities(crops))
  # The batch dimension is symbolic: the raw function takes any batch size.
  raw = jax.export.deserialize(bytearray(payload))
  for n in (3, 9):
    probs = raw.call(crops[:n], np.asarray(False), np.float32(0.0))
    assert np.abs(np.asarray(probs) - predictor.probabilities(crops[:n])).max() < TOL


def test_load_exported_runs_without_checkpoints(export_file):
  """The load path imports neither ferjax.runs nor orbax."""
  code = ("import sys; from ferjax import export; export.load_exported(sys.argv[1]); "
          "print(sorted(m for m in sys.modules if m == 'ferjax.runs' or m.startswith('orbax')))")
  out = subprocess.run([sys.executable, "-c", code, str(export_file)], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


# --- Bad input ------------------------------------------------------------------------------------
def test_export_refuses_existing_out(tiny_runs, tmp_path, capsys):
  out = tmp_path / "taken.ferjax"
  out.write_text("keep me")
  expect_one_line(["export", "--workdir", tiny_runs.classifier, "--out", out],
                  [str(out), "already exists"], capsys, protect=[tmp_path])
  expect_one_line(["export", "--workdir", tiny_runs.classifier, "--out", tmp_path],
                  "folder", capsys, protect=[tmp_path])


def test_export_refuses_vaegan_and_checkpointless_workdirs(tiny_runs, tmp_path, capsys):
  out = tmp_path / "out" / "model.ferjax"
  out.parent.mkdir()
  expect_one_line(["export", "--workdir", tiny_runs.vaegan, "--out", out],
                  ["VAE-GAN", "classifier"], capsys, protect=[tiny_runs.vaegan, out.parent])
  bare = copy_run(tiny_runs.classifier, tmp_path / "bare")
  shutil.rmtree(bare / "checkpoints")
  # Reading creates no checkpoints/ folders either: the workdir stays exactly as it was.
  expect_one_line(["export", "--workdir", bare, "--out", out], "no checkpoint", capsys,
                  protect=[bare, out.parent])
  assert not (bare / "checkpoints").exists()


def _refusal(path, *needles) -> str:
  with pytest.raises(UserError) as info:
    export.load_exported(path)
  line = str(info.value)
  assert "\n" not in line and str(path) in line, line
  for needle in needles:
    assert needle in line, line
  return line


def test_load_refuses_bad_files(export_file, tmp_path):
  data = export_file.read_bytes()
  (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
  _refusal(tmp_path / "photo.png", "not a ferjax exported model")
  (tmp_path / "empty.ferjax").write_bytes(b"")
  _refusal(tmp_path / "empty.ferjax", "not a ferjax exported model")
  _refusal(tmp_path, "folder")
  _refusal(tmp_path / "missing.ferjax", "cannot read")
  (tmp_path / "half.ferjax").write_bytes(data[:len(data) // 2])
  _refusal(tmp_path / "half.ferjax", "truncated")
  (tmp_path / "head.ferjax").write_bytes(data[:60])
  _refusal(tmp_path / "head.ferjax", "truncated")
  header, payload = export.read_exported(export_file)
  (tmp_path / "newer.ferjax").write_bytes(export._pack({**header, "version": 999}, payload))
  _refusal(tmp_path / "newer.ferjax", "newer ferjax (format 999)", "upgrade ferjax")
  (tmp_path / "other.ferjax").write_bytes(export._pack({**header, "format": "x"}, payload))
  _refusal(tmp_path / "other.ferjax", "not a ferjax exported model")
  flipped = bytearray(data)
  flipped[-100] ^= 0xFF
  (tmp_path / "flipped.ferjax").write_bytes(bytes(flipped))
  _refusal(tmp_path / "flipped.ferjax", "checksum")
  garbage = b"not a jax.export" * 8  # Intact container, model jax cannot read.
  fake = {**header, "model_bytes": len(garbage),
          "model_sha256": hashlib.sha256(garbage).hexdigest()}
  fake["checksum"] = export.checksum(fake, garbage)
  (tmp_path / "garbage.ferjax").write_bytes(export._pack(fake, garbage))
  _refusal(tmp_path / "garbage.ferjax", "cannot load a model exported with jax")


# --- Edited headers -------------------------------------------------------------------------------
def _edited(tmp_path, export_file, name, version=None, **changes):
  """A copy of the export with header fields changed (format `version`: its checksum
  recomputed when None, dropped for 1, kept stale otherwise)."""
  header, payload = export.read_exported(export_file)
  header = {**header, **changes}
  if version == 1:
    header = {k: v for k, v in header.items() if k != "checksum"}
    header["version"] = 1
  elif version is None:
    header["checksum"] = export.checksum(header, payload)
  path = tmp_path / name
  path.write_bytes(export._pack(header, payload))
  return path


def test_load_refuses_edited_headers(export_file, tmp_path):
  header, _ = export.read_exported(export_file)
  names = header["class_names"]
  stale = {"version": 2}  # The header edited, its checksum left as it was.
  _refusal(_edited(tmp_path, export_file, "reversed.ferjax", class_names=names[::-1], **stale),
           "edited", "checksum")
  _refusal(_edited(tmp_path, export_file, "other_run.ferjax", **stale,
                   source={"workdir": "runs/other", "step": 99, "checkpoint": "best"}),
           "edited", "checksum")
  # Consistent checksums (or format 1 files, which have none): checked against the model.
  for version in (None, 1):
    _refusal(_edited(tmp_path, export_file, "six.ferjax", version, class_names=names[:6],
                     prior_counts=header["prior_counts"][:6]),
             "'class_names' lists 6 names", "model has 7 classes")
    many = [f"c{i}" for i in range(100_000)]
    _refusal(_edited(tmp_path, export_file, "many.ferjax", version, class_names=many,
                     prior_counts=None), "lists 100000 names", "model has 7 classes")
    _refusal(_edited(tmp_path, export_file, "size.ferjax", version, image_size=48),
             "'image_size' is 48", "32x32")
    _refusal(_edited(tmp_path, export_file, "rgb.ferjax", version, channels=3),
             "'channels' is 3", "1-channel")


def test_load_reads_format_1_files(export_file, tmp_path, crops):
  old = export.load_exported(_edited(tmp_path, export_file, "v1.ferjax", 1))
  new = export.load_exported(export_file)
  np.testing.assert_array_equal(old.probabilities(crops[:4]), new.probabilities(crops[:4]))
  assert old.class_names == new.class_names
