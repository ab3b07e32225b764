"""ViT: presets, shapes for both readouts, sin-cos embeddings, other input sizes, MAE's visible
subset, patchify, bf16, the empty 'batch_stats' the classifier trainer passes, and layer-wise
learning-rate decay (optim.layer_decay)."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax.errors import UserError
from ferjax.models import vit

TINY = dict(num_classes=7, patch_size=8, hidden=32, depth=2, heads=2, mlp_dim=64)


def _tiny(**kwargs):
  return vit.ViT(**{**TINY, **kwargs})


def _init(model, shape):
  """Jitted init with the rbg generator (as test_resnet.py); the head is made nonzero so that
  logits depend on the features."""
  x = jnp.zeros(shape, jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), x, train=False))()
  head = variables["params"]["head"]
  head["kernel"] = jax.random.normal(jax.random.key(3), head["kernel"].shape) * 0.1
  return variables


def _images(shape, seed=1):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


def _apply(model, variables, x, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


@pytest.mark.slow
@pytest.mark.parametrize("readout,channels", [("cls", 1), ("gap", 3)])
def test_logits_and_features_shapes(readout, channels):
  model = _tiny(readout=readout)
  variables = _init(model, (1, 32, 32, channels))
  assert list(variables) == ["params"] and "head" in variables["params"]
  assert ("cls" in variables["params"]) == (readout == "cls")
  x = _images((2, 32, 32, channels))
  logits, features = _apply(model, variables, x, train=False)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert features.shape == (2, 32) and features.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and not np.allclose(logits[0], logits[1])
  tokens = _apply(model, variables, x, method=vit.ViT.encode)
  assert tokens.shape == (2, model.num_prefix_tokens + 16, 32)
  pooled = tokens[:, 0] if readout == "cls" else tokens.mean(1)
  np.testing.assert_allclose(features, pooled, atol=1e-5)
  patch_map = _apply(model, variables, x, method=vit.ViT.patch_tokens)
  assert patch_map.shape == (2, 4, 4, 32)
  np.testing.assert_allclose(patch_map.reshape(2, 16, 32), tokens[:, model.num_prefix_tokens:],
                             atol=1e-6)


@pytest.mark.slow
def test_trainer_style_apply_with_empty_batch_stats():
  """The classifier step's call: {'params', 'batch_stats'}, train=True, mutable batch_stats;
  deterministic (no dropout: no 'dropout' rng needed)."""
  model = _tiny()
  variables = {"params": _init(model, (1, 32, 32, 1))["params"], "batch_stats": {}}
  x = _images((2, 32, 32, 1))
  (logits, _), updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  (again, _), _ = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  assert updates == {"batch_stats": {}}
  np.testing.assert_array_equal(logits, again)
  eval_logits, _ = _apply(model, variables, x, train=False)
  np.testing.assert_allclose(logits, eval_logits, atol=1e-6)


@pytest.mark.parametrize("name,hidden,heads,millions", [
    ("vit_ti", 192, 3, 5.7), ("vit_s", 384, 6, 22.0), ("vit_b", 768, 12, 86.4)])
def test_presets_have_the_published_sizes(name, hidden, heads, millions):
  """DeiT-Ti / S, ViT-B at 224 px / 16 (timm's counts less their learned position table)."""
  model = vit.create_model(name, num_classes=1000, image_size=224, patch_size=16)
  assert (model.hidden, model.depth, model.heads, model.mlp_dim) == (hidden, 12, heads,
                                                                      4 * hidden)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  assert abs(count / 1e6 - millions) / millions < 0.02, count


def test_width_and_depth_overrides_and_patch_sizes():
  assert vit.variant_dims("vit_ti", 0.25, 2) == (48, 2, 3, 192)
  assert vit.variant_dims("vit_s", 1.0) == vit.VARIANTS["vit_s"]
  assert [vit.default_patch_size(s) for s in (32, 48, 64, 96, 112, 224, 100)] == [
      4, 4, 8, 8, 16, 16, 10]
  with pytest.raises(UserError, match="multiple"):
    vit.create_model("vit_ti", num_classes=7, image_size=48, patch_size=5)
  with pytest.raises(UserError, match="not one of"):
    vit.create_model("vit_l", num_classes=7, image_size=48)
  model_config = types.SimpleNamespace(name="vit_ti", patch_size=0, readout="gap", width=0.25,
                                       depth=2, input_norm="none", dtype="bfloat16")
  model = vit.model_from_config(model_config, 7, 64)
  assert (model.patch_size, model.hidden, model.depth, model.readout) == (8, 48, 2, "gap")
  assert model.dtype == jnp.bfloat16


def test_sincos_2d_values():
  emb = vit.sincos_2d(3, 4, 16)
  assert emb.shape == (12, 16) and emb.dtype == np.float32
  # Patch (0, 0): sin(0) = 0 and cos(0) = 1 for both axes.
  np.testing.assert_array_equal(emb[0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  # Patch (row 2, column 1) is index 2 * 4 + 1; first half from the column, second from the row;
  # omega_i = 1 / 10000^(i / 4).
  omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
  expect = np.concatenate([np.sin(omega), np.cos(omega), np.sin(2 * omega), np.cos(2 * omega)])
  np.testing.assert_allclose(emb[9], expect, rtol=1e-6)
  # MAE's square-grid code, transcribed (get_2d_sincos_pos_embed without the cls row).
  grid = np.meshgrid(np.arange(5, dtype=np.float32), np.arange(5, dtype=np.float32))
  one_d = lambda pos: np.concatenate([np.sin(np.outer(pos.reshape(-1), 1 / 10000 ** (
      np.arange(8) / 8.0))), np.cos(np.outer(pos.reshape(-1), 1 / 10000 ** (np.arange(8) / 8.0)))],
      axis=1)
  mae = np.concatenate([one_d(grid[0]), one_d(grid[1])], axis=1)
  np.testing.assert_allclose(vit.sincos_2d(5, 5, 32), mae, atol=1e-6)


def test_other_input_size_with_the_same_parameters():
  """Initialised at 32 px (4x4 tokens), run at 48 px (6x6): embeddings recomputed, no params
  change shape."""
  model = _tiny()
  variables = _init(model, (1, 32, 32, 1))
  logits, features = _apply(model, variables, _images((2, 48, 48, 1)), train=False)
  assert logits.shape == (2, 7) and features.shape == (2, 32)
  assert np.all(np.isfinite(logits))
  with pytest.raises(UserError, match="not a multiple"):
    model.apply(variables, jnp.zeros((1, 36, 36, 1)), train=False)


def test_encode_on_visible_patches():
  model = _tiny()
  variables = _init(model, (1, 32, 32, 1))
  x = _images((2, 32, 32, 1))
  encode = jax.jit(lambda v, x, keep: model.apply(v, x, keep=keep, method=vit.ViT.encode))
  full = encode(variables, x, None)
  every = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
  np.testing.assert_allclose(encode(variables, x, every), full, atol=1e-5)
  keep = jnp.stack([jax.random.permutation(jax.random.key(i), 16)[:4] for i in range(2)])
  visible = encode(variables, x, keep.astype(jnp.int32))
  assert visible.shape == (2, 1 + 4, 32) and np.all(np.isfinite(visible))
  # Reordering the visible patches permutes their outputs (positions travel with the patches).
  flipped = encode(variables, x, keep[:, ::-1].astype(jnp.int32))
  np.testing.assert_allclose(flipped[:, 1:], visible[:, 1:][:, ::-1], atol=1e-5)
  np.testing.assert_allclose(flipped[:, 0], visible[:, 0], atol=1e-5)


def test_patchify_round_trip():
  x = _images((2, 24, 16, 3))
  patches = vit.patchify(x, 8)
  assert patches.shape == (2, 6, 8 * 8 * 3)
  np.testing.assert_array_equal(patches[0, 1], x[0, :8, 8:16].reshape(-1))  # row 0, column 1
  np.testing.assert_array_equal(vit.unpatchify(patches, 8, 24, 16, 3), x)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16)
  variables = _init(model, (1, 32, 32, 1))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  x = _images((2, 32, 32, 1))
  logits, features = _apply(model, variables, x, train=False)
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
  reference, _ = _apply(_tiny(), variables, x, train=False)
  np.testing.assert_allclose(logits, reference, atol=0.1)


@pytest.mark.slow
def test_the_classifier_trainer_trains_and_evaluates_a_vit(tiny_runs, tmp_path, capsys):
  """A ViT through `ferjax train` (with layer-wise lr decay) / `ferjax evaluate` (no BatchNorm:
  empty batch_stats), and the fields that belong to the other family refused in one line."""
  from badinput import expect_one_line
  from ferjax import cli
  vit_flags = ["--config.model.name=vit_ti", "--config.model.width=0.25",
               "--config.model.depth=2", "--config.optim.name=adamw", "--config.optim.lr=1e-3"]
  base = ["--config", str(tiny_runs.classifier_config)]
  workdir = tmp_path / "vit"
  assert cli.main(["train", *base, "--workdir", str(workdir), *vit_flags,
                   "--config.optim.layer_decay=0.75"]) == 0  # Layer-wise lr decay end to end.
  assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
  result = json.loads((workdir / "eval_test.json").read_text())
  assert result["step"] in (2, 4) and 0 <= result["mean_class_accuracy"] <= 1
  expect_one_line(["train", *base, "--workdir", tmp_path / "a", *vit_flags,
                   "--config.model.patch_size=5"], "model.patch_size", capsys)
  expect_one_line(["train", *base, "--workdir", tmp_path / "b", *vit_flags,
                   "--config.model.stem=standard"], "model.stem", capsys)
  expect_one_line(["train", *base, "--workdir", tmp_path / "c", "--config.model.readout=gap"],
                  "model.readout", capsys)


def test_layer_decay_scales_per_layer():
  """Embedding and class token are layer 0, block j layer j, norm and head L = depth + 1."""
  from ferjax.kinds import classifier
  params = _init(_tiny(depth=3), (1, 16, 16, 1))["params"]
  scales = classifier.layer_decay_scales(params, 0.5)
  assert set(scales) == {"embedding", "cls", "block1", "block2", "block3", "encoder_norm", "head"}
  want = {"embedding": 0.5 ** 4, "cls": 0.5 ** 4, "block1": 0.5 ** 3, "block2": 0.5 ** 2,
          "block3": 0.5, "encoder_norm": 1.0, "head": 1.0}
  for name, tree in scales.items():
    for value in jax.tree_util.tree_leaves(tree):
      assert value == pytest.approx(want[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_layer_decay_scales_one_optimizer_step(optimizer):
  """Same gradients, one step: with layer_decay 0.5 the patch embedding moves 0.5^3 as far as
  with 1.0 (depth 2), the head the same."""
  from ferjax.kinds import classifier
  params = _init(_tiny(), (1, 16, 16, 1))["params"]
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.3), params)
  updates = {}
  for decay in (1.0, 0.5):
    config = classifier.default_config()
    config.model.update(name="vit_ti", depth=2)
    config.optim.update(name=optimizer, lr=1e-2, schedule="constant", layer_decay=decay)
    tx, _ = classifier.make_optimizer(config, 10)
    updates[decay], _ = tx.update(grads, tx.init(params), params)
  full, half = updates[1.0], updates[0.5]
  moved = lambda u: float(jnp.abs(u["embedding"]["kernel"]).sum())  # noqa: E731
  assert 0 < moved(half) < moved(full)
  np.testing.assert_allclose(half["embedding"]["kernel"], 0.125 * full["embedding"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_allclose(half["block2"]["mlp"]["fc1"]["kernel"],
                             0.5 * full["block2"]["mlp"]["fc1"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(half["head"]["kernel"], full["head"]["kernel"])


def test_layer_decay_is_refused_with_a_resnet():
  from ferjax.kinds import classifier
  config = classifier.default_config()
  config.optim.layer_decay = 0.75
  with pytest.raises(UserError, match="optim.layer_decay") as error:
    classifier.validate_config(config)
  assert "\n" not in str(error.value)
  config.model.update(name="vit_ti", depth=2)
  classifier.validate_config(config)  # A ViT takes it.
