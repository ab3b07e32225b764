"""Class-preserving VAE-GAN (issue 19, cause 1): class-conditional E/G with a projection D, and
the class-consistency / perceptual terms of a frozen classifier; resume, sampling, bad input."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badinput import expect_one_line
from ferjax import runs as runs_lib
from ferjax.augment import synthesis
from ferjax.data import splits
from ferjax.errors import UserError
from ferjax.kinds import vaegan as vaegan_kind
from ferjax.models import vaegan as models
from ferjax.train import vaegan
from test_vaegan import init_variables, leaves_equal, tiny_config

K = 7  # The synthetic set's classes.


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conditional_generator_draws_the_class_it_is_told(arch):
  model = models.build(arch=arch, image_size=32, channels=1, latent_dim=8, widths=(4, 8, 16),
                       num_classes=K)
  variables = init_variables(model)
  g, e, d = variables["generator"], variables["encoder"], variables["discriminator"]
  assert "class_embedding" in g["params"] and "class_embedding" in e["params"]
  assert "class_projection" in d["params"]
  # The embeddings start random: the same latent decodes differently for another class.
  z = jnp.ones((2, 8))
  images = model.decode(g["params"], g["batch_stats"], z, jnp.array([0, 3]))
  assert images.shape == (2, 32, 32, 1)
  assert float(jnp.max(jnp.abs(images[0] - images[1]))) > 1e-4
  same = model.decode(g["params"], g["batch_stats"], z, jnp.array([3, 3]))
  np.testing.assert_allclose(same[0], same[1], atol=1e-6)
  x = jnp.zeros((2, 32, 32, 1))
  mu0, _ = model.encode(e["params"], e["batch_stats"], x, jnp.array([0, 5]))
  assert float(jnp.max(jnp.abs(mu0[0] - mu0[1]))) > 1e-6  # E sees the label too.
  logits, _ = model.discriminate(d["params"], d["batch_stats"], x, jnp.array([0, 5]))
  assert logits.shape == (2,)
  with pytest.raises(ValueError, match="labels"):
    model.decode(g["params"], g["batch_stats"], z)


@pytest.mark.slow
def test_unconditional_model_ignores_labels():
  model = models.build(image_size=32, channels=1, latent_dim=8, widths=(4, 8, 16))
  g = init_variables(model)["generator"]
  z = jnp.ones((2, 8))
  np.testing.assert_array_equal(model.decode(g["params"], g["batch_stats"], z),
                                model.decode(g["params"], g["batch_stats"], z, jnp.array([0, 3])))


@pytest.mark.slow
def test_judge_terms_train_the_generator_only():
  """The class-consistency and perceptual terms reach G's gradient and nothing else; every
  parameter of a conditional model, class embeddings included, gets a gradient."""
  model = models.build(image_size=32, channels=1, latent_dim=8, widths=(4, 8, 16), num_classes=K)
  variables = init_variables(model)
  params = {n: variables[n]["params"] for n in vaegan_kind.NETS}
  stats = {n: variables[n]["batch_stats"] for n in vaegan_kind.NETS}
  images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 1), minval=-1, maxval=1)
  labels = jnp.arange(8) % K
  judge_variables = {"w": jax.random.normal(jax.random.PRNGKey(3), (32 * 32, K))}

  def judge_apply(v, x):  # A linear "classifier" whose features are its logits.
    logits = x.reshape(x.shape[0], -1) @ v["w"]
    return logits, logits

  def grads(consistency, perceptual):
    loss = types.SimpleNamespace(feature_recon_weight=1.0, pixel_l1_weight=1.0, adv_weight=0.1,
                                 adversarial_to_encoder=False, class_consistency_weight=consistency,
                                 perceptual_weight=perceptual)
    return vaegan.compute_grads(model, params, stats, images, jax.random.PRNGKey(2), loss,
                                jnp.float32(0.5), labels, (judge_apply, judge_variables))

  base, _, metrics = grads(0.0, 0.0)
  judged, _, _ = grads(1.0, 1.0)
  assert {"class_consistency", "perceptual", "judge_acc_recon"} <= set(metrics)
  for net in vaegan_kind.NETS:
    for path, g in jax.tree_util.tree_flatten_with_path(base[net])[0]:
      assert float(jnp.max(jnp.abs(g))) > 0, f"{net}{jax.tree_util.keystr(path)} gets no gradient"
  assert leaves_equal(base["encoder"], judged["encoder"])
  assert leaves_equal(base["discriminator"], judged["discriminator"])
  assert not leaves_equal(base["generator"], judged["generator"])


def conditional_config(judge_workdir, **changes):
  return tiny_config(**{"model.num_classes": K, "loss.classifier_workdir": str(judge_workdir),
                        "loss.class_consistency_weight": 0.5, "loss.perceptual_weight": 0.5,
                        **changes})


@pytest.fixture(scope="module")
def conditional_runs(tmp_path_factory, tiny_runs):
  """A conditional, judged run stopped at 4 steps and resumed to 8, and one run straight to 8."""
  root = tmp_path_factory.mktemp("conditional")
  vaegan.train_and_evaluate(conditional_config(tiny_runs.classifier, **{"train.num_steps": 4}),
                            root / "resumed")
  resumed = vaegan.train_and_evaluate(conditional_config(tiny_runs.classifier), root / "resumed")
  straight = vaegan.train_and_evaluate(conditional_config(tiny_runs.classifier), root / "straight")
  return types.SimpleNamespace(root=root, resumed=resumed, straight=straight, judge=tiny_runs.classifier)


@pytest.mark.slow
def test_conditional_run_resumes_exactly_and_logs_the_judge(conditional_runs):
  root = conditional_runs.root
  assert conditional_runs.resumed["step"] == 8
  _, _, resumed, _ = runs_lib.restore_vaegan_state(root / "resumed")
  _, _, straight, _ = runs_lib.restore_vaegan_state(root / "straight")
  assert leaves_equal(resumed, straight)
  assert "judge_acc_recon" in conditional_runs.straight["train"]
  assert (root / "straight" / "prior_samples.png").is_file()


@pytest.mark.slow
def test_conditional_run_synthesizes_each_class(conditional_runs):
  vae = runs_lib.open_vaegan(conditional_runs.root / "straight", "last")
  assert vae.conditional and vae.model.num_classes == K
  ds = splits.load_split(tiny_config().data, "train", train=True, limit=64)
  fake, labels, seeds = synthesis.synthesize_per_class(vae, ds.images, ds.labels, K, 3,
                                                       residual=True, seed=1)
  assert fake.shape == (3 * len(np.unique(ds.labels)), 32, 32, 1) and fake.dtype == np.uint8
  assert np.all(ds.labels[seeds] == labels)
  again, _, _ = synthesis.synthesize_per_class(vae, ds.images, ds.labels, K, 3, residual=True,
                                               seed=1)
  np.testing.assert_array_equal(fake, again)  # Deterministic.
  with pytest.raises(ValueError, match="labels"):
    vae.decode(np.zeros((1, 8), np.float32))
  with pytest.raises(UserError, match="class-conditional VAE-GAN of 7 classes"):
    synthesis.synthesize_per_class(vae, ds.images, ds.labels, 5, 3)


@pytest.mark.slow
def test_a_class_count_that_differs_is_refused(conditional_runs, tmp_path, capsys):
  """model.num_classes must be the dataset's; a classifier of another class count cannot use
  a conditional VAE-GAN (checked through a stand-in: every builder here has 7 classes)."""
  with pytest.raises(UserError, match="model.num_classes.*expected 7"):
    vaegan.train_and_evaluate(tiny_config(**{"model.num_classes": 5}), tmp_path / "five")
  stand_in = types.SimpleNamespace(conditional=True, model=types.SimpleNamespace(num_classes=8))
  with pytest.raises(UserError, match="augment.vaegan_workdir.*8 classes.*7 classes"):
    synthesis.check_classes(stand_in, 7, "config field 'augment.vaegan_workdir'")


@pytest.mark.parametrize("overrides,needle", [
    (["--config.loss.class_consistency_weight=1"], "loss.classifier_workdir"),
    (["--config.loss.classifier_workdir=JUDGE"], "loss.classifier_workdir"),
    (["--config.loss.perceptual_weight=1", "--config.loss.classifier_workdir=VAEGAN"],
     "vaegan"),
])
def test_bad_judge_settings_get_one_line(overrides, needle, tiny_runs, tmp_path, capsys):
  overrides = [o.replace("JUDGE", str(tiny_runs.classifier)).replace("VAEGAN",
                                                                      str(tiny_runs.vaegan))
               for o in overrides]
  expect_one_line(["train-vaegan", "--config", tiny_runs.vaegan_config, "--workdir",
                   tmp_path / "run", *overrides], needle, capsys, protect=[tiny_runs.root])
