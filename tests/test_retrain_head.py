"""Head re-training (cRT) and feature-space semantic augmentation on the shared tiny run: the
feature VAE learns, perturbations are shaped and deterministic, synthetic features land only in
the planned slots, the new workdir is a classifier run with the source backbone, and mistakes
are one line. The pixel mode (synthetic faces of the shared tiny VAE-GAN run through the frozen
backbone) runs end to end, deterministically, and fills only the planned slots."""

import argparse
import errno
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from badinput import copy_run, expect_one_line

from ferjax import cli, runs
from ferjax import evaluate as evaluate_lib
from ferjax.augment import feature_synthesis
from ferjax.augment import semantic
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.kinds import retrain_head as head_kind
from ferjax.train import retrain_head as head_lib

K = 7
# Small enough for a test: a few compilations dominate the time.
FAST = ["--config.head.steps=30", "--config.head.eval_every=15", "--config.head.batch_size=64",
        "--config.synth.vae.steps=150", "--config.synth.vae.batch_size=64"]


def _wired() -> bool:
  """Whether `ferjax retrain-head` is a verb of the CLI yet."""
  try:
    cli.build_parser().parse_known_args(["retrain-head", "--workdir", "a", "--out", "b"])
    return True
  except UserError:
    return False


def retrain(workdir, out, *overrides):
  """`ferjax retrain-head --workdir W --out O [overrides]`, through the CLI once it is wired."""
  if _wired():
    assert cli.main(["retrain-head", "--workdir", str(workdir), "--out", str(out),
                     *overrides]) == 0
  else:
    head_lib.cli_main(argparse.Namespace(workdir=str(workdir), out=str(out), config=None,
                                         overrides=list(overrides)))


def refused(workdir, out, overrides, needle, capsys, protect=()) -> None:
  """The command is refused in one line naming `needle`, and leaves nothing behind."""
  argv = ["retrain-head", "--workdir", workdir, "--out", out, *overrides]
  if _wired():
    expect_one_line(argv, needle, capsys, protect=protect)
  else:
    with pytest.raises(UserError) as error:
      retrain(workdir, out, *overrides)
    assert "\n" not in str(error.value) and needle.lower() in str(error.value).lower()


@pytest.fixture(scope="module")
def pool(tiny_runs):
  """(run, train pool features, pool labels) of the tiny run, with mirrored copies."""
  run = runs.open_classifier(tiny_runs.classifier)
  train_ds, val_sets, _ = head_lib.load_data(run)
  features, labels, _ = head_lib.load_features(head_kind.default_config(), run, train_ds, val_sets)
  return run, features, labels


@pytest.fixture(scope="module")
def vae(pool):
  _, features, _ = pool
  return feature_synthesis.train_vae(features, init_key=jax.random.key(0),
                                train_key=jax.random.key(1), steps=200, batch_size=64,
                                latent_dim=8, hidden=64, log_every=20)


def aux_of(vae, synth_probs, class_stats=None):
  stats = class_stats or (jnp.zeros((K, 1)), jnp.zeros((K, 1)))
  return {"vae": vae.variables, "synth_probs": jnp.asarray(synth_probs, jnp.float32),
          "class_stats": stats}


# --- The feature VAE and the perturbations ------------------------------------------------------
def test_kind_names_match_the_pixel_mode():
  assert head_kind.PERTURBATIONS == semantic.MODES
  assert set(head_kind.TARGETS) <= set(semantic.TARGETS)


@pytest.mark.slow
def test_feature_vae_learns(pool, vae):
  _, features, labels = pool
  assert features.shape == (2 * 140, 64) and labels.shape == (2 * 140,)
  assert vae.final_loss < 0.7 * vae.first_loss, vae.curve
  mu, logvar = vae.model.encode(vae.variables, jnp.asarray(features[:5]))
  assert mu.shape == logvar.shape == (5, 8)
  decoded = vae.model.decode(vae.variables, mu)
  assert decoded.shape == (5, 64) and bool(jnp.all(decoded >= vae.variables["stats"]["low"]))


@pytest.mark.parametrize("mode", semantic.MODES)
def test_perturbations_shapes_and_determinism(pool, vae, mode):
  _, features, labels = pool
  seeds, partners = jnp.asarray(features[:5]), jnp.asarray(features[5:10])
  classes = jnp.asarray(labels[:5])
  stats = feature_synthesis.class_latent_stats(vae.model, vae.variables, features, labels, K)
  aux = aux_of(vae, np.ones(K) / K, stats)
  make = lambda key, alpha=1.0: feature_synthesis.generate(
      vae.model, aux, seeds, classes, jax.random.key(key), mode=mode, alpha=alpha,
      partners=partners)
  a, b, c = make(0), make(0), make(1)
  assert a.shape == (5, 64)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_alpha_zero_and_residual_decoding(pool, vae):
  _, features, labels = pool
  seeds, classes = jnp.asarray(features[:6]), jnp.asarray(labels[:6])
  aux = aux_of(vae, np.ones(K) / K)
  full = feature_synthesis.generate(vae.model, aux, seeds, classes, jax.random.key(0),
                               mode="posterior", alpha=0.0)
  mu = vae.model.encode(vae.variables, seeds)[0]
  np.testing.assert_allclose(full, vae.model.decode(vae.variables, mu), rtol=1e-6)
  # Residual: the seed plus the change the perturbation makes; alpha 0 changes nothing.
  same = feature_synthesis.generate(vae.model, aux, seeds, classes, jax.random.key(0),
                               mode="posterior", alpha=0.0, residual=True)
  np.testing.assert_allclose(same, seeds, atol=1e-5)


def test_class_gaussian_uses_class_stats(pool, vae):
  _, features, labels = pool
  means, stds = feature_synthesis.class_latent_stats(vae.model, vae.variables, features, labels, K)
  mu = np.asarray(vae.model.encode(vae.variables, jnp.asarray(features))[0])
  np.testing.assert_allclose(means[3], mu[labels == 3].mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stds[3], mu[labels == 3].std(0), rtol=1e-4, atol=1e-5)
  # alpha 0: every synthetic feature of class c is D(mean_c), whatever its seed.
  classes = jnp.asarray([2, 2, 5])
  seeds = jnp.asarray(features[[0, 1, 2]])
  out = feature_synthesis.generate(vae.model, aux_of(vae, np.ones(K) / K, (means, stds)), seeds,
                              classes, jax.random.key(0), mode="class_gaussian", alpha=0.0)
  np.testing.assert_allclose(out, vae.model.decode(vae.variables, means[classes]), rtol=1e-5)
  np.testing.assert_allclose(out[0], out[1])


# --- The plan and the slots ---------------------------------------------------------------------
def test_plan_tail_only_cap_and_prior():
  counts = np.array([100, 80, 60, 40, 20, 10, 5])
  p = feature_synthesis.plan(counts, batch_size=100, sampler="instance", synthesize=True,
                        target="largest", fill=1.0, tail_only=True, max_share=0.3)
  assert p.num_synthetic == 30  # The share (365 / 680 of the epoch) is capped at 0.3.
  assert np.all(p.synth_probs[:4] == 0) and np.all(p.synth_probs[4:] > 0)
  np.testing.assert_allclose(p.synth_probs[4:], np.array([80, 90, 95]) / 265)
  np.testing.assert_allclose(p.real_probs, counts / counts.sum())
  # The prior is the batch's: real slots by the sampler plus the synthetic slots.
  expected = 70 * counts / counts.sum() + 30 * p.synth_probs
  np.testing.assert_allclose(p.prior_counts / p.prior_counts.sum(), expected / 100)
  balanced = feature_synthesis.plan(counts, batch_size=100, sampler="class_balanced",
                               synthesize=False)
  assert balanced.num_synthetic == 0
  np.testing.assert_allclose(balanced.prior_counts, np.full(K, counts.sum() / K))
  with pytest.raises(UserError, match="nothing to synthesize"):
    feature_synthesis.plan(np.full(K, 20), batch_size=64, sampler="instance", synthesize=True)


@pytest.mark.slow
def test_synthetic_features_fill_only_the_planned_slots(pool, vae):
  _, features, labels = pool
  config = head_kind.default_config()
  config.head.update(batch_size=48, sampler="instance")
  probs = np.zeros(K)
  probs[[1, 4]] = [0.25, 0.75]
  data = {"features": jnp.asarray(features), "labels": jnp.asarray(labels),
          "class_index": pipeline.class_index(jnp.asarray(labels), K),
          "synthesis": aux_of(vae, probs)}
  synthesize = feature_synthesis.make_synthesize(vae.model, 12, mode="posterior", alpha=1.0,
                                            weight=0.5)
  key = jax.random.key(3)
  batch = jax.jit(lambda key: head_lib.make_batch(config, data, key, 7, synthesize))
  plain = jax.jit(lambda key: head_lib.make_batch(config, data, key, 7))
  (f, y, w), (f0, y0, _) = batch(key), plain(key)
  np.testing.assert_array_equal(f[:36], f0[:36])  # Real slots untouched...
  np.testing.assert_array_equal(y[:36], y0[:36])
  np.testing.assert_array_equal(w, np.r_[np.ones(36), np.full(12, 0.5)])
  assert set(np.asarray(y[36:]).tolist()) <= {1, 4}  # ...the last 12 of the planned classes,
  assert not np.any(np.all(np.isin(np.asarray(f[36:]), features), axis=1))  # and synthetic.
  np.testing.assert_array_equal(batch(key)[0], f)  # Same key, same batch.


def test_pixel_pool_features_fill_only_the_planned_slots(pool):
  """Pixel mode: each synthetic slot holds a row of the synthetic-face pool of its own class,
  the classes are the planned ones, the real slots are untouched."""
  _, features, labels = pool
  config = head_kind.default_config()
  config.head.update(batch_size=48, sampler="instance")
  config.synth.update(mode="pixel", weight=0.5)
  rng = np.random.default_rng(0)
  fake_labels = np.repeat(np.array([1, 4], np.int32), 10)  # Only classes 1 and 4 were made.
  fake = (rng.normal(size=(20, features.shape[1])) + 100.0).astype(np.float32)
  probs = np.zeros(K)
  probs[[1, 4]] = [0.25, 0.75]
  plan = feature_synthesis.FeaturePlan(12, probs, np.full(K, 1 / K), np.zeros(K), np.zeros(K),
                                  np.ones(K))
  data = {"features": jnp.asarray(features), "labels": jnp.asarray(labels),
          "class_index": pipeline.class_index(jnp.asarray(labels), K),
          "synthesis": feature_synthesis.pool_stage_data(
              plan, {"features": fake, "labels": fake_labels}, K)}
  synthesize = feature_synthesis.make_pool_synthesize(12, weight=0.5)
  key = jax.random.key(3)
  batch = jax.jit(lambda key, step: head_lib.make_batch(config, data, key, step, synthesize))
  plain = jax.jit(lambda key: head_lib.make_batch(config, data, key, 7))
  (f, y, w), (f0, y0, _) = batch(key, 7), plain(key)
  np.testing.assert_array_equal(f[:36], f0[:36])
  np.testing.assert_array_equal(y[:36], y0[:36])
  np.testing.assert_array_equal(w, np.r_[np.ones(36), np.full(12, 0.5)])
  seen = []
  for step in range(5):  # Over a few batches: both planned classes, each from its own pool.
    f, y, _ = batch(jax.random.key(step), step)
    rows = [int(np.flatnonzero(np.all(fake == np.asarray(v), axis=1))[0]) for v in f[36:]]
    np.testing.assert_array_equal(fake_labels[rows], np.asarray(y[36:]))
    seen += np.asarray(y[36:]).tolist()
  assert set(seen) == {1, 4}
  np.testing.assert_array_equal(batch(key, 7)[0], batch(key, 7)[0])  # Same key, same batch.


def train_heads(radius, steps=25, d=16):
  """The kernel [D, K] after `steps` head steps on random separable features, projected onto
  the ball of `radius` after every step (head.max_norm_radius, head.max_norm_every=1)."""
  config = head_kind.default_config()
  config.head.update(batch_size=32, steps=steps, lr=0.5, init="zero")
  max_norm = None if radius is None else head_kind.MaxNorm(radius, 1)
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(K), [60, 30, 20, 10, 8, 6, 4]).astype(np.int32)
  features = (rng.normal(size=(len(labels), d)) + 3 * np.eye(K, d)[labels]).astype(np.float32)
  data = {"features": jnp.asarray(features), "labels": jnp.asarray(labels),
          "class_index": pipeline.class_index(jnp.asarray(labels), K)}
  tx, _ = head_kind.make_optimizer(config)
  source = {"kernel": np.zeros((d, K), np.float32), "bias": np.zeros(K, np.float32)}
  state = head_kind.init_state(config, source, tx)
  step = jax.jit(head_lib.make_train_step(config, np.bincount(labels), jit=False,
                                          max_norm=max_norm))
  for _ in range(steps):
    state, _ = step(state, data)
  return np.asarray(state.params["kernel"]), np.asarray(state.params["bias"])


@pytest.mark.slow
def test_max_norm_projects_every_class_column():
  """Weight balancing's MaxNorm (Alshammari et al. 2022): each class's kernel column ends in
  the L2 ball; no MaxNorm is plain training, bit for bit (a radius never reached too)."""
  free, free_bias = train_heads(None)
  assert np.linalg.norm(free, axis=0).max() > 0.5  # The constraint below does bind.
  kernel, _ = train_heads(0.5)
  norms = np.linalg.norm(kernel, axis=0)
  assert norms.max() <= 0.5 + 1e-6 and norms.min() > 0.25
  loose, loose_bias = train_heads(1e9)
  np.testing.assert_array_equal(loose, free)
  np.testing.assert_array_equal(loose_bias, free_bias)
  head = {"kernel": jnp.asarray([[3.0, 0.1], [4.0, 0.0]]), "bias": jnp.ones(2)}
  projected = head_kind.project_max_norm(head, 1.0)
  np.testing.assert_allclose(projected["kernel"], [[0.6, 0.1], [0.8, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(projected["bias"], head["bias"])
  assert head_kind.project_max_norm(head, None) is head


# --- The stage end to end -----------------------------------------------------------------------
@pytest.mark.slow
def test_weight_balancing_stage_keeps_every_column_in_the_ball(tiny_runs, tmp_path):
  out = tmp_path / "wb"
  retrain(tiny_runs.classifier, out, "--config.head.steps=4", "--config.head.eval_every=2",
          "--config.head.max_norm_radius=0.05", "--config.head.max_norm_every=1",
          "--config.head.sampler=class_balanced")
  for which in ("best", "last"):
    kernel = runs.open_classifier(out, which).variables["params"]["head"]["kernel"]
    assert np.linalg.norm(np.asarray(kernel), axis=0).max() <= 0.05 + 1e-6, which
  head_json = json.loads((out / "head.json").read_text())
  assert head_json["config"]["head"]["max_norm_radius"] == 0.05
  assert head_json["max_norm"] == {"radius": 0.05, "every": 1}


@pytest.mark.slow
def test_crt_writes_a_classifier_run_with_the_source_backbone(tiny_runs, tmp_path):
  out = tmp_path / "crt"
  retrain(tiny_runs.classifier, out, *FAST)
  source, new = runs.open_classifier(tiny_runs.classifier), runs.open_classifier(out)
  assert new.class_names == source.class_names and new.step == int(
      json.loads((out / "head.json").read_text())["best_step"])
  old, now = jax.device_get(source.variables), jax.device_get(new.variables)
  backbone = lambda v: {c: {k: x for k, x in v[c].items() if k != "head"} for c in v}
  head = lambda v: {c: v[c]["head"] for c in v if "head" in v[c]}
  chex.assert_trees_all_equal(backbone(now), backbone(old))  # The source's, bit for bit.
  retrained = jax.tree.map(lambda a, b: not np.array_equal(a, b), head(now), head(old))
  assert jax.tree.leaves(retrained) and all(jax.tree.leaves(retrained)), retrained  # All new.
  # class_balanced: the prior the head was trained under is uniform.
  np.testing.assert_allclose(new.prior_counts, np.full(K, source.train_counts.sum() / K))
  np.testing.assert_array_equal(new.train_counts, source.train_counts)
  result = evaluate_lib.evaluate_run(out, "test")
  assert 0 <= result["mean_class_accuracy"] <= 1 and (out / "eval_test.json").is_file()
  info = json.loads((out / "head.json").read_text())
  assert info["plan"]["num_synthetic"] == 0 and "vae" not in info
  assert set(info["before"]) == set(head_kind.BEST_METRICS)
  assert [p.name for p in tmp_path.iterdir()] == ["crt"]  # No staging folder left.


@pytest.mark.slow
def test_feature_mode_end_to_end_and_deterministic(tiny_runs, tmp_path):
  options = [*FAST, "--config.synth.mode=feature", "--config.synth.perturb=interpolate",
             "--config.head.loss=logit_adjusted", "--config.synth.decode=residual"]
  retrain(tiny_runs.classifier, tmp_path / "a", *options)
  info = json.loads((tmp_path / "a" / "head.json").read_text())
  assert info["plan"]["num_synthetic"] > 0
  assert info["vae"]["final_loss"] < info["vae"]["first_loss"]
  synthesized = [n for n, v in info["plan"]["synthetic_per_batch"].items() if v > 0]
  assert 0 < len(synthesized) < K  # tail_only
  assert (tmp_path / "a" / "synthetic_neighbours.png").is_file()
  lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
  # The source head's validation at step 0, then a train and a validation record per evaluation.
  assert [json.loads(line)["step"] for line in lines] == [0, 15, 15, 30, 30]
  # The same command gives the same head.
  retrain(tiny_runs.classifier, tmp_path / "b", *options)
  heads = [runs.open_classifier(tmp_path / n, "last").variables["params"]["head"] for n in "ab"]
  np.testing.assert_array_equal(heads[0]["kernel"], heads[1]["kernel"])
  new = runs.open_classifier(tmp_path / "a")  # The prior counts the synthetic features too.
  assert new.prior_counts[[new.class_names.index(n) for n in synthesized]].min() > min(
      new.prior_counts)


def pixel_options(tiny_runs, *extra):
  return [*FAST, "--config.synth.mode=pixel", f"--config.synth.vaegan_workdir={tiny_runs.vaegan}",
          "--config.synth.pool_per_class=6", *extra]


@pytest.mark.slow
def test_pixel_mode_end_to_end_and_deterministic(tiny_runs, tmp_path):
  options = pixel_options(tiny_runs, "--config.head.loss=logit_adjusted",
                          "--config.head.sampler=instance", "--config.synth.decode=residual")
  retrain(tiny_runs.classifier, tmp_path / "a", *options)
  out = tmp_path / "a"
  info = json.loads((out / "head.json").read_text())
  assert info["config"]["synth"]["mode"] == "pixel" and "vae" not in info
  assert info["plan"]["num_synthetic"] > 0
  synthesized = sorted(n for n, v in info["plan"]["synthetic_per_batch"].items() if v > 0)
  assert 0 < len(synthesized) < K  # tail_only
  pixel = info["pixel"]
  assert sorted(pixel["faces_per_class"]) == synthesized  # Faces of the planned classes only,
  assert set(pixel["faces_per_class"].values()) == {6}  # synth.pool_per_class each,
  assert pixel["features"] == 2 * 6 * len(synthesized)  # and their mirrors (head.flip).
  assert 0 <= pixel["source_head_accuracy"] <= 1 and pixel["vaegan_step"] == 2
  assert (out / "synthetic_faces.png").is_file() and not (out / "synthetic_neighbours.png").exists()
  new = runs.open_classifier(out)
  assert new.prior_counts[[new.class_names.index(n) for n in synthesized]].min() > min(
      new.prior_counts)
  result = evaluate_lib.evaluate_run(out, "test")
  assert 0 <= result["mean_class_accuracy"] <= 1
  # The same command gives the same head.
  retrain(tiny_runs.classifier, tmp_path / "b", *options)
  heads = [runs.open_classifier(tmp_path / n, "last").variables["params"]["head"] for n in "ab"]
  np.testing.assert_array_equal(heads[0]["kernel"], heads[1]["kernel"])
  np.testing.assert_array_equal(heads[0]["bias"], heads[1]["bias"])


def test_pixel_pool_is_the_backbone_features_of_the_synthetic_faces(tiny_runs):
  """The pool: synth.pool_per_class faces per planned class, in the classifier's format, whose
  features are the frozen backbone's (as the real train images'), mirrored ones after."""
  run = runs.open_classifier(tiny_runs.classifier)
  train_ds, _, _ = head_lib.load_data(run)
  config = head_kind.default_config()
  config.synth.update(mode="pixel", vaegan_workdir=str(tiny_runs.vaegan), pool_per_class=4,
                      perturb="interpolate")
  plan = feature_synthesis.plan_for(config, train_ds.class_counts())
  made = feature_synthesis.synthetic_pool(config, run, head_lib.open_vaegan(config), train_ds, plan)
  classes = np.flatnonzero(plan.synth_probs > 0)
  np.testing.assert_array_equal(made["face_labels"], np.repeat(classes, 4))
  assert made["faces"].shape == (4 * len(classes), 32, 32, 1)
  assert made["faces"].dtype == np.uint8 and made["seeds"].shape == made["faces"].shape
  np.testing.assert_array_equal(made["labels"], np.tile(made["face_labels"], 2))
  np.testing.assert_allclose(made["features"][:len(classes) * 4],
                             evaluate_lib.extract_features(run, made["faces"]), rtol=1e-5)


# --- Mistakes: one line, nothing written ----------------------------------------------------------
@pytest.mark.parametrize("overrides, needle", [
    (["--config.synth.mode=feature", "--config.synth.fill=0"], "synth.fill"),
    (["--config.synth.mode=feature", "--config.synth.max_share=0"], "synth.max_share"),
    (["--config.head.sampler=oversample"], "head.sampler"),
    (["--config.head.lr=0"], "head.lr"),
    (["--config.head.max_norm_radius=0"], "head.max_norm_radius"),
    (["--config.head.max_norm_thresh=-1"], "head.max_norm_thresh"),
    (["--config.head.max_norm_every=0"], "head.max_norm_every"),
    (["--config.head.max_norm_thresh=0.1", "--config.head.max_norm_radius=1"],
     "head.max_norm_radius"),
    (["--config.head.max_norm_thresh=0.1", "--config.head.init=zero"], "head.init"),
    (["--config.synth.perturbation=posterior"], "perturbation"),
    (["--config.source.checkpoint=77"], "no checkpoint at step 77"),
    (["--config.synth.mode=feature", "--config.synth.fill=0.001"], "synth.fill"),
    (["--config.synth.mode=feature", "--config.synth.target=uniform",
      "--config.synth.tail_only=False", "--config.synth.max_share=0.001"], "synth.max_share"),
    (["--config.synth.mode=pixel"], "synth.vaegan_workdir"),
    (["--config.synth.mode=pixel", "--config.synth.vaegan_workdir=x",
      "--config.synth.max_share=0"], "synth.max_share"),
    (["--config.synth.mode=feature", "--config.synth.vaegan_workdir=runs/vaegan"],
     ["synth.vaegan_workdir", "only read with synth.mode=pixel"]),
    (["--config.synth.vaegan_workdir=runs/vaegan"], "synth.vaegan_workdir"),
    (["--config.synth.mode=pixel", "--config.synth.vaegan_workdir=x",
      "--config.synth.pool_per_class=0"], "synth.pool_per_class"),
])
def test_bad_options_are_one_line(tiny_runs, tmp_path, capsys, overrides, needle):
  refused(tiny_runs.classifier, tmp_path / "out", overrides, needle, capsys,
          protect=[tiny_runs.classifier])
  assert not any(tmp_path.iterdir())


def test_bad_workdirs_are_one_line(tiny_runs, tmp_path, capsys):
  (tmp_path / "exists").mkdir()
  refused(tiny_runs.classifier, tmp_path / "exists", [], "already exists", capsys)
  refused(tiny_runs.vaegan, tmp_path / "out", [], "not a classifier run", capsys)
  refused(tmp_path / "missing", tmp_path / "out", [], "config.json not found", capsys)
  empty = copy_run(tiny_runs.classifier, tmp_path / "empty")
  for folder in (empty / "checkpoints").iterdir():
    for step in folder.iterdir():
      shutil.rmtree(step)
  refused(empty, tmp_path / "out", [], "no checkpoint", capsys)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exists"]


def test_bad_vaegan_workdirs_are_one_line(tiny_runs, tmp_path, capsys):
  """synth.vaegan_workdir that is a classifier run or missing: one line naming the field and the
  path, before any feature is extracted, nothing written."""
  for bad, why in ((tiny_runs.classifier, "not a VAE-GAN"), (tmp_path / "missing", "not found")):
    refused(tiny_runs.classifier, tmp_path / "out",
            ["--config.synth.mode=pixel", f"--config.synth.vaegan_workdir={bad}"],
            ["synth.vaegan_workdir", str(bad), why], capsys, protect=[tiny_runs.classifier])
  assert not any(tmp_path.iterdir())


def test_training_into_a_retrained_head_is_refused(tiny_runs, tmp_path, capsys):
  """A retrain-head workdir is not a trainer's run: `ferjax train` into it would 'resume' a
  backbone it never trained, so it is refused in one line and left as it was."""
  out = tmp_path / "crt"
  retrain(tiny_runs.classifier, out, "--config.head.steps=2", "--config.head.eval_every=2")
  expect_one_line(["train", "--config", tiny_runs.classifier_config, "--workdir", out],
                  ["retrain-head", "cannot be resumed"], capsys, protect=[out])


def test_full_disk_is_one_line_and_leaves_no_staging_folder(tiny_runs, tmp_path, monkeypatch):
  def full(config, run, staging, stop_after):
    (staging / "metrics.jsonl").write_text("{}\n")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(head_lib, "_retrain", full)
  with pytest.raises(UserError) as error:
    head_lib.retrain_head(head_kind.default_config(), tiny_runs.classifier, tmp_path / "out")
  message = str(error.value)
  assert "\n" not in message and "--out" in message and "No space left" in message
  assert "resume" not in message and not any(tmp_path.iterdir())
