"""VAE-GAN models and trainer: shapes, gradient routing, learning, checkpoints, resume, devices."""

import shutil
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ferjax import configs
from ferjax.errors import UserError
from ferjax.models import vaegan as models
from ferjax import bench
from ferjax import runs as runs_lib
from ferjax.core import checkpoint, monitor, parallel
from ferjax.data import splits
from ferjax.kinds import vaegan as vaegan_kind
from ferjax.train import vaegan


def tiny_config(**changes):
  """32 px gray, widths 4-8-16, latent 8, batch 16: compiles and runs in seconds on a CPU."""
  config = vaegan_kind.default_config()
  config.data.image_size = 32
  config.data.channels = 1
  config.data.num_examples = 64
  config.data.val_examples = 16
  config.model.latent_dim = 8
  config.model.widths = (4, 8, 16)
  config.loss.kl_warmup_steps = 10
  config.optim.lr = 1e-3
  config.optim.ema_decay = 0.9
  config.train.num_steps = 8
  config.train.batch_size = 16
  config.train.num_devices = 1
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.sample_every = 8
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 5
  for key, value in changes.items():
    parent = config
    *path, leaf = key.split(".")
    for part in path:
      parent = parent[part]
    parent[leaf] = value
  return config


def init_variables(model, seed=0):
  """model.init, compiled the quick way the trainer does it (see ferjax.kinds.vaegan.init_state)."""
  key = jax.random.PRNGKey(seed)
  return jax.jit(model.init).lower(key).compile(compiler_options=parallel.FAST_COMPILE)(key)


def leaves_equal(a, b):
  """For checks that two trees differ (chex.assert_trees_all_equal asserts that they agree)."""
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ================================================================================================
# Models
# ================================================================================================
@pytest.mark.parametrize("image_size,stages,smallest", [(32, 3, 4), (48, 4, 3), (64, 4, 4),
                                                        (96, 5, 3), (128, 5, 4)])
def test_stages_keep_maps_at_least_3x3(image_size, stages, smallest):
  assert models.num_stages(image_size) == stages
  assert models.smallest_map(image_size) == smallest
  assert len(models.default_widths(image_size)) == stages
  assert models.default_widths(64) == (64, 128, 256, 512)


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(arch, dtype):
  model = models.build(arch=arch, image_size=32, channels=3, latent_dim=8, widths=(4, 8, 16),
                       dtype=dtype)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0))  # Shapes only: no compile.
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32  # Parameters stay float32 whatever the compute dtype.

  def forward(variables, images):
    e, g, d = (variables[n] for n in vaegan_kind.NETS)
    mu, logvar = model.encode(e["params"], e["batch_stats"], images)
    decoded = model.decode(g["params"], g["batch_stats"], mu)
    return mu, logvar, decoded, *model.discriminate(d["params"], d["batch_stats"], decoded)

  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  mu, logvar, decoded, logits, features = jax.eval_shape(forward, variables, images)
  assert mu.shape == logvar.shape == (2, 8) and mu.dtype == logvar.dtype == jnp.float32
  assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == jnp.float32
  assert logits.shape == (2,) and logits.dtype == jnp.float32
  assert features.shape == (2, 8, 8, 8)  # The second-to-last stage: 8x8, width 8.
  jaxpr = str(jax.make_jaxpr(forward)(variables, images))
  assert ("bf16" in jaxpr) == (dtype == "bfloat16")  # The convs really run in bfloat16.


@pytest.mark.parametrize("use_bias", [True, False])
def test_upconv_is_a_transposed_conv(use_bias):
  import flax.linen as nn
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 3))  # Non-square on purpose.
  variables = models.UpConv(4, use_bias=use_bias).init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda a: a + 0.3 if a.ndim == 1 else a, variables)  # Nonzero bias.
  reference = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding="SAME", use_bias=use_bias)
  assert (jax.tree.map(jnp.shape, variables)
          == jax.tree.map(jnp.shape, reference.init(jax.random.PRNGKey(0), x)))
  np.testing.assert_allclose(models.UpConv(4, use_bias=use_bias).apply(variables, x),
                             reference.apply(variables, x), atol=1e-5)


@pytest.mark.slow
def test_encode_decode_values_and_jit_vmap():
  model = models.build(image_size=32, channels=1, latent_dim=8, widths=(4, 8, 16))
  v = init_variables(model)
  e, g = v["encoder"], v["generator"]
  encode = jax.jit(jax.vmap(model.encode, in_axes=(None, None, 0)))
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 2, 32, 32, 1), minval=-1, maxval=1)
  mu, logvar = encode(e["params"], e["batch_stats"], images)
  assert mu.shape == logvar.shape == (3, 2, 8)
  decoded = jax.jit(model.decode)(g["params"], g["batch_stats"], mu[0])
  assert decoded.shape == (2, 32, 32, 1) and float(jnp.max(jnp.abs(decoded))) <= 1.0
  # uint8 input is accepted and read as 0..255 (0 is -1.0).
  zeros = jnp.zeros((3, 2, 32, 32, 1), jnp.uint8)
  minus_ones = -jnp.ones((3, 2, 32, 32, 1))
  np.testing.assert_allclose(encode(e["params"], e["batch_stats"], zeros)[0],
                             encode(e["params"], e["batch_stats"], minus_ones)[0], atol=1e-6)


# ================================================================================================
# Gradients go where they should
# ================================================================================================
@pytest.fixture(scope="module")
def grad_setup():
  """grads(**loss weights) -> per-network gradients on one fixed batch (weights are traced)."""
  model = vaegan_kind.build_model(tiny_config())
  variables = init_variables(model)
  params = {n: variables[n]["params"] for n in vaegan_kind.NETS}
  stats = {n: variables[n]["batch_stats"] for n in vaegan_kind.NETS}
  images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 1), minval=-1, maxval=1)

  @jax.jit(static_argnums=2)
  def compute(params, weights, adversarial_to_encoder):
    loss = types.SimpleNamespace(**weights, adversarial_to_encoder=adversarial_to_encoder)
    return vaegan.compute_grads(model, params, stats, images, jax.random.PRNGKey(2), loss,
                                jnp.float32(0.5))[0]

  def grads(adversarial_to_encoder=False, **changes):
    weights = {"feature_recon_weight": 1.0, "pixel_l1_weight": 1.0, "adv_weight": 0.1, **changes}
    return compute(params, {k: jnp.float32(v) for k, v in weights.items()},
                   adversarial_to_encoder)

  return grads


@pytest.mark.slow
def test_every_parameter_gets_a_gradient(grad_setup):
  grads = grad_setup()
  for net in vaegan_kind.NETS:
    for path, g in jax.tree_util.tree_flatten_with_path(grads[net])[0]:
      assert float(jnp.max(jnp.abs(g))) > 0, f"{net}{jax.tree_util.keystr(path)} gets no gradient"


GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-8


def allclose(a, b):
  """For checks that two trees differ (chex.assert_trees_all_close asserts that they agree)."""
  return all(np.allclose(x, y, rtol=GRAD_RTOL, atol=GRAD_ATOL)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_gradients_follow_each_networks_own_loss(grad_setup):
  base = grad_setup()
  # E gets no adversarial gradient while the switch is off...
  strong_adv = grad_setup(adv_weight=5.0)
  chex.assert_trees_all_close(base["encoder"], strong_adv["encoder"], rtol=GRAD_RTOL,
                              atol=GRAD_ATOL)
  assert not allclose(base["generator"], strong_adv["generator"])  # ...G does.
  # ...and gets it once the switch is on.
  on = grad_setup(adversarial_to_encoder=True)
  on_strong = grad_setup(adversarial_to_encoder=True, adv_weight=5.0)
  assert not allclose(on["encoder"], on_strong["encoder"])
  # D learns from the hinge loss only: G's loss terms do not reach it.
  other_g_loss = grad_setup(adv_weight=3.0, feature_recon_weight=7.0, pixel_l1_weight=0.0)
  chex.assert_trees_all_close(base["discriminator"], other_g_loss["discriminator"],
                              rtol=GRAD_RTOL, atol=GRAD_ATOL)
  # Reconstruction weights move E and G.
  assert not allclose(base["encoder"], other_g_loss["encoder"])


# ================================================================================================
# Training: learning, devices, compile-once, resume, checkpoints, NaN guard
# ================================================================================================
def run_steps(config, num_devices, num_steps, images, snapshot_at=()):
  """Runs the real train step; returns ({step: state} at `snapshot_at`, all metrics)."""
  mesh = parallel.make_mesh(num_devices)
  model = vaegan_kind.build_model(config)
  state = vaegan_kind.init_state(config, model, mesh)
  step = vaegan.make_train_step(model, config, mesh, len(images))
  images = parallel.put_rows(images, mesh)
  history, snapshots = [], {}
  for i in range(num_steps):
    state, metrics = step(state, images)
    history.append(metrics)
    if i + 1 in snapshot_at:
      snapshots[i + 1] = jax.device_get(state)
  return snapshots, jax.device_get(history)


@pytest.fixture(scope="module")
def tiny_images():
  return splits.load_split(tiny_config().data, "train", train=True, limit=64).images


@pytest.fixture(scope="module")
def one_device_run(tiny_images):
  return run_steps(tiny_config(), 1, 150, tiny_images, snapshot_at=(8, 20))


@pytest.mark.slow
def test_reconstruction_loss_falls(one_device_run):
  _, history = one_device_run
  first = np.mean([m["pixel_l1"] for m in history[:10]])
  last = np.mean([m["pixel_l1"] for m in history[-10:]])
  assert last < 0.6 * first, (first, last)
  assert all(np.isfinite(m["d_loss"]) for m in history)


@pytest.mark.slow
def test_one_two_and_eight_devices_agree(one_device_run, tiny_images):
  """Same batch, noise and global-batch BatchNorm on 1, 2 and 8 devices.

  2 and 8 devices (both partitioned programs) give the same losses and gradient norms for 10
  steps to float rounding (measured: 5e-7 relative at most on an AMD EPYC over 20 steps, 4e-7
  on an Intel Xeon over 13 steps) and the same parameters. A GAN amplifies any rounding
  difference: on the Xeon one appears at step 14 (4.6e-4 relative) and grows to 3% by step 20,
  so the steps compared stop at 10. The unpartitioned 1-device program rounds differently on
  some CPUs (the EPYC: the encoder's gradient norm 1.8e-5 apart at step 1, 3e-7 elsewhere), so
  1 device is compared on the first step only.
  """
  assert jax.device_count() == 8
  keys = ("d_loss", "g_loss", "e_loss", "kl", "feature_recon", "pixel_l1", "grad_norm_e",
          "grad_norm_g", "grad_norm_d")
  _, history_1 = one_device_run
  snapshots_2, history_2 = run_steps(tiny_config(), 2, 10, tiny_images, snapshot_at=(10,))
  snapshots_8, history_8 = run_steps(tiny_config(), 8, 10, tiny_images, snapshot_at=(10,))
  for key in keys:
    np.testing.assert_allclose(history_1[0][key], history_8[0][key],
                               rtol=1e-5 if "grad" not in key else 1e-4, err_msg=f"step 1: {key}")
  for i in range(10):
    for key in keys:
      np.testing.assert_allclose(history_2[i][key], history_8[i][key], rtol=1e-5,
                                 err_msg=f"step {i + 1}: {key}")
  chex.assert_trees_all_close(snapshots_2[10].params, snapshots_8[10].params, rtol=1e-4,
                              atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """train_and_evaluate for 4 steps, stopped, then resumed to 8 in the same workdir."""
  root = tmp_path_factory.mktemp("vaegan")
  workdir = root / "run"
  half = vaegan.train_and_evaluate(tiny_config(**{"train.num_steps": 4}), workdir)
  resumed = vaegan.train_and_evaluate(tiny_config(), workdir)
  return types.SimpleNamespace(workdir=workdir, half=half, resumed=resumed)


@pytest.mark.slow
def test_resume_equals_uninterrupted(runs, one_device_run):
  assert runs.half["step"] == 4 and runs.resumed["step"] == 8
  _, _, resumed, meta = runs_lib.restore_vaegan_state(runs.workdir)
  assert meta["step"] == 8
  uninterrupted = one_device_run[0][8]  # The same config run for 8 steps without a stop.
  chex.assert_trees_all_equal(resumed, uninterrupted)
  # The replayed steps are logged once, with the uninterrupted run's values.
  records = [r for r in monitor.read_metrics(runs.workdir) if "d_loss" in r]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  history = one_device_run[1]
  np.testing.assert_allclose(records[-1]["d_loss"], np.mean([m["d_loss"] for m in history[6:8]]),
                             rtol=1e-6)


@pytest.mark.slow
def test_train_step_compiles_once(tiny_images):
  """The step is a parallel.jit_once: a retrace (here forced by a new batch shape) is an
  error, so every run above compiled it once."""
  config = tiny_config()
  mesh = parallel.make_mesh(1)
  model = vaegan_kind.build_model(config)
  step = vaegan.make_train_step(model, config, mesh, 16)
  state, _ = step(vaegan_kind.init_state(config, model, mesh), parallel.put_rows(tiny_images[:16], mesh))
  state, _ = step(state, parallel.put_rows(tiny_images[16:32], mesh))  # Same shapes: no trace.
  with pytest.raises(AssertionError, match="traced"):
    step(state, parallel.put_rows(tiny_images[:24], mesh))


@pytest.mark.slow
def test_workdir_contents(runs):
  workdir = runs.workdir
  for name in ("config.json", "metrics.jsonl", "summary.json", "reconstructions.png",
               "prior_samples.png", "perturbation.png", "curves.png"):
    assert (workdir / name).is_file(), name
  records = monitor.read_metrics(workdir)
  train_keys = {"d_loss", "g_adv", "feature_recon", "pixel_l1", "kl", "d_acc_real", "d_acc_fake",
                "grad_norm_e", "grad_norm_g", "grad_norm_d", "steps_per_s"}
  assert train_keys <= set(records[0])
  val = [r for r in records if "val_psnr" in r]
  assert [r["step"] for r in val] == [4, 8] and all(np.isfinite(r["val_mse"]) for r in val)
  assert runs.resumed["val"]["val_psnr"] > 0
  assert vaegan_kind.read_config(workdir).model.widths == (4, 8, 16)  # config.json round-trips.


@pytest.mark.slow
def test_checkpoint_round_trip_and_step_restore(runs, tmp_path):
  workdir = runs.workdir
  ckpts = checkpoint.Checkpoints(workdir / "checkpoints")
  assert ckpts.steps() == [2, 4, 6, 8]
  ckpts.close()
  config, model, state, _ = runs_lib.restore_vaegan_state(workdir)
  # Save the restored state elsewhere and read it back: bit-identical, raw uint32 key kept.
  again = checkpoint.Checkpoints(tmp_path / "ckpt")
  again.save(8, state)
  fresh = vaegan_kind.init_state(config, model, parallel.make_mesh(1))
  restored, meta = again.restore(fresh)
  again.close()
  assert meta["step"] == 8
  chex.assert_trees_all_equal(state, restored)
  # An earlier step for ablations, and the best-on-validation one.
  _, _, state_4, meta_4 = runs_lib.restore_vaegan_state(workdir, which=4)
  assert meta_4["step"] == 4 and int(state_4.step) == 4
  assert not leaves_equal(state_4.params, state.params)
  with pytest.raises(UserError, match="no checkpoint at step 5"):
    runs_lib.restore_vaegan_state(workdir, which=5)


@pytest.mark.slow
def test_load_for_sampling(runs, tiny_images):
  trained = runs_lib.open_vaegan(runs.workdir, which="best")
  assert trained.step in (4, 8) and trained.config.model.latent_dim == 8
  mu, logvar = trained.encode(tiny_images[:4])
  assert mu.shape == logvar.shape == (4, 8)
  images = trained.decode(mu)
  assert images.shape == (4, 32, 32, 1) and bool(jnp.all(jnp.abs(images) <= 1))
  # The pure form, as the sampler will use it inside its own jitted step.
  e = trained.encoder
  mu2, _ = jax.jit(trained.model.encode)(e["params"], e["batch_stats"], tiny_images[:4])
  np.testing.assert_allclose(mu, mu2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_divergence_stops_clearly_and_keeps_last_good_checkpoint(runs, tmp_path):
  workdir = tmp_path / "diverge"
  shutil.copytree(runs.workdir, workdir)
  # An absurd learning rate sends the parameters to inf on the first resumed step. The workdir
  # only resumes its own run, so the copy's recorded config is made this one first.
  config = tiny_config(**{"optim.lr": 1e30, "train.num_steps": 12})
  configs.save_config(config, workdir / "config.json")
  with pytest.raises(monitor.NonFiniteLoss, match=r"step 9: .* is (inf|nan)") as error:
    vaegan.train_and_evaluate(config, workdir)
  assert isinstance(error.value, UserError)  # The CLI prints it as one line.
  ckpts = checkpoint.Checkpoints(workdir / "checkpoints")
  assert ckpts.latest_step() == 8
  ckpts.close()
  _, _, state, _ = runs_lib.restore_vaegan_state(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


# ================================================================================================
# Config validation, CLI entry, bench
# ================================================================================================
@pytest.mark.parametrize("field,value", [
    ("optim.lr", -1.0), ("optim.b1", 1.0), ("data.image_size", 30), ("data.image_size", 100),
    ("data.channels", 2), ("model.widths", (4, 8)), ("model.arch", "vit"),
    ("model.dtype", "float16"), ("train.batch_size", 0), ("loss.beta", -0.1),
    ("data.val_split", "test"), ("train.num_devices", 9), ("loss.kl_warmup_steps", -1),
])
def test_bad_config_value_names_the_field(field, value):
  config = tiny_config(**{field: value})
  with pytest.raises(UserError, match=field.replace(".", r"\.")):
    vaegan_kind.validate_config(config)


def test_batch_must_split_over_devices():
  config = tiny_config(**{"train.num_devices": 8, "train.batch_size": 12})
  with pytest.raises(UserError, match=r"train\.batch_size.*multiple of the device count \(8\)"):
    vaegan_kind.validate_config(config)


def test_unknown_or_missing_field_is_a_user_error():
  with pytest.raises(AttributeError, match="num_stpes"):  # The defaults are locked.
    tiny_config().train.num_stpes = 3
  config = ml_collections.ConfigDict(tiny_config().to_dict())  # Built without the defaults.
  config.train.num_stpes = 3
  with pytest.raises(UserError, match="num_stpes"):
    vaegan_kind.validate_config(config)
  config = ml_collections.ConfigDict(tiny_config().to_dict())
  del config.loss["beta"]
  with pytest.raises(UserError, match=r"loss\.beta.*missing"):
    vaegan_kind.validate_config(config)


def test_experiment_configs_are_valid():
  for name in ("vaegan_synthetic_tiny", "vaegan_synthetic", "vaegan_fer2013"):
    config = configs.load_config(configs_dir() / f"{name}.py")
    config.train.num_devices = 1
    vaegan_kind.validate_config(config)


def configs_dir():
  import pathlib
  return pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_cli_main_reports_bad_override_as_user_error(tmp_path):
  args = types.SimpleNamespace(config=str(configs_dir() / "vaegan_synthetic_tiny.py"),
                               overrides=["--config.optim.lr=-3"], workdir=str(tmp_path / "w"))
  with pytest.raises(UserError, match=r"optim\.lr"):
    vaegan.cli_main(args)


@pytest.mark.slow
def test_bench_times_the_real_step():
  record = bench.bench_vaegan(tiny_config(), batch_size=8, steps=2)
  assert record["what"] == "vaegan" and record["batch"] == 8 and record["images_per_s"] > 0
