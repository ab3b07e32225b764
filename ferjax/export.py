"""`ferjax export`: a trained classifier as one self-contained file, and loading that file.

    ferjax export --workdir runs/baseline --out baseline.ferjax [--checkpoint best]

writes one file that runs without the run's config, checkpoints or orbax: the line
`ferjax-exported-model`, the length of a JSON header as a decimal line, the header (format and
version, class_names, image_size, channels, prior_counts, source run and step, jax version,
the model's size and sha256, and a sha256 of the header and the model together) and the model,
serialised with `jax.export`: uint8 crops [batch, S, S, C] (batch symbolic), flip (bool) and
tau (float32) -> probabilities [batch, K], weights baked in, lowered for cpu, cuda and tpu.

Loading checks the whole file against its checksum (format 2; format 1 files, written before the
header was covered, have only the model's) and the header against the model itself: image size,
channels and the number of class names must be those of the serialised function's input and
output shapes. The file is published with a hard link, so an existing file is never replaced,
even by two exports racing to one path.
"""

import functools
import hashlib
import json
import pathlib

import jax
import numpy as np

import ferjax
from ferjax import inference, writing
from ferjax.data import reading
from ferjax.errors import UserError


# --- Writing an export --------------------------------------------------------------------------
MAGIC = b"ferjax-exported-model\n"
FORMAT = "ferjax-exported-model"
FORMAT_VERSION = 2  # The newest format this ferjax reads and the one it writes.
CHECKSUM_FROM = 2  # The first format whose "checksum" covers the header and the model.
PLATFORMS = ("cpu", "cuda", "tpu")


def _export_function(model, variables, log_prior, image_size: int, channels: int):
  """The serialised `jax.export` form of `probabilities_fn`, batch symbolic, weights constant."""
  fn = jax.jit(functools.partial(inference.probabilities_fn, model, jax.device_get(variables),
                                 log_prior))
  batch, = jax.export.symbolic_shape("batch")
  specs = (jax.ShapeDtypeStruct((batch, image_size, image_size, channels), np.uint8),
           jax.ShapeDtypeStruct((), np.bool_), jax.ShapeDtypeStruct((), np.float32))
  return bytes(jax.export.export(fn, platforms=PLATFORMS)(*specs).serialize())


def export_run(workdir, out, checkpoint="best") -> dict:
  """Writes the classifier run in `workdir` at `checkpoint` to the file `out` (see the module
  docstring), atomically; returns the file's header."""
  from ferjax import runs  # Lazily: reading an exported file needs no checkpoints (nor orbax).
  from ferjax.core import parallel
  from ferjax.core import workdir as workdir_lib
  out = pathlib.Path(out)
  if out.is_dir():
    raise UserError(f"--out {reading.shown(out)}: is a folder; expected a file name to write")
  if out.exists() or out.is_symlink():
    raise UserError(f"--out {reading.shown(out)}: already exists; choose another name (an export "
                    "never overwrites a file)")
  writing.refuse_clobbering(out, input_dirs=[workdir], what="--out")
  workdir_lib.check_writable(out.parent, "--out")
  run = runs.open_classifier(workdir, str(checkpoint), mesh=parallel.make_mesh(1))
  image_size, channels = int(run.config.data.image_size), int(run.config.data.channels)
  payload = _export_function(run.model, run.variables,
                             inference.log_prior(run.prior_counts, len(run.class_names)),
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
  header["checksum"] = checksum(header, payload)
  writing.write_new(out, _pack(header, payload), "--out")
  return header


def checksum(header: dict, payload: bytes) -> str:
  """sha256 of the header (less its "checksum", as sorted compact JSON) and the model."""
  fields = {k: v for k, v in header.items() if k != "checksum"}
  text = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
  return hashlib.sha256(text + b"\n" + payload).hexdigest()


def _pack(header: dict, payload: bytes) -> bytes:
  text = json.dumps(header, indent=1).encode()
  return MAGIC + f"{len(text)}\n".encode() + text + payload


# --- Loading an export ----------------------------------------------------------------------------
def read_exported(path) -> tuple[dict, bytes]:
  """(header, serialised model) of an exported file; one line for anything that is not an
  intact export this ferjax can read."""
  path = pathlib.Path(path)
  shown = reading.shown(path)
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
  if version >= CHECKSUM_FROM and header.get("checksum") != checksum(header, payload):
    raise UserError(f"{shown}: damaged or edited ferjax export (the checksum of its header and "
                    "model differs): export it again")
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


def load_exported(path) -> inference.Predictor:
  """The model in a file written by `ferjax export`, ready for `probabilities` (one device)."""
  header, payload = read_exported(path)
  shown, made_with = reading.shown(path), header.get("jax_version", "?")
  try:
    exported = jax.export.deserialize(bytearray(payload))
  except Exception as e:  # Serialisation of another jax version; reported in one line.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"{shown}: this jax {jax.__version__} cannot load a model exported with jax "
                    f"{made_with} ({reason})") from None
  _check_signature(exported, header, shown)
  backend = jax.default_backend()
  if not any(p == backend or (backend == "gpu" and p in ("cuda", "rocm"))
             for p in exported.platforms):
    raise UserError(f"{shown}: exported for {', '.join(exported.platforms)}, not for this "
                    f"machine's {backend}")
  call, device = jax.jit(exported.call), jax.devices()[0]
  source = header.get("source", {})
  run = lambda batch, flip, tau: call(jax.device_put(batch, device), flip, tau)
  return inference.Predictor(run, class_names=header["class_names"],
                             image_size=header["image_size"], channels=header["channels"],
                             prior_counts=header["prior_counts"],
                             source=f"{shown} (exported from {source.get('workdir', '?')}, step "
                                    f"{source.get('step', '?')})")


def _check_signature(exported, header: dict, shown: str) -> None:
  """The header's image size, channels and class count against the serialised function's input
  and output shapes: one line naming the file when they differ (an edited header)."""
  try:
    crops, flip, tau = exported.in_avals
    probs, = exported.out_avals
    size, width, channels = (int(d) for d in crops.shape[1:])
    num_classes = int(probs.shape[1])
    ok = (crops.dtype == np.uint8 and len(crops.shape) == 4 and flip.shape == ()
          and tau.shape == () and len(probs.shape) == 2 and size == width)
  except (ValueError, TypeError, IndexError):
    ok = False
  if not ok:
    raise UserError(f"{shown}: not a ferjax exported model (its function takes "
                    f"{list(exported.in_avals)} and returns {list(exported.out_avals)})")
  problems = {
      "image_size": (header["image_size"] != size,
                     f"is {header['image_size']}, but the model takes {size}x{size} crops"),
      "channels": (header["channels"] != channels,
                   f"is {header['channels']}, but the model takes {channels}-channel crops"),
      "class_names": (len(header["class_names"]) != num_classes,
                      f"lists {len(header['class_names'])} names, but the model has "
                      f"{num_classes} classes"),
  }
  for field, (wrong, text) in problems.items():
    if wrong:
      raise UserError(f"{shown}: damaged or edited ferjax export (header field {field!r} {text}): "
                      "export it again")


def cli_export(args) -> int:
  """`ferjax export`: see the module docstring."""
  checkpoint = getattr(args, "checkpoint", None) or "best"
  header = export_run(args.workdir, args.out, checkpoint)
  print(f"exported {args.workdir} (step {header['source']['step']}, {checkpoint}): "
        f"{len(header['class_names'])} classes, {header['image_size']}x{header['image_size']}x"
        f"{header['channels']} crops, {header['model_bytes'] / 1e6:.1f} MB -> {args.out}")
  return 0
