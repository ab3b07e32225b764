"""import-weights: torchvision/timm ResNet state dicts -> ferjax variables, the weights folder,
apply_init, and the numerics (a numpy forward with torchvision's semantics; torch if installed).

The torchvision layout (names, shapes, parameter counts) and the inverse name mapping are
written out here independently of ferjax.models.import_weights. Files are tiny: torchvision
names at a stem width of 8 (ferjax width 0.125); full widths are checked in memory.
"""

import argparse
import hashlib
import importlib.util
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import core, traverse_util
from safetensors.numpy import save_file

from badinput import expect_one_line
from ferjax.errors import UserError
from ferjax.models import import_weights as iw
from ferjax.models import resnet

# torchvision.models.resnet: blocks per stage and the block's expansion (ResNet-10: timm's
# basic [1, 1, 1, 1] layout with the plain stem).
TV_LAYERS = {"resnet10": ((1, 1, 1, 1), 1), "resnet18": ((2, 2, 2, 2), 1),
             "resnet34": ((3, 4, 6, 3), 1), "resnet50": ((3, 4, 6, 3), 4)}
# sum(p.numel() for p in torchvision.models.NAME().parameters()), 1000 classes.
TV_PARAM_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
TINY = dict(base=8, classes=10)  # torchvision names and layout at ferjax width 0.125.


# =================================================================================================
# The torchvision layout, independently
# =================================================================================================
def tv_shapes(arch, *, base=64, in_ch=3, classes=1000, stem=7) -> dict:
  """{torch name: shape} of torchvision's ResNet (v1.5) with `base` stem channels."""
  sizes, expansion = TV_LAYERS[arch]
  shapes = {"conv1.weight": (base, in_ch, stem, stem)}
  bn = lambda prefix, c: {f"{prefix}.{leaf}": (c,) if leaf != "num_batches_tracked" else ()
                          for leaf in BN_LEAVES}
  shapes |= bn("bn1", base)
  inplanes = base
  for s, blocks in enumerate(sizes):
    planes = base * 2 ** s
    for i in range(blocks):
      stride = 2 if s > 0 and i == 0 else 1
      prefix = f"layer{s + 1}.{i}"
      convs = ([(planes, inplanes, 3), (planes, planes, 3)] if expansion == 1 else
               [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)])
      for j, (out, cin, k) in enumerate(convs, 1):
        shapes[f"{prefix}.conv{j}.weight"] = (out, cin, k, k)
        shapes |= bn(f"{prefix}.bn{j}", out)
      if stride != 1 or inplanes != planes * expansion:
        shapes[f"{prefix}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
        shapes |= bn(f"{prefix}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  shapes["fc.weight"], shapes["fc.bias"] = (classes, inplanes), (classes,)
  return shapes


def random_state(shapes, seed=0) -> dict:
  """Plausible weights: He-scaled convs, BatchNorm near identity, positive variances."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in shapes.items():
    if name.endswith("num_batches_tracked"):
      value = np.array(7, np.int64)
    elif name.endswith("running_var") or (len(shape) == 1 and name.endswith("weight")
                                          and not name.startswith("fc")):
      value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 4:
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
    else:
      value = rng.normal(0, 0.1, shape)
    state[name] = np.asarray(value, np.int64 if value.dtype == np.int64 else np.float32)
  return state


def ferjax_leaf(name: str, value: np.ndarray):
  """(ferjax path, array in flax layout) for one torchvision name; None for counters."""
  if name.endswith("num_batches_tracked"):
    return None
  module, leaf = name.rsplit(".", 1)
  is_bn = bool(re.search(r"(^bn1|\.bn\d|downsample\.1)$", module))
  collection = "batch_stats" if leaf.startswith("running_") else "params"
  ferjax_leaf = {"running_mean": "mean", "running_var": "var", "bias": "bias",
                 "weight": "scale" if is_bn else "kernel"}[leaf]
  if module in ("conv1", "bn1", "fc"):
    modules = ({"conv1": "stem_conv", "bn1": "stem_norm", "fc": "head"}[module],)
  else:
    s, i, rest = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", module).groups()
    sub = {"downsample.0": "conv_proj", "downsample.1": "norm_proj"}.get(rest)
    if sub is None:
      kind, j = re.fullmatch(r"(conv|bn)(\d)", rest).groups()
      sub = f"{'Conv' if kind == 'conv' else 'BatchNorm'}_{int(j) - 1}"
    modules = (f"stage{s}_block{int(i) + 1}", sub)
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  return "/".join((collection,) + modules + (ferjax_leaf,)), value


def flat(variables) -> dict:
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(
      core.unfreeze(variables)).items()}


def ferjax_shapes(arch, *, width, stem="standard", channels=3, num_classes=10, cbam=False):
  model = resnet.create_model(arch, num_classes=num_classes, stem=stem, width=width, cbam=cbam)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, channels)),
                                           train=False))
  return {k: tuple(v.shape) for k, v in flat_shapes(tree).items()}


def flat_shapes(tree) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(core.unfreeze(tree)).items()}


def one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(UserError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def namespace(file, out, **kwargs):
  base = dict(file=str(file), arch="resnet18", out=str(out), channels=3, stem="standard",
              num_classes=None)
  return argparse.Namespace(**(base | kwargs))


# =================================================================================================
# A numpy forward pass with torchvision's semantics (NCHW, OIHW, eval-mode BatchNorm)
# =================================================================================================
def np_conv(x, w, stride, pad):
  n, _, h, wd = x.shape
  k = w.shape[2]
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
  out = np.zeros((n, w.shape[0], oh, ow))
  for di in range(k):
    for dj in range(k):
      patch = xp[:, :, di:di + stride * oh:stride, dj:dj + stride * ow:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, di, dj])
  return out


def np_bn(x, state, prefix):
  get = lambda leaf: state[f"{prefix}.{leaf}"].astype(np.float64)[None, :, None, None]
  return (x - get("running_mean")) / np.sqrt(get("running_var") + 1e-5) * get("weight") + get(
      "bias")


def np_maxpool(x):
  """3x3, stride 2, padding 1 (padded with -inf), as torch.nn.MaxPool2d(3, 2, 1)."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  oh, ow = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
  return np.max([xp[:, :, di:di + 2 * oh:2, dj:dj + 2 * ow:2]
                 for di in range(3) for dj in range(3)], axis=0)


def np_resnet(state, x, arch):
  """Logits of torchvision's ResNet (basic or bottleneck blocks) in float64."""
  relu = lambda v: np.maximum(v, 0)
  w = lambda name: state[name].astype(np.float64)
  x = np_maxpool(relu(np_bn(np_conv(x, w("conv1.weight"), 2, 3), state, "bn1")))
  sizes, expansion = TV_LAYERS[arch]
  for s, blocks in enumerate(sizes):
    for i in range(blocks):
      p, stride = f"layer{s + 1}.{i}", 2 if s > 0 and i == 0 else 1
      if expansion == 1:
        y = relu(np_bn(np_conv(x, w(f"{p}.conv1.weight"), stride, 1), state, f"{p}.bn1"))
        y = np_bn(np_conv(y, w(f"{p}.conv2.weight"), 1, 1), state, f"{p}.bn2")
      else:
        y = relu(np_bn(np_conv(x, w(f"{p}.conv1.weight"), 1, 0), state, f"{p}.bn1"))
        y = relu(np_bn(np_conv(y, w(f"{p}.conv2.weight"), stride, 1), state, f"{p}.bn2"))
        y = np_bn(np_conv(y, w(f"{p}.conv3.weight"), 1, 0), state, f"{p}.bn3")
      if f"{p}.downsample.0.weight" in state:
        x = np_bn(np_conv(x, w(f"{p}.downsample.0.weight"), stride, 0), state,
                  f"{p}.downsample.1")
      x = relu(x + y)
  return x.mean(axis=(2, 3)) @ w("fc.weight").T + w("fc.bias")


def ferjax_logits(variables, x_nhwc, arch, width, num_classes=10):
  model = resnet.create_model(arch, num_classes=num_classes, stem="standard", width=width)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_nhwc)
  return np.asarray(logits)


# =================================================================================================
# Fixtures: one tiny torchvision-named file for the module
# =================================================================================================
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(path, state): a resnet18 with torchvision names, stem width 8, 10 classes."""
  state = random_state(tv_shapes("resnet18", **TINY))
  path = tmp_path_factory.mktemp("weights") / "tiny_resnet18.safetensors"
  save_file(state, path)
  return path, state


@pytest.fixture(scope="module")
def imported(tiny, tmp_path_factory):
  """An import folder made by cli_main from the tiny file (head kept)."""
  out = tmp_path_factory.mktemp("imports") / "resnet18"
  assert iw.cli_main(namespace(tiny[0], out)) == 0
  return out


# =================================================================================================
# Conversion
# =================================================================================================
def test_torchvision_layout_is_the_real_one():
  """The test's own shape table reproduces torchvision's parameter counts."""
  for arch, count in TV_PARAM_COUNTS.items():
    shapes = tv_shapes(arch)
    params = [s for k, s in shapes.items() if not re.search(r"running_|num_batches", k)]
    assert sum(int(np.prod(s)) for s in params) == count, arch


def test_every_leaf_round_trips_exactly(tiny):
  path, state = tiny
  variables = iw.convert_resnet(iw.read_state_dict(path), "resnet18", channels=3, stem="standard")
  got = flat(variables)
  expected = dict(filter(None, (ferjax_leaf(k, v) for k, v in state.items())))
  assert set(got) == set(expected) == set(ferjax_shapes("resnet18", width=0.125))
  assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}
  chex.assert_trees_all_equal(got, expected)


def write_bfloat16_safetensors(path, state: dict) -> None:
  """A .safetensors file written by hand (an 8-byte little-endian header length, the JSON header,
  then the raw bytes), its floating-point tensors stored as bfloat16: the top two bytes of each
  float32, as torch's `.bfloat16()` truncates exactly representable values."""
  header, chunks, offset = {}, [], 0
  for name, value in sorted(state.items()):
    if value.dtype == np.float32:
      raw = (np.ascontiguousarray(value).view(np.uint32) >> 16).astype("<u2").tobytes()
      dtype = "BF16"
    else:
      raw, dtype = np.ascontiguousarray(value, "<i8").tobytes(), "I64"
    header[name] = {"dtype": dtype, "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def test_a_bfloat16_state_dict_imports_as_float32(tiny, tmp_path):
  _, state = tiny
  truncated = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) if v.dtype == np.float32
               else v for k, v in state.items()}
  path = tmp_path / "bf16.safetensors"
  write_bfloat16_safetensors(path, state)
  variables = iw.convert_resnet(iw.read_state_dict(path), "resnet18", channels=3, stem="standard")
  got = flat(variables)
  assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}
  chex.assert_trees_all_equal(got, dict(filter(None, (ferjax_leaf(k, v)
                                                      for k, v in truncated.items()))))
  out = tmp_path / "imported"
  assert iw.cli_main(namespace(path, out)) == 0
  assert (out / iw.WEIGHTS_FILE).is_file()


def test_an_integer_weight_is_still_refused(tiny, tmp_path):
  _, state = tiny
  state = dict(state, **{"conv1.weight": state["conv1.weight"].astype(np.int32)})
  path = tmp_path / "int.safetensors"
  save_file(state, path)
  message = one_line_error(iw.convert_resnet, iw.read_state_dict(path), "resnet18", channels=3,
                           stem="standard")
  assert "conv1.weight has dtype int32, expected floating point" in message


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_full_width_torchvision_shapes_fit(arch):
  """Every torchvision parameter at its real shape lands on a ferjax leaf of the same size."""
  shapes = tv_shapes(arch)
  state = {k: np.zeros(s, np.int64 if k.endswith("tracked") else np.float32)
           for k, s in shapes.items()}
  got = flat(iw.convert_resnet(state, arch, channels=3, stem="standard"))
  assert {k: v.shape for k, v in got.items()} == ferjax_shapes(arch, width=1.0,
                                                                 num_classes=1000)
  assert sum(v.size for k, v in got.items() if k.startswith("params/")) == TV_PARAM_COUNTS[arch]


@pytest.mark.parametrize("arch", ["resnet10", "resnet50"])
def test_other_archs_at_tiny_width(arch):
  state = random_state(tv_shapes(arch, **TINY), seed=1)
  got = flat(iw.convert_resnet(state, arch, channels=3, stem="standard"))
  assert {k: v.shape for k, v in got.items()} == ferjax_shapes(arch, width=0.125)


def test_grayscale_sums_the_rgb_filters(tiny):
  _, state = tiny
  got = flat(iw.convert_resnet(state, "resnet18", channels=1, stem="standard"))
  summed = state["conv1.weight"].sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
  np.testing.assert_allclose(got["params/stem_conv/kernel"], summed, rtol=1e-6)
  assert got["params/stem_conv/kernel"].shape == (7, 7, 1, 8)


def test_head_dropped_when_the_class_count_differs(tiny):
  _, state = tiny
  assert "head" not in iw.convert_resnet(state, "resnet18", channels=3, stem="standard",
                                         num_classes=7)["params"]
  kept = iw.convert_resnet(state, "resnet18", channels=3, stem="standard", num_classes=10)
  assert kept["params"]["head"]["kernel"].shape == (64, 10)
  headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
  assert "head" not in iw.convert_resnet(headless, "resnet18", channels=3,
                                         stem="standard")["params"]


def test_small_stem_refuses_a_7x7_conv1_and_takes_a_3x3_one(tiny):
  _, state = tiny
  message = one_line_error(iw.convert_resnet, state, "resnet18", channels=3, stem="small")
  for part in ("conv1.weight", "(8, 3, 7, 7)", "(8, 3, 3, 3)", "params/stem_conv/kernel",
               "--stem standard"):
    assert part in message, message
  cifar = random_state(tv_shapes("resnet18", stem=3, **TINY))
  got = flat(iw.convert_resnet(cifar, "resnet18", channels=3, stem="small"))
  assert got["params/stem_conv/kernel"].shape == (3, 3, 3, 8)


# =================================================================================================
# Numerics: ferjax on the converted weights == torchvision's computation
# =================================================================================================
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_logits_match_a_numpy_torchvision_forward(arch, tiny):
  """Same logits on the same input: kernel layouts, the stem's padding and max-pool, strides,
  projections and eval-mode BatchNorm all agree with torchvision's."""
  state = tiny[1] if arch == "resnet18" else random_state(tv_shapes(arch, **TINY), seed=2)
  x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 45, 45)).astype(np.float32)
  expected = np_resnet(state, x.astype(np.float64), arch)
  variables = iw.convert_resnet(state, arch, channels=3, stem="standard")
  got = ferjax_logits(variables, x.transpose(0, 2, 3, 1), arch, 0.125)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_gray_model_equals_the_rgb_model_on_replicated_gray(tiny):
  _, state = tiny
  gray = np.random.default_rng(4).uniform(-1, 1, (2, 1, 40, 40)).astype(np.float32)
  expected = np_resnet(state, np.repeat(gray, 3, axis=1).astype(np.float64), "resnet18")
  variables = iw.convert_resnet(state, "resnet18", channels=1, stem="standard")
  got = ferjax_logits(variables, gray.transpose(0, 2, 3, 1), "resnet18", 0.125)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_torchvision_resnet18_logits_match_torch(tmp_path):
  """Optional (needs torch and torchvision): the real torchvision model, in eval mode."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  net = torchvision.models.resnet18(weights=None, num_classes=10)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # Non-trivial statistics and affine terms.
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  net.eval()
  path = tmp_path / "tv_resnet18.safetensors"
  save_file({k: v.numpy() for k, v in net.state_dict().items()}, path)
  variables = iw.convert_resnet(iw.read_state_dict(path), "resnet18", channels=3, stem="standard")
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()
  got = ferjax_logits(variables, x.transpose(0, 2, 3, 1), "resnet18", 1.0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# =================================================================================================
# Parameters that do not fit: one line naming the first
# =================================================================================================
def test_renamed_parameter_is_named_with_its_ferjax_path(tiny):
  state = dict(tiny[1])
  state["layer2.0.shortcut.0.weight"] = state.pop("layer2.0.downsample.0.weight")
  message = one_line_error(iw.convert_resnet, state, "resnet18", channels=3, stem="standard",
                           source="w.safetensors")
  for part in ("w.safetensors", "layer2.0.downsample.0.weight",
               "params/stage2_block1/conv_proj/kernel", "(16, 8, 1, 1)",
               "layer2.0.shortcut.0.weight"):
    assert part in message, message


def test_missing_running_statistic_is_named(tiny):
  state = dict(tiny[1])
  del state["layer3.1.bn2.running_var"]
  message = one_line_error(iw.convert_resnet, state, "resnet18", channels=3, stem="standard")
  assert "layer3.1.bn2.running_var" in message
  assert "batch_stats/stage3_block2/BatchNorm_1/var" in message


def test_extra_parameter_is_named(tiny):
  state = dict(tiny[1], **{"layer5.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)})
  message = one_line_error(iw.convert_resnet, state, "resnet18", channels=3, stem="standard")
  assert "unexpected parameter layer5.0.conv1.weight" in message


def test_wrong_shape_names_both_shapes(tiny):
  state = dict(tiny[1], **{"layer1.0.conv2.weight": np.zeros((8, 8, 5, 5), np.float32)})
  message = one_line_error(iw.convert_resnet, state, "resnet18", channels=3, stem="standard")
  for part in ("layer1.0.conv2.weight", "(8, 8, 5, 5)", "(8, 8, 3, 3)",
               "params/stage1_block1/Conv_1/kernel", "(3, 3, 8, 8)"):
    assert part in message, message


def test_wrong_arch_names_the_first_missing_block(tiny):
  message = one_line_error(iw.convert_resnet, tiny[1], "resnet34", channels=3, stem="standard")
  assert "layer1.2." in message and "stage1_block3" in message


def test_bad_choices_are_named(tiny):
  assert "--arch" in one_line_error(iw.convert_resnet, tiny[1], "resnet99", channels=3,
                                    stem="standard")
  assert "--channels" in one_line_error(iw.convert_resnet, tiny[1], "resnet18", channels=2,
                                        stem="standard")
  assert "--stem" in one_line_error(iw.convert_resnet, tiny[1], "resnet18", channels=3,
                                    stem="huge")


def test_non_finite_weights_are_named(tiny):
  state = dict(tiny[1])
  state["layer4.1.bn1.weight"] = np.full_like(state["layer4.1.bn1.weight"], np.nan)
  assert "layer4.1.bn1.weight" in one_line_error(iw.convert_resnet, state, "resnet18",
                                                 channels=3, stem="standard")


# =================================================================================================
# Reading files
# =================================================================================================
def test_garbled_and_missing_files_are_one_line(tiny, tmp_path):
  garbled = tmp_path / "garbled.safetensors"
  garbled.write_bytes(b"\x07" * 64)
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(tiny[0].read_bytes()[:5000])
  unknown = tmp_path / "weights.ckpt"
  unknown.write_bytes(b"hello world, not weights")
  for path in (garbled, truncated, unknown, tmp_path / "absent.safetensors", tmp_path):
    assert str(path) in one_line_error(iw.read_state_dict, path)


def test_safetensors_by_content_and_module_prefix(tiny, tmp_path):
  path = tmp_path / "weights.bin.ckpt"  # Unknown suffix: recognised by its header.
  save_file({f"module.{k}": v for k, v in tiny[1].items()}, path)
  assert set(iw.read_state_dict(path)) == set(tiny[1])


def test_pth_without_torch_says_torch_is_needed(tmp_path):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed: .pth files are read")
  path = tmp_path / "model.pth"
  path.write_bytes(b"PK\x03\x04 not really")
  message = one_line_error(iw.read_state_dict, path)
  assert "torch" in message and "safetensors" in message and str(path) in message


def test_pth_with_torch_unwraps_and_strips_module(tiny, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "model.pth"
  torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in tiny[1].items()},
              "epoch": 3}, path)
  state = iw.read_state_dict(path)
  assert set(state) == set(tiny[1])
  np.testing.assert_array_equal(state["conv1.weight"], tiny[1]["conv1.weight"])


# =================================================================================================
# The command and its folder
# =================================================================================================
def test_cli_writes_weights_and_metadata(tiny, imported, capsys):
  meta = json.loads((imported / "import.json").read_text())
  assert meta["format"] == "ferjax-weights" and meta["version"] == 1
  assert (meta["arch"], meta["stem"], meta["channels"], meta["width"]) == (
      "resnet18", "standard", 3, 0.125)
  assert meta["sha256"] == hashlib.sha256(tiny[0].read_bytes()).hexdigest()
  assert meta["head_included"] and meta["num_classes"] == 10
  variables, loaded_meta = iw.load_init(imported)
  assert loaded_meta == meta
  expected = flat(iw.convert_resnet(tiny[1], "resnet18", channels=3, stem="standard"))
  got = flat(variables)
  chex.assert_trees_all_equal(got, expected)
  assert meta["num_parameters"] == sum(v.size for k, v in got.items() if k.startswith("params/"))
  assert sorted(p.name for p in imported.iterdir()) == ["import.json", "weights.npz"]


def test_cli_summary_line_and_dropped_head(tiny, tmp_path, capsys):
  out = tmp_path / "nested" / "gray7"
  iw.cli_main(namespace(tiny[0], out, channels=1, num_classes=7))
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and "head dropped" in lines[0] and str(out) in lines[0], lines
  meta = json.loads((out / "import.json").read_text())
  assert not meta["head_included"] and meta["num_classes"] == 7
  assert meta["input_channels"] == "rgb summed" and meta["source_num_classes"] == 10
  assert [p.name for p in out.parent.iterdir()] == ["gray7"]  # No temporary folder left.


def test_cli_refuses_an_existing_out(tiny, tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  message = one_line_error(iw.cli_main, namespace(tiny[0], out))
  assert "--out" in message and str(out) in message
  assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_failure_writes_nothing(tmp_path):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"garbage" * 10)
  one_line_error(iw.cli_main, namespace(bad, tmp_path / "out" / "w"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_load_init_refuses_broken_folders(imported, tmp_path):
  assert "no such folder" in one_line_error(iw.load_init, tmp_path / "absent")
  cases = {
      "import.json": lambda d: (d / "import.json").write_text("{not json"),
      "format": lambda d: (d / "import.json").write_text('{"format": "other", "version": 1}'),
      "weights.npz": lambda d: (d / "weights.npz").write_bytes(b"PK\x03\x04 broken"),
  }
  for name, damage in cases.items():
    folder = tmp_path / name
    folder.mkdir()
    for f in imported.iterdir():
      (folder / f.name).write_bytes(f.read_bytes())
    damage(folder)
    assert str(folder) in one_line_error(iw.load_init, folder), name
  (tmp_path / "format" / "import.json").unlink()
  assert "import.json" in one_line_error(iw.load_init, tmp_path / "format")


# =================================================================================================
# apply_init: a fresh train state's variables take the imported ones
# =================================================================================================
def fresh_variables(arch="resnet18", *, width=0.125, num_classes=7, cbam=False, channels=3):
  """Random arrays shaped as the model's variables (standing in for a fresh init)."""
  model = resnet.create_model(arch, num_classes=num_classes, stem="standard", width=width,
                              cbam=cbam)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(9), jnp.zeros((1, 64, 64, channels)),
                                           train=False))
  rng = np.random.default_rng(9)
  leaves = lambda c: jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                                  core.unfreeze(tree[c]))
  return {"params": leaves("params"), "batch_stats": leaves("batch_stats")}


def test_apply_init_replaces_the_backbone_and_keeps_a_fresh_head(imported):
  init, _ = iw.load_init(imported)
  fresh = core.freeze(fresh_variables(num_classes=7))
  result = iw.apply_init(fresh, init, what=str(imported))
  assert isinstance(result, core.FrozenDict)
  got, source, before = flat(result), flat(init), flat(fresh)
  chex.assert_trees_all_equal(got, {key: before[key] if key.startswith("params/head/") else
                                    source[key] for key in before})


def test_apply_init_takes_a_matching_head_and_works_under_jit(imported):
  init, _ = iw.load_init(imported)
  fresh = fresh_variables(num_classes=10)
  result = jax.jit(lambda v: iw.apply_init(v, init, what="init"))(fresh)
  chex.assert_trees_all_equal(flat(result), flat(init))


@pytest.mark.parametrize("arch,width,cbam,needle", [
    ("resnet18", 0.25, False, "has shape"),       # width differs
    ("resnet34", 0.125, False, "stage1_block3"),  # init lacks blocks
    ("resnet10", 0.125, False, "model lacks"),    # init has blocks the model lacks
    ("resnet18", 0.125, True, "CBAM"),            # CBAM is not in torchvision files
])
def test_apply_init_mismatch_is_one_line(imported, arch, width, cbam, needle):
  init, _ = iw.load_init(imported)
  fresh = fresh_variables(arch, width=width, cbam=cbam)
  message = one_line_error(iw.apply_init, fresh, init, what="model.init_from=X")
  assert "model.init_from=X" in message and needle in message, message


def test_apply_init_names_a_channel_mismatch(imported):
  init, _ = iw.load_init(imported)
  message = one_line_error(iw.apply_init, fresh_variables(channels=1), init, what="X")
  assert "params/stem_conv/kernel" in message and "(7, 7, 3, 8)" in message
  assert "(7, 7, 1, 8)" in message


# =================================================================================================
# Through `ferjax` itself, once cli.py has the verb
# =================================================================================================
def _verb_wired() -> bool:
  from ferjax import cli
  verbs = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
  return any("import-weights" in a.choices for a in verbs)


wired = pytest.mark.skipif(not _verb_wired(), reason="`ferjax import-weights` not wired yet")


@wired
def test_cli_verb_bad_inputs(tiny, tmp_path, capsys):
  garbled = tmp_path / "garbled.safetensors"
  garbled.write_bytes(b"\x07" * 64)
  out = tmp_path / "out"
  expect_one_line(["import-weights", garbled, "--arch", "resnet18", "--out", out],
                  garbled.name, capsys, protect=[tmp_path])
  out.mkdir()
  expect_one_line(["import-weights", tiny[0], "--arch", "resnet18", "--out", out],
                  ["--out", str(out)], capsys, protect=[tmp_path])
  expect_one_line(["import-weights", tiny[0], "--arch", "resnet18", "--stem", "small", "--out",
                   tmp_path / "small"], "conv1.weight", capsys, protect=[tmp_path])


@wired
def test_cli_verb_converts(tiny, tmp_path, capsys):
  from ferjax import cli
  out = tmp_path / "w"
  assert cli.main(["import-weights", str(tiny[0]), "--arch", "resnet18", "--out", str(out),
                   "--channels", "1", "--num-classes", "7"]) == 0
  meta = json.loads((out / "import.json").read_text())
  assert meta["channels"] == 1 and not meta["head_included"]
