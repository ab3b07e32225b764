"""A run's workdir: created (or reopened to resume) by the trainer that writes into it."""

import pathlib

from ferjax import configs
from ferjax.core import parallel


def open_for_training(workdir, config) -> tuple[pathlib.Path, bool]:
  """(workdir as a Path, whether this process writes files): the folder is created and, in
  process 0 only (the one that writes config.json, metrics and PNGs), the config is saved."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = parallel.is_main_process()
  if is_main:
    configs.save_config(config, workdir / "config.json")
  return workdir, is_main
