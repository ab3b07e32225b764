"""`ferjax predict`: the expression of every face in some images, from a trained run or an
exported model.

    ferjax predict --workdir runs/demo/baseline photos/ --out runs/predicted
    ferjax predict --model model.ferjax --whole-image 'crops/*.png' --format csv --output faces.csv

Inputs are image files, folders (searched recursively; hidden entries skipped) and glob
patterns: any format and bit depth Pillow reads, gray or colour, any size, EXIF orientation
applied (boxes are in the image as displayed). Files that are not readable images and
non-regular files are skipped and named in one `ferjax: warning:` line; a path that does not
exist, a pattern that matches nothing, or no readable image at all is a one-line error.

Faces are found by OpenCV's frontal-face Haar cascade (the optional `predict` extra), read from
a CSV of boxes (`--boxes`, header file,x,y,w,h), or are the whole images (`--whole-image`, for
aligned crops). A box grows by `--margin` of its size on each side and is squared around its
centre (edge pixels repeated past the image border); the crops are converted to the model's size
and channels as its training images were, and all go through the model in one batched call.

One row per face (JSON lines or CSV) goes to stdout or `--output`: file, face index, box (x, y,
w, h), label, confidence and per-class probabilities. `--out DIR` adds annotated copies of the
images (DIR/annotated/) and DIR/faces.png, a contact sheet of the crops with their labels. The
summary line goes to stderr while stdout carries the rows, else to stdout.

Outputs never clobber inputs: `--output` and `--out` may not be an input (an image, the boxes
CSV, the model), lie inside an input folder or the run's workdir, nor (for `--out`) hold one.
`--output` replaces only an empty file or an earlier rows file (written atomically); `--out`
must be new, empty or an earlier `predict --out` folder (its marker file, which also locks it
while a predict writes there: a second one at once is refused); its annotated/ is replaced as a
whole, so it holds one run's pictures.
"""

import csv
import dataclasses
import glob
import io
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ferjax import export, inference, writing
from ferjax.data import reading
from ferjax.data.images import to_8bit
from ferjax.errors import UserError

CASCADE = "haarcascade_frontalface_default.xml"
DETECT_MAX_SIDE = 1280  # Larger images are searched scaled down to this (faster, same faces).
MIN_FACE = 24  # Smallest face searched, in pixels of the searched image.
BOXES_HEADER = ["file", "x", "y", "w", "h"]
SHEET_FACES, SHEET_CELL, SHEET_COLUMNS = 256, 96, 8  # Contact sheet: at most 256 faces.
COLOURS = ("#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4", "#7f7f7f", "#ff7f0e",
           "#e377c2", "#17becf", "#bcbd22")  # One per class, cycled.


@dataclasses.dataclass
class Face:
  """One face to classify: its image, index there, box (x, y, w, h) and square crop."""
  file: pathlib.Path
  index: int
  box: tuple
  crop: np.ndarray


@dataclasses.dataclass
class Found:
  """What the inputs held: faces, images read (with their face count) and files skipped."""
  faces: list = dataclasses.field(default_factory=list)
  images: dict = dataclasses.field(default_factory=dict)  # path -> number of faces
  skipped: list = dataclasses.field(default_factory=list)  # (path, reason)


# --- Inputs ------------------------------------------------------------------------------------
def find_files(inputs) -> tuple[list[pathlib.Path], list[tuple]]:
  """(candidate image files, skipped (path, reason)) of files, folders and glob patterns; a
  path that does not exist, a pattern matching nothing, or no file at all is a UserError."""
  found, skipped, seen = {}, [], set()

  def add(path):
    if reading.is_regular(path):
      found.setdefault(path.resolve(), path)
    else:
      skipped.append((path, "not a regular file"))

  def walk(folder):
    if folder.resolve() in seen:  # A link back up the tree.
      return
    seen.add(folder.resolve())
    for entry in reading.list_dir(folder):
      if entry.name.startswith("."):
        continue
      if entry.is_dir():
        walk(entry)
      else:
        add(entry)

  for text in inputs:
    if not text:
      raise UserError("PATH: expected an image file, folder or glob pattern, got an empty name")
    path = pathlib.Path(text).expanduser()
    if path.exists() or path.is_symlink():
      matches = [path]
    elif any(c in text for c in "*?["):
      matches = [pathlib.Path(p) for p in sorted(glob.glob(os.path.expanduser(text),
                                                           recursive=True))]
      if not matches:
        raise UserError(f"{reading.shown(text)}: the pattern matches no file")
    else:
      raise UserError(f"{reading.shown(text)}: no such file or folder")
    for match in matches:
      if match.is_dir():
        walk(match)
      else:
        add(match)
  if not found:
    named = " ".join(map(reading.shown, inputs[:3])) + (" ..." if len(inputs) > 3 else "")
    if not skipped:
      raise UserError(f"{named}: no files found (an empty folder?)")
    raise UserError(f"{named}: no readable image ({_skipped_text(skipped)})")
  return list(found.values()), skipped


def read_image(path) -> np.ndarray:
  """uint8 [H, W, 1] (gray) or [H, W, 3] of an image file as displayed (EXIF orientation
  applied; 16-bit scaled to 8); raises one of reading.IMAGE_ERRORS when it is not one."""
  with reading.strict_images(), Image.open(path) as img:
    img = to_8bit(ImageOps.exif_transpose(img))
    array = np.asarray(img.convert("L" if img.mode in ("L", "LA", "1") else "RGB"))
  return array[..., None] if array.ndim == 2 else array


def read_boxes(path) -> dict:
  """{image path: [(CSV line, (x, y, w, h)), ...]} of a boxes CSV (header file,x,y,w,h; file
  relative to the CSV's folder or absolute); a UserError names the CSV line at fault."""
  path = pathlib.Path(path)
  if not reading.is_regular(path):
    raise UserError(f"--boxes: {reading.shown(path)} is not a file: expected a CSV with header "
                    f"{','.join(BOXES_HEADER)}")
  boxes = {}
  try:
    rows = list(reading.read_csv(path))
  except OSError as e:
    raise reading.io_error(e, "read the boxes file") from None
  if not rows or [c.strip().lower() for c in rows[0][1]] != BOXES_HEADER:
    line, got = (rows[0][0], ",".join(rows[0][1])) if rows else (1, "an empty file")
    raise UserError(f"{reading.shown(path)} line {line}: expected the header "
                    f"{','.join(BOXES_HEADER)}, got {reading.shown(got)}")
  for line, row in rows[1:]:
    where = f"{reading.shown(path)} line {line}"
    if len(row) != 5:
      raise UserError(f"{where}: expected 5 fields (file,x,y,w,h), got {len(row)}")
    try:
      x, y, w, h = (float(v) for v in row[1:])
    except ValueError:
      raise UserError(f"{where}: expected numbers x,y,w,h, got {reading.shown(','.join(row[1:]))}")\
          from None
    if not all(map(math.isfinite, (x, y, w, h))) or min(x, y) < 0 or min(w, h) < 1:
      raise UserError(f"{where}: expected x, y >= 0 and w, h >= 1 pixels, got "
                      f"{reading.shown(','.join(row[1:]))}")
    image = pathlib.Path(row[0].strip()).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not reading.is_regular(image):
      what = "is not a regular file" if image.exists() else "not found"
      raise UserError(f"{where}: image {reading.shown(image)} {what}")
    boxes.setdefault(image, []).append((line, tuple(round(v) for v in (x, y, w, h))))
  if not boxes:
    raise UserError(f"{reading.shown(path)}: lists no boxes, only its header")
  return boxes


# --- Faces -------------------------------------------------------------------------------------
def face_detector():
  """detect(image uint8 [H, W, C]) -> boxes (x, y, w, h) sorted left to right, by OpenCV's
  frontal-face Haar cascade; a UserError naming the extra to install when OpenCV is missing."""
  try:
    import cv2
  except ImportError as e:
    raise UserError(f"face detection needs OpenCV ({e}): pip install 'ferjax[predict]', or pass "
                    f"--boxes FILE or --whole-image") from None
  cascade_path = os.path.join(cv2.data.haarcascades, CASCADE)
  cascade = cv2.CascadeClassifier(cascade_path)
  if cascade.empty():
    raise UserError(f"cannot load OpenCV's face detector {cascade_path}: reinstall "
                    f"opencv-python-headless")

  def detect(image):
    h, w = image.shape[:2]
    gray = np.ascontiguousarray(image[..., 0]) if image.shape[-1] == 1 else \
        cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    if scale < 1:
      gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                     minSize=(MIN_FACE, MIN_FACE))
    boxes = []
    for bx, by, bw, bh in (np.asarray(found, np.float64) / scale).round().astype(int):
      bx, by = min(bx, w - 1), min(by, h - 1)
      boxes.append((int(bx), int(by), int(min(bw, w - bx)), int(min(bh, h - by))))
    return sorted(boxes)

  return detect


def square_crop(image: np.ndarray, box, margin: float) -> np.ndarray:
  """The square around `box`'s centre, `margin` of the box's size added on each side; parts
  past the image border repeat its edge pixels."""
  x, y, w, h = box
  side = max(1, round(max(w, h) * (1 + 2 * margin)))
  x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
  height, width = image.shape[:2]
  part = image[max(y0, 0):min(y0 + side, height), max(x0, 0):min(x0 + side, width)]
  pad = ((max(-y0, 0), max(y0 + side - height, 0)), (max(-x0, 0), max(x0 + side - width, 0)),
         (0, 0))
  return np.pad(part, pad, mode="edge")


def faces_in_files(paths, skipped=(), *, detect=None, margin: float = 0.2) -> Found:
  """Every face of the image files `paths` (see `find_files`, which also gives `skipped`):
  detected by `detect`, or each whole image when it is None. Unreadable files are skipped too;
  none readable is a UserError."""
  found = Found(skipped=list(skipped))
  for path in paths:
    try:
      image = read_image(path)
    except reading.IMAGE_ERRORS as e:
      found.skipped.append((path, reading.image_reason(e)))
      continue
    if detect is None:
      found.images[path] = 1
      found.faces.append(Face(path, 0, (0, 0, image.shape[1], image.shape[0]), image))
    else:
      _add_faces(found, path, image, detect(image), margin)
  if not found.images:
    raise UserError(f"no readable image among the inputs ({_skipped_text(found.skipped)})")
  return found


def faces_in_boxes(boxes: dict, boxes_file, margin: float = 0.2) -> Found:
  """The faces of `read_boxes(boxes_file)`; a box past its image's border is a UserError
  naming the CSV line."""
  found = Found()
  for image_path, entries in boxes.items():
    try:
      image = read_image(image_path)
    except reading.IMAGE_ERRORS as e:
      raise UserError(f"{reading.shown(boxes_file)} line {entries[0][0]}: "
                      f"{reading.shown(image_path)} is not a readable image "
                      f"({reading.image_reason(e)})") from None
    height, width = image.shape[:2]
    for line, (x, y, w, h) in entries:
      if x + w > width or y + h > height:
        raise UserError(f"{reading.shown(boxes_file)} line {line}: box {x},{y},{w},{h} lies "
                        f"outside {reading.shown(image_path)} ({width}x{height})")
    _add_faces(found, image_path, image, [box for _, box in entries], margin)
  return found


def _add_faces(found, path, image, boxes, margin):
  found.images[path] = len(boxes)
  found.faces += [Face(path, i, box, square_crop(image, box, margin))
                  for i, box in enumerate(boxes)]


def _skipped_text(skipped, most: int = 5) -> str:
  named = ", ".join(f"{reading.shown(p)}: {reason}" for p, reason in skipped[:most])
  more = f", and {len(skipped) - most} more" if len(skipped) > most else ""
  return f"{_count(len(skipped), 'file')} skipped: {named}{more}"


def _count(n: int, word: str) -> str:
  return f"{n} {word}{'' if n == 1 else 's'}"


# --- Prediction and rows -----------------------------------------------------------------------
def predict(predictor, faces, *, tta: str = "none", logit_adjust: float = 0.0) -> np.ndarray:
  """Probabilities [N, K] of all faces, in one batched call."""
  crops = inference.prepare_crops([f.crop for f in faces], predictor.image_size,
                                  predictor.channels)
  return predictor.probabilities(crops, tta=tta, logit_adjust=logit_adjust)


def rows_of(faces, probs, class_names) -> list[dict]:
  """One JSON-ready row per face: file, face, box, label, confidence, probabilities."""
  rows = []
  for face, p in zip(faces, probs):
    k = int(np.argmax(p))
    rows.append({"file": reading.shown(face.file), "face": face.index, "box": list(face.box),
                 "label": class_names[k], "confidence": round(float(p[k]), 6),
                 "probabilities": {n: round(float(v), 6) for n, v in zip(class_names, p)}})
  return rows


def write_rows(rows, class_names, fmt: str, stream) -> None:
  """Rows as JSON lines, or CSV (file,face,x,y,w,h,label,confidence,prob_<class>...)."""
  if fmt == "jsonl":
    for row in rows:
      stream.write(json.dumps(row) + "\n")
    return
  writer = csv.writer(stream, lineterminator="\n")
  writer.writerow(["file", "face", "x", "y", "w", "h", "label", "confidence",
                   *(f"prob_{n}" for n in class_names)])
  for r in rows:
    writer.writerow([r["file"], r["face"], *r["box"], r["label"], r["confidence"],
                     *r["probabilities"].values()])


# --- Pictures ----------------------------------------------------------------------------------
def annotate(image: np.ndarray, faces, rows, class_names) -> Image.Image:
  """An RGB copy of `image` with each face's box and "label confidence" drawn (images under
  480 px are enlarged first, so the labels stay legible)."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
  scale = max(1, math.ceil(480 / max(pil.size)))
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(pil)
  font = _font(max(12, min(pil.size) // 24))
  line = max(2, min(pil.size) // 160)
  for face, row in zip(faces, rows):
    x, y, w, h = (v * scale for v in face.box)
    colour = COLOURS[class_names.index(row["label"]) % len(COLOURS)]
    draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=line)
    _label(draw, (x, y), f"{row['label']} {row['confidence']:.2f}", font, colour, above=True)
  return pil


def contact_sheet(faces, rows, class_names) -> Image.Image:
  """The face crops (first SHEET_FACES) in a grid, each with its label, confidence and file."""
  faces, rows = faces[:SHEET_FACES], rows[:SHEET_FACES]
  columns = min(len(faces), SHEET_COLUMNS)
  font = _font(12)
  cell_h = SHEET_CELL + 34
  sheet = Image.new("RGB", (columns * (SHEET_CELL + 4) + 4,
                            -(-len(faces) // columns) * (cell_h + 4) + 4), "white")
  draw = ImageDraw.Draw(sheet)
  for i, (face, row) in enumerate(zip(faces, rows)):
    r, c = divmod(i, columns)
    x, y = 4 + c * (SHEET_CELL + 4), 4 + r * (cell_h + 4)
    crop = face.crop[..., 0] if face.crop.shape[-1] == 1 else face.crop
    sheet.paste(Image.fromarray(crop).convert("RGB").resize((SHEET_CELL, SHEET_CELL),
                                                           Image.BILINEAR), (x, y))
    colour = COLOURS[class_names.index(row["label"]) % len(COLOURS)]
    _label(draw, (x, y + SHEET_CELL), f"{row['label']} {row['confidence']:.2f}", font, colour)
    name = f"{face.file.name}#{face.index}"
    draw.text((x, y + SHEET_CELL + 18), name if len(name) <= 15 else "..." + name[-12:],
              fill="black", font=font)
  return sheet


def _font(size: int):
  """Pillow's default font at `size` (its small bitmap font when Pillow lacks FreeType)."""
  try:
    return ImageFont.load_default(size=size)
  except ImportError:
    return ImageFont.load_default()


def _label(draw, xy, text, font, colour, above=False):
  """`text` in white on a `colour` strip whose top-left is `xy` (or whose bottom-left is, when
  `above` and there is room)."""
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  pad = max(2, (bottom - top) // 5)
  w, h = right - left + 2 * pad, bottom - top + 2 * pad
  x, y = xy
  if above and y - h >= 0:
    y -= h
  draw.rectangle([x, y, x + w, y + h], fill=colour)
  draw.text((x + pad - left, y + pad - top), text, fill="white", font=font)


def write_pictures(out: pathlib.Path, found: Found, rows, class_names) -> None:
  """DIR/annotated/<image name>.png for every image read, and DIR/faces.png. The annotated
  copies are written into a new hidden folder that then replaces DIR/annotated/ as a whole, so
  the folder holds this run's pictures only (the caller holds DIR's lock)."""
  by_file, names = {}, set()
  for face, row in zip(found.faces, rows):
    by_file.setdefault(face.file, []).append((face, row))
  try:
    out.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".annotated.partial-", dir=out))
    try:
      for path in found.images:
        try:
          image = read_image(path)  # Read again: the images are not all kept in memory.
        except reading.IMAGE_ERRORS as e:
          reading.warn(f"{path}: not annotated, it changed since it was read "
                       f"({reading.image_reason(e)})")
          continue
        name, n = path.stem, 1
        while name in names:
          name, n = f"{path.stem}-{n}", n + 1
        names.add(name)
        pairs = by_file.get(path, [])
        annotate(image, [f for f, _ in pairs], [r for _, r in pairs], class_names).save(
            staging / f"{name}.png")
      os.chmod(staging, 0o777 & ~writing.UMASK)
      _replace_folder(staging, out / "annotated")
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    if found.faces:
      with writing.atomic_path(out / "faces.png") as partial:
        contact_sheet(found.faces, rows, class_names).save(partial)
  except OSError as e:
    raise reading.io_error(e, "write the pictures", "check --out") from None


def _replace_folder(new: pathlib.Path, folder: pathlib.Path) -> None:
  """Renames `new` to `folder`, the old `folder` (or a file or link there) moved aside first
  and then removed."""
  if not (folder.exists() or folder.is_symlink()):
    os.rename(new, folder)
    return
  old = pathlib.Path(tempfile.mkdtemp(prefix=".annotated.old-", dir=folder.parent))
  os.rename(folder, old / "annotated")
  os.rename(new, folder)
  shutil.rmtree(old, ignore_errors=True)


# --- Outputs ------------------------------------------------------------------------------------
OUT_FILES = ("annotated", "faces.png")  # What --out holds; a folder holding only them is ours.
ROWS_KEYS = {"file", "face", "box", "label", "confidence", "probabilities"}
CSV_HEAD = "file,face,x,y,w,h,label,confidence"


def input_folders(inputs) -> list[pathlib.Path]:
  """The folders among the PATH arguments (given, or matched by a pattern): read recursively."""
  folders = []
  for text in inputs:
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
      folders.append(path)
    elif not path.exists() and any(c in text for c in "*?["):
      folders += [pathlib.Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                  if os.path.isdir(p)]
  return folders


def is_rows_file(path) -> bool:
  """Whether `path` is an empty regular file or one that `ferjax predict --output` wrote."""
  path = pathlib.Path(path)
  if path.is_symlink() or not path.is_file():
    return False
  try:
    with open(path, "rb") as f:
      first = f.read(1 << 16).split(b"\n", 1)[0].decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return False
  if not first or first.startswith(CSV_HEAD):
    return True
  try:
    row = json.loads(first)
  except ValueError:
    return False
  return isinstance(row, dict) and ROWS_KEYS <= set(row)


def check_outputs(args, files, boxes) -> None:
  """--output and --out against the inputs (see the module docstring); one line each."""
  inputs = [*files, args.boxes, args.model, *(boxes or {})]
  folders = [*input_folders(args.paths), args.workdir]
  if args.output is not None:
    output = pathlib.Path(args.output)
    writing.refuse_clobbering(output, inputs=inputs, input_dirs=folders, what="--output")
    if output.is_symlink():
      raise UserError(f"--output {reading.shown(output)}: is a symbolic link: expected a file "
                      "name (nothing was written)")
    if output.exists() and not is_rows_file(output):
      raise UserError(f"--output {reading.shown(output)}: already exists and is not a rows file "
                      "of `ferjax predict`: choose another name (nothing was written)")
  if args.out is not None:
    out = pathlib.Path(args.out)
    writing.refuse_clobbering(out, inputs=inputs, input_dirs=folders, what="--out", folder=True)
    writing.refuse_foreign_folder(out, "predict", owned=lambda name: name in OUT_FILES)
    if args.output is not None:
      mine = [out / name for name in (*OUT_FILES, writing.marker_name("predict"))]
      writing.refuse_clobbering(args.output, inputs=mine, input_dirs=mine[:1], what="--output")


def write_rows_file(path, rows, class_names, fmt: str) -> None:
  """The rows into `path`, replaced atomically."""
  buffer = io.StringIO(newline="")
  write_rows(rows, class_names, fmt, buffer)
  try:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writing.write_atomic(path, buffer.getvalue().encode("utf-8"))
  except OSError as e:
    raise reading.io_error(e, "write the rows", "check --output") from None


# --- `ferjax predict` --------------------------------------------------------------------------
def load_predictor(args):
  """The model of --workdir (at --checkpoint) or --model."""
  if args.model is not None:
    if args.checkpoint is not None:
      raise UserError("--checkpoint: applies to --workdir only (an exported --model holds one)")
    return export.load_exported(args.model)
  return inference.from_run(args.workdir, args.checkpoint or "best")


def _check_args(args) -> None:
  if not math.isfinite(args.logit_adjust):
    raise UserError(f"--logit-adjust: expected a finite number, got {args.logit_adjust}")
  if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
    raise UserError(f"--margin: expected a fraction of the box size from 0 to 10, got "
                    f"{args.margin}")
  if args.boxes is not None and args.paths:
    raise UserError("--boxes: the CSV names the images itself; drop the PATH arguments")
  if args.boxes is None and not args.paths:
    raise UserError("ferjax predict: expected at least one image file, folder or glob pattern "
                    "(see ferjax predict --help)")
  if args.out is not None and pathlib.Path(args.out).exists() and not pathlib.Path(
      args.out).is_dir():
    raise UserError(f"--out: {reading.shown(args.out)} is a file: expected a folder (created when "
                    f"missing)")
  if args.output is not None and pathlib.Path(args.output).is_dir():
    raise UserError(f"--output: {reading.shown(args.output)} is a folder: expected a file name")


def cli_main(args) -> int:
  """`ferjax predict`: see the module docstring."""
  _check_args(args)
  detect = None if (args.whole_image or args.boxes) else face_detector()
  # Listing the inputs is quick; reading them waits until the model has loaded.
  boxes = read_boxes(args.boxes) if args.boxes is not None else None
  paths, skipped = find_files(args.paths) if boxes is None else ([], [])
  check_outputs(args, paths, boxes)
  predictor = load_predictor(args)
  if args.logit_adjust and predictor.prior_counts is None:
    raise UserError(f"--logit-adjust: {predictor.source} records no class prior to adjust by")
  if boxes is not None:
    found = faces_in_boxes(boxes, args.boxes, args.margin)
  else:
    found = faces_in_files(paths, skipped, detect=detect, margin=args.margin)
  names = predictor.class_names
  probs = predict(predictor, found.faces, tta=args.tta, logit_adjust=args.logit_adjust)
  rows = rows_of(found.faces, probs, names)
  if args.output is None:
    write_rows(rows, names, args.format, sys.stdout)
    sys.stdout.flush()
  else:
    write_rows_file(args.output, rows, names, args.format)
  if args.out is not None:  # Locked while written: two predicts into one folder never mix.
    with writing.output_folder(args.out, "predict", owned=lambda name: name in OUT_FILES):
      write_pictures(pathlib.Path(args.out), found, rows, names)
  if found.skipped:
    reading.warn(_skipped_text(found.skipped))
  if detect is not None and not found.faces:
    reading.warn("no face found; for images that are already face crops pass --whole-image")
  no_face = sum(1 for n in found.images.values() if n == 0)
  summary = (f"ferjax predict: {_count(len(found.images), 'image')} read, "
             f"{_count(len(found.faces), 'face')} found, {_count(no_face, 'image')} with no face, "
             f"{_count(len(found.skipped), 'unreadable file')} skipped")
  summary += f"; rows in {reading.shown(args.output)}" if args.output is not None else ""
  summary += f"; pictures in {reading.shown(args.out)}" if args.out is not None else ""
  print(summary, file=sys.stderr if args.output is None else sys.stdout, flush=True)
  return 0
