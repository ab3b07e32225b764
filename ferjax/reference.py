"""The config and command-line references: `ferjax config show` and the generated pages
docs/config.md and docs/cli.md.

Every config field's meaning is written once, as the `doc` of its `configs.Field` in its kind's
SPEC (ferjax/kinds/); every verb's is its argparse help in ferjax/cli.py. `config_page()` and
`cli_page(parser)` turn them into MyST Markdown pages; `python tests/test_reference.py` rewrites
both pages (this module cannot import ferjax.cli, which names it as a handler), and a test there
checks that the pages in docs/ are current.
"""

import argparse
import pathlib
import re

from ferjax import configs
from ferjax.errors import UserError
from ferjax.kinds import classifier, pretrain, retrain_head, semisup, vaegan

# Each kind of run: its module and the verb that runs it, in the order of the reference page.
KINDS = {
    classifier.KIND: (classifier, "train"),
    semisup.KIND: (semisup, "train-semisup"),
    retrain_head.KIND: (retrain_head, "retrain-head"),
    vaegan.KIND: (vaegan, "train-vaegan"),
    pretrain.KIND: (pretrain, "pretrain"),
}
REGENERATE = "python tests/test_reference.py"
GENERATED = (f"This page is generated (`{REGENERATE}` rewrites it) from {{source}}: edit those, "
             "not this page.")


# =================================================================================================
# ferjax config show
# =================================================================================================
def show_main(args) -> int:
  """`ferjax config show [KIND] [--config FILE] [--config.FIELD=VALUE ...]`: prints the config,
  one field a line (value, meaning, allowed values)."""
  if args.kind is None and args.config is None:
    raise UserError("ferjax config show: name a KIND (one of " + ", ".join(KINDS) + ") or "
                    "a --config FILE (see ferjax config show --help)")
  if args.config is None:
    kind = args.kind
    config = KINDS[kind][0].default_config()
    configs.apply_overrides(config, args.overrides)
    source = f"the {kind} defaults"
  else:
    config = configs.load_config(args.config, args.overrides)
    kind = args.kind or infer_kind(config, args.config)
    source = str(args.config)
  module, verb = KINDS[kind]
  configs.check_spec(config, module.SPEC)
  if args.overrides:
    source += " with " + " ".join(args.overrides)
  print(show_text(config, kind, f"# {kind} config (run by `ferjax {verb}`): {source}"))
  return 0


def infer_kind(config, path) -> str:
  """The kind whose SPEC has exactly the top-level fields (groups and `seed`) of `config`."""
  found = [kind for kind, (module, _) in KINDS.items() if set(module.SPEC) == set(config.keys())]
  if len(found) != 1:
    raise UserError(f"config file {path}: its top-level fields ({', '.join(sorted(config))}) are "
                    "no kind's: name the kind, e.g. ferjax config show classifier --config "
                    f"{path}")
  return found[0]


def show_text(config, kind: str, title: str) -> str:
  """The lines of `ferjax config show`: `field = value  # meaning [allowed: ...]`, groups apart;
  a value that differs from the default names the default."""
  module = KINDS[kind][0]
  fields = configs.spec_fields(module.SPEC)
  values = {name: _get(config, name) for name, _ in fields}
  name_width = max(len(name) for name, _ in fields)
  value_width = min(24, max(len(repr(v)) for v in values.values()))
  lines = [title]
  group = None
  for name, field in fields:
    if name.split(".")[0] != group and "." in name:
      lines.append("")
    group = name.split(".")[0]
    value = values[name]
    notes = f"allowed: {field.expected}"
    if value != field.default or type(value) is not type(field.default):
      notes += f"; default: {field.default!r}"
    lines.append(f"{name:<{name_width}} = {value!r:<{value_width}}  # {field.doc} [{notes}]")
  return "\n".join(lines)


def _get(config, name: str):
  for part in name.split("."):
    config = config[part]
  return config


# =================================================================================================
# docs/config.md
# =================================================================================================
def config_page() -> str:
  """docs/config.md: how to set a field, then one section per kind with a table per group."""
  lines = [
      "# Config reference",
      "",
      GENERATED.format(source="the `doc` of each field in the kinds' config specs (`SPEC` in "
                              "`ferjax/kinds/`)"),
      "",
      "Every run reads a config: a Python file whose `get_config()` returns the kind's default "
      "config (e.g. `classifier.default_config()` from `ferjax.kinds.classifier`) with some "
      "fields changed. A field is set",
      "",
      "- in the config file's `get_config()`: `config.optim.lr = 0.05`;",
      "- on the command line, after the file: `--config.optim.lr=0.05`, parsed with the field's "
      "type (a tuple as `--config.augment.resized_crop_scale=(0.5,1.0)`; text without quotes);",
      "- to `None`, where the allowed values say so, with `--config.data.val_split=None` (or "
      "`= None` in the file).",
      "",
      "A misspelled field or a value outside its allowed values is an error naming the field. "
      "`ferjax config show KIND` prints a kind's defaults, and `ferjax config show --config FILE "
      "[--config.FIELD=VALUE ...]` prints the config a run would use, one field a line with its "
      "meaning. Rules that tie fields together (e.g. `model.cosine_scale` with `loss.name`) are "
      "checked when the run starts.",
      "",
      "Kinds of run: " + ", ".join(f"[{kind}](#{kind})" for kind in KINDS) + ".",
  ]
  for kind, (module, verb) in KINDS.items():
    lines += ["", f"## {kind}", "", f"Run by `ferjax {verb}`; its defaults are "
              f"`{module.__name__}.default_config()`."]
    fields = configs.spec_fields(module.SPEC)
    if kind == semisup.KIND:
      lines[-1] += (" Its fields are the [classifier's](#classifier) plus the `semisup` group "
                    "below (FixMatch with an EMA teacher, optionally FlexMatch thresholds); a run "
                    "sets `data.label_fraction` below 1, and the rest of train is the unlabeled "
                    "pool.")
      fields = [(name, field) for name, field in fields if name.startswith("semisup.")]
    groups = {}
    for name, field in fields:
      groups.setdefault(name.split(".")[0] if "." in name else "", []).append((name, field))
    for group, members in groups.items():
      lines += ["", f"### {kind}: {group or 'top level'}", "",
                "| field | default | allowed values | meaning |", "|---|---|---|---|"]
      for name, field in members:
        cells = [f"`{name}`", f"`{field.default!r}`", _prose(field.expected), _prose(field.doc)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


# =================================================================================================
# docs/cli.md
# =================================================================================================
def cli_page(parser: argparse.ArgumentParser) -> str:
  """docs/cli.md from the `ferjax` parser: the verbs with a line each, then one section per verb
  (description, usage, example, arguments, notes) in the parser's order."""
  verbs = list(_leaf_verbs(parser))
  lines = [
      "# Command-line reference",
      "",
      GENERATED.format(source="the argparse parser of `ferjax/cli.py`"),
      "",
      _prose(parser.description or ""),
      "",
      "```text",
      _usage(parser),
      "```",
      "",
      "`ferjax --version` prints the version; every verb takes `-h` / `--help`. A user error "
      "(a bad flag, file or config field) is one line on stderr, `ferjax: error: ...`, and exit "
      "code 2.",
      "",
      "Verbs:",
      "",
  ]
  for path, _, help_text in verbs:
    title = " ".join(("ferjax", *path))
    lines.append(f"- [`{title}`](#{_slug(title)}): {_prose(_first_sentence(help_text))}")
  kinds_of_verb = {verb: kind for kind, (_, verb) in KINDS.items()}
  for path, sub, _ in verbs:
    text, example = _split_example(sub.description or "")
    lines += ["", f"## {' '.join(('ferjax', *path))}", "", _prose(text), "", "```text",
              _usage(sub), "```"]
    if example:
      lines += ["", "Example:", "", "```bash", example, "```"]
    lines += _argument_tables(sub)
    if sub.epilog:
      lines += ["", _prose(sub.epilog)]
    kind = kinds_of_verb.get(path[-1])
    if kind:
      lines += ["", f"Its config fields: [config reference, {kind}](config.md#{kind})."]
  return "\n".join(lines) + "\n"


def _leaf_verbs(parser, prefix=()):
  """(path, parser, help) of every verb that runs something, e.g. (('data', 'stats'), ...),
  in the order the parser defines them; groups such as `data` are walked, not listed."""
  for action in parser._actions:
    if not isinstance(action, argparse._SubParsersAction):
      continue
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    for name, sub in action.choices.items():
      if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
        yield from _leaf_verbs(sub, (*prefix, name))
      else:
        yield (*prefix, name), sub, helps.get(name) or ""


def _usage(parser) -> str:
  """The usage line at a fixed width (argparse's own follows the terminal's)."""
  formatter = argparse.HelpFormatter(prog=parser.prog, width=100)
  formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
  return formatter.format_help().strip()


def _split_example(description: str) -> tuple[str, str]:
  """A verb's description as cli._verb writes it: (text, example command)."""
  text, _, example = description.partition("\n\nexample:\n")
  return text, example.strip()


def _argument_tables(parser) -> list[str]:
  """A table per argument group (positionals, options, named groups), help flags left out."""
  formatter = argparse.HelpFormatter(prog=parser.prog, width=100)
  exclusive = {}
  for group in parser._mutually_exclusive_groups:
    for action in group._group_actions:
      exclusive[action] = group
  lines = []
  for group in parser._action_groups:
    actions = [a for a in group._group_actions
               if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
    if not actions:
      continue
    if group is parser._positionals:
      title = "Arguments"
    elif group is parser._optionals:
      title = "Options"
    else:
      title = group.title[0].upper() + group.title[1:]
    lines += ["", f"{_prose(title)}:", "", "| argument | default | meaning |", "|---|---|---|"]
    for action in actions:
      meaning = action.help or ""
      if action in exclusive:
        others = [o.option_strings[0] for o in exclusive[action]._group_actions if o is not action]
        meaning += f" (not with {' or '.join(f'`{o}`' for o in others)}"
        meaning += "; one of them is required)" if exclusive[action].required else ")"
      cells = [f"`{formatter._format_action_invocation(action)}`", _default(action),
               _prose(meaning)]
      lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  return lines


def _default(action) -> str:
  if action.required and action.nargs not in ("?", "*"):
    return "required"
  if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
    return ""
  return f"`{action.default}`"


def _first_sentence(text: str) -> str:
  """Up to the first full stop outside parentheses that ends a sentence."""
  depth = 0
  for i, char in enumerate(text):
    depth += (char == "(") - (char == ")")
    if char == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
      return text[:i + 1]
  return text


def _slug(heading: str) -> str:
  """GitHub's (and MyST's) anchor of a heading: lower case, punctuation dropped, spaces to -."""
  return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


# --- Markdown ------------------------------------------------------------------------------------
_SPECIAL = re.compile(r"[\\*\[\]<>|$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# A flag such as --dataset or --config.synth.mode=pixel, outside backquotes: shown as code (in
# prose Sphinx would turn its -- into a dash).
_FLAG = re.compile(r"(?<![\w`-])--[A-Za-z](?:[\w.-]*\w)?(?:=[^\s,;)`]*[^\s,;)`.])?")


def _prose(text: str) -> str:
  """Plain text as Markdown that shows it as written: whitespace collapsed, `code` spans kept,
  flags made code, characters Markdown would read (emphasis, links, HTML, math) escaped
  elsewhere."""
  text = " ".join(text.split())
  if text.count("`") % 2 == 0:
    text = "".join(part if part.startswith("`") else _FLAG.sub(lambda m: f"`{m.group(0)}`", part)
                   for part in re.split(r"(`[^`]*`)", text))
  if text.count("`") % 2:  # An unpaired backquote: no code span.
    return _SPECIAL.sub(lambda m: "\\" + m.group(0), text).replace("`", "\\`")
  parts = re.split(r"(`[^`]*`)", text)
  return "".join(part if part.startswith("`") else _SPECIAL.sub(lambda m: "\\" + m.group(0), part)
                 for part in parts)


def _cell(text: str) -> str:
  """A table cell: pipes escaped inside code spans too (outside them _prose escaped them)."""
  parts = re.split(r"(`[^`]*`)", text)
  return "".join(part.replace("|", "\\|") if part.startswith("`") else part for part in parts)


# =================================================================================================
# Writing the pages
# =================================================================================================
def pages(parser) -> dict[str, str]:
  """{file name under docs/: text} of the generated pages."""
  return {"config.md": config_page(), "cli.md": cli_page(parser)}


def write_pages(parser, docs: pathlib.Path) -> list[pathlib.Path]:
  """Rewrites the generated pages under `docs`; returns the files that changed."""
  changed = []
  for name, text in pages(parser).items():
    path = pathlib.Path(docs) / name
    if not path.is_file() or path.read_text() != text:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
      changed.append(path)
  return changed
