"""The standing bad-input harness (issue 15), shared by the tests/test_bad_input*.py suites.

Each case builds its broken input in a temp dir and runs the `ferjax` CLI in this process; the
promise checked is the same for all of them:

* exit code 2;
* exactly one line on stderr, `ferjax: error: ...`, naming the file or field (`needle`);
* no traceback anywhere in stdout or stderr;
* nothing that existed before changed (`protect`: folders or files hashed before and after).

A case that needs a trained run copies one of the session's tiny finished runs (conftest's
`tiny_runs`) rather than training its own.
"""

import hashlib
import pathlib
import re
import shutil

from ferjax import cli

PROGRESS = re.compile(r"^\s*[\w-]*:\s+\d+%\|")


def digest(*roots) -> dict:
  """{path: sha256 (files) or 'dir'} of everything under `roots` (missing roots: empty)."""
  out = {}
  for root in roots:
    root = pathlib.Path(root)
    paths = [root] if root.is_file() else (sorted(root.rglob("*")) if root.is_dir() else [])
    for p in paths:
      if p.is_symlink() or not (p.is_file() or p.is_dir()):
        out[str(p)] = "special"
      elif p.is_dir():
        out[str(p)] = "dir"
      else:
        try:
          out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        except PermissionError:
          out[str(p)] = "unreadable"
  return out


def expect_one_line(argv, needle, capsys, protect=()) -> str:
  """Runs `ferjax argv`, asserts the bad-input promise (module docstring); returns the line."""
  protect = [pathlib.Path(p) for p in protect]
  before = digest(*protect)
  capsys.readouterr()
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  # Progress bars (tqdm, on stderr while a run trains) are not messages.
  lines = [line.split("\r")[-1] for line in err.split("\n")]
  lines = [line for line in lines if line.strip() and not PROGRESS.match(line)]
  assert "Traceback" not in out + err, f"traceback for {argv}:\n{err}"
  assert rc == 2, f"exit {rc} (expected 2) for {argv}; stderr:\n{err}"
  assert len(lines) == 1, f"expected one stderr line for {argv}, got {len(lines)}:\n{err}"
  assert lines[0].startswith("ferjax: error: "), lines[0]
  for part in ([needle] if isinstance(needle, str) else needle):
    assert str(part).lower() in lines[0].lower(), f"{part!r} not named in: {lines[0]}"
  assert digest(*protect) == before, f"{argv} changed files under {protect}"
  return lines[0]


def copy_run(source, destination) -> pathlib.Path:
  """A private copy of a shared finished run, to damage or reuse freely."""
  shutil.copytree(source, destination, symlinks=True)
  return pathlib.Path(destination)
