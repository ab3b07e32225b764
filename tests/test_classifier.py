"""Classifier trainer: balancing policies, augmentations, config validation, and short runs.

The trainer runs use a stand-in dataset (class = image brightness, long-tailed) that a tiny
ResNet learns in a few dozen steps, so "clearly above chance" is testable in seconds; the real
synthetic set is exercised by the loader test and by the experiment configs.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferjax.data
from ferjax.data import Dataset, pipeline
from ferjax.errors import UserError
from ferjax.models import resnet
from ferjax.train import classifier, parallel
from ferjax.train.checkpoint import Checkpoints

NAMES = ("a", "b", "c", "d", "e", "f", "g")
TRAIN_COUNTS = [120, 80, 50, 30, 20, 12, 8]


def stand_in_load(name, split, *, image_size=32, channels=1, **unused):
  """Long-tailed 7-class set whose class is the image's brightness level, plus pixel noise."""
  counts = {"train": TRAIN_COUNTS, "validation": [10] * 7, "test": [13] * 7}[split]
  rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[split])
  labels = rng.permutation(np.repeat(np.arange(7), counts)).astype(np.int32)
  level = (labels + 0.5) / 7 * 255
  noise = rng.normal(0, 20, (len(labels), image_size, image_size, channels))
  images = np.clip(level[:, None, None, None] + noise, 0, 255).astype(np.uint8)
  return Dataset(images, labels, NAMES, name, split)


def tiny_config(**train):
  config = classifier.default_config()
  config.model.name = "resnet10"
  config.model.width = 0.125
  config.data.image_size = 32
  config.optim.warmup_steps = 2
  config.train.update(dict(num_steps=30, batch_size=32, log_every=5, eval_every=10,
                           checkpoint_every=10, keep_checkpoints=2))
  config.train.update(train)
  config.eval.batch_size = 32
  return config


@pytest.fixture
def stand_in(monkeypatch):
  monkeypatch.setattr(ferjax.data, "load", stand_in_load)


# --- Balancing policies --------------------------------------------------------------------------
COUNTS = np.array([400, 200, 100, 50, 25, 10, 5])
LABELS = np.repeat(np.arange(7), COUNTS).astype(np.int32)


def _class_frequencies(sampler, step=0, num_steps=100, draws=40_000):
  index = pipeline.class_index(jnp.asarray(LABELS), 7)
  sample = jax.jit(lambda key: pipeline.sample_indices(
      key, step, sampler=sampler, index=index, class_counts=index[2], batch_size=draws,
      num_steps=num_steps))
  indices = np.asarray(sample(jax.random.key(0)))
  return np.bincount(LABELS[indices], minlength=7) / draws


def test_instance_sampling_follows_class_frequencies():
  np.testing.assert_allclose(_class_frequencies("instance"), COUNTS / COUNTS.sum(), atol=0.01)


def test_class_balanced_sampling_draws_classes_uniformly():
  np.testing.assert_allclose(_class_frequencies("class_balanced"), np.full(7, 1 / 7), atol=0.01)


def test_square_root_sampling():
  root = np.sqrt(COUNTS)
  np.testing.assert_allclose(_class_frequencies("sqrt"), root / root.sum(), atol=0.01)


def test_progressive_sampling_moves_from_instance_to_balanced():
  np.testing.assert_allclose(_class_frequencies("progressive", step=0), COUNTS / COUNTS.sum(),
                             atol=0.01)
  np.testing.assert_allclose(_class_frequencies("progressive", step=99), np.full(7, 1 / 7),
                             atol=0.01)
  halfway = np.asarray(pipeline.sampler_class_probs("progressive", COUNTS, 0.5))
  np.testing.assert_allclose(halfway, 0.5 * COUNTS / COUNTS.sum() + 0.5 / 7, rtol=1e-5)


def test_sampling_within_a_class_is_uniform():
  index = pipeline.class_index(jnp.asarray(LABELS), 7)
  indices = np.asarray(pipeline.sample_indices(
      jax.random.key(1), 0, sampler="class_balanced", index=index, class_counts=index[2],
      batch_size=70_000, num_steps=1))
  rare = indices[LABELS[indices] == 6]  # the 5 examples of the rarest class
  np.testing.assert_allclose(np.bincount(rare - rare.min(), minlength=5) / len(rare),
                             np.full(5, 0.2), atol=0.02)


def test_random_oversampling_balances_every_epoch_and_keeps_every_example():
  order = pipeline.oversampled_order(LABELS, 7, seed=0)
  assert len(order) == 7 * COUNTS.max()
  np.testing.assert_array_equal(np.bincount(LABELS[order], minlength=7), np.full(7, COUNTS.max()))
  assert set(order.tolist()) == set(range(len(LABELS)))
  # Whole repeats plus a remainder drawn without replacement: counts differ by at most one.
  per_example = np.bincount(order, minlength=len(LABELS))
  for k in range(7):
    members = per_example[LABELS == k]
    assert members.max() - members.min() <= 1
  # Walking epochs batch by batch: one epoch is exactly a permutation of the over-sampled set,
  # and a batch straddling two epochs is computed the same way as any other (resume-exact).
  batch, length = 100, len(order)
  walk = jax.jit(lambda step: pipeline.sample_epochs(jax.random.key(3), jnp.asarray(order), step,
                                                     batch))
  first_epoch = np.concatenate([np.asarray(walk(s)) for s in range(length // batch)])
  np.testing.assert_array_equal(np.sort(first_epoch), np.sort(order))
  np.testing.assert_array_equal(np.asarray(walk(5)), np.asarray(walk(5)))


# --- Augmentation ------------------------------------------------------------------------------
def _image(seed=0, size=16, channels=1):
  return jax.random.uniform(jax.random.key(seed), (size, size, channels), minval=-1, maxval=1)


def test_random_crop_is_a_shifted_window_of_the_reflect_padded_image():
  image = _image()
  np.testing.assert_array_equal(pipeline.random_crop_one(jax.random.key(0), image, 0), image)
  padded = np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0)), mode="reflect")
  windows = [padded[dy:dy + 16, dx:dx + 16] for dy in range(9) for dx in range(9)]
  for seed in range(5):
    crop = np.asarray(pipeline.random_crop_one(jax.random.key(seed), image, 4))
    assert crop.shape == image.shape
    assert any(np.array_equal(crop, w) for w in windows)


def test_rotation_by_a_quarter_turn_is_rot90_and_zero_is_identity():
  image = _image(size=9)
  np.testing.assert_allclose(pipeline.rotate(image, 0.0), image, atol=1e-5)
  np.testing.assert_allclose(pipeline.rotate(image, np.pi / 2), np.rot90(np.asarray(image)),
                             atol=1e-5)
  np.testing.assert_array_equal(pipeline.random_rotation_one(jax.random.key(0), image, 0), image)


def test_resized_crop_of_the_whole_image_is_the_identity():
  image = _image()
  same = pipeline.random_resized_crop_one(jax.random.key(0), image, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(same, image, atol=1e-5)
  crop = pipeline.random_resized_crop_one(jax.random.key(1), image, (0.3, 0.5))
  assert crop.shape == image.shape
  assert float(crop.min()) >= float(image.min()) - 1e-6
  assert float(crop.max()) <= float(image.max()) + 1e-6


def test_random_erasing_sets_one_box_and_leaves_the_rest():
  image = _image(size=32) * 0.5 + 0.5  # strictly positive: the erased value 0 stands out
  np.testing.assert_array_equal(pipeline.random_erasing_one(jax.random.key(0), image, 0.0), image)
  for seed in range(5):
    erased = np.asarray(pipeline.random_erasing_one(jax.random.key(seed), image, 1.0))[..., 0]
    rows, cols = np.nonzero(erased == 0)
    assert len(rows) > 0
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    assert np.all(erased[box] == 0)  # one solid rectangle
    assert 0.02 * 32 * 32 * 0.5 <= len(rows) <= 0.33 * 32 * 32 * 1.5
    outside = np.ones_like(erased, bool)
    outside[box] = False
    np.testing.assert_array_equal(erased[outside], np.asarray(image)[..., 0][outside])


def test_flip_mirrors_or_keeps():
  image = _image()
  for seed in range(4):
    out = np.asarray(pipeline.flip_one(jax.random.key(seed), image))
    assert np.array_equal(out, image) or np.array_equal(out, np.asarray(image)[:, ::-1])


def test_mixup_is_a_per_example_convex_combination():
  images = jax.random.uniform(jax.random.key(0), (8, 4, 4, 1))
  labels = jnp.arange(8)
  mixed, partner_labels, lam = jax.jit(pipeline.mixup, static_argnums=3)(
      jax.random.key(1), images, labels, 0.4)
  assert mixed.shape == images.shape and lam.shape == (8,)
  assert np.all((lam >= 0) & (lam <= 1))
  partner = np.asarray(partner_labels)  # labels are the example indices here
  expected = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[partner]
  np.testing.assert_allclose(mixed, expected, rtol=1e-5)
  assert sorted(partner.tolist()) == list(range(8))


def test_augment_batch_keeps_shape_dtype_and_range():
  config = classifier.default_config().augment
  config.update(crop="resized", rotation_deg=10.0, erasing_prob=0.5)
  images = jax.random.uniform(jax.random.key(0), (6, 32, 32, 3), minval=-1, maxval=1)
  out = jax.jit(lambda k, x: pipeline.augment_batch(k, x, config))(jax.random.key(1), images)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert float(jnp.abs(out).max()) <= 1.0 + 1e-5


# --- Config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("optim.lr", -0.1), ("optim.lr", 0.0), ("train.batch_size", 12), ("loss.name", "hinge"),
    ("sampler.name", "balanced"), ("model.name", "resnet101"), ("model.stem", "tiny"),
    ("data.val_split", "test"), ("data.channels", 2), ("augment.crop", "center"),
    ("train.best_metric", "test_accuracy"), ("optim.warmup_steps", 5000), ("loss.beta", 1.0),
    ("model.dtype", "float16"), ("train.num_devices", 64), ("eval.tta", "five_crop")])
def test_bad_config_values_name_the_field(field, value):
  config = classifier.default_config()
  group, leaf = field.split(".")
  config[group][leaf] = value
  with pytest.raises(UserError, match=field.replace(".", r"\.")):
    classifier.validate_config(config)


def test_drw_needs_class_weights():
  config = classifier.default_config()
  config.loss.drw_start_step = 10
  with pytest.raises(UserError, match="loss.class_weights"):
    classifier.validate_config(config)


def test_default_config_is_valid():
  classifier.validate_config(classifier.default_config())


# --- Validation split ----------------------------------------------------------------------------
def test_stratified_holdout_of_the_synthetic_train_split():
  config = classifier.default_config()
  config.data.update(val_split=None, val_fraction=0.2, num_examples=350, image_size=32)
  train, val = classifier.load_splits(config)
  full = ferjax.data.load("synthetic", "train", num_examples=350, image_size=32)
  assert len(train) + len(val) == len(full)
  np.testing.assert_array_equal(train.class_counts() + val.class_counts(), full.class_counts())
  np.testing.assert_allclose(val.class_counts(), np.round(0.2 * full.class_counts()), atol=1)
  again = classifier.load_splits(config)[1]
  np.testing.assert_array_equal(again.images, val.images)  # seeded: the same hold-out each time


# --- Train step: compile once, 1 vs 8 devices, every switch at once -----------------------------
def _step_setup(config, num_devices):
  config.train.num_devices = num_devices
  mesh = parallel.make_mesh(num_devices)
  train = stand_in_load("synthetic", "train")
  counts = train.class_counts()
  model = resnet.model_from_config(config.model, 7)
  tx, _ = classifier.make_optimizer(config, config.train.num_steps)
  state = classifier.init_state(config, model, tx, mesh)
  data = classifier.device_data(config, train.images, train.labels, 7, mesh)
  step = classifier.make_train_step(config, model, tx, counts, config.train.num_steps, mesh)
  return state, data, step


def _every_switch(config):
  """Sampling, augmentation, mixup, loss and EMA switches that all draw or use randomness."""
  config.loss.update(name="ldam", class_weights="effective", drw_start_step=2, label_smoothing=0.1)
  config.sampler.name = "oversample"
  config.augment.update(crop="resized", rotation_deg=10.0, erasing_prob=0.5, mixup_alpha=0.4)
  config.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, ema_decay=0.9)
  return config


def test_one_and_eight_devices_agree_with_every_switch_on_and_compile_once():
  """Same sampled batch, same augmentation and mixup draws, same update on 1 and 8 devices,
  step after step for 20 steps."""
  results = {}
  for n in (1, 8):
    config = _every_switch(tiny_config(num_steps=20))
    classifier.validate_config(config)
    state, data, train_step = _step_setup(config, n)
    losses = []
    for _ in range(20):
      state, metrics = train_step(state, data)
      assert all(np.isfinite(float(v)) for v in metrics.values())
      losses.append(float(metrics["loss"]))
    assert train_step._cache_size() == 1  # No retracing across steps.
    ema, params = classifier.eval_variables(state)["params"], state.params
    assert not np.allclose(jax.tree.leaves(ema)[0], jax.tree.leaves(params)[0])
    results[n] = (jax.device_get(state.params), losses)
  # Measured: losses 1e-7 relative apart at most (the order of the cross-device sums), weights
  # 7e-6 absolute after 20 AdamW steps of lr 1e-3.
  np.testing.assert_allclose(results[1][1], results[8][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               results[1][0], results[8][0])


def test_train_images_are_split_by_rows_over_the_devices():
  """Each of 8 devices holds 1/8 of the (zero-padded) images; a batch gathered from them by
  global indices inside jit equals numpy indexing of the host array."""
  mesh = parallel.make_mesh(8)
  rows = np.random.default_rng(0).integers(0, 256, (61, 4, 4, 1), dtype=np.uint8)
  placed = parallel.put_rows(rows, mesh)
  assert placed.shape == (64, 4, 4, 1)
  shards = sorted(placed.addressable_shards, key=lambda s: s.index[0].start)
  assert [s.data.shape[0] for s in shards] == [8] * 8
  np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards])[:61], rows)
  assert not np.asarray(shards[-1].data)[5:].any()  # Padding rows are zeros.
  indices = jnp.asarray([60, 0, 7, 8, 33, 33, 59, 1], jnp.int32)
  gathered = jax.jit(lambda images, i: images[i],
                     out_shardings=parallel.batch_sharding(mesh))(placed, indices)
  np.testing.assert_array_equal(np.asarray(gathered), rows[np.asarray(indices)])


def test_lazily_read_rows_go_to_the_devices_a_chunk_at_a_time():
  """`put_rows` of a LazyImages never asks for more than rows_per_read rows at once, and each
  process (here: the one) reads only rows its devices hold, each once."""
  rows = np.random.default_rng(1).integers(0, 256, (50, 3, 3, 1), dtype=np.uint8)
  reads = []

  def read(indices):
    reads.append(np.asarray(indices))
    return rows[indices]

  placed = parallel.put_rows(ferjax.data.LazyImages(read, np.arange(50), (3, 3, 1)),
                             parallel.make_mesh(4), rows_per_read=5)
  assert max(len(r) for r in reads) <= 5
  np.testing.assert_array_equal(np.sort(np.concatenate(reads)), np.arange(50))
  np.testing.assert_array_equal(np.asarray(placed)[:50], rows)


def test_batch_maker_exposes_the_synthesis_seam():
  """A synthesis stage sees the gathered float batch and its edits reach the loss."""
  config = tiny_config()
  config.augment.update(crop="none", flip=False)
  mesh = parallel.make_mesh(1)
  train = stand_in_load("synthetic", "train")
  data = classifier.device_data(config, train.images, train.labels, 7, mesh)
  data["synthesis"] = jnp.float32(0.25)
  seen = {}

  def synthesize(key, step, images, labels, weights, data):
    seen["range"] = (images.dtype, images.shape)
    assert set(data) >= {"images", "labels", "class_index", "synthesis"}
    return jnp.full_like(images, data["synthesis"]), jnp.zeros_like(labels), weights * 0.5

  make_batch = classifier.batch_maker(config, data, num_steps=10, synthesize=synthesize)
  images, labels, weights = jax.jit(make_batch)(jax.random.key(0), 3)
  assert seen["range"] == (jnp.float32, (32, 32, 32, 1))
  np.testing.assert_allclose(images, 0.25)
  assert np.all(labels == 0) and np.allclose(weights, 0.5)


# --- Full runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """One 30-step run on the stand-in data (8 devices), shared by the tests below."""
  patch = pytest.MonkeyPatch()
  patch.setattr(ferjax.data, "load", stand_in_load)
  workdir = tmp_path_factory.mktemp("run")
  try:
    result = classifier.train_and_evaluate(tiny_config(), workdir)
  finally:
    patch.undo()
  return workdir, result


def test_short_run_is_clearly_above_chance(trained_run):
  workdir, result = trained_run
  assert result["best"]["mean_class_accuracy"] > 0.5  # chance: 1/7
  for name in ("config.json", "metrics.jsonl", "curves.png"):
    assert (workdir / name).is_file()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("loss" in r and "images_per_s" in r for r in records)


def test_best_checkpoint_is_chosen_on_validation(trained_run):
  workdir, result = trained_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  val = [(r["val_mean_class_accuracy"], -r["step"]) for r in records
         if "val_mean_class_accuracy" in r]
  best_value, neg_step = max(val)  # the first step reaching the best value
  assert result["best_step"] == -neg_step
  assert np.isclose(result["best"]["mean_class_accuracy"], best_value)
  ckpt = Checkpoints(workdir / "checkpoints", best_metric="mean_class_accuracy")
  assert ckpt.best_step() == -neg_step and ckpt.read_meta("best")["val_split"] == "validation"
  assert ckpt.latest_step() == 30
  ckpt.close()


def test_resume_equals_uninterrupted(trained_run, stand_in, tmp_path):
  """Stopped at step 10 (a checkpoint) and resumed: the same step-30 state as the shared run."""
  whole_dir, whole = trained_run
  classifier.train_and_evaluate(tiny_config(), tmp_path, stop_after=10)
  resumed = classifier.train_and_evaluate(tiny_config(), tmp_path)
  assert resumed["step"] == 30
  mesh = parallel.make_mesh()
  model = resnet.model_from_config(tiny_config().model, 7)
  target = classifier.abstract_state(tiny_config(), model, mesh)
  states = []
  for workdir in (whole_dir, tmp_path):
    ckpt = Checkpoints(workdir / "checkpoints")
    states.append(jax.device_get(ckpt.restore(target, 30)[0]))
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
  assert whole["best_step"] == resumed["best_step"] and whole["best"] == resumed["best"]
  assert whole["last"] == resumed["last"]


def test_long_tail_subset_is_geometric_fixed_and_for_real_train_splits_only(monkeypatch):
  from ferjax.data.dataset import long_tail_subset
  labels = np.repeat(np.arange(4), [50, 400, 100, 200]).astype(np.int32)
  keep = long_tail_subset(labels, 4, 10.0)
  counts = np.bincount(labels[keep], minlength=4)
  # Natural order 1 > 3 > 2 > 0: 400, 400 * 10^(-1/3), 400 * 10^(-2/3) capped at 100, 40.
  np.testing.assert_array_equal(counts, [40, 400, 86, 186])
  np.testing.assert_array_equal(keep, long_tail_subset(labels, 4, 10.0))  # same subset each time
  monkeypatch.setattr(ferjax.data, "load", stand_in_load)
  config = tiny_config()
  config.data.name = "fer2013"
  config.data.imbalance_ratio = 100.0
  train = classifier.load_dataset(config, "train")
  np.testing.assert_array_equal(train.class_counts(), [120, 56, 26, 12, 6, 3, 1])
  assert len(classifier.load_dataset(config, "test")) == 7 * 13  # test split untouched
  config.data.imbalance_ratio = 0.5
  with pytest.raises(UserError, match="data.imbalance_ratio"):
    classifier.validate_config(config)
