"""Experiment configs: Python files with `get_config()`, plus `--config.field=value` overrides.

A config file is plain Python returning an `ml_collections.ConfigDict`; its docstring holds the
exact command that runs it. Overrides are parsed with the type of the field they replace, so a
typo or a wrong type is caught before anything compiles.
"""

import ast
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import traceback
from typing import Any, Callable

import ml_collections

from ferjax import writing
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
  try:
    config = module.get_config()
  except Exception as e:
    raise UserError(_get_config_error(path, e)) from None
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
  unsets a field (e.g. data.val_split=None: hold validation out of train; train.num_devices=None:
  all devices); the run's validation refuses it, naming the field, where None is not allowed."""
  if raw == "None":  # Unsets any field; validation says whether the field may be None.
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
  """Writes config.json atomically (a partial file renamed into place: a kill never tears it)."""
  writing.write_atomic(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


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
    default.update_from_flattened_dict(flatten(stored))
  except (KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: does not fit the {what} config ({e})") from None
  return default


def flatten(tree, prefix="") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples (as JSON gives back a config's tuples)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def _get_config_error(path, error: Exception) -> str:
  """One line for an exception raised by a config file's get_config(), naming the file's line;
  a field that a locked default config does not have is named as an unknown field."""
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if pathlib.Path(f.filename) == pathlib.Path(path)]
  where = f"{path} line {frames[-1].lineno}" if frames else str(path)
  unknown = re.search(r'Key "([^"]+)" does not exist and cannot be added since the config is '
                      r'locked', str(error))
  if unknown:
    field = unknown.group(1)
    if frames and frames[-1].line:  # e.g. `config.optim.lrr = 0.1`: name the whole path.
      match = re.search(r"\b\w+((?:\.\w+)*\." + re.escape(field) + r")\b", frames[-1].line)
      field = match.group(1)[1:] if match else field
    return (f"config file {where}: unknown config field {field!r} (a misspelling? every field "
            "a run reads is in its default config)")
  return f"config file {where}: get_config() failed: {type(error).__name__}: {error}"


# --- Config specs: each field's default and what a valid value is, written once ---------------
@dataclasses.dataclass(frozen=True)
class Field:
  """A config field: its default, its rule (`valid(value)`, described by `expected`) and its
  meaning (`doc`, one sentence: the config reference and `ferjax config show` print it)."""
  default: Any
  expected: str
  valid: Callable[[Any], bool]
  doc: str = ""


def is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _optional(field: Field, optional: bool, meaning: str = "") -> Field:
  if not optional:
    return field
  return Field(field.default, f"None{meaning} or {field.expected}",
               lambda v: v is None or field.valid(v), field.doc)


def one_of(default, choices, *, optional=False, doc="") -> Field:
  choices = tuple(choices)
  return _optional(Field(default, f"one of {', '.join(map(str, choices))}",
                         lambda v: isinstance(v, str) and v in choices, doc), optional)


def integer(default, lo=None, hi=None, *, optional=False, meaning="", doc="") -> Field:
  words = ("an integer" + (f" in {lo}..{hi}" if lo is not None and hi is not None else
                           f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""))
  ok = lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
  return _optional(Field(default, words, ok, doc), optional, meaning)


def number(default, lo=None, hi=None, *, lo_open=False, hi_open=False, optional=False,
           meaning="", doc="") -> Field:
  """A finite number in [lo, hi] (open ends with lo_open / hi_open)."""
  parts = []
  if lo is not None:
    parts.append(f"> {lo}" if lo_open else f">= {lo}")
  if hi is not None:
    parts.append(f"< {hi}" if hi_open else f"<= {hi}")
  ok = lambda v: (is_number(v) and (lo is None or (v > lo if lo_open else v >= lo))
                  and (hi is None or (v < hi if hi_open else v <= hi)))
  expected = "a number " + " and ".join(parts) if parts else "a number"
  return _optional(Field(default, expected, ok, doc), optional, meaning)


def flag(default: bool, *, doc="") -> Field:
  return Field(default, "True or False", lambda v: isinstance(v, bool), doc)


def text(default, *, optional=True, meaning="", doc="") -> Field:
  return _optional(Field(default, "a text value", lambda v: isinstance(v, str), doc), optional,
                   meaning)


def custom(default, expected: str, valid: Callable[[Any], bool], *, doc="") -> Field:
  return Field(default, expected, valid, doc)


def checkpoint(default="best", *, doc="") -> Field:
  """Which checkpoint of a run to read: best (chosen on validation), last/latest or a step."""
  return Field(default, "best, last or a step number",
               lambda v: v in ("best", "last", "latest") or is_int(v)
               or (isinstance(v, str) and v.isdigit()), doc)


def from_spec(spec: dict) -> ml_collections.ConfigDict:
  """The defaults of a spec as a locked ConfigDict: setting a field it does not have (a typo in
  a config file or flag) raises instead of adding it."""
  config = ml_collections.ConfigDict(_defaults(spec))
  config.lock()
  return config


def spec_fields(spec: dict, prefix: str = "") -> list[tuple[str, Field]]:
  """Every field of a spec with its dotted name, e.g. ('optim.lr', Field(...)), in spec order."""
  out = []
  for key, rule in spec.items():
    if isinstance(rule, dict):
      out += spec_fields(rule, f"{prefix}{key}.")
    else:
      out.append((prefix + key, rule))
  return out


def _defaults(spec: dict) -> dict:
  return {k: _defaults(v) if isinstance(v, dict) else v.default for k, v in spec.items()}


def check_spec(config, spec: dict, prefix: str = "") -> None:
  """Every field of the spec present and valid, nothing unknown; a UserError names the field."""
  for key in config.keys():
    if key not in spec:
      raise UserError(f"unknown config field {prefix + key!r} (known: "
                      f"{', '.join(sorted(spec))})")
  for key, rule in spec.items():
    if key not in config:
      raise UserError(f"config field {prefix + key!r} is missing (start from the run's "
                      "default_config())")
    value = config[key]
    if isinstance(rule, dict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise UserError(f"config field {prefix + key!r}: expected a group of fields")
      check_spec(value, rule, prefix + key + ".")
    else:
      check(rule.valid(value), prefix + key, rule.expected, value)


def check(condition: bool, field: str, expected: str, value) -> None:
  """One-line validation helper: `check(lr > 0, 'optim.lr', 'a positive number', lr)`."""
  if not condition:
    raise UserError(f"config field {field!r}: expected {expected}, got {value!r}")
