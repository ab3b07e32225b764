"""The long-tail toolbox in the trainer: how the class-weighted batch loss is averaged
(loss.weight_average, ferjax.losses.weighted_average) inside the classifier's train step; the
cosine head (model.head, LDAM-DRW's NormedLinear) and attentive patch pooling (model.pooling,
APViT's APP): their config rules, a real train step each, the protocol's LDAM-DRW methods and
the refusal of --tau-norm on a cosine head."""

import json
import pathlib
import sys
import types

import jax
import numpy as np
import pytest

from ferjax import configs, evaluate, losses, runs
from ferjax.core import parallel
from ferjax.data import pipeline
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.models import resnet
from ferjax.train import classifier
from ferjax.kinds import classifier_batches

COUNTS = np.array([120, 80, 50, 30, 20, 12, 8])


def _config(weight_average):
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.image_size = 24
  config.model.stem = "small"
  config.optim.warmup_steps = 0
  config.train.update(num_steps=4, batch_size=16, num_devices=1)
  config.loss.update(class_weights="effective", beta=0.99, weight_average=weight_average)
  config.augment.mixup_alpha = 0.4
  return config


def test_the_default_is_mean_and_a_wrong_value_is_one_line():
  assert classifier_kind.default_config().loss.weight_average == "mean"
  config = _config("sum")
  with pytest.raises(UserError, match="loss.weight_average"):
    classifier_kind.validate_config(config)


@pytest.mark.slow
def test_train_step_normalizes_by_the_mixed_class_weights_of_the_batch():
  """normalized = sum_i e_i [lam_i w(y_i) L_i + (1 - lam_i) w(y'_i) L'_i] / sum_i [lam_i w(y_i)
  + (1 - lam_i) w(y'_i)]; mean divides the same sum by B. Same state, same batch: their ratio is
  B over the mixed class weights of the batch's labels and mixup partners."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(7), COUNTS).astype(np.int32)
  images = rng.integers(0, 256, (len(labels), 24, 24, 1), dtype=np.uint8)
  mesh = parallel.make_mesh(1)
  loss = {}
  for mode in ("mean", "normalized"):
    config = _config(mode)
    classifier_kind.validate_config(config)
    model = resnet.model_from_config(config.model, 7)
    tx, _ = classifier_kind.make_optimizer(config, 4)
    state = classifier_kind.init_state(config, model, tx, mesh)
    data = classifier_batches.device_data(config, images, labels, 7, mesh)
    step = classifier.make_train_step(config, model, tx, COUNTS, 4, mesh, jit=False)
    loss[mode] = float(jax.jit(step)(state, data)[1]["loss"])
    # The batch and the mixup draws of step 0, as the train step makes them.
    batch_key, mixup_key = jax.random.split(
        jax.random.fold_in(classifier_kind.rng_streams(config.seed).train, 0))
    batch_images, batch_labels, _ = jax.jit(
        classifier_batches.batch_maker(config, data, num_steps=4, mesh=mesh))(batch_key, 0)
    _, partners, lam = pipeline.mixup(mixup_key, batch_images, batch_labels, 0.4)
  w = losses.class_weights(COUNTS, "effective", 0.99)
  lam = np.asarray(lam, np.float64)
  mixed = np.sum(lam * w[np.asarray(batch_labels)] + (1 - lam) * w[np.asarray(partners)])
  assert not np.isclose(mixed, 16)  # The test tells the two apart.
  assert loss["normalized"] == pytest.approx(loss["mean"] * 16 / mixed, rel=1e-4)


# --- Cosine head and attentive patch pooling ---------------------------------------------------
def _validate(**fields):
  config = _config("mean")
  for dotted, value in fields.items():
    section, name = dotted.split("__")
    config[section][name] = value
  classifier_kind.validate_config(config)


def test_defaults_are_the_linear_head_and_average_pooling():
  model = classifier_kind.default_config().model
  assert (model.head, model.cosine_scale, model.pooling) == ("linear", 1.0, "avg")


@pytest.mark.parametrize("fields,field", [
    (dict(model__cosine_scale=30.0), "model.cosine_scale"),  # Linear head: scale unused.
    (dict(model__head="cosine"), "model.cosine_scale"),  # CE on bare cosines.
    (dict(model__head="cosine", loss__name="ldam"), "loss.ldam_scale"),  # LDAM with s = 1.
    (dict(model__head="cosine", loss__name="ldam", loss__ldam_scale=30.0,
          model__cosine_scale=30.0), "model.cosine_scale"),  # Scaled twice.
    (dict(model__head="arcface"), "model.head"),
    (dict(model__pooling="max"), "model.pooling"),
    (dict(model__pooling="app", model__app_keep=0.0), "model.app_keep"),
    (dict(model__pooling="app", model__app_keep=1.5), "model.app_keep"),
])
def test_cosine_head_and_app_rules_are_one_line(fields, field):
  with pytest.raises(UserError, match=field.replace(".", r"\.")) as error:
    _validate(**fields)
  assert "\n" not in str(error.value)


def test_cosine_head_and_app_settings_that_validate():
  _validate(model__head="cosine", loss__name="ldam", loss__ldam_scale=30.0)  # As published.
  _validate(model__head="cosine", model__cosine_scale=16.0)  # CE / others: the model scales.
  _validate(model__pooling="app", model__app_keep=0.5)
  _validate(model__pooling="app", model__app_keep=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(model=dict(head="cosine"), loss=dict(name="ldam", ldam_scale=30.0, drw_start_step=1,
                                              weight_average="normalized")),
    dict(model=dict(pooling="app", app_keep=0.5), loss=dict(name="logit_adjusted")),
], ids=["cosine_ldam_drw", "app"])
def test_a_real_train_step_is_finite(overrides):
  """Two steps of the classifier's own train step (the second after DRW switches on)."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(7), COUNTS).astype(np.int32)
  images = rng.integers(0, 256, (len(labels), 24, 24, 1), dtype=np.uint8)
  config = _config("mean")
  for section, fields in overrides.items():
    config[section].update(fields)
  classifier_kind.validate_config(config)
  mesh = parallel.make_mesh(1)
  model = classifier_kind.build_model(config, 7)
  tx, _ = classifier_kind.make_optimizer(config, 4)
  state = classifier_kind.init_state(config, model, tx, mesh)
  data = classifier_batches.device_data(config, images, labels, 7, mesh)
  step = jax.jit(classifier.make_train_step(config, model, tx, COUNTS, 4, mesh, jit=False))
  for _ in range(2):
    state, metrics = step(state, data)
    assert np.isfinite(float(metrics["loss"]))
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))
  if config.model.head == "cosine":
    assert set(state.params["head"]) == {"kernel"}
    logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            np.zeros((2, 24, 24, 1), np.float32), train=False)
    assert np.all(np.abs(np.asarray(logits)) <= 1 + 1e-5)  # Bare cosines with LDAM.


def test_tau_norm_is_refused_on_a_cosine_head(monkeypatch, tmp_path):
  config = classifier_kind.default_config()
  config.model.head = "cosine"
  monkeypatch.setattr(runs, "open_classifier",
                      lambda workdir, which: types.SimpleNamespace(config=config))
  with pytest.raises(UserError, match="--tau-norm: .*model.head=cosine.*normalised already"):
    evaluate.evaluate_run(tmp_path, tau_norm=1.0)


def test_protocol_reports_the_published_ldam_drw_and_labels_the_linear_variant(experiment):
  protocol = experiment("protocol")
  methods = protocol.methods(1000, pathlib.Path("vaegan"))
  for name, expected in (
      ("ldam_drw", dict(model=dict(head="cosine"), loss=dict(
          name="ldam", ldam_scale=30.0, ldam_max_margin=0.5, class_weights="effective",
          beta=0.9999, drw_start_step=800, weight_average="normalized"))),
      ("ldam_drw_linear", dict(model=dict(head="linear"), loss=dict(
          name="ldam", ldam_scale=1.0, ldam_max_margin=0.5, class_weights="effective",
          drw_start_step=750, weight_average="mean")))):
    config = classifier_kind.default_config()
    configs.apply_overrides(config, methods[name])
    classifier_kind.validate_config(config)
    for section, fields in expected.items():
      assert {k: config[section][k] for k in fields} == fields, name
    assert name in protocol.__doc__


def test_protocol_refuses_an_unknown_method_before_making_its_out_folder(tmp_path, monkeypatch,
                                                                         capsys, experiment):
  protocol, runner = experiment("protocol"), experiment("runner")
  out = tmp_path / "protocol_out"
  monkeypatch.setattr(sys, "argv", ["protocol.py", "--out", str(out), "--methods", "nosuch"])
  with pytest.raises(SystemExit) as info:
    runner.main_guard(protocol.main)
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--methods: unknown ['nosuch']" in err[0], err
  assert not out.exists()


def test_feature_semantic_refuses_an_unknown_variant_before_making_its_out_folder(tmp_path,
                                                                                   experiment):
  feature_semantic = experiment("feature_semantic")
  out = tmp_path / "heads"
  with pytest.raises(UserError, match=r"--variants: unknown \['nosuch'\]"):
    feature_semantic.main(["--base", str(tmp_path / "base"), "--out", str(out),
                           "--variants", "crt", "nosuch"])
  assert not out.exists() and not (tmp_path / "base").exists()


def test_feature_semantic_reuses_a_head_only_with_its_variants_settings(tmp_path, experiment):
  """A finished head whose head.json lacks the variant's values (wb trained with the former
  absolute radius) is refused, not reported under the variant's new settings."""
  feature_semantic = experiment("feature_semantic")
  from ferjax.kinds import retrain_head as head_kind  # pylint: disable=import-outside-toplevel
  _, wb = feature_semantic.heads()["wb"]
  _, wb_radius = feature_semantic.heads()["wb_radius"]
  old = head_kind.default_config()
  configs.apply_overrides(old, [f"--{o}" for o in wb_radius])
  (tmp_path / "head.json").write_text(json.dumps({"config": configs.to_dict(old)}))
  for overrides in (wb_radius, [*wb_radius, "config.seed=0"]):
    config = head_kind.default_config()
    configs.apply_overrides(config, [f"--{o}" for o in overrides])
    feature_semantic.check_head(tmp_path, config, overrides)
  config = head_kind.default_config()
  configs.apply_overrides(config, [f"--{o}" for o in wb])
  with pytest.raises(UserError, match="head.max_norm_thresh=None, not 0.1"):
    feature_semantic.check_head(tmp_path, config, wb)


def test_feature_semantic_trains_only_the_backbones_its_chosen_heads_need(tmp_path, monkeypatch,
                                                                          experiment):
  """`--variants wb` trains the strong-weight-decay backbone only (no plain, no logit-adjusted,
  no tau-normalisation); the default table trains all three."""
  feature_semantic, runner = experiment("feature_semantic"), experiment("runner")
  trained, heads_run = [], []
  fake = {"accuracy": 0.5, "mean_class_accuracy": 0.5, "per_class_recall": [0.5] * 7}
  monkeypatch.setattr(runner, "train_and_test",
                      lambda config, workdir, overrides, report_split: (
                          trained.append(pathlib.Path(workdir).name) or {**fake, "val": fake}))
  monkeypatch.setattr(feature_semantic, "run_head", lambda backbone, out, overrides, split: (
      heads_run.append(out.name) or {**fake, "val": fake}))
  monkeypatch.setattr(feature_semantic, "tau_norm",
                      lambda backbone, split: heads_run.append("tau") or {**fake, "val": fake})
  monkeypatch.setattr(runner, "write_results", lambda *args: "")
  feature_semantic.main(["--base", str(tmp_path / "base"), "--out", str(tmp_path / "heads"),
                         "--seeds", "0", "--variants", "wb", "wb_radius"])
  assert trained == ["wd_seed0"] and heads_run == ["wb_seed0", "wb_radius_seed0"]
  trained.clear()
  heads_run.clear()
  feature_semantic.main(["--base", str(tmp_path / "base"), "--out", str(tmp_path / "heads"),
                         "--seeds", "0"])
  assert trained == ["none_seed0", "logit_adj_seed0", "wd_seed0"] and "tau" in heads_run
