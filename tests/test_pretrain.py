"""`ferjax pretrain`: MAE masking and loss against their definitions, unlabeled sources, a tiny
pre-training run (its loss falls), a classifier starting from its encoder, and bad input as one
line. Exact resume after SIGKILL: tests/test_trust.py, for every trainer."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from badinput import expect_one_line
from conftest import TINY_CLASSIFIER_CONFIG
from PIL import Image

from ferjax import cli, configs, runs
from ferjax.core import monitor, parallel
from ferjax.data import unlabeled
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import pretrain as kind
from ferjax.models import mae, vit
from ferjax.train import pretrain

TINY = '''"""A 30-step MAE of a 2-block ViT-Ti at width 0.25 on 256 synthetic 32 px faces."""
from ferjax.kinds import pretrain


def get_config():
  config = pretrain.default_config()
  config.data.update(sources="synthetic", image_size=32, channels=1, num_examples=256,
                     val_fraction=0.125)
  config.model.update(name="vit_ti", width=0.25, depth=2, patch_size=4)
  config.mae.update(decoder_width=32, decoder_depth=1, decoder_heads=4)
  config.optim.update(lr=1e-3, warmup_steps=3)
  config.train.update(num_steps=30, batch_size=32, num_devices=1, log_every=10, eval_every=15,
                      checkpoint_every=15)
  return config
'''
VIT_FLAGS = dict(name="vit_ti", width=0.25, depth=2, patch_size=4)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(config file, workdir) of one finished tiny pre-training run, trained through the CLI."""
  root = tmp_path_factory.mktemp("pretrain")
  config_file = root / "tiny.py"
  config_file.write_text(TINY)
  assert cli.main(["pretrain", "--config", str(config_file), "--workdir", str(root / "run")]) == 0
  return config_file, root / "run"


def leaves(tree) -> dict:
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


# --- Masking and loss -----------------------------------------------------------------------------
def test_random_masking_keeps_its_share_and_partitions_the_patches():
  keep, mask, ids_restore = mae.random_masking(jax.random.PRNGKey(3), 4, 64, 0.75)
  keep, mask, ids_restore = map(np.asarray, (keep, mask, ids_restore))
  assert keep.shape == (4, 16) and keep.dtype == np.int32 and mask.shape == (4, 64)
  np.testing.assert_array_equal(mask.sum(1), [48] * 4)
  for b in range(4):
    masked = np.flatnonzero(mask[b])
    assert len(set(keep[b])) == 16 and not set(keep[b]) & set(masked)
    assert sorted([*keep[b], *masked]) == list(range(64))
    # ids_restore undoes MAE's shuffle: kept patches first, then the masked ones.
    shuffle = np.argsort(ids_restore[b])
    np.testing.assert_array_equal(shuffle[:16], keep[b])
    np.testing.assert_array_equal(shuffle[ids_restore[b]], np.arange(64))
  assert not np.array_equal(keep[0], keep[1])  # Each image its own mask.
  assert mae.num_kept(100, 0.9) == 10 and mae.num_kept(144, 0.75) == 36


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_is_the_mean_over_masked_patches_of_the_patch_mse(norm_pix_loss):
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(3, 16, 12)).astype(np.float32)
  target = rng.uniform(-1, 1, size=(3, 16, 12)).astype(np.float32)
  mask = (rng.uniform(size=(3, 16)) < 0.75).astype(np.float32)
  want_target = target
  if norm_pix_loss:  # MAE: (t - mean) / sqrt(var + 1e-6), torch's unbiased variance.
    want_target = ((target - target.mean(-1, keepdims=True))
                   / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6))
  per_patch = ((pred - want_target) ** 2).mean(-1)
  want = (per_patch * mask).sum() / mask.sum()
  got = mae.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), norm_pix_loss)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  per_image = mae.per_image_loss(pred, target, mask, norm_pix_loss)
  np.testing.assert_allclose(per_image, (per_patch * mask).sum(1) / mask.sum(1), rtol=1e-5)


def test_reconstruction_keeps_the_visible_patches():
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1), minval=-1, maxval=1)
  _, mask, _ = mae.random_masking(jax.random.PRNGKey(2), 2, 4, 0.5)
  recon = mae.reconstruct(jnp.full((2, 4, 16), 0.5), images, mask, 4, norm_pix_loss=False)
  patches, mask = np.asarray(vit.patchify(recon, 4)), np.asarray(mask)
  np.testing.assert_array_equal(patches[mask == 0], np.asarray(vit.patchify(images, 4))[mask == 0])
  np.testing.assert_array_equal(patches[mask == 1], 0.5)


# --- Random-resized crop (augment.crop_scale) -----------------------------------------------------
def test_random_resized_crop_keeps_shape_is_keyed_and_crops():
  from ferjax.data import pipeline
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 1), minval=-1, maxval=1)
  crop = jax.jit(pipeline.random_resized_crop, static_argnums=(2, 3))
  mae_crop = ((0.2, 1.0), (3 / 4, 4 / 3))
  a = crop(jax.random.PRNGKey(1), images, *mae_crop)
  assert a.shape == images.shape and a.dtype == images.dtype
  np.testing.assert_array_equal(a, crop(jax.random.PRNGKey(1), images, *mae_crop))
  assert not np.allclose(a, crop(jax.random.PRNGKey(2), images, *mae_crop))
  assert all(not np.allclose(a[i], images[i], atol=1e-3) for i in range(4))  # Each one cropped.
  assert float(jnp.abs(a).max()) <= 1.0 + 1e-6  # Bilinear: inside the input's range.
  whole = crop(jax.random.PRNGKey(1), images, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(whole, images, atol=1e-6)  # The whole image, unscaled.
  # A quarter of the area, square: the crop is a smooth 2x upsampling (ratio 1 keeps 8x8).
  small = crop(jax.random.PRNGKey(1), images, (0.25, 0.25), (1.0, 1.0))
  roughness = lambda x: float(jnp.abs(jnp.diff(x, axis=1)).mean())  # noqa: E731
  assert roughness(small) < roughness(images)


# --- Unlabeled sources ----------------------------------------------------------------------------
def test_sources_parse_names_folders_and_weights():
  parsed = unlabeled.parse_sources("synthetic:2, folder:/data/a:b/faces:0.5,folder:/x:3:1")
  assert [(s.name, s.path, s.weight) for s in parsed] == [
      ("synthetic", None, 2.0), ("folder", "/data/a:b/faces", 0.5), ("folder", "/x:3", 1.0)]
  for bad, needle in [("", "data.sources"), ("nope", "nope"), ("synthetic:0", "weight"),
                      ("folder:", "names no folder"), ("synthetic,synthetic", "twice"),
                      ("folder", "folder")]:
    with pytest.raises(UserError, match=needle):
      unlabeled.parse_sources(bad)


def faces_folder(root, broken=True):
  """Images of every kind under `root` (nested, RGB and gray, odd sizes) and broken files."""
  (root / "a" / "b").mkdir(parents=True)
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(root / "one.jpg")
  Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "a" / "two.png")
  Image.fromarray(np.full((64, 64), 90, np.uint8)).save(root / "a" / "b" / "three.bmp")
  (root / ".hidden.png").write_bytes(b"ignored")
  if broken:
    (root / "notes.txt").write_text("not an image\n")
    (root / "a" / "cut.png").write_bytes((root / "a" / "two.png").read_bytes()[:30])
  return root


def test_folder_source_reads_every_image_and_skips_broken_ones_in_one_line(tmp_path, capsys):
  images = unlabeled.read_folder(faces_folder(tmp_path / "faces"), image_size=16, channels=1)
  assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
  assert sorted(int(images[i].mean()) for i in range(3)) == [0, 90, 200]
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "skipped 2 of 5" in err[0] and str(tmp_path / "faces") in err[0]


def test_pool_holds_out_distinct_images_and_weights_sources(tmp_path):
  config = kind.default_config()
  folder = faces_folder(tmp_path / "faces", broken=False)
  config.data.update(sources=f"folder:{folder}:2", image_size=16, val_fraction=0.34)
  pool = unlabeled.load_pool(config.data, seed=0)
  assert len(pool.val) == 1 and len(pool.train) == 4  # 2 distinct images, each twice.
  assert pool.counts == {f"folder:{folder}": (2, 1)}
  assert not any(np.array_equal(pool.val[0], image) for image in pool.train)


def test_pool_leaves_out_the_validation_split_when_asked(tmp_path):
  """data.include_validation=False (ssfer.py --report-split validation): FER-2013's PublicTest
  images stay out of the pool; the test split is out either way (data.include_test)."""
  from test_builders import make_fer_folders
  values = make_fer_folders(tmp_path / "raw", per_class=1)  # Constant images, value = identity.
  config = kind.default_config()
  config.data.update(sources="fer2013", image_size=48, val_fraction=0.0,
                     manual_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "data"))
  seen = lambda pool: sorted(int(round(float(image.mean()))) for image in pool.train)  # noqa: E731
  split_values = lambda split: sorted(v for (s, _), vs in values.items() if s == split  # noqa: E731
                                      for v in vs)
  assert seen(unlabeled.load_pool(config.data, seed=0)) == sorted(
      split_values("train") + split_values("validation"))
  config.data.include_validation = False
  assert seen(unlabeled.load_pool(config.data, seed=0)) == split_values("train")


# --- Training -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretraining_loss_falls_and_writes_its_files(pretrained):
  _, workdir = pretrained
  records = monitor.read_metrics(workdir)
  losses = [r["loss"] for r in records if "loss" in r]
  assert [r["step"] for r in records if "loss" in r] == [10, 15, 20, 30]
  assert losses[-1] < 0.8 * losses[0], losses
  assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
  for name in ("reconstructions.png", "curves.png", "samples/reconstructions_0000015.png"):
    assert (workdir / name).is_file(), name
  with Image.open(workdir / "reconstructions.png") as grid:  # 3 rows of 8 faces, scale 3.
    assert grid.size == (3 * (8 * 34 + 2), 3 * (3 * 34 + 2))
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 30 and summary["images"] == {
      "synthetic": {"train": 224, "held_out": 32}}


@pytest.mark.slow
def test_one_and_eight_devices_agree(pretrained):
  config = configs.load_config(pretrained[0])
  config.augment.crop_scale = (0.2, 1.0)  # The crops too: keyed per image, not per shard.
  images = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 1), dtype=np.uint8)
  results = []
  for n in (1, 8):
    config.train.num_devices = n
    mesh = parallel.make_mesh(n)
    models = kind.build_models(config)
    state = kind.init_state(config, models, mesh)
    step = pretrain.make_train_step(models, config, mesh, len(images))
    data = parallel.put_rows(images, mesh)
    losses = []
    for _ in range(2):
      state, metrics = step(state, data)
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-7, atol=1e-4)


def test_a_vit_classifier_starts_from_the_pretrained_encoder(pretrained, tmp_path):
  _, workdir = pretrained
  encoder = leaves(runs.open_pretrain(workdir).encoder_variables)
  (tmp_path / "c.py").write_text(TINY_CLASSIFIER_CONFIG)
  config = configs.load_config(tmp_path / "c.py")
  config.model.update(init_from=str(workdir), **VIT_FLAGS)
  model = classifier_kind.build_model(config, 7)
  tx, _ = classifier_kind.make_optimizer(config)
  state = classifier_kind.init_state(config, model, tx, parallel.make_mesh(1))
  got = leaves(runs.initial_weights(config, state, ("x",) * 7))
  fresh = leaves({"params": state.params})
  assert set(got) == set(encoder) | {"params/head/kernel", "params/head/bias"}
  chex.assert_trees_all_equal({name: got[name] for name in encoder}, encoder)
  np.testing.assert_array_equal(got["params/head/kernel"], fresh["params/head/kernel"])

  config.model.width = 0.5  # Another ViT shape: one line naming the first parameter that differs.
  model = classifier_kind.build_model(config, 7)
  state = classifier_kind.init_state(config, model, tx, parallel.make_mesh(1))
  with pytest.raises(UserError, match=r"model.init_from .*params/block1/.* has shape"):
    runs.initial_weights(config, state, ("x",) * 7)


# --- Bad input: one line, exit 2, nothing written -------------------------------------------------
def _empty_folder(t):
  folder = t / "nothing"
  folder.mkdir()
  (folder / "readme.txt").write_text("no faces here\n")
  (folder / "broken.png").write_bytes(b"\x89PNG not really")
  return folder


def _classifier_workdir(t):
  """A workdir recorded as a classifier run (all the workdir guard reads)."""
  workdir = t / "classifier"
  workdir.mkdir()
  (workdir / "run.json").write_text(json.dumps({"kind": "classifier"}) + "\n")
  return workdir


def _classifier(t, *flags):
  (t / "c.py").write_text(TINY_CLASSIFIER_CONFIG)
  return ["train", "--config", t / "c.py", "--workdir", t / "w", *flags]


# id -> (argv builder (tmp_path, config file, pretrain workdir), needles)
BAD = {
    "folder-without-images": (
        lambda t, c, w: ["pretrain", "--config", c, "--workdir", t / "w",
                         f"--config.data.sources=folder:{_empty_folder(t)}"],
        ["nothing", "no readable image"]),
    "mask-ratio-above-1": (lambda t, c, w: ["pretrain", "--config", c, "--workdir", t / "w",
                                            "--config.mae.mask_ratio=1.5"], "mae.mask_ratio"),
    "mask-ratio-keeps-nothing": (lambda t, c, w: ["pretrain", "--config", c, "--workdir", t / "w",
                                                  "--config.mae.mask_ratio=0.99"],
                                 "mae.mask_ratio"),
    "mask-ratio-zero": (lambda t, c, w: ["pretrain", "--config", c, "--workdir", t / "w",
                                         "--config.mae.mask_ratio=0"], "mae.mask_ratio"),
    "unknown-source": (lambda t, c, w: ["pretrain", "--config", c, "--workdir", t / "w",
                                        "--config.data.sources=synthetic,celeba"],
                       ["data.sources", "celeba"]),
    "resnet-from-a-pretrain-run": (lambda t, c, w: _classifier(
        t, f"--config.model.init_from={w}"), ["model.init_from", "model.name", "resnet10"]),
    "evaluate-a-pretrain-run": (lambda t, c, w: ["evaluate", "--workdir", w],
                                "pre-training run"),
    "pretrain-into-a-classifier-run": (lambda t, c, w: [
        "pretrain", "--config", c, "--workdir", _classifier_workdir(t)], "classifier run"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(case, pretrained, tmp_path, capsys):
  config_file, workdir = pretrained
  build, needle = BAD[case]
  argv = build(tmp_path, config_file, workdir)
  expect_one_line(argv, needle, capsys, protect=[workdir, tmp_path])
  assert not (tmp_path / "w").exists()  # Nothing half-written.
