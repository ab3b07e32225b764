"""`ferjax train-semisup`: RandAugment ops, FlexMatch thresholds and the pseudo-label loss against
their formulas, a tiny end-to-end run (pseudo-label metrics, evaluation of its teacher), 1 and 8
devices agreeing, and bad input as one line. Exact resume after SIGKILL: tests/test_trust.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from badinput import expect_one_line

from ferjax import cli, evaluate, runs
from ferjax.core import checkpoint, monitor, parallel
from ferjax.data import randaugment
from ferjax.errors import UserError
from ferjax.kinds import classifier_batches
from ferjax.kinds import semisup as kind
from ferjax.train import semisup

TINY = '''"""A 6-step semi-supervised ResNet-10 (width 1/8) on 32 px synthetic faces."""
from ferjax.kinds import semisup


def get_config():
  config = semisup.default_config()
  config.data.update(name="synthetic", image_size=32, channels=1, num_examples=210,
                     label_fraction=0.2)
  config.model.update(name="resnet10", width=0.125)
  config.augment.update(crop="pad", crop_padding=2)
  config.optim.update(name="adamw", lr=1e-3, warmup_steps=1)
  config.semisup.update(threshold_mode="flexmatch", ratio=2, ema_decay=0.9, randaugment_ops=1)
  config.train.update(num_steps=6, batch_size=8, num_devices=1, log_every=2, eval_every=3,
                      checkpoint_every=3)
  config.eval.batch_size = 64
  return config
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config file, workdir) of one finished tiny run, trained through the CLI."""
  root = tmp_path_factory.mktemp("semisup")
  config_file = root / "tiny.py"
  config_file.write_text(TINY)
  assert cli.main(["train-semisup", "--config", str(config_file),
                   "--workdir", str(root / "run")]) == 0
  return config_file, root / "run"


# --- RandAugment ----------------------------------------------------------------------------------
def _faces(channels, n=3, size=16):
  return jax.random.uniform(jax.random.PRNGKey(channels), (n, size, size, channels),
                            minval=-1.0, maxval=1.0)


@pytest.mark.slow
def test_rand_augment_shape_range_and_determinism():
  images = _faces(1)  # (every op on 3 channels: the next test)
  fn = jax.jit(lambda k, x: randaugment.rand_augment_batch(k, x, 2, 10.0))
  a = fn(jax.random.PRNGKey(0), images)
  assert a.shape == images.shape and a.dtype == images.dtype
  assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, fn(jax.random.PRNGKey(0), images))
  assert not np.allclose(a, fn(jax.random.PRNGKey(1), images))


@pytest.mark.slow
def test_every_op_runs_under_jit_and_vmap():
  images = _faces(3)
  keys = jax.random.split(jax.random.PRNGKey(0), len(images))
  for index, name in enumerate(randaugment.OP_NAMES):
    op = jax.jit(jax.vmap(lambda k, x, i=index: randaugment.apply_op(i, k, x, 0.8)))
    out = np.asarray(op(keys, images))
    assert out.shape == images.shape and np.all(np.isfinite(out)), name
    assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5, name
    if name != "identity":
      assert not np.allclose(out, images), f"{name} left the images unchanged"


def test_ops_at_level_zero_are_identities_where_they_should_be():
  x = _faces(1)[0]
  for name in ("brightness", "contrast", "sharpness", "posterize", "rotate", "shear_x",
               "translate_y", "cutout"):
    op = getattr(randaugment, name)
    # posterize keeps all 8 bits: the image rounded to 8 bits.
    np.testing.assert_allclose(op(jax.random.PRNGKey(0), x, 0.0), x, atol=4.5e-3, err_msg=name)
  solarized = randaugment.solarize(None, x, 1.0)  # threshold 0: every pixel inverted
  np.testing.assert_allclose(solarized, -x, atol=1e-6)


# --- FlexMatch thresholds, the mask and the unlabeled loss -----------------------------------------
def numpy_flex_thresholds(record, k, tau):
  counts = {c: int(np.sum(record == c)) for c in range(-1, k)}
  top = max(counts.values())
  beta = np.array([counts[c] / top for c in range(k)])
  return tau * beta / (2 - beta)


def test_flex_thresholds_match_the_formula():
  rng = np.random.default_rng(0)
  for record in (np.full(50, -1), rng.integers(-1, 4, 50), np.r_[np.full(40, 2), [-1] * 5, 0, 1],
                 np.r_[np.full(10, 1), np.full(30, -1)]):
    got = semisup.flex_thresholds(jnp.asarray(record, jnp.int32), 4, 0.7)
    np.testing.assert_allclose(got, numpy_flex_thresholds(record, 4, 0.7), rtol=1e-6)
  assert np.all(np.asarray(semisup.flex_thresholds(jnp.full(9, -1, jnp.int32), 3, 0.7)) == 0)


def test_update_record_keeps_confident_and_last_duplicate():
  record = jnp.full(6, -1, jnp.int32)
  index = jnp.asarray([0, 2, 2, 5, 3])
  confidence = jnp.asarray([0.9, 0.95, 0.99, 0.5, 0.8])
  labels = jnp.asarray([1, 2, 3, 4, 0], jnp.int32)
  got = semisup.update_record(record, index, confidence, labels, 0.7)
  np.testing.assert_array_equal(got, [1, -1, 3, 0, -1, -1])


def test_pseudo_label_mask_and_loss_match_the_formula():
  rng = np.random.default_rng(1)
  teacher = rng.normal(size=(12, 4)).astype(np.float32) * 3
  student = rng.normal(size=(12, 4)).astype(np.float32)
  thresholds = np.array([0.5, 0.9, 0.3, 0.7], np.float32)
  labels, mask, confidence = semisup.pseudo_labels(jnp.asarray(teacher), jnp.asarray(thresholds))
  probs = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
  want_labels = probs.argmax(-1)
  want_mask = (probs.max(-1) >= thresholds[want_labels]).astype(np.float32)
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(confidence, probs.max(-1), rtol=1e-6)
  assert 0 < want_mask.sum() < len(want_mask)
  log_softmax = student - np.log(np.exp(student).sum(-1, keepdims=True))
  ce = -log_softmax[np.arange(12), want_labels]
  loss = semisup.unlabeled_loss(jnp.asarray(student), labels, mask)
  np.testing.assert_allclose(loss, np.mean(want_mask * ce), rtol=1e-5)


# --- A tiny run -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_run_logs_pseudo_labels_and_evaluates_its_teacher(trained):
  config_file, workdir = trained
  records = monitor.read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert train and all(np.isfinite(r["loss"]) for r in train)
  first = train[0]
  assert len(first["pseudo_count"]) == 7 and len(first["pseudo_accuracy"]) == 7
  # FlexMatch starts with every threshold at 0: the whole unlabeled batch counts.
  assert first["mask_rate"] == 1.0 and sum(first["pseudo_count"]) == 2 * 16
  assert 0 <= first["pseudo_label_accuracy"] <= 1
  assert any("val_mean_class_accuracy" in r for r in records)
  run = runs.open_classifier(workdir, "best")
  assert run.class_names and run.step in (3, 6)
  restored = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True,
                                    best_metric="mean_class_accuracy")
  with restored as ckpt:
    config = kind.read_config(workdir)
    target = kind.abstract_state(config, run.model, run.mesh, ckpt.read_meta("best")["pool_size"])
    state, _ = ckpt.restore(target, "best")
  chex.assert_trees_all_equal(run.variables["params"], state.teacher_params)
  result = evaluate.evaluate_run(workdir, "test", quiet=True)
  assert 0 <= result["accuracy"] <= 1 and (workdir / "eval_test.json").exists()


@pytest.mark.slow
def test_one_and_eight_devices_agree():
  """Same labelled and unlabeled batches, augmentations, pseudo-labels (FlexMatch record) and
  update on 1 and 8 devices, for 4 steps of the tiny run (batch 8 + 16 unlabeled)."""
  config = _tiny_config()
  train, _, pool, truth = semisup.load_data(config)
  counts = kind.sampled_counts(config, train.class_counts())
  results = {}
  for n in (1, 8):
    config.train.num_devices = n
    mesh = parallel.make_mesh(n)
    model = kind.build_model(config, 7)
    tx, _ = kind.make_optimizer(config, config.train.num_steps)
    state = kind.init_state(config, model, tx, mesh, len(truth))
    labelled = classifier_batches.device_data(config, train.images, train.labels, 7, mesh)
    data = {"labelled": labelled, "pool": parallel.put_rows(pool, mesh),
            "pool_truth": parallel.put_replicated(truth, mesh)}
    step = semisup.make_train_step(config, model, tx, counts, 7, len(truth),
                                   config.train.num_steps, mesh)
    history = []
    for _ in range(4):
      state, metrics, pseudo = step(state, data)
      history.append({k: float(v) for k, v in metrics.items()})
    results[n] = (history, jax.device_get(state), jax.device_get(pseudo))
  (one, one_state, one_pseudo), (eight, eight_state, eight_pseudo) = results[1], results[8]
  for a, b in zip(one, eight):
    for key in ("loss", "sup_loss", "unlabeled_loss", "teacher_confidence"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert a["mask_rate"] == b["mask_rate"]
  assert all(h["mask_rate"] > 0 for h in one)  # The unlabeled loss takes part.
  np.testing.assert_array_equal(one_state.pseudo_record, eight_state.pseudo_record)
  chex.assert_trees_all_equal(one_pseudo, eight_pseudo)
  names = ("params", "teacher_params", "batch_stats", "teacher_batch_stats")
  chex.assert_trees_all_close({name: getattr(one_state, name) for name in names},
                              {name: getattr(eight_state, name) for name in names},
                              rtol=1e-3, atol=1e-4)


# --- Bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [None, 1.0])
def test_no_unlabeled_pool_is_refused(fraction):
  config = _tiny_config()
  config.data.label_fraction = fraction
  with pytest.raises(UserError, match="data.label_fraction.*no unlabeled pool"):
    kind.validate_config(config)


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.1])
def test_threshold_outside_zero_one_is_refused(threshold):
  config = _tiny_config()
  config.semisup.threshold = threshold
  with pytest.raises(UserError, match="semisup.threshold"):
    kind.validate_config(config)


def test_bad_values_are_one_line_on_the_command_line(tmp_path, capsys):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY)
  for flag, needle in (("--config.data.label_fraction=1.0", "data.label_fraction"),
                       ("--config.semisup.threshold=0", "semisup.threshold"),
                       ("--config.semisup.threshold_mode=soft", "semisup.threshold_mode"),
                       ("--config.semisup.extra_sources=synthetic", "semisup.extra_sources")):
    expect_one_line(["train-semisup", "--config", config_file, "--workdir", tmp_path / "run",
                     flag], needle, capsys)
  assert not (tmp_path / "run" / "checkpoints").exists()


def _tiny_config():
  namespace = {}
  exec(compile(TINY, "tiny.py", "exec"), namespace)
  return namespace["get_config"]()
