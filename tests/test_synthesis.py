"""Semantic augmentation end to end: the sampler, the batch stage, training with it, export,
the synthetic-data measures and the sampler benchmark, on a tiny VAE-GAN and classifier."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax import cli
from ferjax.augment import quality, semantic, synthesis
from ferjax.data import folder, pipeline
from ferjax.errors import UserError
from ferjax import runs as runs_lib
from ferjax.core import parallel
from ferjax.data import splits
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import vaegan as vaegan_kind
from ferjax.train import classifier, vaegan
from ferjax.kinds import classifier_batches

NUM_CLASSES = 7


def vaegan_config():
  config = vaegan_kind.default_config()
  config.data.update(image_size=32, channels=1, num_examples=96, val_examples=16)
  config.model.update(latent_dim=8, widths=(4, 8, 16))
  config.train.update(num_steps=4, batch_size=16, num_devices=1, log_every=2, eval_every=4,
                      sample_every=4, checkpoint_every=4)
  return config


def classifier_config(**augment):
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.update(image_size=32, channels=1, num_examples=280)
  config.optim.warmup_steps = 2
  config.train.update(num_steps=12, batch_size=32, num_devices=1, log_every=4, eval_every=6,
                      checkpoint_every=6)
  config.eval.batch_size = 64
  config.augment.update(augment)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 4-step VAE-GAN, a 12-step baseline and a 12-step semantic classifier on synthetic data."""
  root = tmp_path_factory.mktemp("semantic")
  vaegan.train_and_evaluate(vaegan_config(), root / "vaegan")
  classifier.train_and_evaluate(classifier_config(), root / "baseline")
  semantic_config = classifier_config(vaegan_workdir=str(root / "vaegan"), decode="residual",
                                      start_step=4, target="largest", fill=0.5)
  result = classifier.train_and_evaluate(semantic_config, root / "semantic")
  return root, result


@pytest.fixture(scope="module")
def vae(runs):
  return runs_lib.open_vaegan(runs[0] / "vaegan", "latest")


@pytest.fixture(scope="module")
def train_ds():
  return splits.load_split(classifier_config().data, "train", train=True)


# --- The sampler -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", semantic.MODES)
def test_sampler_format_labels_and_modes(vae, train_ds, mode):
  fake, labels, seed_idx = synthesis.synthesize_per_class(
      vae, train_ds.images, train_ds.labels, NUM_CLASSES, 5, mode=mode, alpha=1.0,
      image_size=40, channels=3)
  assert fake.shape == (35, 40, 40, 3) and fake.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [5] * NUM_CLASSES)
  np.testing.assert_array_equal(train_ds.labels[seed_idx], labels)  # seeds of the right class


@pytest.mark.slow
def test_alpha_zero_is_reconstruction_and_residual_keeps_the_seed(vae, train_ds):
  full0, _, idx = synthesis.synthesize_per_class(vae, train_ds.images, train_ds.labels,
                                                 NUM_CLASSES, 3, alpha=0.0, seed=1)
  again, _, _ = synthesis.synthesize_per_class(vae, train_ds.images, train_ds.labels,
                                               NUM_CLASSES, 3, alpha=0.0, seed=2)
  recon = np.asarray(pipeline.to_uint8(vae.decode(vae.encode(train_ds.images[idx])[0])))
  np.testing.assert_allclose(full0.astype(int), recon.astype(int), atol=1)
  assert not np.array_equal(full0, again)  # other seeds drawn
  residual0, _, idx = synthesis.synthesize_per_class(vae, train_ds.images, train_ds.labels,
                                                     NUM_CLASSES, 3, alpha=0.0, residual=True)
  # seed + G(mu) - G(mu) is the seed itself.
  np.testing.assert_allclose(residual0.astype(int), train_ds.images[idx].astype(int), atol=1)


@pytest.mark.slow
def test_stage_fills_the_gaps_and_waits_for_start_step(vae, train_ds):
  plan = semantic.plan_batches(train_ds.class_counts(), batch_size=32, target="largest")
  data = classifier_batches.device_data(classifier_config(), train_ds.images, train_ds.labels,
                                NUM_CLASSES, parallel.make_mesh(1))
  data["synthesis"] = synthesis.stage_data(vae, plan, "posterior", train_ds.images,
                                            train_ds.labels, NUM_CLASSES)
  stage = synthesis.make_synthesize(vae.model, plan.num_synthetic, 32, 1, mode="posterior",
                                    alpha=1.0, start_step=5, synthetic_weight=0.5)
  base = (pipeline.to_float(data["images"][:32]), data["labels"][:32], jnp.ones(32))
  run = jax.jit(lambda key, step: stage(key, step, *base, data))
  images, labels, weights = run(jax.random.PRNGKey(0), 5)
  m = plan.num_synthetic
  assert 0 < m < 32 and images.shape == (32, 32, 32, 1)
  head = int(np.argmax(train_ds.class_counts()))
  assert head not in np.asarray(labels[-m:])  # the largest class has no gap to fill
  np.testing.assert_array_equal(weights, [1.0] * (32 - m) + [0.5] * m)
  before = run(jax.random.PRNGKey(0), 4)  # before start_step: the sampler's batch untouched
  for got, want in zip(before, base):
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_bad_augment_fields_are_one_line_errors(runs, train_ds):
  root, _ = runs
  for field, value, needle in [("decode", "blend", "augment.decode"),
                               ("start_step", 99, "augment.start_step"),
                               ("mode", "dream", "augment.mode")]:
    config = classifier_config(vaegan_workdir=str(root / "vaegan"), **{field: value})
    with pytest.raises(UserError, match=needle):
      synthesis.build(config, train_ds.images, train_ds.labels, NUM_CLASSES)


# --- Training with it --------------------------------------------------------------------------
@pytest.mark.slow
def test_semantic_run_trains_under_the_rebalanced_prior(runs, train_ds):
  root, result = runs
  assert result["step"] == 12 and result["best_step"] is not None
  meta = json.loads((root / "semantic" / "config.json").read_text())
  assert meta["augment"]["decode"] == "residual"
  ckpt_meta = runs_lib.open_classifier(root / "semantic", "latest").meta
  plan = semantic.plan_batches(train_ds.class_counts(), batch_size=32, target="largest", fill=0.5)
  np.testing.assert_allclose(ckpt_meta["prior_counts"], plan.real_counts + plan.synthetic_counts)
  assert ckpt_meta["train_counts"] == train_ds.class_counts().tolist()


# --- Export, measures, bench ---------------------------------------------------------------------
@pytest.mark.slow
def test_synthesize_exports_a_loadable_folder_dataset(runs, tmp_path, capsys):
  root, _ = runs
  out = tmp_path / "faces"
  argv = ["synthesize", "--vaegan", str(root / "vaegan"), "--per-class", "3", "--out", str(out)]
  assert cli.main(argv) == 0
  ds = folder.load(out, "train")
  assert ds.images.shape == (21, 32, 32, 1)
  np.testing.assert_array_equal(ds.class_counts(), [3] * NUM_CLASSES)
  assert ds.class_names[0] == "angry" and (out / "grid.png").stat().st_size > 1000
  assert json.loads((out / "synthesis.json").read_text())["per_class"] == 3
  capsys.readouterr()
  assert cli.main(argv) == 2  # never overwrites
  assert "already exists" in capsys.readouterr().err


def test_folder_dataset_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    folder.load(tmp_path, "train")
  (tmp_path / "train" / "a").mkdir(parents=True)
  (tmp_path / "train" / "a" / "x.png").write_bytes(b"not a png")
  with pytest.raises(UserError, match="x.png: not a readable image"):
    folder.load(tmp_path, "train")


def test_frechet_distance_and_diversity():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4000, 3))
  assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  # Same covariance, means 2 apart in one axis: distance ~ 4.
  assert quality.frechet_distance(a, a + [2.0, 0, 0]) == pytest.approx(4.0, abs=1e-6)
  # N(0, I) vs N(0, 4I) in 3-d: 3 * (1 + 4 - 2 * 2) = 3.
  b = rng.normal(size=(4000, 3)) * 2
  assert quality.frechet_distance(a, b) == pytest.approx(3.0, rel=0.1)
  assert quality.mean_pairwise_distance(np.array([[0.0, 0], [3, 4]])) == pytest.approx(5.0)


@pytest.mark.slow
def test_evaluate_synthetic_writes_every_measure(runs, tmp_path, capsys):
  root, _ = runs
  argv = ["evaluate-synthetic", "--vaegan", str(root / "vaegan"), "--classifier",
          str(root / "baseline"), "--per-class", "8", "--cas-steps", "6", "--out", str(tmp_path)]
  assert cli.main(argv) == 0
  result = json.loads((tmp_path / "synthetic_quality.json").read_text())
  assert 0 <= result["consistency"] <= 1 and len(result["per_class"]) == NUM_CLASSES
  for v in result["per_class"].values():
    assert v["frechet"] >= -1e-6 and v["diversity"] > 0 and v["diversity_real"] > 0
  assert 0 <= result["cas"]["mean_class_accuracy"] <= 1 and result["cas"]["steps"] == 6
  assert "Classification accuracy score" in (tmp_path / "synthetic_quality.md").read_text()
  for decode in ("full", "residual"):  # --decode overrides the judge config's augment.decode.
    assert cli.main([*argv[:-2], "--cas-steps", "0", "--decode", decode, "--out",
                     str(tmp_path / decode)]) == 0
    judged = json.loads((tmp_path / decode / "synthetic_quality.json").read_text())
    assert judged["residual"] == (decode == "residual") and "cas" not in judged
  capsys.readouterr()
  # The judge must be a real-data classifier.
  argv[4] = str(root / "semantic")
  assert cli.main(argv) == 2 and "real images only" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_sampler_reports_its_share_of_the_step(runs, capsys):
  root, _ = runs
  argv = ["bench", "sampler", "--steps", "2", "--batch", "32", "--config.model.name=resnet10",
          "--config.model.width=0.125", "--config.data.image_size=32",
          "--config.train.num_devices=1", f"--config.augment.vaegan_workdir={root / 'vaegan'}"]
  assert cli.main(argv) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["what"] for r in records] == ["sampler", "classifier+synthesis", "classifier"]
  assert records[0]["synthetic_per_batch"] == 8 and records[0]["share_of_step"] > 0
  assert all(r["images_per_s"] > 0 for r in records)
  assert "synthesis_overhead" in records[1]


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "bad\nname"])
def test_class_names_never_become_paths_outside_the_output(tmp_path, name):
  """A folder dataset's classes.txt names folders: a separator, '..' or a control character is
  refused by name, on reading and on writing, and nothing lands outside the output folder."""
  from ferjax.data import folder as folder_lib
  images = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(UserError, match="cannot be a folder name"):
    folder_lib.write(tmp_path / "out", "train", images, np.array([0, 1]), ("ok", name))
  assert not (tmp_path / "escape").exists() and not (tmp_path / "out" / "train").exists()
  root = tmp_path / "in"
  (root / "train" / "ok").mkdir(parents=True)
  (root / "classes.txt").write_text(f"ok\n{name}\n" if "\n" not in name else "ok\n..\n")
  with pytest.raises(UserError, match=r"classes\.txt: class name .* cannot be a folder name"):
    folder_lib.load(root, "train")
