"""Bad input to `ferjax data prepare` / `ferjax data stats` and the folder loader (issue 15's
standing suite, data side): damaged prepared data, a reused preparation, missing or empty class
folders, held locks, FIFOs, odd file names and encodings, unreadable files, decompression bombs,
unwritable or full data dirs.

Each table case builds its broken input from one tiny FER-2013 preparation made once per module
(copied before damaging) or from a few raw files, and must end in one `ferjax: error:` line
naming the file (tests/badinput.py). Plain tests cover warnings and skipped files.
"""

import builtins
import errno
import io
import json
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinput import expect_one_line
from ferjax import cli
from ferjax.data import builders, folder
from ferjax.data.builders import locate
from ferjax.errors import UserError
from test_builders import (make_affectnet, make_ckplus, make_fer_folders, make_rafdb,
                           write_fer_csv, write_image)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
VERSION_DIR = Path("fer2013") / "1.1.0"
TRAIN_SHARD = VERSION_DIR / "fer2013-train.array_record-00000-of-00001"
TEST_SHARD = VERSION_DIR / "fer2013-test.array_record-00000-of-00001"
BAD_NAME = os.fsdecode(b"Training_\xff\xfe.png")  # Not UTF-8: a lone-surrogate str in Python.
_CLEANUP: list = []  # Undone after each test: modes taken away, locks held.


@pytest.fixture(autouse=True)
def _cleanup():
  yield
  while _CLEANUP:
    _CLEANUP.pop()()


# ---------------------------------------------------------------------------------------------
# Shared inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """One FER-2013 folder set (1 image per class and split) prepared once: `raw`, `data`."""
  root = tmp_path_factory.mktemp("bad_input_data")
  make_fer_folders(root / "raw", per_class=1)
  builders.prepare("fer2013", root / "raw", root / "data", progress=False)
  return root


class Case:
  """What a table case gets: fresh copies of the shared inputs and a place to work."""

  def __init__(self, base: Path, tmp: Path, monkeypatch):
    self.base, self.tmp, self.monkeypatch = base, tmp, monkeypatch

  def data(self, name="data") -> Path:
    """A private copy of the prepared data dir."""
    return Path(shutil.copytree(self.base / "data", self.tmp / name))

  def raw(self, name="raw") -> Path:
    """A private copy of the raw FER-2013 folders."""
    return Path(shutil.copytree(self.base / "raw", self.tmp / name))

  def stats(self, data: Path, *extra):
    return ["data", "stats", "fer2013", "--data-dir", data, "--out", self.tmp / "out", *extra]

  def prepare(self, name, raw: Path, data: Path, *extra):
    return ["data", "prepare", name, "--manual-dir", raw, "--data-dir", data, *extra]


def deny(monkeypatch, target: Path):
  """Makes `target` (a folder or file) unreadable: chmod 000, and since root ignores modes,
  also refuses it in os.listdir / os.scandir / open for this test."""
  target = Path(target).absolute()
  mode = target.stat().st_mode
  os.chmod(target, 0)
  _CLEANUP.append(lambda: os.chmod(target, mode))
  if not IS_ROOT:
    return

  def denied(path) -> bool:  # (os.scandir also takes file descriptors: never denied.)
    return not isinstance(path, int) and os.path.abspath(os.fsdecode(path)) == str(target)

  def refuse(path):
    raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

  for module, name in ((os, "listdir"), (os, "scandir")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda p=".", *a, _real=real, **k:
                        refuse(p) if denied(p) else _real(p, *a, **k))
  real_open = builtins.open

  def fake_open(file, *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and denied(file):
      refuse(file)
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", fake_open)
  monkeypatch.setattr(io, "open", fake_open)


def read_only(monkeypatch, root: Path):
  """Makes writes under `root` fail with EROFS (a read-only mount, which root cannot bypass)."""
  root = Path(root).absolute()

  def under(path) -> bool:
    return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root)

  def refuse(path):
    raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

  real_open, real_mkdir, real_os_open = builtins.open, os.mkdir, os.open
  writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

  def fake_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and under(file) and set(mode) & set("wax+"):
      refuse(file)
    return real_open(file, mode, *args, **kwargs)

  def fake_mkdir(path, *args, **kwargs):
    if under(path) and not os.path.exists(path):
      refuse(path)
    return real_mkdir(path, *args, **kwargs)

  def fake_os_open(path, flags, *args, **kwargs):  # Locks and staged files open this way.
    if under(path) and flags & writing:
      refuse(path)
    return real_os_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", fake_open)
  monkeypatch.setattr(io, "open", fake_open)
  monkeypatch.setattr(os, "mkdir", fake_mkdir)
  monkeypatch.setattr(os, "open", fake_os_open)


def bomb_png(path: Path, size=20000):
  """A ~70-byte PNG whose header claims size x size pixels (Pillow refuses it at open)."""
  buf = io.BytesIO()
  Image.new("L", (1, 1)).save(buf, format="PNG")
  data = bytearray(buf.getvalue())
  data[16:24] = struct.pack(">II", size, size)  # IHDR width, height
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(bytes(data))


def full_disk(monkeypatch, exc=None):
  """The array_record writer fails as on a full disk."""
  from tensorflow_datasets.core import file_adapters

  def write_examples(cls, path, iterator):
    raise exc or OSError(errno.ENOSPC, "No space left on device", os.fspath(path))

  monkeypatch.setattr(file_adapters.ArrayRecordFileAdapter, "write_examples",
                      classmethod(write_examples))


def fer_csv(raw: Path, text: bytes):
  raw.mkdir(parents=True, exist_ok=True)
  (raw / "fer2013.csv").write_bytes(text)
  return raw


def csv_text(rows=((0, "Training"), (3, "PublicTest"))) -> str:
  pixels = " ".join(["7"] * 2304)
  return "emotion,pixels,Usage\n" + "".join(f"{e},{pixels},{u}\n" for e, u in rows)


# ---------------------------------------------------------------------------------------------
# The table: case id -> builder returning (argv, needle(s), paths that must not change)
# ---------------------------------------------------------------------------------------------


def damaged(edit, needle, verb="stats"):
  """A case damaging a copy of the prepared data with `edit(data_dir)`."""
  def case(c: Case):
    data = c.data()
    edit(data)
    argv = c.stats(data) if verb == "stats" else c.prepare("fer2013", c.base / "raw", data)
    return argv, [needle, "--force"], [data, c.base / "raw"]
  return case


def truncate(rel, size=60000, manifest=True):
  def edit(data):
    os.truncate(data / rel, size)
    if not manifest:
      (data / VERSION_DIR / locate.MANIFEST).unlink()
  return edit


def overwrite(rel, text: bytes):
  return lambda data: (data / rel).write_bytes(text)


def scramble_shard(data):
  """Bytes inside the first record overwritten, size unchanged, no size record to compare."""
  (data / VERSION_DIR / locate.MANIFEST).unlink()
  path = data / TRAIN_SHARD
  raw = bytearray(path.read_bytes())
  raw[200:16000] = b"A" * 15800
  path.write_bytes(bytes(raw))


def shard_to_folder(data):
  (data / TEST_SHARD).unlink()
  (data / TEST_SHARD).mkdir()


def append_bytes(data):
  with open(data / TRAIN_SHARD, "ab") as f:
    f.write(b"\0" * 10)


def reuse_with_manual_dir(kind):
  """`data prepare` over a good preparation with a --manual-dir that is gone or a file."""
  def case(c: Case):
    data = c.data()
    manual = c.tmp / "gone"
    if kind == "file":
      manual.write_text("not a folder")
    what = "is not a folder" if kind == "file" else "does not exist"
    return c.prepare("fer2013", manual, data), ["--manual-dir", str(manual), what], [data]
  return case


def bad_wait(value):
  def case(c: Case):
    data = c.data()
    return c.prepare("fer2013", c.base / "raw", data, "--wait", value), "--wait", [data]
  return case


def lock_held(c: Case):
  import fcntl
  data = c.tmp / "data"
  data.mkdir()
  lock = data / ".fer2013.lock"
  lock.write_text("pid 4242 on otherhost since 2024-01-01 00:00:00\n")
  handle = open(lock, "a+")
  fcntl.flock(handle, fcntl.LOCK_EX)
  _CLEANUP.append(handle.close)  # Released after the test.
  return (c.prepare("fer2013", c.base / "raw", data),
          ["pid 4242 on otherhost since 2024-01-01", "--wait"], [data, c.base / "raw"])


def missing_class(split, cls):
  def case(c: Case):
    raw = c.raw()
    shutil.rmtree(raw / split / cls)
    data = c.tmp / "data"
    return c.prepare("fer2013", raw, data), f"{split}/{cls}/", [raw]
  return case


def raw_case(make, name, needle):
  """`data prepare name` on a fresh raw dir that `make(raw, case)` fills, into a data dir that
  holds only the (empty, unheld) lock file: it must hold nothing else afterwards."""
  def case(c: Case):
    raw = c.tmp / "raw"
    raw.mkdir()
    make(raw, c)
    data = c.tmp / "data"
    data.mkdir()
    (data / f".{name}.lock").touch()
    return c.prepare(name, raw, data), needle, [raw, data]
  return case


def fer_raw(edit):
  """The shared raw FER-2013 folders, copied and changed by `edit(raw, case)`."""
  def make(raw, c):
    shutil.copytree(c.base / "raw", raw, dirs_exist_ok=True)
    edit(raw, c)
  return make


def rafdb_raw(edit):
  def make(raw, c):
    make_rafdb(raw)
    edit(raw, c)
  return make


def affectnet_raw(edit):
  def make(raw, c):
    make_affectnet(raw, per_class=(1, 1))
    edit(raw, c)
  return make


def latin1_line(path: Path, line: int):
  """Puts a Latin-1 'é' into line `line` (1-based) of a text file."""
  lines = path.read_bytes().split(b"\n")
  lines[line - 1] = lines[line - 1] + b"\xe9"
  path.write_bytes(b"\n".join(lines))


def ferplus_raw(edit):
  def make(raw, c):
    write_fer_csv(raw / "fer2013.csv", [(0, 5, "Training"), (3, 9, "PublicTest")])
    (raw / "fer2013new.csv").write_text(
        "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"
        "Training,a.png,9,1,0,0,0,0,0,0,0,0\nPublicTest,b.png,0,9,0,0,0,0,0,0,0,0\n")
    edit(raw, c)
  return make


def bomb_in_train(raw, c):
  bomb_png(raw / "train" / "happy" / "Training_bomb.png")


def bomb_warning_range(raw, c):
  write_image(raw / "train" / "happy" / "Training_big.png", 5, size=(100, 100))
  c.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: Pillow only warns.


def bomb_rafdb(raw, c):
  bomb_png(raw / "Image" / "aligned" / "train_00002_aligned.jpg")


def bad_name_undecodable(raw, c):
  (raw / "train" / "happy" / BAD_NAME).write_bytes(b"not an image")


def bad_name_class_folder(raw, c):
  write_image(raw / "train" / os.fsdecode(b"h\xe4ppy") / "Training_1.png", 1)


def bad_name_ckplus(raw, c):
  shutil.rmtree(raw)
  make_ckplus(raw, subjects=3)
  write_image(raw / "anger" / os.fsdecode(b"S\xff_001.png"), 3, fmt="PNG")


def unreadable(rel):
  def edit(raw, c):
    deny(c.monkeypatch, raw / rel)
  return edit


def fifo(rel):
  def edit(raw, c):
    (raw / rel).unlink()
    os.mkfifo(raw / rel)
  return edit


def data_dir_file(verb):
  def case(c: Case):
    data = c.tmp / "data"
    data.write_text("a file")
    argv = c.stats(data) if verb == "stats" else c.prepare("fer2013", c.base / "raw", data)
    return argv, ["data dir", str(data), "not a folder"], [data, c.base / "raw"]
  return case


def out_is_file(c: Case):
  data = c.data()
  out = c.tmp / "out.png"
  out.write_text("a file")
  return (["data", "stats", "fer2013", "--data-dir", data, "--out", out],
          ["--out", str(out), "not a folder"], [data, out])


def out_under_file(c: Case):
  data = c.data()
  out = c.tmp / "out.png"
  out.write_text("a file")
  return (["data", "stats", "fer2013", "--data-dir", data, "--out", out / "sub"],
          ["cannot write the stats PNGs", str(out / "sub")], [data, out])


def read_only_data_dir(c: Case):
  data = c.tmp / "data"
  data.mkdir()
  read_only(c.monkeypatch, data)
  return (c.prepare("fer2013", c.base / "raw", data), ["cannot write into data dir", str(data)],
          [data, c.base / "raw"])


def disk_full(exc=None):
  def case(c: Case):
    data = c.data()  # --force over a good preparation: it must survive untouched.
    full_disk(c.monkeypatch, exc)
    return (c.prepare("fer2013", c.base / "raw", data, "--force"), ["is full", str(data)],
            [data, c.base / "raw"])
  return case


CASES = {
    # 1. Damaged prepared data: refused when opened, naming the file and the --force command.
    "damaged-truncated-shard-stats": damaged(truncate(TRAIN_SHARD), "fer2013-train.array_record"),
    "damaged-truncated-shard-prepare": damaged(truncate(TRAIN_SHARD), "60000 bytes", "prepare"),
    "damaged-truncated-shard-no-size-record": damaged(
        truncate(TRAIN_SHARD, manifest=False), "fer2013-train.array_record"),
    "damaged-shard-grown": damaged(append_bytes, "were written"),
    "damaged-shard-scrambled": damaged(scramble_shard, "fer2013-train.array_record"),
    "damaged-shard-deleted": damaged(lambda d: (d / TEST_SHARD).unlink(), "is missing"),
    "damaged-shard-deleted-prepare": damaged(lambda d: (d / TEST_SHARD).unlink(),
                                             "fer2013-test.array_record", "prepare"),
    "damaged-shard-is-folder": damaged(shard_to_folder, "is not a regular file"),
    "damaged-dataset-info-garbled": damaged(
        overwrite(VERSION_DIR / "dataset_info.json", b'{"name": "fer2'), "dataset_info.json"),
    "damaged-dataset-info-empty": damaged(
        overwrite(VERSION_DIR / "dataset_info.json", b""), "dataset_info.json is not valid JSON"),
    "damaged-dataset-info-wrong-fields": damaged(
        overwrite(VERSION_DIR / "dataset_info.json", b'{"x": 1}'), "dataset_info.json"),
    "damaged-dataset-info-binary": damaged(
        overwrite(VERSION_DIR / "dataset_info.json", b"\xff\xfe\x00garbage"), "dataset_info.json"),
    "damaged-features-garbled": damaged(
        overwrite(VERSION_DIR / "features.json", b"{]"), "features.json is not valid JSON"),
    "damaged-size-record-garbled": damaged(
        overwrite(VERSION_DIR / locate.MANIFEST, b"[1, 2"), locate.MANIFEST),
    "damaged-size-record-wrong-shape": damaged(
        overwrite(VERSION_DIR / locate.MANIFEST, b'{"files": [1]}'), locate.MANIFEST),
    # 2. Reusing a preparation still checks --manual-dir.
    "reuse-manual-dir-missing": reuse_with_manual_dir("missing"),
    "reuse-manual-dir-is-file": reuse_with_manual_dir("file"),
    "prepare-wait-negative": bad_wait("-1"),
    "prepare-wait-not-a-number": bad_wait("soon"),
    "prepare-wait-infinite": bad_wait("inf"),
    # 3. Missing class folders of a fixed-class dataset.
    "missing-class-folder-train": missing_class("train", "disgust"),
    "missing-class-folder-test": missing_class("test", "fear"),
    # 4. Another process's lock: named at once (--wait 0 is the default).
    "lock-held-by-another-process": lock_held,
    # 4. FIFOs named like the raw files are not read (they would block).
    "fifo-affectnet-training-csv": raw_case(affectnet_raw(fifo("training.csv")), "affectnet",
                                            "training.csv"),
    "fifo-rafdb-image": raw_case(rafdb_raw(fifo("Image/aligned/test_00016_aligned.jpg")), "rafdb",
                                 "test_00016_aligned.jpg (not a regular file)"),
    "fifo-rafdb-label-file": raw_case(rafdb_raw(fifo("EmoLabel/list_patition_label.txt")),
                                      "rafdb", "list_patition_label.txt"),
    # 5. Encodings.
    "csv-latin1-byte": raw_case(lambda r, c: fer_csv(r, csv_text().encode() + b"1,caf\xe9,x\n"),
                                "fer2013", ["fer2013.csv line 4", "0xe9", "UTF-8"]),
    "csv-latin1-header": raw_case(lambda r, c: fer_csv(r, "émotion,pixels,Usage\n".encode(
        "latin-1")), "fer2013", ["fer2013.csv line 1", "UTF-8"]),
    "csv-utf16-without-bom": raw_case(lambda r, c: fer_csv(r, csv_text().encode("utf-16-le")),
                                      "fer2013", ["fer2013.csv line 1", "NUL"]),
    "csv-utf16-bom-odd-bytes": raw_case(
        lambda r, c: fer_csv(r, csv_text().encode("utf-16") + b"\x00"), "fer2013",
        ["fer2013.csv", "UTF-16"]),
    "csv-ferplus-votes-latin1": raw_case(
        ferplus_raw(lambda r, c: latin1_line(r / "fer2013new.csv", 3)), "ferplus",
        ["fer2013new.csv line 3", "0xe9"]),
    "csv-affectnet-latin1": raw_case(
        affectnet_raw(lambda r, c: latin1_line(r / "validation.csv", 2)), "affectnet",
        ["validation.csv line 2", "UTF-8"]),
    "rafdb-label-file-latin1": raw_case(
        rafdb_raw(lambda r, c: latin1_line(r / "EmoLabel" / "list_patition_label.txt", 5)),
        "rafdb", ["list_patition_label.txt line 5", "0xe9"]),
    # 5. File names that are not UTF-8, printed with \x escapes.
    "non-utf8-image-name-undecodable": raw_case(fer_raw(bad_name_undecodable), "fer2013",
                                                ["Training_\\xff\\xfe.png", "cannot decode"]),
    "non-utf8-class-folder": raw_case(fer_raw(bad_name_class_folder), "fer2013",
                                      ["unknown class folder train/h\\xe4ppy"]),
    "non-utf8-ckplus-file-name": raw_case(bad_name_ckplus, "ckplus", ["S\\xff_001.png",
                                                                      "S<subject>"]),
    # 5. Unreadable raw files.
    "unreadable-class-folder": raw_case(fer_raw(unreadable("train/happy")), "fer2013",
                                        ["cannot read folder", "train/happy"]),
    "unreadable-image": raw_case(fer_raw(unreadable("test/sad/PublicTest_58.jpg")), "fer2013",
                                 ["cannot read image test/sad/PublicTest_58.jpg",
                                  "permission denied"]),
    "unreadable-rafdb-label-file": raw_case(
        rafdb_raw(unreadable("EmoLabel/list_patition_label.txt")), "rafdb",
        ["cannot read", "list_patition_label.txt", "permission denied"]),
    # 5. Decompression bombs.
    "bomb-png-header-20000px": raw_case(fer_raw(bomb_in_train), "fer2013",
                                        ["train/happy/Training_bomb.png", "decompression-bomb"]),
    "bomb-warning-range": raw_case(fer_raw(bomb_warning_range), "fer2013",
                                   ["train/happy/Training_big.png", "decompression-bomb"]),
    "bomb-rafdb": raw_case(rafdb_raw(bomb_rafdb), "rafdb",
                           ["train_00002_aligned.jpg", "decompression-bomb"]),
    # 5. Data dirs and --out that cannot be used.
    "data-dir-is-file-prepare": data_dir_file("prepare"),
    "data-dir-is-file-stats": data_dir_file("stats"),
    "stats-out-is-file": out_is_file,
    "stats-out-under-a-file": out_under_file,
    "data-dir-read-only": read_only_data_dir,
    "data-dir-full-oserror": disk_full(),
    "data-dir-full-writer-error": disk_full(RuntimeError(
        "ArrayRecordWriter: write failed: No space left on device")),
    # Every builder's missing raw file, kept as part of the standing suite.
    "rafdb-missing-label-file": raw_case(
        rafdb_raw(lambda r, c: (r / "EmoLabel" / "list_patition_label.txt").unlink()), "rafdb",
        "EmoLabel/list_patition_label.txt"),
    "affectnet-missing-images": raw_case(
        affectnet_raw(lambda r, c: shutil.rmtree(r / "Manually_Annotated_Images")), "affectnet",
        "Manually_Annotated_Images/"),
    "ferplus-missing-votes": raw_case(
        ferplus_raw(lambda r, c: (r / "fer2013new.csv").unlink()), "ferplus", "fer2013new.csv"),
    "ckplus-empty-manual-dir": raw_case(lambda r, c: None, "ckplus", "is empty"),
    "stats-not-prepared": lambda c: (c.stats(c.tmp / "nothing"), "is not prepared", []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_input_is_one_line(case, base, tmp_path, monkeypatch, capsys):
  argv, needle, protect = CASES[case](Case(base, tmp_path, monkeypatch))
  expect_one_line(argv, needle, capsys, protect=protect)


# ---------------------------------------------------------------------------------------------
# Warnings, skipped files, and what still works
# ---------------------------------------------------------------------------------------------


def run(argv, capsys):
  capsys.readouterr()
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err, err
  return rc, out, err.splitlines()


def test_reuse_is_announced_and_force_rebuilds(base, tmp_path, capsys):
  data = Path(shutil.copytree(base / "data", tmp_path / "data"))
  rc, out, err = run(["data", "prepare", "fer2013", "--manual-dir", base / "raw", "--data-dir",
                      data], capsys)
  assert rc == 0 and err == []
  assert "already prepared" in out and "--force" in out and "train: 7 images" in out
  # A damaged preparation is rebuilt by --force.
  os.truncate(data / TRAIN_SHARD, 1000)
  rc, out, err = run(["data", "prepare", "fer2013", "--manual-dir", base / "raw", "--data-dir",
                      data, "--force"], capsys)
  assert rc == 0 and out.startswith("prepared fer2013") and err == []
  assert builders.split_sizes("fer2013", data)["train"] == 7
  assert (data / ".fer2013.lock").read_text() == ""  # No holder once released.


def test_empty_class_warns_at_prepare_and_in_stats(base, tmp_path, capsys):
  raw = Path(shutil.copytree(base / "raw", tmp_path / "raw"))
  for image in (raw / "train" / "disgust").iterdir():
    image.unlink()
  data = tmp_path / "data"
  rc, _, err = run(["data", "prepare", "fer2013", "--manual-dir", raw, "--data-dir", data],
                   capsys)
  assert rc == 0
  assert err == ["ferjax: warning: fer2013: split 'train' has no images of class(es) disgust: a "
                 "model trained or scored on it never sees them"]
  rc, out, err = run(["data", "stats", "fer2013", "--data-dir", data, "--out", tmp_path / "o"],
                     capsys)
  assert rc == 0 and err == []
  assert "warning: split 'train' has no images of class(es) disgust" in out
  rc, out, _ = run(["data", "stats", "fer2013", "--data-dir", data, "--out", tmp_path / "o",
                    "--json"], capsys)
  assert json.loads(out)["splits"]["train"]["empty_classes"] == ["disgust"]


def test_stats_default_out_is_beside_the_data_not_the_current_folder(base, tmp_path, capsys,
                                                                     monkeypatch):
  data = Path(shutil.copytree(base / "data", tmp_path / "data"))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  rc, out, _ = run(["data", "stats", "fer2013", "--data-dir", data], capsys)
  assert rc == 0 and list(cwd.iterdir()) == []
  written = sorted(p.name for p in (data / "stats" / "fer2013").iterdir())
  assert written == ["fer2013_class_histogram.png", "fer2013_samples_train.png"]
  assert f"wrote {data / 'stats' / 'fer2013'}" in out
  assert builders.split_sizes("fer2013", data)["train"] == 7  # Still a valid data dir.


def test_lock_wait_announces_then_times_out(base, tmp_path, capsys):
  import fcntl
  data = tmp_path / "data"
  data.mkdir()
  lock = data / ".fer2013.lock"
  lock.write_text("pid 4242 on otherhost since 2024-01-01 00:00:00\n")
  with open(lock, "a+") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    rc, _, err = run(["data", "prepare", "fer2013", "--manual-dir", base / "raw", "--data-dir",
                      data, "--wait", "0.3"], capsys)
  assert rc == 2 and len(err) == 2
  assert err[0].startswith("ferjax: waiting for up to 0.3 s for pid 4242 on otherhost")
  assert err[1].startswith("ferjax: error: fer2013 in ") and "after waiting 0.3 s" in err[1]
  assert sorted(p.name for p in data.iterdir()) == [".fer2013.lock"]


def test_lock_wait_proceeds_once_released(base, tmp_path, capsys, monkeypatch):
  import fcntl
  from ferjax import writing
  data = tmp_path / "data"
  data.mkdir()
  held = open(data / ".fer2013.lock", "a+")
  fcntl.flock(held, fcntl.LOCK_EX)
  tries, real_try = [], writing._try_lock

  def try_lock(f):  # The holder lets go while the waiter polls (after its waiting line), on
    tries.append(f)  # any machine load: a timer could fire before the first try.
    if len(tries) == 2:
      held.close()
    return real_try(f)
  monkeypatch.setattr(writing, "_try_lock", try_lock)
  rc, out, err = run(["data", "prepare", "fer2013", "--manual-dir", base / "raw", "--data-dir",
                      data, "--wait", "30"], capsys)
  assert rc == 0 and out.startswith("prepared fer2013"), err
  assert len(err) == 1 and err[0].startswith("ferjax: waiting for up to 30 s for another process")


def test_full_disk_leaves_no_staging_dir(base, tmp_path, monkeypatch):
  full_disk(monkeypatch)
  data = tmp_path / "data"
  with pytest.raises(UserError, match=r"fer2013: data dir .* is full \(no space left"):
    builders.prepare("fer2013", base / "raw", data, progress=False)
  assert sorted(p.name for p in data.iterdir()) == [".fer2013.lock"]


@pytest.fixture
def alarm():
  """Fails a test that blocks (a FIFO opened for reading) instead of hanging the suite."""
  def on_alarm(*_):
    raise TimeoutError("blocked: a FIFO was opened")
  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(60)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, old)


def test_fifo_in_a_class_folder_is_skipped_when_preparing(base, tmp_path, capsys, alarm):
  raw = Path(shutil.copytree(base / "raw", tmp_path / "raw"))
  os.mkfifo(raw / "train" / "happy" / "Training_fifo.png")
  os.mkfifo(raw / "train" / "sad" / "Training_fifo.jpg")
  rc, _, err = run(["data", "prepare", "fer2013", "--manual-dir", raw, "--data-dir",
                    tmp_path / "data"], capsys)
  assert rc == 0
  assert len(err) == 1 and err[0].startswith("ferjax: warning: skipped 2 non-regular files")
  assert str(raw / "train") in err[0]
  assert builders.split_sizes("fer2013", tmp_path / "data")["train"] == 7


def test_folder_dataset_skips_fifos_and_loads_an_empty_class_with_no_examples(tmp_path, capsys,
                                                                              alarm):
  root = tmp_path / "faces"
  for name in ("a", "b"):
    write_image(root / "train" / name / "x.png", 10)
  os.mkfifo(root / "train" / "a" / "pipe.png")
  (root / "train" / "b" / "dir.png").mkdir()
  (root / "train" / "c").mkdir()
  ds = folder.load(root, "train")
  assert len(ds) == 2 and ds.class_names == ("a", "b", "c")
  assert ds.class_counts().tolist() == [1, 1, 0]  # The trainer refuses it, naming class c.
  err = capsys.readouterr().err.splitlines()
  assert err == [f"ferjax: warning: skipped 2 non-regular files (FIFO, socket, device or folder "
                 f"named like an image) under {root / 'train'}"]


def test_utf16_csv_with_bom_is_accepted(tmp_path):
  raw = fer_csv(tmp_path / "raw", csv_text().encode("utf-16"))
  assert builders.prepare("fer2013", raw, tmp_path / "data", progress=False) == \
      {"train": 1, "validation": 1}


def test_non_utf8_image_name_is_prepared(base, tmp_path, capsys):
  raw = Path(shutil.copytree(base / "raw", tmp_path / "raw"))
  write_image(raw / "train" / "happy" / BAD_NAME, 99)
  rc, out, err = run(["data", "prepare", "fer2013", "--manual-dir", raw, "--data-dir",
                      tmp_path / "data"], capsys)
  assert rc == 0 and err == [] and "train: 8 images" in out
  train = builders.load_prepared("fer2013", "train", tmp_path / "data")
  assert np.any(train.images[:, 0, 0, 0] == 99)


FOLDER_CASES = {
    "non-utf8-class-folder": (lambda r, m: write_image(r / "train" / os.fsdecode(b"\xffcls") /
                                                       "x.png", 1),
                              r"class name '\\udcffcls' is not valid UTF-8"),
    "unreadable-class-folder": (lambda r, m: (write_image(r / "train" / "a" / "x.png", 1),
                                              deny(m, r / "train" / "a")),
                                r"cannot read folder .*train/a: Permission denied"),
    "unreadable-image": (lambda r, m: (write_image(r / "train" / "a" / "x.png", 1),
                                       deny(m, r / "train" / "a" / "x.png")),
                         r"x.png: not a readable image \(Permission denied\)"),
    "bomb": (lambda r, m: bomb_png(r / "train" / "a" / "x.png"),
             r"x.png: not a readable image .*decompression-bomb"),
    "classes-txt-latin1": (lambda r, m: (write_image(r / "train" / "a" / "x.png", 1),
                                         (r / "classes.txt").write_bytes(b"a\ncaf\xe9\n")),
                           r"classes.txt line 2: byte 0xe9 is not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_folder_dataset_bad_input(case, tmp_path, monkeypatch, alarm):
  make, message = FOLDER_CASES[case]
  root = tmp_path / "faces"
  make(root, monkeypatch)
  with pytest.raises(UserError, match=message) as e:
    folder.load(root, "train")
  assert "\n" not in str(e.value)
  str(e.value).encode("utf-8")  # Printable: no lone surrogates.
