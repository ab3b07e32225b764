"""ResNet: output shapes and dtypes for both stems, CBAM, width, and the 3x3 map floor."""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax import configs
from ferjax.models import resnet
from ferjax.kinds import classifier as classifier_kind

REPO = pathlib.Path(__file__).resolve().parents[1]


def _init(model, shape):
  """Jitted init with the rbg generator: compiles in a fraction of eager or threefry time."""
  x = jnp.zeros(shape, jnp.float32)
  return jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), x, train=False))()


def _apply(model, variables, x, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


@pytest.mark.slow
@pytest.mark.parametrize("stem,size,channels", [("small", 32, 1), ("standard", 96, 3)])
def test_logits_and_features_shapes(stem, size, channels):
  model = resnet.create_model("resnet10", num_classes=7, stem=stem, width=0.125)
  variables = _init(model, (2, size, size, channels))
  x = jax.random.uniform(jax.random.key(1), (2, size, size, channels), minval=-1, maxval=1)
  logits, features = _apply(model, variables, x, train=False)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert features.shape == (2, resnet.stage_widths(0.125)[-1])
  (logits_t, _), updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  assert logits_t.shape == (2, 7) and "batch_stats" in updates
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(logits_t))


def test_stems_differ_in_first_layer_and_pooling():
  shapes = lambda model, size: jax.eval_shape(lambda: _init(model, (1, size, size, 1)))
  small = shapes(resnet.create_model("resnet10", num_classes=7, stem="small", width=0.125), 32)
  standard = shapes(resnet.create_model("resnet10", num_classes=7, stem="standard", width=0.125),
                    96)
  assert small["params"]["stem_conv"]["kernel"].shape == (3, 3, 1, 8)
  assert standard["params"]["stem_conv"]["kernel"].shape == (7, 7, 1, 8)


def test_strided_stem_is_the_small_stem_at_half_the_map():
  """Same parameters as the small stem (a 3x3 conv, no pool), every map halved."""
  def run(stem):
    model = resnet.create_model("resnet10", num_classes=7, stem=stem, width=0.125)
    x = jnp.zeros((1, 48, 48, 1))
    return jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), x, train=False, capture_intermediates=True))
  (_, small), (_, strided) = run("small"), run("strided")
  assert jax.tree.map(lambda a: a.shape, small["params"]) == jax.tree.map(
      lambda a: a.shape, strided["params"])
  for block, side in (("stage1_block1", 24), ("stage2_block1", 12), ("stage4_block1", 3)):
    assert strided["intermediates"][block]["__call__"][0].shape[1:3] == (side, side)
    assert small["intermediates"][block]["__call__"][0].shape[1] == 2 * side


@pytest.mark.parametrize("name,stem,size", [
    ("resnet18", "small", 48), ("resnet18", "small", 32), ("resnet10", "strided", 48),
    ("resnet34", "standard", 112),
    ("resnet50", "standard", 96)])
def test_smallest_feature_map_matches_the_model(name, stem, size):
  """The helper configs rely on predicts the last stage's map of the real network."""
  model = resnet.create_model(name, num_classes=7, stem=stem, width=0.25)
  x = jnp.zeros((1, size, size, 1))
  _, state = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), x, train=False, capture_intermediates=True))
  last_block = sorted(k for k in state["intermediates"] if k.startswith("stage4"))[-1]
  out_shape = state["intermediates"][last_block]["__call__"][0].shape
  assert out_shape[1] == out_shape[2] == resnet.smallest_feature_map(size, stem)
  expansion = 4 if name == "resnet50" else 1
  assert out_shape[3] == resnet.stage_widths(0.25)[-1] * expansion


def test_known_map_sizes():
  assert resnet.smallest_feature_map(48, "small") == 6
  assert resnet.smallest_feature_map(32, "small") == 4
  assert resnet.smallest_feature_map(48, "strided") == 3
  assert resnet.smallest_feature_map(32, "strided") == 2
  assert resnet.smallest_feature_map(96, "standard") == 3
  assert resnet.smallest_feature_map(64, "standard") == 2  # Too small: the small stem is for this.


def test_cbam_adds_attention_to_every_block():
  model = resnet.create_model("resnet18", num_classes=7, width=0.125, cbam=True)
  variables = jax.eval_shape(lambda: _init(model, (1, 32, 32, 1)))
  params, stats = variables["params"], variables["batch_stats"]
  blocks = [k for k in params if k.startswith("stage")]
  assert len(blocks) == 8
  for block in blocks:
    cbam = params[block]["CBAM_0"]
    assert set(cbam) == {"channel_fc1", "channel_fc2", "spatial_conv", "spatial_norm"}
    # The reference's BasicConv(2, 1, 7, padding=3, relu=False): bias-free conv + BatchNorm.
    assert set(cbam["spatial_conv"]) == {"kernel"}
    assert cbam["spatial_conv"]["kernel"].shape == (7, 7, 2, 1)
    assert {k: v.shape for k, v in cbam["spatial_norm"].items()} == {"scale": (1,), "bias": (1,)}
    assert {k: v.shape for k, v in stats[block]["CBAM_0"]["spatial_norm"].items()} == {
        "mean": (1,), "var": (1,)}


@pytest.mark.slow
def test_cbam_model_runs_and_its_spatial_norm_follows_train_and_eval():
  kwargs = dict(num_classes=5, width=0.125)
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1, maxval=1)
  model = resnet.create_model("resnet10", cbam=True, **kwargs)
  variables = _init(model, (1, 32, 32, 3))
  logits, features = _apply(model, variables, x, train=False)
  assert logits.shape == (2, 5) and np.all(np.isfinite(features))
  (logits_t, _), updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  assert logits_t.shape == (2, 5) and np.all(np.isfinite(logits_t))
  assert "spatial_norm" in updates["batch_stats"]["stage1_block1"]["CBAM_0"]


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False])
def test_cbam_spatial_gate_is_a_bias_free_conv_then_batchnorm(train):
  """sigmoid(BN(conv7x7([max_c x, mean_c x]))) on the channel-gated input, BN with batch
  statistics (running ones updated with momentum 0.99) in training, running ones in evaluation."""
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5)
  cbam = resnet.CBAM(norm)
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 16))
  variables = cbam.init(jax.random.key(0), x)
  stats = {"mean": jnp.full((1,), 0.3), "var": jnp.full((1,), 2.0)}
  scale, bias = jnp.full((1,), 1.5), jnp.full((1,), -0.2)
  variables = {"params": {**variables["params"], "spatial_norm": {"scale": scale, "bias": bias}},
               "batch_stats": {"spatial_norm": stats}}
  (out, state) = cbam.apply(variables, x, mutable=["batch_stats", "intermediates"],
                            capture_intermediates=True)
  p = variables["params"]
  mlp = lambda v: (jax.nn.relu(v @ p["channel_fc1"]["kernel"] + p["channel_fc1"]["bias"])
                   @ p["channel_fc2"]["kernel"] + p["channel_fc2"]["bias"])
  gated = x * jax.nn.sigmoid(mlp(x.mean((1, 2))) + mlp(x.max((1, 2))))[:, None, None, :]
  pooled = jnp.concatenate([gated.max(-1, keepdims=True), gated.mean(-1, keepdims=True)], -1)
  conv = jax.lax.conv_general_dilated(pooled, p["spatial_conv"]["kernel"], (1, 1),
                                      ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(state["intermediates"]["spatial_conv"]["__call__"][0], conv,
                             rtol=1e-4, atol=1e-5)
  mean, var = (conv.mean(), conv.var()) if train else (0.3, 2.0)
  expected = gated * jax.nn.sigmoid((conv - mean) / jnp.sqrt(var + 1e-5) * 1.5 - 0.2)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  new = state["batch_stats"]["spatial_norm"]["mean"]
  np.testing.assert_allclose(new, 0.99 * 0.3 + 0.01 * conv.mean() if train else 0.3, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_with_float32_params():
  model = resnet.create_model("resnet10", num_classes=7, width=0.125, dtype="bfloat16")
  variables = _init(model, (1, 32, 32, 1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1), minval=-1, maxval=1)
  (logits, features), state = _apply(model, variables, x, train=False, capture_intermediates=True)
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
  assert state["intermediates"]["stem_conv"]["__call__"][0].dtype == jnp.bfloat16
  reference = resnet.create_model("resnet10", num_classes=7, width=0.125, dtype="float32")
  ref_logits, _ = _apply(reference, variables, x, train=False)
  np.testing.assert_allclose(logits, ref_logits, atol=0.1)


def test_width_multiplier():
  assert resnet.stage_widths(1.0) == (64, 128, 256, 512)
  assert resnet.stage_widths(0.25) == (16, 32, 64, 128)


@pytest.mark.parametrize("config_file", [None, "classifier_synthetic_tiny.py",
                                         "classifier_synthetic.py", "classifier_fer2013.py"])
def test_no_default_runs_a_conv_below_3x3(config_file):
  if config_file is None:
    config = classifier_kind.default_config()
  else:
    config = configs.load_config(REPO / "experiments" / "configs" / config_file)
  assert resnet.smallest_feature_map(config.data.image_size, config.model.stem) >= 3


# --- Cosine head (LDAM-DRW's NormedLinear) ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_cosine_head_is_normalised_features_times_normalised_columns_without_bias(scale):
  """logits = scale * normalize(f) @ normalize(W, dim=0) (github.com/kaidic/LDAM-DRW,
  NormedLinear), computed directly from the model's own features and `head/kernel`."""
  model = resnet.create_model("resnet10", num_classes=7, width=0.125, head="cosine",
                              cosine_scale=scale)
  variables = _init(model, (1, 32, 32, 1))
  head = variables["params"]["head"]
  assert set(head) == {"kernel"}  # No bias; head-only tools still find params['head']['kernel'].
  assert head["kernel"].shape == (resnet.stage_widths(0.125)[-1], 7)
  # NormedLinear's initialisation: unit-norm class columns.
  np.testing.assert_allclose(np.linalg.norm(head["kernel"], axis=0), 1.0, rtol=1e-5)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1), minval=-1, maxval=1)
  logits, features = _apply(model, variables, x, train=False)
  f, w = np.asarray(features, np.float64), np.asarray(head["kernel"], np.float64)
  expected = scale * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (
      w / np.linalg.norm(w, axis=0, keepdims=True))
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  assert np.all(np.abs(np.asarray(logits)) <= scale * (1 + 1e-5))


def test_cosine_logits_of_a_hand_made_case_and_a_zero_feature():
  features = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  kernel = jnp.array([[2.0, 0.0, -1.0], [0.0, 5.0, 0.0]])  # Columns: e1, e2, -e1 after norming.
  np.testing.assert_allclose(resnet.cosine_logits(features, kernel),
                             [[0.6, 0.8, -0.6], [0.0, 0.0, 0.0]], atol=1e-6)


def test_linear_head_is_unchanged_by_default():
  model = resnet.create_model("resnet10", num_classes=7, width=0.125)
  assert model.head == "linear" and model.pooling == "avg"
  head = jax.eval_shape(lambda: _init(model, (1, 32, 32, 1)))["params"]["head"]
  assert set(head) == {"kernel", "bias"}


# --- Attentive patch pooling (APViT's APP) -----------------------------------------------------
def test_attentive_patch_pool_on_a_hand_made_map():
  """Scores sum_c |x_c| per position (APViT's SUM_ABS_1), the top max(int(N * keep), 1) kept,
  their mean returned; a tie goes to the earlier position."""
  x = jnp.array([[[[1.0, 0.0], [-3.0, 1.0]],     # scores 1, 4
                  [[0.5, 0.5], [2.0, -2.0]]],    # scores 1, 4
                 [[[0.0, 0.0], [0.0, 1.0]],      # scores 0, 1
                  [[9.0, 0.0], [0.0, 0.5]]]])    # scores 9, 0.5
  assert resnet.app_keep_count(4, 0.5) == 2 and resnet.app_keep_count(4, 0.1) == 1
  half = resnet.attentive_patch_pool(x, 0.5)
  # Image 0 keeps (0,1) and (1,1): mean of [-3, 1] and [2, -2]; image 1 keeps (1,0) and (0,1).
  np.testing.assert_allclose(half, [[-0.5, -0.5], [4.5, 0.5]], atol=1e-6)
  # keep 0.75 -> 3 of 4: image 0's tie between (0,0) and (1,0) (both 1) goes to (0,0).
  np.testing.assert_allclose(resnet.attentive_patch_pool(x, 0.75),
                             [[0.0, -1.0 / 3], [3.0, 0.5]], atol=1e-6)
  np.testing.assert_allclose(resnet.attentive_patch_pool(x, 1.0), jnp.mean(x, axis=(1, 2)),
                             atol=1e-6)


def test_app_pooling_in_the_model_has_no_parameters_and_pools_the_last_map():
  kwargs = dict(num_classes=7, width=0.125)
  avg = resnet.create_model("resnet10", **kwargs)
  app = resnet.create_model("resnet10", pooling="app", app_keep=0.5, **kwargs)
  variables = _init(avg, (1, 32, 32, 1))
  shapes = lambda v: jax.tree.map(lambda a: a.shape, v)
  assert shapes(jax.eval_shape(lambda: _init(app, (1, 32, 32, 1)))) == shapes(variables)
  x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 1), minval=-1, maxval=1)
  (logits, features), state = _apply(app, variables, x, train=False, capture_intermediates=True)
  last_map = state["intermediates"]["stage4_block1"]["__call__"][0]  # [3, 4, 4, D]
  np.testing.assert_allclose(features, resnet.attentive_patch_pool(last_map, 0.5), rtol=1e-5)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, features @ head["kernel"] + head["bias"], rtol=1e-4,
                             atol=1e-5)
  _, avg_features = _apply(avg, variables, x, train=False)
  assert not np.allclose(features, avg_features)
  keep_all = resnet.create_model("resnet10", pooling="app", app_keep=1.0, **kwargs)
  np.testing.assert_allclose(_apply(keep_all, variables, x, train=False)[1], avg_features,
                             rtol=1e-5, atol=1e-6)
