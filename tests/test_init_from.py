"""model.init_from: a classifier starts from a finished run's or an imported backbone."""

import chex
import numpy as np
import pytest
from badinput import copy_run, expect_one_line
from safetensors.numpy import save_file
from test_import_weights import TINY, namespace, random_state, tv_shapes

from ferjax import configs, runs
from ferjax.core import parallel
from ferjax.kinds import classifier as kind
from ferjax.models import import_weights


def fresh_state(config, num_classes):
  model = kind.build_model(config, num_classes)
  tx, _ = kind.make_optimizer(config)
  return kind.init_state(config, model, tx, parallel.make_mesh(1)), tx


def leaves(tree) -> dict:
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in __import__("jax").tree_util.tree_leaves_with_path(tree)}


def test_from_a_finished_run_takes_its_backbone_and_keeps_the_head_only_for_its_classes(
    tiny_runs):
  source = runs.open_classifier(tiny_runs.classifier, "best")
  config = configs.load_config(tiny_runs.classifier_config)
  config.model.init_from = str(tiny_runs.classifier)
  config.seed = 5  # Another random init: everything that matches must come from the run.
  state, _ = fresh_state(config, 7)

  same = runs.initial_weights(config, state, source.class_names)
  want = leaves(dict(source.variables))
  chex.assert_trees_all_equal(leaves(same), want)

  other = runs.initial_weights(config, state, ("a", "b", "c", "d", "e", "f", "g"))
  fresh = leaves({"params": state.params})
  # Other classes: the fresh head, not the run's.
  chex.assert_trees_all_equal(leaves(other), {name: fresh[name] if "head" in name else value
                                              for name, value in want.items()})


def test_from_an_import_folder_and_through_training(tiny_runs, tmp_path):
  weights = tmp_path / "tiny.safetensors"
  save_file(random_state(tv_shapes("resnet18", **TINY)), weights)
  folder = tmp_path / "imported"
  import_weights.cli_main(namespace(weights, folder, channels=1, num_classes=7))
  init, meta = import_weights.load_init(folder)
  config = configs.load_config(tiny_runs.classifier_config)
  config.model.update(name="resnet18", stem="standard", width=meta["width"],
                      init_from=str(folder))
  config.data.image_size = 48
  state, tx = fresh_state(config, 7)
  started = kind.with_weights(state, runs.initial_weights(config, state, ["x"] * 7), tx,
                              parallel.make_mesh(1))
  np.testing.assert_array_equal(np.asarray(started.params["stem_conv"]["kernel"]),
                                init["params"]["stem_conv"]["kernel"])
  assert int(started.step) == 0


def test_bad_init_from_is_one_line(tiny_runs, tmp_path, capsys):
  config = ["--config", tiny_runs.classifier_config]
  missing = tmp_path / "nowhere"
  expect_one_line(["train", *config, "--workdir", tmp_path / "a",
                   f"--config.model.init_from={missing}"], [str(missing)], capsys,
                  protect=[tiny_runs.classifier])
  assert not (tmp_path / "a").exists()
  line = expect_one_line(["train", *config, "--workdir", tmp_path / "b",
                          "--config.model.width=0.25",
                          f"--config.model.init_from={tiny_runs.classifier}"],
                         ["model.init_from", "shape"], capsys, protect=[tiny_runs.classifier])
  assert "(8,)" in line or "(16,)" in line
  vaegan = copy_run(tiny_runs.vaegan, tmp_path / "vaegan")
  expect_one_line(["train", *config, "--workdir", tmp_path / "c",
                   f"--config.model.init_from={vaegan}"], ["vaegan"], capsys,
                  protect=[vaegan])


@pytest.mark.parametrize("value", ["-nope", "anger,-disgust"])
def test_bad_classes_field_is_one_line(tiny_runs, tmp_path, capsys, value):
  expect_one_line(["train", "--config", tiny_runs.classifier_config, "--workdir",
                   tmp_path / "w", f"--config.data.classes={value}"], "data.classes", capsys)
