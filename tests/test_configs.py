"""Config files and --config.field=value overrides: typed, validated, one-line errors."""

import pathlib
import textwrap

import pytest

from ferjax import configs
from ferjax.errors import UserError

CONFIG = textwrap.dedent('''
    """Test config. Run: ferjax train --config this.py --workdir /tmp/x"""
    import ml_collections

    def get_config():
      c = ml_collections.ConfigDict()
      c.seed = 0
      c.optim = ml_collections.ConfigDict({"lr": 0.1, "nesterov": True, "name": "sgd"})
      c.data = ml_collections.ConfigDict({"image_size": 48, "widths": (8, 16), "val_split": None})
      return c
    ''')


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(CONFIG)
  return path


def test_overrides_are_typed_by_the_field(config_file):
  c = configs.load_config(config_file, ["config.optim.lr=0.5", "--config.seed=3",
                                        "config.optim.nesterov=false", "config.data.widths=(4,8,16)",
                                        "config.optim.name=adamw", "config.data.val_split=validation"])
  assert c.optim.lr == 0.5 and isinstance(c.optim.lr, float)
  assert c.seed == 3 and c.optim.nesterov is False
  assert c.data.widths == (4, 8, 16)
  assert c.optim.name == "adamw" and c.data.val_split == "validation"
  assert configs.load_config(config_file, ["config.optim.lr=1"]).optim.lr == 1.0
  # None unsets an optional text field that the file set (validation held out of train).
  c = configs.load_config(config_file, ["config.data.val_split=validation",
                                        "config.data.val_split=None"])
  assert c.data.val_split is None


@pytest.mark.parametrize("override, needle", [
    ("config.optim.lrr=0.1", "optim has no field 'lrr'"),
    ("config.nope.x=1", "no field 'nope'"),
    ("config.data.image_size=big", "'data.image_size': expected int"),
    ("config.data.image_size=4.5", "expected int"),
    ("config.optim.nesterov=maybe", "expected bool"),
    ("config.optim=1", "is a group"),
    ("config.seed", "expected field=value"),
])
def test_bad_overrides_name_the_field(config_file, override, needle):
  with pytest.raises(UserError, match=needle.replace("(", r"\(")):
    configs.load_config(config_file, [override])


def test_missing_and_broken_files(tmp_path):
  with pytest.raises(UserError, match="not found"):
    configs.load_config(tmp_path / "missing.py")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(UserError, match="broken.py failed to load: SyntaxError"):
    configs.load_config(broken)
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(UserError, match="defines no get_config"):
    configs.load_config(empty)


def test_check_and_save(config_file, tmp_path):
  c = configs.load_config(config_file)
  with pytest.raises(UserError, match="'optim.lr': expected a positive number, got -1"):
    configs.check(-1 > 0, "optim.lr", "a positive number", -1)
  configs.save_config(c, tmp_path / "config.json")
  assert '"lr": 0.1' in (tmp_path / "config.json").read_text()


def test_every_experiment_config_loads():
  import pathlib
  folder = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
  files = sorted(folder.glob("*.py"))
  for path in files:
    c = configs.load_config(path)
    doc = path.read_text().split('"""')[1]
    assert "ferjax " in doc, f"{path.name}: docstring must give the exact command"
    configs.to_dict(c)  # JSON-serialisable (written to each workdir)


# --- Unknown fields: refused from files and flags, for every kind of run ------------------------
KIND_CONFIG = textwrap.dedent('''
    """Test config. Run: ferjax train --config this.py --workdir /tmp/x"""
    from ferjax.kinds import {kind}

    def get_config():
      config = {kind}.default_config()
      config.train.num_steps = 3
      config.{field} = 0.1
      return config
    ''')


@pytest.mark.parametrize("kind", ["classifier", "vaegan"])
def test_a_misspelled_field_in_a_config_file_is_refused_naming_it(tmp_path, kind):
  path = tmp_path / "typo.py"
  path.write_text(KIND_CONFIG.format(kind=kind, field="optim.lrr"))
  with pytest.raises(UserError, match=r"typo\.py line 8: unknown config field 'optim\.lrr'"):
    configs.load_config(path)
  path.write_text(KIND_CONFIG.format(kind=kind, field="train.num_stepz"))
  with pytest.raises(UserError, match=r"unknown config field 'train\.num_stepz'"):
    configs.load_config(path)


@pytest.mark.parametrize("kind", ["classifier", "vaegan"])
def test_a_misspelled_field_in_a_flag_is_refused_naming_it(tmp_path, kind):
  path = tmp_path / "ok.py"
  path.write_text(KIND_CONFIG.format(kind=kind, field="optim.lr"))
  assert configs.load_config(path).optim.lr == 0.1
  with pytest.raises(UserError, match="optim has no field 'lrr'"):
    configs.load_config(path, ["config.optim.lrr=0.2"])


def test_a_config_built_from_scratch_is_checked_field_by_field():
  """A file may build its ConfigDict without the locked defaults: validation still refuses an
  unknown field and names a missing one."""
  import ml_collections
  from ferjax.kinds import classifier
  config = ml_collections.ConfigDict(classifier.default_config().to_dict())
  config.optim.lrr = 0.1
  with pytest.raises(UserError, match=r"unknown config field 'optim\.lrr'"):
    classifier.validate_config(config)
  config = ml_collections.ConfigDict(classifier.default_config().to_dict())
  del config.train["num_steps"]
  with pytest.raises(UserError, match=r"'train\.num_steps' is missing"):
    classifier.validate_config(config)


def test_get_config_raising_is_one_line_naming_the_file_line(tmp_path):
  path = tmp_path / "raises.py"
  path.write_text("def get_config():\n  return 1 / 0\n")
  with pytest.raises(UserError, match=r"raises\.py line 2: get_config\(\) failed: "
                                      r"ZeroDivisionError"):
    configs.load_config(path)


def test_field_rules_describe_what_they_accept():
  assert configs.integer(3, 1).valid(2) and not configs.integer(3, 1).valid(True)
  assert not configs.integer(3, 1).valid(0) and "an integer >= 1" == configs.integer(3, 1).expected
  rule = configs.number(0.5, 0, 1, hi_open=True, optional=True)
  assert rule.valid(None) and rule.valid(0.0) and not rule.valid(1.0)
  assert not rule.valid(float("nan")) and not rule.valid("0.5")
  assert configs.one_of("a", ("a", "b")).valid("b") and not configs.one_of("a", ("a",)).valid(1)


def test_none_unsets_any_field_and_validation_decides():
  from ferjax.kinds import classifier
  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
  config = configs.load_config(path / "classifier_synthetic_tiny.py",
                               ["config.train.num_devices=4", "config.train.num_devices=None"])
  assert config.train.num_devices is None  # All devices, as the README says.
  classifier.validate_config(config)
  config = configs.load_config(path / "classifier_synthetic_tiny.py", ["config.optim.lr=None"])
  with pytest.raises(UserError, match=r"'optim\.lr': expected a number > 0, got None"):
    classifier.validate_config(config)
