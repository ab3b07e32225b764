"""The config and command-line references: every config field has a meaning, `ferjax config
show` prints a config field by field, and docs/config.md and docs/cli.md are what
ferjax.reference generates now.

Run as a script (`python tests/test_reference.py`) it rewrites docs/config.md and docs/cli.md.
"""

import pathlib
import re
import sys

import markdown_it
import pytest

from ferjax import cli, configs, reference
from ferjax.kinds import classifier, semisup

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
CONFIG_HEADINGS = ["## classifier", "## semisup", "## retrain-head", "## vaegan", "## pretrain"]


def _fields(kind):
  return configs.spec_fields(reference.KINDS[kind][0].SPEC)


# --- Field docs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(reference.KINDS))
def test_every_field_has_a_one_line_meaning(kind):
  fields = _fields(kind)
  assert fields
  for name, field in fields:
    assert field.doc.strip(), f"{kind}: config field {name!r} has no doc"
    assert "\n" not in field.doc and field.doc.endswith("."), f"{kind} {name}: {field.doc!r}"
    assert field.doc == " ".join(field.doc.split()), f"{kind} {name}: stray spaces"


def test_kinds_are_the_modules_kinds_and_the_clis():
  assert [m.KIND for m, _ in reference.KINDS.values()] == list(reference.KINDS)
  assert tuple(reference.KINDS) == cli.CONFIG_KINDS


def test_semisup_inherits_the_classifier_fields_and_their_docs():
  inherited = [(n, f) for n, f in _fields(semisup.KIND) if not n.startswith("semisup.")]
  assert [(n, f.doc, f.expected) for n, f in inherited] == [
      (n, f.doc, f.expected) for n, f in _fields(classifier.KIND)]


def test_optional_fields_keep_their_doc():
  field = configs.integer(None, 1, optional=True, meaning=" (all)", doc="Devices.")
  assert field.doc == "Devices." and field.expected == "None (all) or an integer >= 1"
  assert field.valid(None) and field.valid(2) and not field.valid(0)


# --- ferjax config show --------------------------------------------------------------------------
def _show(argv, capsys):
  capsys.readouterr()
  assert cli.main(["config", "show", *map(str, argv)]) == 0
  out, err = capsys.readouterr()
  assert not err
  return out.splitlines()


def _line(lines, name):
  [line] = [line for line in lines if line.split(" ", 1)[0] == name]
  return line


@pytest.mark.parametrize("kind", list(reference.KINDS))
def test_show_kind_prints_every_field_with_its_default_and_meaning(kind, capsys):
  lines = _show([kind], capsys)
  assert lines[0].startswith(f"# {kind} config (run by `ferjax {reference.KINDS[kind][1]}`)")
  for name, field in _fields(kind):
    line = _line(lines, name)
    assert re.match(rf"{re.escape(name)} +=", line)
    assert f" = {field.default!r}" in line and f"# {field.doc} [allowed: {field.expected}]" in line
    assert "default:" not in line  # Every value is the default.


def test_show_a_file_infers_its_kind_and_applies_overrides(capsys):
  path = "experiments/configs/classifier_synthetic_tiny.py"
  lines = _show(["--config", path, "--config.optim.lr=0.05"], capsys)
  assert lines[0] == (f"# classifier config (run by `ferjax train`): {path} with "
                      "--config.optim.lr=0.05")
  lr = _line(lines, "optim.lr")
  assert re.match(r"optim\.lr +=  ?0\.05 ", lr) and lr.endswith("; default: 0.1]")
  assert "default:" not in _line(lines, "seed")


@pytest.mark.parametrize("path, kind", [
    ("experiments/configs/vaegan_synthetic_tiny.py", "vaegan"),
    ("experiments/configs/pretrain_synthetic_tiny.py", "pretrain"),
    ("experiments/configs/semisup_synthetic_tiny.py", "semisup"),
])
def test_show_infers_each_kind(path, kind, capsys):
  assert _show(["--config", path], capsys)[0].startswith(f"# {kind} config")


def test_show_a_retrain_head_file_and_a_named_kind(tmp_path, capsys):
  path = tmp_path / "head.py"
  path.write_text("from ferjax.kinds import retrain_head\n\ndef get_config():\n"
                  "  c = retrain_head.default_config()\n  c.head.steps = 7\n  return c\n")
  lines = _show(["--config", path], capsys)
  assert lines[0].startswith("# retrain-head config (run by `ferjax retrain-head`)")
  assert re.match(r"head\.steps +=  ?7 ", _line(lines, "head.steps"))
  assert _show(["retrain-head", "--config", path], capsys) == lines
  lines = _show(["vaegan", "--config.train.num_steps=5"], capsys)
  assert "with --config.train.num_steps=5" in lines[0]
  assert "; default: 20000]" in _line(lines, "train.num_steps")


def test_config_alone_prints_its_help(capsys):
  assert cli.main(["config"]) == 2
  assert "show" in capsys.readouterr().out


# --- The generated pages -------------------------------------------------------------------------
def _tokens(text):
  return markdown_it.MarkdownIt("commonmark").enable("table").parse(text)


def _headings(text):
  return [line for line in text.splitlines() if line.startswith("## ")]


@pytest.fixture(scope="module")
def generated():
  return reference.pages(cli.build_parser())


@pytest.mark.parametrize("name", ["config.md", "cli.md"])
def test_pages_in_docs_are_current(name, generated):
  path = DOCS / name
  assert path.is_file() and path.read_text() == generated[name], (
      f"docs/{name} is not what ferjax.reference generates now: run `{reference.REGENERATE}`")


@pytest.mark.parametrize("name", ["config.md", "cli.md"])
def test_pages_are_markdown_without_html(name, generated):
  tokens = _tokens(generated[name])
  kinds = {t.type for t in tokens} | {c.type for t in tokens for c in t.children or ()}
  assert not kinds & {"html_inline", "html_block"}
  # Within each table every line has as many unescaped pipes as its header: a stray pipe in a
  # cell would add a cell (which Markdown drops silently).
  tables = re.findall(r"(?:^\|.*\n)+", generated[name], re.M)
  assert tables and sum(1 for t in tokens if t.type == "table_open") == len(tables)
  for table in tables:
    counts = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
    assert len(counts) == 1, f"{name}: a cell with a stray pipe in:\n{table}"


def test_config_page_has_a_section_per_kind_in_order(generated):
  text = generated["config.md"]
  assert _headings(text) == CONFIG_HEADINGS
  for kind, (_, verb) in reference.KINDS.items():
    section = text.split(f"## {kind}\n", 1)[1].split("\n## ", 1)[0]
    assert f"`ferjax {verb}`" in section
    fields = [n for n, _ in _fields(kind) if kind != semisup.KIND or n.startswith("semisup.")]
    for name in fields:
      assert f"| `{name}` |" in section, f"{kind}: {name} not in its table"
  assert "(#classifier)" in text.split("## semisup\n", 1)[1].split("\n## ", 1)[0]
  assert "| `data.name` |" not in text.split("## semisup\n", 1)[1].split("\n## ", 1)[0]


def test_config_page_cells_show_pipes_and_angle_brackets_as_written(generated):
  html = markdown_it.MarkdownIt("commonmark").enable("table").render(generated["config.md"])
  assert "&lt;split&gt;/&lt;class&gt;/*.png" in html  # data.name's doc, not an HTML tag.


def test_cells_show_text_as_written():
  cell = reference._cell(reference._prose("a|b <x>  *y* _z_ $V `p|q` with --flag."))
  html = markdown_it.MarkdownIt("commonmark").enable("table").render(f"| h |\n|---|\n| {cell} |\n")
  assert "<td>a|b &lt;x&gt; *y* _z_ $V <code>p|q</code> with <code>--flag</code>.</td>" in html


def test_cli_page_has_a_section_per_verb_and_a_working_index(generated):
  text = generated["cli.md"]
  paths = [" ".join(("ferjax", *path)) for path, _, _ in reference._leaf_verbs(cli.build_parser())]
  assert _headings(text) == [f"## {p}" for p in paths]
  for verb in ("ferjax data prepare", "ferjax data stats", "ferjax config show", "ferjax train",
               "ferjax predict"):
    assert f"## {verb}" in text
  anchors = re.findall(r"\]\(#([\w-]+)\)", text)
  assert sorted(anchors) == sorted(reference._slug(p) for p in paths)
  assert "ferjax-data-prepare" in anchors and "ferjax-train-vaegan" in anchors
  train = text.split("## ferjax train\n", 1)[1].split("\n## ", 1)[0]
  assert "ferjax train --config experiments/configs/classifier_synthetic_tiny.py" in train
  assert "| `--workdir WORKDIR` | required |" in train
  assert "(config.md#classifier)" in train
  assert "| `--init-timeout SECONDS` | `300` |" in train


if __name__ == "__main__":
  for changed in reference.write_pages(cli.build_parser(), DOCS):
    print(f"wrote {changed}")
  sys.exit(0)
