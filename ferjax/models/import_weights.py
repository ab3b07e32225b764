"""Pretrained torchvision/timm ResNet weights -> ferjax ResNet variables (`ferjax import-weights`).

Reads a state dict (.safetensors with the `safetensors` numpy API; .pth/.pt only when torch is
installed), maps the standard torchvision/timm names onto `ferjax.models.resnet`, checks every
shape against the ferjax model built for the arch, and writes a folder the classifier can start
from (`model.init_from`):

  DIR/weights.npz  one array per leaf, keyed by its '/'-joined path: `params/stem_conv/kernel`,
                   `params/stage1_block1/Conv_0/kernel`, `batch_stats/stem_norm/mean`, ...
                   (no `params/head/...` when the head was left out); float32.
  DIR/import.json  {format: "ferjax-weights", version: 1, arch, stem, width, channels, source,
                   sha256 (of the source file), head_included, num_classes, source_num_classes,
                   source_channels, input_channels ("as is", "rgb summed" or "gray spread"),
                   num_parameters (scalars under params/), num_arrays}.

The folder is written under a temporary name beside DIR and renamed into place; DIR must not exist.

Name mapping (torch -> ferjax; conv kernels OIHW -> HWIO, the fc matrix transposed):
  conv1.weight -> stem_conv/kernel; bn1.{weight,bias,running_mean,running_var} ->
  stem_norm/{scale,bias} and batch_stats stem_norm/{mean,var}; layer{s}.{i}.conv{j} ->
  stage{s}_block{i+1}/Conv_{j-1}, .bn{j} -> BatchNorm_{j-1}; .downsample.0 -> conv_proj,
  .downsample.1 -> norm_proj; fc.{weight,bias} -> head/{kernel,bias}. `num_batches_tracked`
  is ignored. Both block types agree with torchvision v1.5 (the stride sits on the 3x3 conv).

Decisions:
  * Stem: torchvision's stem (7x7/2 conv, padding 3, then a 3x3/2 max-pool, padding 1) is
    ferjax's `stem=standard`, identical including padding. ferjax's `stem=small` has a 3x3
    stem conv: a 7x7 conv1 is refused (one line naming conv1.weight and both shapes); a file
    whose conv1 is 3x3 (CIFAR-style ResNets in torchvision naming) loads into it.
  * Width: read from conv1 (out channels / 64); the other shapes must then agree.
  * Grayscale: for channels=1 from an RGB conv1, the three input filters are summed, so a gray
    image g gives what the RGB model gives on (g, g, g). An 1-channel conv1 into a 3-channel
    model is spread as w / 3 over R, G and B (the same identity backwards).
  * Head: fc is imported when present and its class count is the one asked for (or none was
    asked); otherwise it is left out and the caller keeps its freshly initialised head.
  * No input normalisation is folded in: ferjax feeds images in [-1, 1], torchvision models
    expect ImageNet-standardised ones; fine-tuning absorbs the difference.
  * CBAM is not in these files: a model with `cbam=True` cannot start from them (apply_init
    names the first CBAM parameter).
"""

import hashlib
import json
import pathlib
import re
import zipfile

import numpy as np
from flax import traverse_util

from ferjax import writing
from ferjax.errors import UserError
from ferjax.models import resnet

FORMAT = "ferjax-weights"
VERSION = 1
WEIGHTS_FILE = "weights.npz"
META_FILE = "import.json"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
COLLECTIONS = ("params", "batch_stats")
IGNORED_SUFFIXES = ("num_batches_tracked",)
# ferjax leaf -> torch leaf.
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
_BLOCK = re.compile(r"stage(\d+)_block(\d+)")
_SUBMODULE = re.compile(r"(Conv|BatchNorm)_(\d+)")


# =================================================================================================
# Reading a state dict
# =================================================================================================
def read_state_dict(path) -> dict[str, np.ndarray]:
  """{torch name: array} from a .safetensors file (or a .pth/.pt state dict, with torch)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such file (expected a .safetensors or .pth state dict)")
  if path.is_dir():
    raise UserError(f"{path}: is a folder (expected a .safetensors or .pth state dict file)")
  kind = _file_kind(path)
  state = _read_safetensors(path) if kind == "safetensors" else _read_torch(path)
  state = {k.removeprefix("module."): v for k, v in state.items()}
  if not state:
    raise UserError(f"{path}: holds no tensors (expected a ResNet state dict)")
  return state


def _file_kind(path: pathlib.Path) -> str:
  """safetensors or torch, by suffix, else by the first bytes."""
  suffix = path.suffix.lower()
  if suffix in SAFETENSORS_SUFFIXES:
    return "safetensors"
  if suffix in TORCH_SUFFIXES:
    return "torch"
  try:
    with open(path, "rb") as f:
      head = f.read(9)
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
  if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then a JSON header.
    return "safetensors"
  if head[:2] == b"PK" or head[:1] == b"\x80":  # torch's zip archive, or its older format.
    return "torch"
  raise UserError(f"{path}: neither a .safetensors nor a PyTorch (.pth/.pt) state dict")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return dict(load_file(path))
  except Exception as e:  # SafetensorError, OSError, unknown dtypes: all mean "not readable".
    raise UserError(f"{path}: not a readable .safetensors file ({_first_line(e)})") from None


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UserError(f"{path}: reading a PyTorch .pth/.pt file needs torch (pip install torch); "
                    "or convert it to .safetensors where torch is installed "
                    "(safetensors.torch.save_file(state_dict, 'model.safetensors'))") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # Garbled, truncated, or a pickled whole model (not weights only).
    raise UserError(f"{path}: not a readable PyTorch state dict ({_first_line(e)})") from None
  for key in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict "
                    "(save model.state_dict())")
  return {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_to_numpy(tensor) -> np.ndarray:
  tensor = tensor.detach().cpu()
  return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _first_line(error: BaseException, limit: int = 160) -> str:
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= limit else text[:limit - 3] + "..."


# =================================================================================================
# Conversion
# =================================================================================================
def convert_resnet(state_dict: dict, arch: str, *, channels: int, stem: str,
                   num_classes: int | None = None, source: str = "state dict") -> dict:
  """{'params', 'batch_stats'} nested dicts of float32 arrays for `resnet.create_model(arch,
  stem=stem, width=<from conv1>)` on `channels`-channel input. The head is included only when
  the file has fc and its class count is `num_classes` (or `num_classes` is None). A missing,
  unexpected or misshaped backbone parameter is a UserError naming it (`source`: the file)."""
  _check_choices(arch, channels, stem)
  state = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
  width = infer_width(state, source)
  file_classes = _head_classes(state, source)
  include_head = file_classes is not None and num_classes in (None, file_classes)
  targets = target_shapes(arch, channels=channels, stem=stem, width=width,
                          num_classes=num_classes or file_classes or 1)
  where = f"{arch} stem={stem} width={width:g} channels={channels}"
  names = {path: torch_name(path) for path in targets}
  _check_names(state, names, targets, source, where)
  flat = {}
  for path, shape in sorted(targets.items(), key=lambda item: _natural(names[item[0]])):
    if path[1] == "head" and not include_head:
      continue
    flat[path] = _convert_leaf(state[names[path]], path, names[path], shape, source, where)
  return traverse_util.unflatten_dict(flat)


def infer_width(state: dict, source: str = "state dict") -> float:
  """ferjax's `width` from conv1's output channels (64 at width 1)."""
  conv1 = state.get("conv1.weight")
  if conv1 is None:
    raise UserError(f"{source}: no conv1.weight (ferjax params/stem_conv/kernel); expected a "
                    "torchvision/timm ResNet state dict")
  if np.ndim(conv1) != 4:
    raise UserError(f"{source}: conv1.weight has shape {tuple(np.shape(conv1))}, expected a 4-d "
                    "conv kernel (out, in, h, w)")
  return conv1.shape[0] / 64


def target_shapes(arch: str, *, channels: int, stem: str, width: float,
                  num_classes: int) -> dict[tuple, tuple]:
  """{('params'|'batch_stats', module..., leaf): shape} of the ferjax model, without computing."""
  import jax
  import jax.numpy as jnp
  model = resnet.create_model(arch, num_classes=num_classes, stem=stem, width=width)
  x = jax.ShapeDtypeStruct((1, 64, 64, channels), jnp.float32)
  tree = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}


def torch_name(path: tuple) -> str:
  """The torchvision/timm name of a ferjax leaf, e.g. ('params', 'stage2_block1', 'conv_proj',
  'kernel') -> 'layer2.0.downsample.0.weight'."""
  _, *modules, leaf = path
  if modules == ["head"]:
    return f"fc.{'weight' if leaf == 'kernel' else 'bias'}"
  if modules in (["stem_conv"], ["stem_norm"]):
    return f"{'conv1' if modules[0] == 'stem_conv' else 'bn1'}.{_LEAVES[leaf]}"
  block, sub = _BLOCK.fullmatch(modules[0]), modules[1] if len(modules) == 2 else ""
  match = _SUBMODULE.fullmatch(sub)
  if block and match:
    prefix = f"layer{block[1]}.{int(block[2]) - 1}"
    kind = "conv" if match[1] == "Conv" else "bn"
    return f"{prefix}.{kind}{int(match[2]) + 1}.{_LEAVES[leaf]}"
  if block and sub in ("conv_proj", "norm_proj"):
    index = 0 if sub == "conv_proj" else 1
    return f"layer{block[1]}.{int(block[2]) - 1}.downsample.{index}.{_LEAVES[leaf]}"
  raise UserError(f"ferjax parameter {'/'.join(path)} has no torchvision counterpart "
                  "(a CBAM model cannot import torchvision weights)")


def _check_choices(arch, channels, stem) -> None:
  if arch not in resnet.ARCHITECTURES:
    raise UserError(f"--arch: expected one of {', '.join(resnet.MODEL_NAMES)}, got {arch!r}")
  if channels not in (1, 3):
    raise UserError(f"--channels: expected 1 (gray) or 3 (RGB), got {channels!r}")
  if stem not in resnet.STEMS:
    raise UserError(f"--stem: expected one of {', '.join(resnet.STEMS)}, got {stem!r}")


def _head_classes(state: dict, source: str) -> int | None:
  """The file's fc class count (None without an fc); fc.weight and fc.bias must agree."""
  weight, bias = state.get("fc.weight"), state.get("fc.bias")
  if weight is None and bias is None:
    return None
  if weight is None or bias is None:
    missing = "fc.weight" if weight is None else "fc.bias"
    raise UserError(f"{source}: has {'fc.bias' if weight is None else 'fc.weight'} but no "
                    f"{missing} (ferjax params/head)")
  if np.ndim(weight) != 2 or np.shape(bias) != (np.shape(weight)[0],):
    raise UserError(f"{source}: fc.weight {tuple(np.shape(weight))} and fc.bias "
                    f"{tuple(np.shape(bias))} are not a (classes, features) layer and its bias")
  return int(weight.shape[0])


def _check_names(state, names, targets, source, where) -> None:
  """Every backbone name present, nothing unexpected; the first offender named, with shapes."""
  wanted = set(names.values())
  unexpected = sorted((k for k in state if k not in wanted and not k.startswith("fc.")),
                      key=_natural)
  for path in sorted(targets, key=lambda p: _natural(names[p])):
    if path[1] == "head" or names[path] in state:
      continue
    also = f"; the file has unexpected {unexpected[0]}" if unexpected else ""
    raise UserError(f"{source}: no parameter {names[path]} (ferjax {'/'.join(path)}, shape "
                    f"{_torch_shape(path, targets[path])}) for {where}{also}")
  if unexpected:
    raise UserError(f"{source}: unexpected parameter {unexpected[0]} "
                    f"{tuple(np.shape(state[unexpected[0]]))}, not part of {where} (torchvision/"
                    "timm ResNet names expected)")


def _convert_leaf(value, path, name, shape, source, where) -> np.ndarray:
  """One torch array -> its ferjax layout (float32), with the shape checked."""
  value = np.asarray(value)
  if not _is_float(value.dtype):
    raise UserError(f"{source}: {name} has dtype {value.dtype}, expected floating point")
  value, original = value.astype(np.float32), value.shape
  expected = _torch_shape(path, shape)
  if path[1] == "stem_conv" and value.ndim == 4:
    value = _adapt_input_channels(value, expected[1])
  if value.shape != expected:
    stem_hint = ""
    if path[1] == "stem_conv" and value.ndim == 4 and value.shape[2:] != expected[2:]:
      stem_hint = f"; the file's stem conv is {value.shape[2]}x{value.shape[3]}: try --stem " + (
          "standard" if value.shape[2] == 7 else "small")
    raise UserError(f"{source}: {name} has shape {original}, expected {expected} (ferjax "
                    f"{'/'.join(path)} {shape}) for {where}{stem_hint}")
  if not np.all(np.isfinite(value)):
    raise UserError(f"{source}: {name} holds NaN or infinite values")
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  return np.ascontiguousarray(value.T) if value.ndim == 2 else value


def _is_float(dtype) -> bool:
  """Whether `dtype` is floating point: numpy's own, or one numpy knows through ml_dtypes
  (bfloat16 and the float8 types, as safetensors hands them over)."""
  if np.issubdtype(dtype, np.floating):
    return True
  import ml_dtypes
  try:
    ml_dtypes.finfo(dtype)
  except (TypeError, ValueError):
    return False
  return True


def _adapt_input_channels(kernel: np.ndarray, channels: int) -> np.ndarray:
  """RGB filters summed for gray input; gray filters spread as w / 3 for RGB input."""
  if kernel.shape[1] == 3 and channels == 1:
    return kernel.sum(axis=1, keepdims=True)
  if kernel.shape[1] == 1 and channels == 3:
    return np.repeat(kernel / 3, 3, axis=1)
  return kernel


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  """The torch layout of a ferjax shape: HWIO -> OIHW, (in, out) -> (out, in)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def _natural(name: str) -> tuple:
  """Sort key: layer2 before layer10."""
  return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name)))


# =================================================================================================
# The weights folder
# =================================================================================================
def write_weights(out, variables: dict, meta: dict) -> pathlib.Path:
  """Writes DIR/weights.npz and DIR/import.json through a temporary folder renamed into place."""
  out = pathlib.Path(out)
  _refuse_existing(out)
  arrays = {"/".join(path): np.asarray(v)
            for path, v in traverse_util.flatten_dict(variables).items()}
  try:
    with writing.staged_folder(out, "--out") as partial:
      np.savez(partial / WEIGHTS_FILE, **arrays)
      (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
  except OSError as e:
    raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None
  return out


def _refuse_existing(out: pathlib.Path) -> None:
  if out.exists() or out.is_symlink():
    raise UserError(f"--out {out}: already exists (import-weights writes a new folder; choose "
                    "another path or remove it)")


def load_init(path) -> tuple[dict, dict]:
  """(variables {'params', 'batch_stats'} of numpy arrays, import.json) of an import folder."""
  folder = pathlib.Path(path)
  if folder.is_file() and folder.name in (WEIGHTS_FILE, META_FILE):
    folder = folder.parent
  if not folder.is_dir():
    raise UserError(f"{path}: no such folder (expected one written by `ferjax import-weights`)")
  meta = _read_meta(folder / META_FILE)
  weights = folder / WEIGHTS_FILE
  try:
    with np.load(weights, allow_pickle=False) as npz:
      flat = {tuple(key.split("/")): np.asarray(npz[key]) for key in npz.files}
  except FileNotFoundError:
    raise UserError(f"{weights}: missing (the folder is not a complete import)") from None
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise UserError(f"{weights}: not a readable weights file ({_first_line(e)})") from None
  bad = next((p for p in flat if len(p) < 3 or p[0] not in COLLECTIONS), None)
  if bad is not None or not flat:
    what = f"unexpected key {'/'.join(bad)}" if bad else "no arrays"
    raise UserError(f"{weights}: {what} (expected params/... and batch_stats/... arrays)")
  return traverse_util.unflatten_dict(flat), meta


def _read_meta(path: pathlib.Path) -> dict:
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(f"{path}: missing (expected a folder written by `ferjax import-weights`)"
                    ) from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not readable JSON ({_first_line(e)})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise UserError(f"{path}: not a {FORMAT} file (format {_get(meta, 'format')!r})")
  if meta.get("version") != VERSION:
    raise UserError(f"{path}: {FORMAT} version {meta.get('version')!r}; this ferjax reads "
                    f"version {VERSION}")
  return meta


def _get(meta, key):
  return meta.get(key) if isinstance(meta, dict) else None


def apply_init(variables, init, *, what: str):
  """`variables` ({'params', 'batch_stats'}, dicts or FrozenDicts of arrays or tracers) with
  every leaf taken from `init` (cast to the leaf's dtype). The head (params/head, and the rul /
  dan heads' modules: resnet.HEAD_MODULES) is taken only when `init` has it with the same shapes; otherwise it stays as it is. A backbone leaf missing
  from `init`, a leaf of another shape, or an `init` leaf the model lacks is a UserError naming
  the first such path, both shapes and `what` (the init's source)."""
  import jax.numpy as jnp
  from flax import core
  have, source = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(init)
  keys = lambda paths: sorted(paths, key=lambda p: _natural("/".join(p)))
  head = lambda p: len(p) > 1 and p[1] in resnet.HEAD_MODULES
  head_fits = all(p in source and np.shape(source[p]) == tuple(have[p].shape)
                  for p in have if head(p))
  out = {}
  for path in keys(have):
    leaf = have[path]
    if head(path):
      out[path] = jnp.asarray(source[path], leaf.dtype) if head_fits else leaf
      continue
    if path not in source:
      raise UserError(f"{what}: has no {'/'.join(path)} (shape {tuple(leaf.shape)}) that the "
                      "model needs (model.name, width, stem or cbam differ from the import?)")
    if np.shape(source[path]) != tuple(leaf.shape):
      raise UserError(f"{what}: {'/'.join(path)} has shape {np.shape(source[path])}, the model's "
                      f"is {tuple(leaf.shape)} (model.name, width, stem or data.channels differ "
                      "from the import?)")
    out[path] = jnp.asarray(source[path], leaf.dtype)
  extra = [p for p in keys(source) if p not in have and not head(p)]
  if extra:
    raise UserError(f"{what}: has {'/'.join(extra[0])} (shape {np.shape(source[extra[0]])}) that "
                    "the model lacks (model.name differs from the import?)")
  result = traverse_util.unflatten_dict(out)
  return core.freeze(result) if isinstance(variables, core.FrozenDict) else result


# =================================================================================================
# The command
# =================================================================================================
def cli_main(args) -> int:
  """`ferjax import-weights FILE --arch A --out DIR [--channels 1|3] [--stem S]
  [--num-classes K]`: converts, writes DIR, prints one summary line."""
  out = pathlib.Path(args.out)
  writing.refuse_clobbering(out, inputs=[args.file], what="--out", folder=True)
  _refuse_existing(out)
  channels = getattr(args, "channels", 3)
  stem = getattr(args, "stem", "standard")
  num_classes = getattr(args, "num_classes", None)
  if num_classes is not None and num_classes < 1:
    raise UserError(f"--num-classes: expected a positive class count, got {num_classes}")
  _check_choices(args.arch, channels, stem)
  source = pathlib.Path(args.file)
  state = read_state_dict(source)
  variables = convert_resnet(state, args.arch, channels=channels, stem=stem,
                             num_classes=num_classes, source=str(source))
  meta = _meta(state, variables, args.arch, channels, stem, num_classes, source)
  write_weights(out, variables, meta)
  print(_summary(meta, out))
  return 0


def _meta(state, variables, arch, channels, stem, num_classes, source) -> dict:
  file_classes = _head_classes(state, str(source))
  source_channels = int(state["conv1.weight"].shape[1])
  params = traverse_util.flatten_dict(variables["params"])
  head_included = "head" in variables["params"]
  return {
      "format": FORMAT, "version": VERSION, "arch": arch, "stem": stem,
      "width": infer_width(state), "channels": channels,
      "source": str(source.resolve()), "sha256": _sha256(source),
      "head_included": head_included,
      "num_classes": file_classes if head_included else num_classes,
      "source_num_classes": file_classes, "source_channels": source_channels,
      "input_channels": ("as is" if source_channels == channels else
                         "rgb summed" if channels == 1 else "gray spread"),
      "num_parameters": int(sum(v.size for v in params.values())),
      "num_arrays": len(traverse_util.flatten_dict(variables)),
  }


def _summary(meta: dict, out: pathlib.Path) -> str:
  if meta["head_included"]:
    head = f"head kept ({meta['num_classes']} classes)"
  elif meta["source_num_classes"] is None:
    head = "no head in the file (the model keeps its own)"
  else:
    head = (f"head dropped (file has {meta['source_num_classes']} classes, wanted "
            f"{meta['num_classes']}; the model keeps its own)")
  gray = ", RGB filters summed for gray input" if meta["input_channels"] == "rgb summed" else ""
  return (f"ferjax import-weights: converted {meta['num_parameters']:,} parameters of "
          f"{meta['arch']} (stem {meta['stem']}, width {meta['width']:g}, {meta['channels']} "
          f"channel{'s' if meta['channels'] > 1 else ''}{gray}); {head} -> {out}")


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
