"""What a prepared dataset was made from (`ferjax_source.json`), one progress bar while
preparing, `data stats` on CK+ folds, and per-example extras from `load_prepared`.

Tiny fixtures: FER-2013 with 1 or 2 images per class and split, CK+ with 12 subjects.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from badinput import expect_one_line
from ferjax import cli
from ferjax.data import builders
from ferjax.data.builders import locate
from ferjax.errors import UserError
from test_builders import make_ckplus, make_fer_folders

FER_FILES_A = 21  # make_fer_folders(per_class=1): 7 train + 7 PublicTest + 7 PrivateTest.
FER_FILES_B = 28  # per_class=2: 14 train, the same 14 test images.


def run(argv, capsys):
  """(exit code, stdout, stderr) of `ferjax argv`; never a traceback."""
  capsys.readouterr()
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err, err
  return rc, out, err


def prepare_argv(manual, data, *extra):
  return ["data", "prepare", "fer2013", "--manual-dir", manual, "--data-dir", data, *extra]


@pytest.fixture(scope="module")
def fer(tmp_path_factory):
  """Raw folders `a` (1 image per class and split) and `b` (2), and `data` prepared from a."""
  root = tmp_path_factory.mktemp("sources")
  make_fer_folders(root / "a", per_class=1)
  make_fer_folders(root / "b", per_class=2)
  builders.prepare("fer2013", root / "a", root / "data", progress=False)
  return root


@pytest.fixture
def data(fer, tmp_path):
  """A private copy of the data dir prepared from `fer / "a"`."""
  return Path(shutil.copytree(fer / "data", tmp_path / "data"))


@pytest.fixture(scope="module")
def ckplus(tmp_path_factory):
  """CK+ (12 subjects, 2 images each) prepared once: `raw`, `data`."""
  root = tmp_path_factory.mktemp("ckplus")
  make_ckplus(root / "raw")
  builders.prepare("ckplus", root / "raw", root / "data", progress=False)
  return root


# ---------------------------------------------------------------------------------------------
# The recorded source
# ---------------------------------------------------------------------------------------------


def test_source_is_recorded(fer):
  source = builders.prepared_source("fer2013", fer / "data")
  assert source["manual_dir"] == str((fer / "a").resolve())
  assert source["files"] == FER_FILES_A and source["fingerprint"].startswith("sha256:")
  version_dir = builders.prepared_dir("fer2013", fer / "data")
  assert json.loads((version_dir / locate.SOURCE).read_text()) == source


def test_prepare_from_another_manual_dir_is_refused(fer, data, capsys):
  a, b = (fer / "a").resolve(), (fer / "b").resolve()
  line = expect_one_line(prepare_argv(fer / "b", data),
                         [str(a), str(b), f"{FER_FILES_A} files", f"{FER_FILES_B} files",
                          "--force"], capsys, protect=[data])
  assert line.index(str(a)) < line.index(str(b))  # Prepared from a, asked for b.


def test_force_prepares_again_from_the_new_source(fer, data, capsys):
  rc, out, err = run(prepare_argv(fer / "b", data, "--force"), capsys)
  assert rc == 0 and err == "" and out.startswith("prepared fer2013")
  assert "train: 14 images" in out
  source = builders.prepared_source("fer2013", data)
  assert source["manual_dir"] == str((fer / "b").resolve()) and source["files"] == FER_FILES_B
  rc, out, _ = run(prepare_argv(fer / "b", data), capsys)  # Now b is the one reused.
  assert rc == 0 and "from the same files" in out and "train: 14 images" in out


def test_same_source_is_reused(fer, data, tmp_path, capsys):
  rc, out, err = run(prepare_argv(fer / "a", data), capsys)
  assert rc == 0 and err == ""
  assert "already prepared" in out and f"same files ({FER_FILES_A} in" in out
  assert "train: 7 images" in out
  # The same files moved elsewhere are the same source.
  moved = shutil.copytree(fer / "a", tmp_path / "moved")
  rc, out, _ = run(prepare_argv(moved, data), capsys)
  assert rc == 0 and "train: 7 images" in out


def test_changed_files_in_the_same_folder_are_refused(fer, tmp_path):
  raw = Path(shutil.copytree(fer / "a", tmp_path / "raw"))
  builders.prepare("fer2013", raw, tmp_path / "d2", progress=False)
  next((raw / "train" / "happy").iterdir()).unlink()
  with pytest.raises(UserError, match=f"when it held {FER_FILES_A} files; it now holds other "
                                      f"files \\({FER_FILES_A - 1} files\\): add --force"):
    builders.prepare("fer2013", raw, tmp_path / "d2")


def test_nonexistent_manual_dir_is_refused_when_prepared(data, tmp_path, capsys):
  expect_one_line(prepare_argv(tmp_path / "does" / "not" / "exist", data),
                  ["does not exist", str(tmp_path / "does")], capsys, protect=[data])


def test_preparation_without_a_record_is_reused_with_a_note(fer, data, capsys):
  (builders.prepared_dir("fer2013", data) / locate.SOURCE).unlink()
  rc, out, err = run(prepare_argv(fer / "b", data), capsys)
  assert rc == 0 and err == ""
  assert out.startswith("note: fer2013 was already prepared") and "train: 7 images" in out
  assert str(fer / "b") in out and "--force" in out
  assert not (builders.prepared_dir("fer2013", data) / locate.SOURCE).exists()  # Nothing written.
  assert len(builders.load_prepared("fer2013", "train", data, manual_dir=fer / "b")) == 7


def test_garbled_record_is_damaged_data(fer, data, tmp_path, capsys):
  """It matters only when a manual dir is compared with it (opening for stats does not)."""
  (builders.prepared_dir("fer2013", data) / locate.SOURCE).write_text("{not json")
  expect_one_line(prepare_argv(fer / "a", data), [locate.SOURCE, "not valid JSON", "--force"],
                  capsys, protect=[data])
  assert len(builders.load_prepared("fer2013", "train", data)) == 7


def test_loading_with_another_manual_dir_is_refused(fer, data, tmp_path):
  with pytest.raises(UserError, match="prepared from .* not from manual_dir .*--force") as e:
    builders.load_prepared("fer2013", "train", data, manual_dir=fer / "b")
  assert str((fer / "a").resolve()) in str(e.value) and "\n" not in str(e.value)
  assert len(builders.load_prepared("fer2013", "train", data, manual_dir=fer / "a")) == 7
  # The recorded folder itself is not listed again: its raw files may be gone.
  raw = Path(shutil.copytree(fer / "a", tmp_path / "raw"))
  builders.prepare("fer2013", raw, tmp_path / "d2", progress=False)
  shutil.rmtree(raw)
  assert len(builders.load_prepared("fer2013", "train", tmp_path / "d2", manual_dir=raw)) == 7
  with pytest.raises(UserError, match="does not exist"):
    builders.load_prepared("fer2013", "train", data, manual_dir=tmp_path / "typo")


# ---------------------------------------------------------------------------------------------
# One progress bar
# ---------------------------------------------------------------------------------------------


def test_one_ferjax_progress_bar_and_no_tfds_output(tmp_path, capsys):
  make_ckplus(tmp_path / "raw", subjects=7)  # Every class: no empty-class warning.
  capsys.readouterr()
  builders.prepare("ckplus", tmp_path / "raw", tmp_path / "data", progress=True)
  err = capsys.readouterr().err
  assert err.startswith("\rckplus:") and "14/14" in err.splitlines()[-1]
  assert "Generating" not in err and "Shuffling" not in err and "examples/s" not in err
  # The CLI shows the bar only on a terminal: nothing on stderr under pytest.
  make_ckplus(tmp_path / "raw2", subjects=7)
  rc, _, err = run(["data", "prepare", "ckplus", "--manual-dir", tmp_path / "raw2",
                    "--data-dir", tmp_path / "data2"], capsys)
  assert rc == 0 and err == ""


# ---------------------------------------------------------------------------------------------
# data stats on CK+ folds
# ---------------------------------------------------------------------------------------------


def test_stats_ckplus_fold_split_json(ckplus, tmp_path, capsys):
  rc, out, err = run(["data", "stats", "ckplus", "--split", "fold3_test", "--json",
                      "--data-dir", ckplus / "data", "--out", tmp_path], capsys)
  assert rc == 0 and err == ""
  result = json.loads(out)
  assert list(result["splits"]) == ["fold3_test"]
  assert result["splits"]["fold3_test"]["total"] == 2  # Subject 4 only.
  listed = result["available_splits"]
  assert listed[:3] == ["all", "train", "test"] and len(listed) == 23
  assert "fold3_test" in listed and "fold9_train" in listed
  folds = result["folds"]
  assert [f["fold"] for f in folds] == list(range(10))
  # 12 subjects dealt round-robin: folds 0 and 1 hold two subjects, the others one.
  assert [f["subjects"] for f in folds] == [2, 2] + [1] * 8
  assert [f["images"] for f in folds] == [4, 4] + [2] * 8
  assert folds[1]["subject_ids"] == [2, 12] and folds[3]["subject_ids"] == [4]


def test_stats_ckplus_table_lists_splits_and_folds(ckplus, tmp_path, capsys):
  rc, out, _ = run(["data", "stats", "ckplus", "--data-dir", ckplus / "data", "--out",
                    tmp_path], capsys)
  assert rc == 0
  assert "splits: all, train, test, fold<k>_train / fold<k>_test (k = 0..9)" in out
  rows = [line.split() for line in out.splitlines()]
  assert ["fold", "subjects", "images"] in rows
  assert ["1", "2", "4"] in rows and ["9", "1", "2"] in rows and ["total", "12", "24"] in rows


def test_stats_ckplus_unknown_split_names_the_fold_splits(ckplus, tmp_path, capsys):
  expect_one_line(["data", "stats", "ckplus", "--split", "fold_3", "--data-dir",
                   ckplus / "data", "--out", tmp_path / "o"],
                  ["'fold_3'", "fold<k>_train"], capsys, protect=[ckplus / "data"])


def test_stats_fer2013_lists_its_splits(fer, tmp_path, capsys):
  rc, out, _ = run(["data", "stats", "fer2013", "--json", "--data-dir", fer / "data", "--out",
                    tmp_path], capsys)
  result = json.loads(out)
  assert rc == 0 and result["available_splits"] == ["train", "validation", "test"]
  assert "folds" not in result


# ---------------------------------------------------------------------------------------------
# Per-example extras
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True])
def test_ckplus_extras_hold_subject_and_fold(ckplus, lazy):
  everything = builders.load_prepared("ckplus", "all", ckplus / "data", lazy=lazy)
  assert set(everything.extras) == {"subject", "fold"}
  subjects = np.asarray(everything.images)[:, 0, 0, 0].astype(int) // 10  # make_ckplus' values.
  np.testing.assert_array_equal(everything.extras["subject"], subjects)
  for k in (0, 3):
    test = builders.load_prepared("ckplus", f"fold{k}_test", ckplus / "data", lazy=lazy)
    train = builders.load_prepared("ckplus", f"fold{k}_train", ckplus / "data", lazy=lazy)
    assert (test.extras["fold"] == k).all() and (train.extras["fold"] != k).all()
    assert len(test.extras["subject"]) == len(test) and len(train.extras["fold"]) == len(train)
    np.testing.assert_array_equal(test.extras["subject"],
                                  np.asarray(test.images)[:, 0, 0, 0].astype(int) // 10)
    assert not set(test.extras["subject"]) & set(train.extras["subject"])
  kept = everything.take(np.array([5, 0]))
  np.testing.assert_array_equal(kept.extras["subject"], everything.extras["subject"][[5, 0]])


def test_fer2013_has_no_extras(fer):
  assert builders.load_prepared("fer2013", "train", fer / "data").extras == {}
