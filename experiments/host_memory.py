"""Peak host memory of putting an AffectNet-style train split on the devices: lazy vs eager.

  python experiments/host_memory.py --images 12000     # 2-core CPU: about 25 s

Writes a fake AffectNet raw folder (128 px JPEGs, 8 expressions) to a temporary folder,
prepares it with `ferjax data prepare` (stored at 112 px RGB), then, each in a fresh process,
loads the train split and places it with `parallel.put_rows` on one device:
  lazy  - `ferjax.data.load` (AffectNet's images stay on disk, read 4,096 rows at a time),
  eager - the whole split read into a numpy array first (what the smaller datasets do).
Prints the growth of peak resident memory of each. On a CPU the "device" is host memory too,
so both include the placed copy; on a GPU only the lazy run's chunks stay on the host.
Measured (2-core CPU, 10,500 / 21,000 train images at 112 px RGB = 377 / 754 MiB placed):
lazy +805 / +1,184 MiB (the placed copy + a constant ~430 MiB: a chunk on the host and its
device copy), eager +1,187 / +2,311 MiB (about 3x what is placed).
"""

import argparse
import csv
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
          "facial_landmarks", "expression", "valence", "arousal"]

MEASURE = """
import resource, sys, time
import jax
import ferjax.data
from ferjax.data import builders
from ferjax.core import parallel
mode, data_dir = sys.argv[1], sys.argv[2]
jax.devices()
peak_mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before, start = peak_mib(), time.perf_counter()
if mode == "lazy":
  ds = ferjax.data.load("affectnet", "train", data_dir=data_dir)
else:
  ds = builders.load_prepared("affectnet", "train", data_dir)
placed = parallel.put_rows(ds.images, parallel.make_mesh(1)).block_until_ready()
print(f"| {mode} | {placed.shape[0]} | {placed.nbytes / 2**20:.0f} | {peak_mib() - before:.0f} "
      f"| {time.perf_counter() - start:.1f} |")
"""


def write_raw(root: pathlib.Path, num_images: int) -> None:
  rng = np.random.default_rng(0)
  for split, csv_name, count in (("train", "training.csv", num_images),
                                 ("validation", "validation.csv", 80)):
    rows = []
    for i in range(count):
      relative = f"{i // 1000}/{split}_{i}.jpg"
      path = root / "Manually_Annotated_Images" / relative
      path.parent.mkdir(parents=True, exist_ok=True)
      small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
      Image.fromarray(small).resize((128, 128), Image.BILINEAR).save(path, quality=90)
      rows.append([relative, 0, 0, 128, 128, "1.0;2.0", i % 8, 0.1, -0.2])
    with open(root / csv_name, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(HEADER)
      writer.writerows(rows)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=12000, help="raw train images to write")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    raw, data = pathlib.Path(tmp) / "raw", pathlib.Path(tmp) / "data"
    write_raw(raw, args.images)
    prepared = subprocess.run(["ferjax", "data", "prepare", "affectnet", "--manual-dir",
                               str(raw), "--data-dir", str(data)], capture_output=True, text=True)
    if prepared.returncode:
      print(prepared.stderr.strip().splitlines()[-1], file=sys.stderr)
      return 1
    print("| read | train images | placed MiB | peak RSS growth MiB | seconds |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("lazy", "eager"):
      result = subprocess.run([sys.executable, "-c", MEASURE, mode, str(data)],
                              capture_output=True, text=True)
      if result.returncode:
        print(result.stderr.strip().splitlines()[-1], file=sys.stderr)
        return 1
      print(result.stdout.strip().splitlines()[-1])
  return 0


if __name__ == "__main__":
  sys.exit(main())
