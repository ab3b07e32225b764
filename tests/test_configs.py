"""Config files and --config.field=value overrides: typed, validated, one-line errors."""

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
