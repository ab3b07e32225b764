"""The documentation: README.md is a front page, every relative link in it and in docs/
resolves (file and section), nothing points outside the repository, and the site builds in
Sphinx's strict mode (a warning is a failure)."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
# Every page the site has; index.md lists them, README.md links to each.
EXPECTED_PAGES = ("index", "install", "datasets", "training", "evaluation", "methods", "results",
                  "config", "cli", "python", "architecture", "api")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[([^\]\n]*)\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
  """The text without fenced code blocks and inline code (links there are examples)."""
  return _INLINE_CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
  """The anchor of a heading, as MyST (myst_heading_anchors) and GitHub make it."""
  title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
  return re.sub(r"[^\w\u4e00-\u9fff\- ]", "", title.lower().replace(" ", "-"))


def anchors(path: pathlib.Path) -> set[str]:
  found, seen = set(), {}
  for _, title in _HEADING.findall(_FENCE.sub("", path.read_text())):
    base = slug(title)
    n = seen.get(base, 0)
    seen[base] = n + 1
    found.add(base if n == 0 else f"{base}-{n}")
  return found


def links(path: pathlib.Path) -> list[str]:
  return [target for _, target in _LINK.findall(_prose(path.read_text()))]


def broken_links(path: pathlib.Path) -> list[str]:
  """Relative links of a Markdown file whose file or section does not exist."""
  broken = []
  for target in links(path):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
      continue
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    if not resolved.exists():
      broken.append(f"{target} (no file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
    elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
      broken.append(f"{target} (no section #{anchor} in {resolved.name})")
  return broken


def test_every_page_exists_and_the_index_lists_it():
  names = {p.stem for p in PAGES}
  assert set(EXPECTED_PAGES) <= names, f"docs/ lacks {sorted(set(EXPECTED_PAGES) - names)}"
  index = (DOCS / "index.md").read_text()
  unlisted = [p.stem for p in PAGES if p.stem != "index" and f"\n{p.stem}\n" not in index]
  assert not unlisted, f"docs/index.md's toctree leaves out {unlisted}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(path):
  assert not broken_links(path), f"{path.name}: broken links {broken_links(path)}"


def test_the_link_checker_catches_a_missing_file_and_a_missing_section(tmp_path):
  (tmp_path / "a.md").write_text("# A\n\n## Some section\n")
  (tmp_path / "b.md").write_text("[ok](a.md#some-section) [no file](c.md) [no section](a.md#x)"
                                 " `[in code](d.md)` [web](https://example.org)\n")
  assert broken_links(tmp_path / "b.md") == [
      f"c.md (no file {(tmp_path / 'c.md').resolve()})", "a.md#x (no section #x in a.md)"]


def test_readme_links_to_every_page():
  targets = {t.partition("#")[0] for t in links(README)}
  missing = [p for p in EXPECTED_PAGES if p != "index" and f"docs/{p}.md" not in targets]
  assert not missing, f"README.md has no link to docs/{missing}"


def test_readme_is_a_front_page():
  text = README.read_text()
  assert len(text.splitlines()) <= 200, "README.md is a front page: at most 200 lines"
  # The two set-up commands open it: install and run the main job, install and run the tests.
  first_screen = "\n".join(text.splitlines()[:40])
  assert "ferjax demo" in first_screen and "&& pytest" in first_screen


def test_no_project_internal_words_or_pointers_outside_the_repository():
  for path in [README, *PAGES]:
    text = path.read_text()
    assert not re.search(r"\bissues? \d+|the issue's|this session", text, re.I), path.name
    assert "../shared" not in text and "shared/docs" not in text, path.name


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
  """sphinx-build -W: a broken link or section, a missing page, a docstring that does not
  import, any warning at all fails."""
  out = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
       "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
      capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, f"sphinx-build failed:\n{out.stdout}\n{out.stderr}"
  for page in EXPECTED_PAGES:
    assert (tmp_path / "html" / f"{page}.html").is_file()
