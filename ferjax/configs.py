"""Experiment configs: Python files with `get_config()`, plus `--config.field=value` overrides.

A config file is plain Python returning an `ml_collections.ConfigDict`; its docstring holds the
exact command that runs it. Overrides are parsed with the type of the field they replace, so a
typo or a wrong type is caught before anything compiles.
"""

import ast
import importlib.util
import json
import pathlib

import ml_collections

from ferjax.errors import UserError


def load_config(path, overrides=()) -> ml_collections.ConfigDict:
  """Loads `path` (a .py file with get_config()) and applies 'a.b=value' overrides."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"config file {path} not found: expected a Python file defining get_config()")
  spec = importlib.util.spec_from_file_location(f"ferjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # A broken config file is the user's to fix: say where.
    raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} defines no get_config()")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"config file {path}: get_config() must return an ml_collections.ConfigDict")
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """Applies 'a.b=value' strings in place, parsing value with the type of config.a.b."""
  for item in overrides:
    if "=" not in item:
      raise UserError(f"override {item!r}: expected field=value, e.g. --config.optim.lr=0.1")
    key, raw = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    parent, leaf = _lookup_parent(config, key)
    old = parent[leaf]
    parent[leaf] = parse_value(key, raw, old)


def _lookup_parent(config, key):
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "config"
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      raise UserError(f"unknown config field {key!r}: {where} has no field {part!r} (known: {known})")
    if i < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise UserError(f"config field {key!r} is a group: set one of its fields instead")
  return node, parts[-1]


def parse_value(key: str, raw: str, old):
  """Parses `raw` as the type of `old` (None-valued fields take any Python literal). `None`
  unsets an optional text field (e.g. data.val_split=None: hold validation out of train)."""
  if raw == "None" and isinstance(old, str):
    return None
  try:
    if isinstance(old, bool):
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(old, int):
      return int(raw)
    if isinstance(old, float):
      return float(raw)
    if isinstance(old, str):
      return raw
    if isinstance(old, (tuple, list)):
      value = ast.literal_eval(raw)
      value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
      return type(old)(value)
    if old is None:
      try:
        return ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        return raw
  except (ValueError, SyntaxError):
    pass  # Not parseable as the field's type: the error below says what was expected.
  raise UserError(f"config field {key!r}: expected {type(old).__name__}, got {raw!r}")


def to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def save_config(config, path) -> None:
  pathlib.Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def read_saved(default: ml_collections.ConfigDict, path, what: str) -> ml_collections.ConfigDict:
  """A run's saved config.json laid over `default` (the trainer's default_config()), so every
  field gets back its Python type (tuples, ints) and fields added since default sanely."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path} not found: is {path.parent} a {what} workdir?")
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None
  try:
    default.update_from_flattened_dict(_flatten(stored))
  except (KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: does not fit the {what} config ({e})") from None
  return default


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def check(condition: bool, field: str, expected: str, value) -> None:
  """One-line validation helper: `check(lr > 0, 'optim.lr', 'a positive number', lr)`."""
  if not condition:
    raise UserError(f"config field {field!r}: expected {expected}, got {value!r}")
