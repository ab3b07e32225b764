"""Where the real FER datasets are: the data dir, each dataset's builder, and the folder a
prepared version lives in; plus the two errors every reader shares (not prepared, damaged).

Layout of a data dir (default `$FERJAX_DATA_DIR`, else `~/.ferjax/datasets`):

    <data_dir>/<builder>/[<config>/]<version>/   one finished TFDS dataset (array_record files,
                                                 dataset_info.json, features.json) and ferjax's
                                                 MANIFEST and SOURCE (written by `prepare`)
    <data_dir>/.staging-<builder>-<id>/          a preparation in progress (deleted afterwards)
    <data_dir>/.<builder>.lock                   serialises preparations of one builder (holds
                                                 "pid N on HOST since TIME" while held)
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ferjax.data import reading
from ferjax.errors import UserError

# Public dataset name -> module holding its builder.
_MODULES = {
    "fer2013": "fer2013",
    "ferplus": "ferplus",
    "rafdb": "rafdb",
    "affectnet": "affectnet",
    "affectnet8": "affectnet",
    "ckplus": "ckplus",
}
NAMES = tuple(_MODULES)
DATA_DIR_ENV = "FERJAX_DATA_DIR"
MANIFEST = "ferjax_files.json"  # {"files": {shard file name: size in bytes}}, written by prepare.
SOURCE = "ferjax_source.json"  # {"manual_dir", "files", "fingerprint"}: what prepare read.


def default_data_dir() -> Path:
  """`$FERJAX_DATA_DIR` when set, else `~/.ferjax/datasets`."""
  env = os.environ.get(DATA_DIR_ENV)
  return Path(env).expanduser() if env else Path.home() / ".ferjax" / "datasets"


def resolve_data_dir(data_dir) -> Path:
  path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
  if path.exists() and not path.is_dir():
    raise UserError(f"data dir {reading.shown(path)} is not a folder: expected a folder for the "
                    f"prepared datasets (--data-dir or ${DATA_DIR_ENV})")
  return path


def builder_module(name: str):
  if name not in _MODULES:
    if name == "synthetic":
      raise UserError("dataset 'synthetic' is generated on the fly and needs no preparation")
    raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(NAMES)}")
  return importlib.import_module(f"ferjax.data.builders.{_MODULES[name]}")


def dataset_spec(name: str):
  return builder_cls(name).spec_for(name)


def builder_cls(name: str):
  return builder_module(name).BUILDER


def prepare_command(name: str, manual_dir: str = "DIR") -> str:
  return f"ferjax data prepare {name} --manual-dir {manual_dir}"


def info(name: str) -> dict:
  """What a person needs to know about dataset `name` (no data needed).

  Keys: name, class_names, num_classes, image_shape (stored form), splits, source (where to get
  it), layout (what the manual dir must hold), description, notes, prepare_command.
  """
  d = dataset_spec(name).as_dict()
  d["prepare_command"] = prepare_command(name)
  return d


# ---------------------------------------------------------------------------------------------
# Locating prepared data
# ---------------------------------------------------------------------------------------------


def variant_dir(cls, data_dir: Path, config: str | None) -> Path:
  parts = [cls.name] + ([config] if config else []) + [str(cls.VERSION)]
  return data_dir.joinpath(*parts)


def is_complete(variant_dir: Path) -> bool:
  return all((variant_dir / f).is_file() for f in ("dataset_info.json", "features.json"))


def prepared_config(name: str, data_dir: Path, image_size=None) -> tuple[bool, str | None]:
  """(prepared?, config name) for dataset `name` in `data_dir`.

  Builders without configs use config None. For builders with configs (AffectNet's stored image
  size), prefers the config matching `image_size`, then the default, then any prepared one.
  """
  cls = builder_cls(name)
  if not hasattr(cls, "config_for"):
    return is_complete(variant_dir(cls, data_dir, None)), None
  candidates = [f"{image_size}px"] if image_size is not None else []
  candidates.append(cls.config_for(None).name)
  root = data_dir / cls.name
  if root.is_dir():
    candidates.extend(sorted(p.name for p in root.iterdir() if not p.name.startswith(".")))
  for config in candidates:
    if cls.config_named(config) and is_complete(variant_dir(cls, data_dir, config)):
      return True, config
  return False, cls.config_for(None).name


def is_prepared(name: str, data_dir=None) -> bool:
  """Whether dataset `name` has been prepared in `data_dir`."""
  return prepared_config(name, resolve_data_dir(data_dir))[0]


def prepared_dir(name: str, data_dir=None, image_size: int | None = None) -> Path | None:
  """The folder `prepare(name, ..., image_size=image_size)` would reuse, or None when that
  preparation does not exist yet."""
  cls = builder_cls(name)
  config = cls.config_for(image_size).name if hasattr(cls, "config_for") else None
  final = variant_dir(cls, resolve_data_dir(data_dir), config)
  return final if is_complete(final) else None


def not_prepared(name: str, data_dir: Path) -> UserError:
  spec = dataset_spec(name)
  where = "" if data_dir == default_data_dir() else f" (with {DATA_DIR_ENV}={data_dir})"
  return UserError(f"dataset {name!r} is not prepared in {data_dir}: run "
                   f"`{prepare_command(name)}`{where} where DIR holds {spec.layout} "
                   f"(get it from {spec.source})")


def damaged(name: str, data_dir: Path, path: Path, problem: str) -> UserError:
  where = "" if data_dir == default_data_dir() else f" --data-dir {data_dir}"
  return UserError(f"prepared dataset {name!r} is damaged: {reading.shown(path)} {problem}: "
                   f"prepare it again with `{prepare_command(name)} --force{where}`")
