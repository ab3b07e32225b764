"""Test setup: 8 fake CPU devices (for the 1-vs-8 device tests), a shared compilation cache and
the real-data locator."""

import atexit
import importlib
import os
import sys
import pathlib
import shutil
import tempfile

# Read when jax is imported (chex imports it below): the CPU backend only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this session's tests and the CLI processes they start:
# many tests train the same tiny programs, and loading an executable is cheaper than compiling
# it again (the values are the same either way). Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="ferjax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import chex  # noqa: E402
import pytest  # noqa: E402

# 8 fake CPU devices (for the 1-vs-8 device tests); effective only before the first jax operation
# initialises a backend, and conftest is imported before any test module. Trainers default to all
# devices, so single-device tests pass num_devices=1 explicitly. chex puts the flag into
# os.environ["XLA_FLAGS"] (other XLA flags kept), so processes started with this environment get
# the same 8 devices; test_trust's CLI runs, which must compile the same programs, also pass it
# themselves.
chex.set_n_cpu_devices(8)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_FER2013 = REPO.parent / "shared" / "data" / "fer2013"


@pytest.fixture
def experiment():
  """Imports a module of experiments/ by name (they import each other as top-level modules)."""
  def load(name: str):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
      return importlib.import_module(name)
    finally:
      sys.path.pop(0)
  return load


@pytest.fixture
def shared_fer2013():
  """The real FER-2013 folders beside the checkout; skips when absent (users' machines, CI forks)."""
  if not (SHARED_FER2013 / "train").is_dir():
    pytest.skip(f"real FER-2013 data not found at {SHARED_FER2013}")
  return SHARED_FER2013


# --- One tiny finished run of each kind, shared by the bad-input suites --------------------------
TINY_CLASSIFIER_CONFIG = '''"""A 4-step ResNet-10 (width 1/8) on 32 px synthetic faces: the bad-input suites' shared run."""
from ferjax.kinds import classifier


def get_config():
  config = classifier.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.update(image_size=32, channels=1, num_examples=140)
  config.optim.warmup_steps = 1
  config.train.update(num_steps=4, batch_size=16, num_devices=1, log_every=2, eval_every=2,
                      checkpoint_every=2)
  config.eval.batch_size = 64
  return config
'''

TINY_VAEGAN_CONFIG = '''"""A 2-step VAE-GAN (widths 4-8-16) on 32 px synthetic faces: the bad-input suites' shared run."""
from ferjax.kinds import vaegan


def get_config():
  config = vaegan.default_config()
  config.data.update(image_size=32, channels=1, num_examples=64, val_examples=16)
  config.model.update(latent_dim=8, widths=(4, 8, 16))
  config.train.update(num_steps=2, batch_size=16, num_devices=1, log_every=1, eval_every=2,
                      sample_every=2, checkpoint_every=2)
  return config
'''


class TinyRuns:
  """Paths of the shared runs: config files and finished workdirs (copy before changing)."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.classifier_config = root / "classifier_tiny.py"
    self.vaegan_config = root / "vaegan_tiny.py"
    self.classifier = root / "classifier"
    self.vaegan = root / "vaegan"


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
  """A finished 4-step classifier run and a 2-step VAE-GAN run, trained once per session
  through the CLI, for cases that need a real workdir (copy one before damaging it)."""
  from ferjax import cli
  runs = TinyRuns(tmp_path_factory.mktemp("tiny_runs"))
  runs.classifier_config.write_text(TINY_CLASSIFIER_CONFIG)
  runs.vaegan_config.write_text(TINY_VAEGAN_CONFIG)
  assert cli.main(["train", "--config", str(runs.classifier_config),
                   "--workdir", str(runs.classifier)]) == 0
  assert cli.main(["train-vaegan", "--config", str(runs.vaegan_config),
                   "--workdir", str(runs.vaegan)]) == 0
  return runs
