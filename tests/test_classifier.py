"""Classifier trainer: balancing policies, augmentations, config validation, and short runs.

The trainer runs use a stand-in dataset (class = image brightness, long-tailed) that a tiny
ResNet learns in a few dozen steps, so "clearly above chance" is testable in seconds; the real
synthetic set is exercised by the loader test and by the experiment configs.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferjax.data
from ferjax.data import Dataset
from ferjax.errors import UserError
from ferjax.models import resnet
from ferjax import runs
from ferjax.core import parallel
from ferjax.core.checkpoint import Checkpoints
from ferjax.data import splits
from ferjax.kinds import classifier as classifier_kind
from ferjax.train import classifier
from ferjax.kinds import classifier_batches

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
  config = classifier_kind.default_config()
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
  monkeypatch.setattr(splits, "load", stand_in_load)


# --- Config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("optim.lr", -0.1), ("optim.lr", 0.0), ("train.batch_size", 12), ("loss.name", "hinge"),
    ("sampler.name", "balanced"), ("model.name", "resnet101"), ("model.stem", "tiny"),
    ("data.val_split", "test"), ("data.channels", 2), ("augment.crop", "center"),
    ("train.best_metric", "test_accuracy"), ("optim.warmup_steps", 5000), ("loss.beta", 1.0),
    ("model.dtype", "float16"), ("train.num_devices", 64), ("eval.tta", "five_crop")])
def test_bad_config_values_name_the_field(field, value):
  config = classifier_kind.default_config()
  group, leaf = field.split(".")
  config[group][leaf] = value
  with pytest.raises(UserError, match=field.replace(".", r"\.")):
    classifier_kind.validate_config(config)


def test_drw_needs_class_weights():
  config = classifier_kind.default_config()
  config.loss.drw_start_step = 10
  with pytest.raises(UserError, match="loss.class_weights"):
    classifier_kind.validate_config(config)


def test_default_config_is_valid():
  classifier_kind.validate_config(classifier_kind.default_config())


# --- Validation split ----------------------------------------------------------------------------
def test_stratified_holdout_of_the_synthetic_train_split():
  config = classifier_kind.default_config()
  config.data.update(val_split=None, val_fraction=0.2, num_examples=350, image_size=32)
  train, val = splits.load_splits(config.data, config.seed)
  full = ferjax.data.load("synthetic", "train", num_examples=350, image_size=32)
  assert len(train) + len(val) == len(full)
  np.testing.assert_array_equal(train.class_counts() + val.class_counts(), full.class_counts())
  np.testing.assert_allclose(val.class_counts(), np.round(0.2 * full.class_counts()), atol=1)
  again = splits.load_splits(config.data, config.seed)[1]
  np.testing.assert_array_equal(again.images, val.images)  # seeded: the same hold-out each time


# --- Train step: compile once, 1 vs 8 devices, every switch at once -----------------------------
def _step_setup(config, num_devices):
  config.train.num_devices = num_devices
  mesh = parallel.make_mesh(num_devices)
  train = stand_in_load("synthetic", "train")
  counts = train.class_counts()
  model = resnet.model_from_config(config.model, 7)
  tx, _ = classifier_kind.make_optimizer(config, config.train.num_steps)
  state = classifier_kind.init_state(config, model, tx, mesh)
  data = classifier_batches.device_data(config, train.images, train.labels, 7, mesh)
  step = classifier.make_train_step(config, model, tx, counts, config.train.num_steps, mesh)
  return state, data, step


def _every_switch(config):
  """Sampling, augmentation, mixup, loss and EMA switches that all draw or use randomness."""
  config.loss.update(name="ldam", class_weights="effective", drw_start_step=2, label_smoothing=0.1)
  config.sampler.name = "oversample"
  config.augment.update(crop="resized", rotation_deg=10.0, erasing_prob=0.5, mixup_alpha=0.4)
  config.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, ema_decay=0.9)
  return config


@pytest.mark.slow
def test_one_and_eight_devices_agree_with_every_switch_on_and_compile_once():
  """Same sampled batch, same augmentation and mixup draws, same update on 1 and 8 devices,
  step after step for 20 steps. The step is a parallel.jit_once: had any of the 20 calls traced
  it again (a shape, dtype or static value that changed), that call would have raised."""
  results = {}
  for n in (1, 8):
    config = _every_switch(tiny_config(num_steps=20))
    classifier_kind.validate_config(config)
    state, data, train_step = _step_setup(config, n)
    losses = []
    for _ in range(20):
      state, metrics = train_step(state, data)
      assert all(np.isfinite(float(v)) for v in metrics.values())
      losses.append(float(metrics["loss"]))
    ema, params = classifier_kind.eval_variables(state)["params"], state.params
    assert not np.allclose(jax.tree.leaves(ema)[0], jax.tree.leaves(params)[0])
    results[n] = (jax.device_get(state.params), losses)
  # Measured: losses 1e-7 relative apart at most (the order of the cross-device sums), weights
  # 7e-6 absolute after 20 AdamW steps of lr 1e-3.
  np.testing.assert_allclose(results[1][1], results[8][1], rtol=1e-5)
  chex.assert_trees_all_close(results[1][0], results[8][0], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_a_step_that_would_compile_again_is_an_error():
  """Same shapes: the compiled step is reused. Train data of another shape would trace (and
  compile) the step again: refused at once, naming the cause."""
  config = tiny_config(num_steps=4)
  config.augment.update(crop="none", flip=False)
  state, data, train_step = _step_setup(config, 1)
  for _ in range(2):
    state, _ = train_step(state, data)
  train = stand_in_load("synthetic", "train")
  fewer = classifier_batches.device_data(config, train.images[:100], train.labels[:100], 7,
                                         parallel.make_mesh(1))
  assert fewer["images"].shape != data["images"].shape
  with pytest.raises(AssertionError, match="train_step was traced 2 times: a shape, dtype"):
    train_step(state, fewer)


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
  data = classifier_batches.device_data(config, train.images, train.labels, 7, mesh)
  data["synthesis"] = jnp.float32(0.25)
  seen = {}

  def synthesize(key, step, images, labels, weights, data):
    seen["range"] = (images.dtype, images.shape)
    assert set(data) >= {"images", "labels", "class_index", "synthesis"}
    return jnp.full_like(images, data["synthesis"]), jnp.zeros_like(labels), weights * 0.5

  make_batch = classifier_batches.batch_maker(config, data, num_steps=10, synthesize=synthesize)
  images, labels, weights = jax.jit(make_batch)(jax.random.key(0), 3)
  assert seen["range"] == (jnp.float32, (32, 32, 32, 1))
  np.testing.assert_allclose(images, 0.25)
  assert np.all(labels == 0) and np.allclose(weights, 0.5)


# --- Full runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """One 30-step run on the stand-in data (8 devices), shared by the tests below."""
  patch = pytest.MonkeyPatch()
  patch.setattr(splits, "load", stand_in_load)
  workdir = tmp_path_factory.mktemp("run")
  try:
    result = classifier.train_and_evaluate(tiny_config(), workdir)
  finally:
    patch.undo()
  return workdir, result


@pytest.mark.slow
def test_short_run_is_clearly_above_chance(trained_run):
  workdir, result = trained_run
  assert result["best"]["mean_class_accuracy"] > 0.5  # chance: 1/7
  for name in ("config.json", "metrics.jsonl", "curves.png"):
    assert (workdir / name).is_file()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("loss" in r and "images_per_s" in r for r in records)


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_equals_uninterrupted(trained_run, stand_in, tmp_path):
  """Stopped at step 10 (a checkpoint) and resumed: the same step-30 state as the shared run."""
  whole_dir, whole = trained_run
  classifier.train_and_evaluate(tiny_config(), tmp_path, stop_after=10)
  resumed = classifier.train_and_evaluate(tiny_config(), tmp_path)
  assert resumed["step"] == 30
  mesh = parallel.make_mesh()
  model = resnet.model_from_config(tiny_config().model, 7)
  target = classifier_kind.abstract_state(tiny_config(), model, mesh)
  states = []
  for workdir in (whole_dir, tmp_path):
    ckpt = Checkpoints(workdir / "checkpoints")
    states.append(jax.device_get(ckpt.restore(target, 30)[0]))
    ckpt.close()
  chex.assert_trees_all_equal(states[0], states[1])
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
  monkeypatch.setattr(splits, "load", stand_in_load)
  config = tiny_config()
  config.data.name = "fer2013"
  config.data.imbalance_ratio = 100.0
  train = splits.load_split(config.data, "train", train=True)
  np.testing.assert_array_equal(train.class_counts(), [120, 56, 26, 12, 6, 3, 1])
  assert len(splits.load_split(config.data, "test", train=False)) == 7 * 13  # test split untouched
  config.data.imbalance_ratio = 0.5
  with pytest.raises(UserError, match="data.imbalance_ratio"):
    classifier_kind.validate_config(config)


# --- The prior under a rebalancing sampler --------------------------------------------------------
@pytest.mark.parametrize("sampler,expected", [
    ("instance", [120, 80, 50, 30, 20, 12, 8]),
    ("class_balanced", [320 / 7] * 7),
    ("oversample", [120] * 7),
])
def test_prior_based_losses_get_the_sampled_distribution(sampler, expected):
  """Balanced softmax on class-balanced batches must not subtract the raw prior again: the
  prior a loss (and post-hoc adjustment) sees is that of the batches the sampler draws."""
  config = tiny_config()
  config.sampler.name = sampler
  config.loss.name = "balanced_softmax"
  classifier_kind.validate_config(config)
  np.testing.assert_allclose(classifier_kind.sampled_counts(config, TRAIN_COUNTS), expected,
                             rtol=1e-6)
  sqrt = classifier_kind.sampled_counts(_with(config, "sampler.name", "sqrt"), TRAIN_COUNTS)
  np.testing.assert_allclose(sqrt / sqrt.sum(), np.sqrt(TRAIN_COUNTS) / np.sqrt(TRAIN_COUNTS).sum(),
                             rtol=1e-6)


def _with(config, field, value):
  group, leaf = field.split(".")
  config[group][leaf] = value
  return config


@pytest.mark.parametrize("loss,weights", [("logit_adjusted", "none"), ("ldam", "none"),
                                          ("ce", "inverse")])
def test_progressive_sampling_with_a_prior_based_loss_is_refused(loss, weights):
  config = tiny_config()
  config.sampler.name = "progressive"
  config.loss.update(name=loss, class_weights=weights)
  with pytest.raises(UserError, match=r"'sampler\.name'.*progressive sampling changes the class "
                                      r"prior"):
    classifier_kind.validate_config(config)


@pytest.mark.slow
def test_a_trained_run_records_the_sampled_prior(stand_in, tmp_path):
  config = tiny_config(num_steps=3, eval_every=3, checkpoint_every=3)
  config.sampler.name = "class_balanced"
  config.loss.name = "logit_adjusted"
  classifier.train_and_evaluate(config, tmp_path)
  meta = runs.open_classifier(tmp_path, "latest").meta
  assert meta["train_counts"] == TRAIN_COUNTS
  np.testing.assert_allclose(meta["prior_counts"], [sum(TRAIN_COUNTS) / 7] * 7)
