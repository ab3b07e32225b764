"""The FER methods of the toolbox: EAC (loss.eac_weight), RUL (model.head=rul), DAN
(model.head=dan) and the coupling-regulation loss (loss.name=coupling). Each loss against a
direct numpy transcription of the reference formula on random inputs, each head's forward
against what it must compute, a real train step of each (finite, with its extra terms), the
config rules as one line, and resume of a RUL run (dropout + feature mixing) equal to the
uninterrupted run."""

import pathlib
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax import configs, evaluate, losses, runs
from ferjax.core import parallel
from ferjax.core.checkpoint import Checkpoints
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.models import import_weights, resnet
from ferjax.train import classifier
from ferjax.kinds import classifier_batches

COUNTS = np.array([120, 80, 50, 30, 20, 12, 8])
K = len(COUNTS)


def _config(**sections):
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.image_size = 24
  config.optim.warmup_steps = 0
  config.train.update(num_steps=4, batch_size=16, num_devices=1)
  for section, fields in sections.items():
    config[section].update(fields)
  return config


# --- Losses against direct formulas ------------------------------------------------------------
def test_coupling_loss_moves_from_focal_to_ldam_on_the_bbn_schedule():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 2, (16, K)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, 16), jnp.int32)
  margins = losses.ldam_margins(COUNTS, 0.5)
  focal = losses.focal_loss(logits, labels, 2.0)
  ldam = losses.ldam_loss(logits, labels, margins, 1.0)
  for step, a in ((0, 1.0), (50, 0.75), (100, 0.0)):
    assert np.isclose(float(losses.coupling_weight(step, 100)), a)
    np.testing.assert_allclose(losses.coupling_loss(logits, labels, step, 100, margins),
                               a * focal + (1 - a) * ldam, rtol=1e-6)
  config = classifier_kind.default_config().loss
  config.name = "coupling"
  loss_fn = losses.make_loss(config, COUNTS, num_steps=100)
  np.testing.assert_allclose(loss_fn(logits, labels, 100), ldam, rtol=1e-6)


def test_class_activation_maps_and_eac_consistency_against_numpy():
  rng = np.random.default_rng(1)
  fmap = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  kernel = rng.normal(size=(6, K)).astype(np.float32)
  cams = np.asarray(losses.class_activation_maps(fmap, kernel))
  # EAC's hm: (feat.unsqueeze(1) * fc_weights.view(1, K, C, 1, 1)).sum(2), in NCHW.
  nchw = fmap.transpose(0, 3, 1, 2)
  direct = (nchw[:, None] * kernel.T[None, :, :, None, None]).sum(2)
  np.testing.assert_allclose(cams, direct, rtol=1e-5, atol=1e-5)
  other = rng.normal(size=cams.shape).astype(np.float32)
  np.testing.assert_allclose(losses.eac_consistency(cams, other),
                             np.mean((cams - other[..., ::-1]) ** 2), rtol=1e-6)
  # A mirror-symmetric pair is consistent: the maps of a mirror image are the mirrored maps.
  assert float(losses.eac_consistency(cams, cams[..., ::-1])) == 0.0


def test_dan_affinity_and_partition_losses_against_their_reference_formulas():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 16)).astype(np.float32)
  centers = rng.normal(size=(K, 16)).astype(np.float32)
  labels = rng.integers(0, K, 8)
  # AffinityLoss.forward: distmat = |x|^2 + |c|^2 - 2 x c^T, masked to the label, divided by
  # centers.var(dim=0).sum() (unbiased), clamped to [1e-12, 1e12], summed, / batch size.
  distmat = (x ** 2).sum(1)[:, None] + (centers ** 2).sum(1)[None] - 2 * x @ centers.T
  mask = labels[:, None] == np.arange(K)[None]
  dist = distmat * mask / centers.var(axis=0, ddof=1).sum()
  expected = np.clip(dist, 1e-12, 1e12).sum() / 8
  np.testing.assert_allclose(losses.affinity_loss(x, labels, centers), expected, rtol=1e-5)
  heads = rng.normal(size=(8, 4, 16)).astype(np.float32)
  np.testing.assert_allclose(losses.partition_loss(heads),
                             np.log(1 + 4 / heads.var(axis=1, ddof=1).mean()), rtol=1e-6)
  assert float(losses.partition_loss(heads[:, :1])) == 0.0


# --- Heads ---------------------------------------------------------------------------------------
def _init(config):
  model = classifier_kind.build_model(config, K)
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (6, 24, 24, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  return model, variables, x


@pytest.mark.slow
def test_rul_mixes_embeddings_by_relative_uncertainty():
  """Its classifier is affine, so the logits of a mixed pair are the same convex combination
  w L_i + (1 - w) L_j of the unmixed logits, with one w in (0, 1) for every class; a swapped
  pair mixes to the same row (w_j = 1 - w_i); an example mixed with itself is unchanged."""
  model, variables, x = _init(_config(model=dict(head="rul", rul_dim=8)))
  assert set(variables["params"]["rul"]) >= {"mu_fc", "log_var_fc", "mu_norm", "head"}
  plain, features = model.apply(variables, x, train=False)
  assert features.shape == (6, 8)
  same, _ = model.apply(variables, x, train=False, mix_with=jnp.arange(6))
  np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-5)
  swap = jnp.array([1, 0, 3, 2, 5, 4])
  mixed, _ = model.apply(variables, x, train=False, mix_with=swap)
  mixed, plain = np.asarray(mixed), np.asarray(plain)
  np.testing.assert_allclose(mixed[0], mixed[1], rtol=1e-5, atol=1e-5)
  w = (mixed[0] - plain[1]) / (plain[0] - plain[1])
  np.testing.assert_allclose(w, np.full(K, w[0]), rtol=1e-3, atol=1e-4)
  assert 0 < w[0] < 1


@pytest.mark.slow
def test_dan_heads_are_fused_by_a_softmax_across_heads_and_sown_for_its_losses():
  model, variables, x = _init(_config(model=dict(head="dan", dan_heads=3)))
  assert set(variables["params"]["dan"]) == {"attention1", "attention2", "attention3", "fc",
                                             "fc_norm", "centers"}
  (logits, features), aux = model.apply(variables, x, train=False, mutable=["aux"])
  sown = aux["aux"]["dan"]
  heads = np.asarray(sown["dan_heads"][0])
  assert logits.shape == (6, K) and heads.shape == (6, 3, features.shape[1])
  np.testing.assert_allclose(np.exp(heads).sum(1), 1.0, rtol=1e-5)  # log-softmax over heads
  np.testing.assert_allclose(features, heads.sum(1), rtol=1e-5)
  assert sown["dan_centers"][0].shape == (K, features.shape[1])


@pytest.mark.slow
@pytest.mark.parametrize("sections,terms", [
    (dict(loss=dict(eac_weight=5.0), augment=dict(erasing_prob=0.5)), {"eac_loss"}),
    (dict(loss=dict(eac_weight=5.0, eac_flip_erasing="independent"),
          augment=dict(erasing_prob=0.5, erasing_scale=(0.02, 0.25))), {"eac_loss"}),
    (dict(model=dict(name="vit_ti", width=1.0, depth=1, readout="gap"),
          loss=dict(eac_weight=5.0), optim=dict(name="adamw", lr=1e-3)), {"eac_loss"}),
    (dict(model=dict(head="rul", cbam=True), loss=dict(class_weights="inverse")), set()),
    (dict(model=dict(head="dan"), loss=dict(name="logit_adjusted")),
     {"affinity_loss", "partition_loss"}),
    (dict(loss=dict(name="coupling")), set()),
], ids=["eac", "eac_noisy_labels", "eac_vit", "rul_class_weights_cbam", "dan_logit_adjusted",
        "coupling"])
def test_a_real_train_step_of_each_method_is_finite(sections, terms):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(K), COUNTS).astype(np.int32)
  images = rng.integers(0, 256, (len(labels), 24, 24, 1), dtype=np.uint8)
  config = _config(**sections)
  classifier_kind.validate_config(config)
  mesh = parallel.make_mesh(1)
  model = classifier_kind.build_model(config, K)
  tx, _ = classifier_kind.make_optimizer(config, 4)
  state = classifier_kind.init_state(config, model, tx, mesh)
  start = jax.device_get(state.params)
  data = classifier_batches.device_data(config, images, labels, K, mesh)
  step = jax.jit(classifier.make_train_step(config, model, tx, COUNTS, 4, mesh, jit=False))
  for _ in range(2):
    state, metrics = step(state, data)
    assert np.isfinite(float(metrics["loss"]))
    assert terms <= set(metrics) and all(np.isfinite(float(metrics[t])) for t in terms)
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))
  if config.model.head == "dan":  # Its class centres learn with the model (the affinity loss).
    assert not np.allclose(start["dan"]["centers"], state.params["dan"]["centers"])


# --- Config rules, one line each -----------------------------------------------------------------
@pytest.mark.parametrize("sections,field", [
    (dict(model=dict(head="cosine", cosine_scale=30.0), loss=dict(eac_weight=5.0)),
     "loss.eac_weight"),
    (dict(model=dict(head="dan"), loss=dict(eac_weight=5.0)), "loss.eac_weight"),
    (dict(model=dict(head="rul", pooling="app")), "model.pooling"),
    (dict(model=dict(head="rul"), augment=dict(mixup_alpha=0.2)), "augment.mixup_alpha"),
    (dict(model=dict(head="dan", cosine_scale=30.0)), "model.cosine_scale"),
    (dict(model=dict(name="vit_ti", head="dan")), "model.head"),
    (dict(model=dict(head="eac")), "model.head"),
    (dict(loss=dict(name="crl")), "loss.name"),
    (dict(loss=dict(name="coupling"), sampler=dict(name="progressive")), "sampler.name"),
    (dict(model=dict(head="dan", dan_heads=0)), "model.dan_heads"),
    (dict(loss=dict(eac_weight=-1.0)), "loss.eac_weight"),
])
def test_incompatible_method_settings_are_one_line(sections, field):
  config = _config(**sections)
  with pytest.raises(UserError, match=field.replace(".", r"\.")) as error:
    classifier_kind.validate_config(config)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("head", ["dan", "rul"])
def test_tau_norm_is_refused_on_the_dan_and_rul_heads(head, monkeypatch, tmp_path):
  config = classifier_kind.default_config()
  config.model.head = head
  monkeypatch.setattr(runs, "open_classifier",
                      lambda workdir, which: types.SimpleNamespace(config=config))
  with pytest.raises(UserError, match=f"--tau-norm: .*model.head={head}.*model.head=linear"):
    evaluate.evaluate_run(tmp_path, tau_norm=1.0)


@pytest.mark.slow
def test_a_backbone_without_the_rul_or_dan_modules_initialises_them_fresh():
  """model.init_from a plain ResNet (e.g. `ferjax import-weights` without a head): the trunk is
  taken, the rul / dan modules are class-side and stay as initialised."""
  _, plain, _ = _init(_config())
  for head in ("rul", "dan"):
    _, fresh, _ = _init(_config(model=dict(head=head)))
    trunk = {c: {k: v for k, v in plain[c].items() if k not in resnet.HEAD_MODULES}
             for c in plain}
    out = import_weights.apply_init(fresh, trunk, what="test")
    np.testing.assert_array_equal(out["params"]["stem_conv"]["kernel"],
                                  plain["params"]["stem_conv"]["kernel"])
    chex.assert_trees_all_equal(out["params"][head], fresh["params"][head])


@pytest.mark.slow
def test_resume_of_a_rul_run_equals_the_uninterrupted_run(tmp_path, monkeypatch):
  """Dropout and the mixing partners come from the step's key: stopped after step 2 and
  resumed, the step-4 state is the uninterrupted one."""
  from ferjax.data import Dataset, splits

  def load(name, split, *, image_size=24, channels=1, **unused):
    rng = np.random.default_rng(len(split))
    counts = COUNTS // 4 if split == "train" else [4] * K
    labels = np.repeat(np.arange(K), counts).astype(np.int32)
    images = rng.integers(0, 256, (len(labels), image_size, image_size, channels), np.uint8)
    return Dataset(images, labels, tuple("abcdefg"), name, split)

  monkeypatch.setattr(splits, "load", load)
  config = lambda: _config(model=dict(head="rul", rul_dim=8),
                           train=dict(eval_every=2, checkpoint_every=2, log_every=2))
  classifier.train_and_evaluate(config(), tmp_path / "whole")
  classifier.train_and_evaluate(config(), tmp_path / "resumed", stop_after=2)
  classifier.train_and_evaluate(config(), tmp_path / "resumed")
  mesh = parallel.make_mesh(1)
  target = classifier_kind.abstract_state(config(), classifier_kind.build_model(config(), K), mesh)
  states = []
  for name in ("whole", "resumed"):
    ckpt = Checkpoints(tmp_path / name / "checkpoints")
    states.append(jax.device_get(ckpt.restore(target, 4)[0]))
    ckpt.close()
  chex.assert_trees_all_equal(states[0], states[1])


def test_protocol_has_every_toolbox_method_and_each_validates(experiment):
  protocol = experiment("protocol")
  methods = protocol.methods(1000, pathlib.Path("vaegan"))
  assert {"eac", "rul", "dan", "coupling"} <= set(methods)
  for name in ("eac", "rul", "dan", "coupling"):
    config = classifier_kind.default_config()
    configs.apply_overrides(config, methods[name])
    classifier_kind.validate_config(config)
    assert name in protocol.__doc__
