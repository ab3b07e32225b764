"""docs/python.md's examples run as written: every `>>>` line, in order, with its output."""

import contextlib
import doctest
import io
import re
from pathlib import Path

import pytest

from ferjax import api

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "python.md"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


class MarkdownParser(doctest.DocTestParser):
  """Reads a Markdown page as doctest text: each fence line becomes an empty line, so an
  example's expected output ends with its block (line numbers stay the page's own)."""

  def parse(self, string, name="<string>"):
    return super().parse(re.sub(r"^```.*$", "", string, flags=re.MULTILINE), name)


def python_blocks(text: str) -> list[str]:
  """The contents of the page's ```python fences."""
  return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_every_python_block_is_a_doctest():
  """A ```python block without prompts would be shown but never run; each one starts with
  `>>>` (Sphinx then highlights it as a session)."""
  blocks = python_blocks(PAGE.read_text())
  assert blocks, f"no ```python blocks in {PAGE}"
  untested = [block.splitlines()[0] for block in blocks if not block.startswith(">>> ")]
  assert not untested, f"{PAGE}: python blocks that do not start with >>>: {untested}"


def test_page_shows_every_api_function():
  text = PAGE.read_text()
  public = ["make_config", "train", "load_dataset", "open_run", "evaluate", "extract_features",
            "predict", "linear_probe", "compare"]
  assert all(callable(getattr(api, name)) for name in public)
  missing = [name for name in public if f"api.{name}(" not in text]
  assert not missing, f"{PAGE} never calls api.{missing}"


@pytest.mark.slow
def test_examples_run(tmp_path, monkeypatch):
  """The page runs from a checkout's root (its config file is under experiments/) and writes
  into runs/: here an empty folder that sees the checkout's experiments/."""
  (tmp_path / "experiments").symlink_to(REPO / "experiments")
  monkeypatch.chdir(tmp_path)
  report = io.StringIO()
  with contextlib.redirect_stdout(report):  # doctest's report of failures; not the examples'.
    failed, attempted = doctest.testfile(str(PAGE), module_relative=False, optionflags=FLAGS,
                                         name="python.md", encoding="utf-8",
                                         parser=MarkdownParser())
  if failed:
    pytest.fail(f"{failed} of {attempted} examples of {PAGE} failed:\n{report.getvalue()}",
                pytrace=False)
  assert attempted >= 40, f"only {attempted} examples found in {PAGE}"
