"""Use a trained classifier on new face crops: from a run's checkpoint, or from one exported file.

    predictor = from_run("runs/baseline")                 # or load_exported("model.ferjax")
    crops = prepare_crops([face_a, face_b], predictor.image_size, predictor.channels)
    probs = predictor.probabilities(crops, tta="flip", logit_adjust=1.0)   # float32 [N, K]

Crops are converted exactly as training images were (8-bit, bilinear resize, ITU-R 601 luma for
gray models); prediction is jitted on one device in batches padded to a power of two (at most
64 crops), so one photo costs a small batch and only a few shapes are ever compiled.
Flip TTA averages the logits of each crop and its mirror; logit adjustment subtracts
`tau * log(prior)` (the class prior the model was trained under) before the softmax.

    ferjax export --workdir runs/baseline --out baseline.ferjax [--checkpoint best]

writes one file that runs without the run's config, checkpoints or orbax: the line
`ferjax-exported-model`, the length of a JSON header as a decimal line, the header (format and
version, class_names, image_size, channels, prior_counts, source run and step, jax version,
the model's size and sha256) and the model, serialised with `jax.export`: uint8 crops
[batch, S, S, C] (batch symbolic), flip (bool) and tau (float32) -> probabilities [batch, K],
weights baked in, lowered for cpu, cuda and tpu.
"""

import functools
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import ferjax
from ferjax import fileio, losses
from ferjax.data import files
from ferjax.data import images as images_lib
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.kinds.classifier import TTA_MODES

BATCH_SIZE = 64  # Crops per compiled call (the last batch is padded).


# --- The predictor -------------------------------------------------------------------------------
class Predictor:
  """A classifier ready for face crops: uint8 [N, S, S, C] -> class probabilities.

  `run_batch(images_uint8 [B, S, S, C], flip: bool, tau: float32) -> probabilities [B, K]` runs
  one padded batch of crops (a power of two, at most `batch_size`); the rest is shared by every
  way of getting a model.
  """

  def __init__(self, run_batch, *, class_names, image_size: int, channels: int, prior_counts,
               source: str, batch_size: int = BATCH_SIZE):
    self._run_batch = run_batch
    self.class_names = tuple(class_names)
    self.image_size = int(image_size)
    self.channels = int(channels)
    self.prior_counts = None if prior_counts is None else np.asarray(prior_counts)
    self.source = source
    self.batch_size = int(batch_size)

  def __repr__(self):
    return (f"Predictor({self.source}: {len(self.class_names)} classes, "
            f"{self.image_size}x{self.image_size}x{self.channels})")

  def probabilities(self, crops_uint8: np.ndarray, *, tta: str = "none",
                    logit_adjust: float = 0.0) -> np.ndarray:
    """uint8 [N, image_size, image_size, channels] -> float32 [N, K] softmax probabilities."""
    if tta not in TTA_MODES:
      raise UserError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
    if not np.isfinite(logit_adjust):
      raise UserError(f"--logit-adjust: expected a finite number, got {logit_adjust}")
    if logit_adjust and self.prior_counts is None:
      raise UserError(f"--logit-adjust: {self.source} records no class prior to adjust by")
    crops = np.asarray(crops_uint8)
    shape = (self.image_size, self.image_size, self.channels)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != shape:
      raise ValueError(f"expected uint8 crops [N, {', '.join(map(str, shape))}] (see "
                       f"prepare_crops), got {crops.dtype} {list(crops.shape)}")
    flip, tau = np.asarray(tta == "flip"), np.float32(logit_adjust)
    outputs = []  # Device arrays: every batch is dispatched before the first is fetched.
    # Padded to a power of two up to batch_size: one photo costs one small batch, not 64 crops,
    # and at most log2(batch_size) + 1 shapes are ever compiled.
    size = min(self.batch_size, 1 << max(len(crops) - 1, 0).bit_length())
    for start in range(0, len(crops), size):
      batch = crops[start:start + size]
      valid = len(batch)
      if valid < size:
        batch = np.concatenate([batch, np.zeros((size - valid, *shape), np.uint8)])
      outputs.append((valid, self._run_batch(batch, flip, tau)))
    probs = [np.asarray(out, np.float32)[:valid] for valid, out in outputs]
    return np.concatenate(probs) if probs else np.zeros((0, len(self.class_names)), np.float32)


def probabilities_fn(model, variables, log_prior, images_uint8, flip, tau):
  """Softmax probabilities [B, K] of uint8 crops: the model's own input scaling, optional flip TTA
  (a traced bool: logits of crop and mirror averaged), `tau * log_prior` subtracted. Pure; the
  same function runs from a run (jitted) and in an exported file (weights as constants)."""
  images = pipeline.to_float(images_uint8)
  logits_of = lambda x: model.apply(variables, x, train=False)[0].astype(jnp.float32)
  both = lambda x: (logits_of(x) + logits_of(x[:, :, ::-1, :])) / 2
  logits = jax.lax.cond(flip, both, logits_of, images)
  return jax.nn.softmax(losses.posthoc_adjust(logits, log_prior, tau), axis=-1)


_probabilities_jit = jax.jit(probabilities_fn, static_argnums=0)


def _log_prior(prior_counts, num_classes: int) -> np.ndarray:
  if prior_counts is None:
    return np.zeros(num_classes, np.float32)
  return losses.log_prior(prior_counts)


# --- From a run ----------------------------------------------------------------------------------
def from_run(workdir, checkpoint="best") -> Predictor:
  """The classifier run in `workdir` at `checkpoint` (best, last or a step), on one device."""
  from ferjax import runs  # Lazily: reading an exported file needs no checkpoints (nor orbax).
  from ferjax.core import parallel
  run = runs.open_classifier(workdir, str(checkpoint), mesh=parallel.make_mesh(1))
  return from_model(run.model, run.variables, class_names=run.class_names,
                    image_size=run.config.data.image_size, channels=run.config.data.channels,
                    prior_counts=run.prior_counts,
                    source=f"{workdir} (step {run.step}, {checkpoint})")


def from_model(model, variables, *, class_names, image_size: int, channels: int, prior_counts,
               source: str) -> Predictor:
  """A Predictor of a Flax classifier and its evaluation variables (on their device)."""
  log_prior = _log_prior(prior_counts, len(class_names))
  run_batch = lambda batch, flip, tau: _probabilities_jit(model, variables, log_prior, batch,
                                                          flip, tau)
  return Predictor(run_batch, class_names=class_names, image_size=image_size, channels=channels,
                   prior_counts=prior_counts, source=source)


# --- Crops ---------------------------------------------------------------------------------------
def _to_8bit(image) -> np.ndarray:
  """One image array (HxW, or HxWxC with 1, 3 or 4 channels; uint8, uint16 or integer) as
  uint8 [H, W, 1] (gray) or [H, W, 3] (colour; alpha dropped), as training images were read."""
  array = np.asarray(image)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f"expected an HxW or HxWxC (C = 1, 3 or 4) image, got shape {array.shape}")
  if array.dtype.kind not in "biu":
    raise ValueError(f"expected an integer image (uint8, uint16), got {array.dtype}")
  if array.ndim == 3:
    array = array[..., :3]  # RGBA -> RGB drops alpha, as PIL's convert("RGB").
    if array.dtype != np.uint8:  # Each channel as 8 bits, the way to_8bit scales gray.
      array = np.stack([_gray_8bit(array[..., c]) for c in range(3)], axis=-1)
    return array
  return _gray_8bit(array)[..., None]


def _gray_8bit(array: np.ndarray) -> np.ndarray:
  if array.dtype == np.uint8:
    return array
  if array.dtype == bool:
    return array.astype(np.uint8) * 255
  if array.dtype != np.uint16:
    array = array.astype(np.int32)  # PIL mode "I": 8-bit values kept, wider ones scaled.
  return np.asarray(images_lib.to_8bit(Image.fromarray(array)))


def prepare_crops(images, image_size: int, channels: int) -> np.ndarray:
  """Face crops of any size and kind (HxW or HxWxC with 1/3/4 channels, 8 or 16 bits) ->
  uint8 [N, image_size, image_size, channels]: resized bilinear, then gray (ITU-R 601 luma, as
  PIL's "L") or RGB, exactly as the training data was converted."""
  crops = np.empty((len(images), image_size, image_size, channels), np.uint8)
  for i, image in enumerate(images):
    crops[i] = images_lib.convert_images(_to_8bit(image)[None], image_size=image_size,
                                         channels=channels)[0]
  return crops


# --- Export ---------------------------------------------------------------------------------------
MAGIC = b"ferjax-exported-model\n"
FORMAT = "ferjax-exported-model"
FORMAT_VERSION = 1  # The newest format this ferjax reads and the one it writes.
PLATFORMS = ("cpu", "cuda", "tpu")


def _export_function(model, variables, log_prior, image_size: int, channels: int):
  """The serialised `jax.export` form of `probabilities_fn`, batch symbolic, weights constant."""
  fn = jax.jit(functools.partial(probabilities_fn, model, jax.device_get(variables), log_prior))
  batch, = jax.export.symbolic_shape("batch")
  specs = (jax.ShapeDtypeStruct((batch, image_size, image_size, channels), np.uint8),
           jax.ShapeDtypeStruct((), np.bool_), jax.ShapeDtypeStruct((), np.float32))
  return bytes(jax.export.export(fn, platforms=PLATFORMS)(*specs).serialize())


def export_run(workdir, out, checkpoint="best") -> dict:
  """Writes the classifier run in `workdir` at `checkpoint` to the file `out` (see the module
  docstring), atomically; returns the file's header."""
  from ferjax import runs  # Lazily, as in from_run.
  from ferjax.core import parallel
  from ferjax.core import workdir as workdir_lib
  out = pathlib.Path(out)
  if out.is_dir():
    raise UserError(f"--out {files.shown(out)}: is a folder; expected a file name to write")
  if out.exists() or out.is_symlink():
    raise UserError(f"--out {files.shown(out)}: already exists; choose another name (an export "
                    "never overwrites a file)")
  workdir_lib.check_writable(out.parent, "--out")
  run = runs.open_classifier(workdir, str(checkpoint), mesh=parallel.make_mesh(1))
  image_size, channels = int(run.config.data.image_size), int(run.config.data.channels)
  payload = _export_function(run.model, run.variables,
                             _log_prior(run.prior_counts, len(run.class_names)),
                             image_size, channels)
  header = {
      "format": FORMAT, "version": FORMAT_VERSION,
      "class_names": list(run.class_names), "image_size": image_size, "channels": channels,
      "prior_counts": np.asarray(run.prior_counts).tolist(),
      "source": {"workdir": str(workdir), "step": run.step, "checkpoint": str(checkpoint)},
      "inputs": "crops uint8 [batch, image_size, image_size, channels], flip bool, tau float32",
      "outputs": "probabilities float32 [batch, num_classes]",
      "platforms": list(PLATFORMS), "jax_version": jax.__version__,
      "ferjax_version": ferjax.__version__,
      "model_bytes": len(payload), "model_sha256": hashlib.sha256(payload).hexdigest(),
  }
  fileio.write_atomic(out, _pack(header, payload))
  return header


def _pack(header: dict, payload: bytes) -> bytes:
  text = json.dumps(header, indent=1).encode()
  return MAGIC + f"{len(text)}\n".encode() + text + payload


# --- Loading an export ----------------------------------------------------------------------------
def read_exported(path) -> tuple[dict, bytes]:
  """(header, serialised model) of an exported file; one line for anything that is not an
  intact export this ferjax can read."""
  path = pathlib.Path(path)
  shown = files.shown(path)
  if path.is_dir():
    raise UserError(f"{shown}: is a folder; expected a file written by `ferjax export`")
  try:
    data = path.read_bytes()
  except OSError as e:
    raise UserError(f"{shown}: cannot read ({e.strerror or e})") from None
  not_export = f"{shown}: not a ferjax exported model (expected a file written by `ferjax export`)"
  if not data.startswith(MAGIC):
    raise UserError(not_export)
  length, _, rest = data[len(MAGIC):].partition(b"\n")
  if not length.isdigit():
    raise UserError(f"{shown}: damaged ferjax export (bad header length): export it again")
  if len(rest) < int(length):
    raise UserError(f"{shown}: truncated ferjax export (the header is cut off): export it again")
  try:
    header = json.loads(rest[:int(length)])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise UserError(f"{shown}: damaged ferjax export (header is not JSON): export it "
                    "again") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise UserError(not_export)
  version = header.get("version")
  if not isinstance(version, int) or version < 1:
    raise UserError(f"{shown}: damaged ferjax export (format version {version!r}): export it again")
  if version > FORMAT_VERSION:
    raise UserError(f"{shown}: exported by a newer ferjax (format {version}); this one reads up "
                    f"to {FORMAT_VERSION}: upgrade ferjax")
  _check_header(header, shown)
  payload = rest[int(length):]
  if len(payload) != header["model_bytes"]:
    raise UserError(f"{shown}: truncated ferjax export (model is {len(payload)} of "
                    f"{header['model_bytes']} bytes): export it again")
  if hashlib.sha256(payload).hexdigest() != header["model_sha256"]:
    raise UserError(f"{shown}: damaged ferjax export (model checksum differs): export it again")
  return header, payload


def _check_header(header: dict, shown: str) -> None:
  names, prior = header.get("class_names"), header.get("prior_counts")
  checks = {
      "class_names": isinstance(names, list) and names and all(isinstance(n, str) for n in names),
      "image_size": isinstance(header.get("image_size"), int) and header["image_size"] > 0,
      "channels": header.get("channels") in (1, 3),
      "prior_counts": prior is None or (isinstance(prior, list) and len(prior) == len(names or ())
                                        and all(isinstance(c, (int, float)) for c in prior)),
      "model_bytes": isinstance(header.get("model_bytes"), int),
      "model_sha256": isinstance(header.get("model_sha256"), str),
  }
  for field, ok in checks.items():
    if not ok:
      raise UserError(f"{shown}: damaged ferjax export (header field {field!r}: "
                      f"{header.get(field)!r}): export it again")


def load_exported(path) -> Predictor:
  """The model in a file written by `ferjax export`, ready for `probabilities` (one device)."""
  header, payload = read_exported(path)
  shown, made_with = files.shown(path), header.get("jax_version", "?")
  try:
    exported = jax.export.deserialize(bytearray(payload))
  except Exception as e:  # Serialisation of another jax version; reported in one line.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"{shown}: this jax {jax.__version__} cannot load a model exported with jax "
                    f"{made_with} ({reason})") from None
  backend = jax.default_backend()
  if not any(p == backend or (backend == "gpu" and p in ("cuda", "rocm"))
             for p in exported.platforms):
    raise UserError(f"{shown}: exported for {', '.join(exported.platforms)}, not for this "
                    f"machine's {backend}")
  call, device = jax.jit(exported.call), jax.devices()[0]
  source = header.get("source", {})
  return Predictor(lambda batch, flip, tau: call(jax.device_put(batch, device), flip, tau),
                   class_names=header["class_names"], image_size=header["image_size"],
                   channels=header["channels"], prior_counts=header["prior_counts"],
                   source=f"{shown} (exported from {source.get('workdir', '?')}, step "
                          f"{source.get('step', '?')})")


def cli_export(args) -> int:
  """`ferjax export`: see the module docstring."""
  checkpoint = getattr(args, "checkpoint", None) or "best"
  header = export_run(args.workdir, args.out, checkpoint)
  print(f"exported {args.workdir} (step {header['source']['step']}, {checkpoint}): "
        f"{len(header['class_names'])} classes, {header['image_size']}x{header['image_size']}x"
        f"{header['channels']} crops, {header['model_bytes'] / 1e6:.1f} MB -> {args.out}")
  return 0
