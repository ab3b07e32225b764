"""The package's layering: a module imports only from its own layer or lower ones, and no two
modules import each other, even through function-level imports."""

import ast
import re
from pathlib import Path
from typing import NamedTuple

import pytest

import ferjax

PACKAGE = "ferjax"
ROOT = Path(ferjax.__file__).parent

class Layer(NamedTuple):
  name: str
  modules: tuple[str, ...]  # module-name prefixes (whole dotted components)
  holds: str


# Bottom to top, written once: the layer table of docs/architecture.md is generated from this list
# (run `python tests/test_layering.py` to print it; a test checks the page's copy).
# `ferjax` itself (ferjax/__init__.py) sits below them all and imports nothing of ferjax.
LAYERS = [
    Layer("base", ("ferjax.errors", "ferjax.configs", "ferjax.writing", "ferjax.losses",
                   "ferjax.plots", "ferjax.report"),
          "errors, config files and overrides, writing files safely, losses, PNGs, tables"),
    Layer("data, models", ("ferjax.data", "ferjax.models"),
          "datasets, builders, splits, the device-side pipeline; pure Flax modules"),
    Layer("core", ("ferjax.core",),
          "orbax checkpoints, mesh and shardings, metrics and progress, workdirs, signals, "
          "the training loop"),
    Layer("run kinds", ("ferjax.kinds",),
          "what defines each kind of run: config spec, model, state, optimizer, random streams; "
          "the classifier's device-resident batches"),
    Layer("reopening", ("ferjax.runs",),
          "reopen a finished run from its workdir; the weights a new run starts from"),
    Layer("uses", ("ferjax.augment", "ferjax.evaluate", "ferjax.features", "ferjax.inference",
                   "ferjax.export", "ferjax.probe"),
          "synthesis stages; evaluation and its metrics, features, linear probes; predictors, "
          "exported models"),
    Layer("trainers", ("ferjax.train",),
          "leaves: one per kind of training, its pure jitted step, what it validates and draws"),
    Layer("top", ("ferjax.cli", "ferjax.demo", "ferjax.bench", "ferjax.evaluate_synthetic",
                  "ferjax.predict", "ferjax.synthesize", "ferjax.api", "ferjax.reference"),
          "verbs, the main job, benchmarks, commands that use trainers, the Python API, the "
          "generated reference pages"),
]
TRAINERS = "ferjax.train"  # Leaves: imported only by the top layer, never by each other.

# A handler spec such as "ferjax.train.classifier:cli_main", imported later by name.
_HANDLER_SPEC = re.compile(r"(ferjax(?:\.\w+)+):\w+")


class Edge(NamedTuple):
  importer: str
  imported: str
  path: str  # relative to the package's parent folder
  line: int

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"

  def __str__(self):
    return f"{self.importer} imports {self.imported} at {self.where}"


# --- The checker ----------------------------------------------------------------------------
def modules_of(root: Path) -> dict[str, Path]:
  """Module name -> file, for every .py file under the package folder `root`."""
  modules = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _in_package(name: str) -> bool:
  return name == PACKAGE or name.startswith(PACKAGE + ".")


def _imported_names(tree, module: str, is_package: bool, modules) -> list[tuple[str, int]]:
  """(imported module, line) for every import anywhere in `tree`, relative ones resolved."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append((sub if sub in modules else base, node.lineno))
    elif isinstance(node, ast.Call) and node.args and _is_import_module(node.func):
      arg = node.args[0]
      if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        found.append((arg.value, node.lineno))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      spec = _HANDLER_SPEC.fullmatch(node.value)
      if spec:
        found.append((spec.group(1), node.lineno))
  return found


def _is_import_module(func) -> bool:
  return (isinstance(func, ast.Attribute) and func.attr == "import_module"
          or isinstance(func, ast.Name) and func.id == "import_module")


def collect_imports(root: Path) -> list[Edge]:
  """Every import of a ferjax module by a module under `root` (the package folder)."""
  modules = modules_of(root)
  edges = []
  for module, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root.parent).as_posix()
    for imported, line in _imported_names(tree, module, path.name == "__init__.py", modules):
      if _in_package(imported) and imported != module:
        edges.append(Edge(module, imported, rel, line))
  return edges


def _matches(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def layers_of(module: str) -> list[int]:
  """Indices of the layers with a prefix matching `module` (exactly one when placed well)."""
  return [i for i, layer in enumerate(LAYERS) if any(_matches(module, p) for p in layer.modules)]


def layer_of(module: str):
  """Index of `module`'s layer in LAYERS; -1 for the package itself; None if not one layer."""
  if module == PACKAGE:
    return -1
  found = layers_of(module)
  return found[0] if len(found) == 1 else None


def misplaced_modules(modules) -> list[str]:
  """One line per module (the package itself aside) that is not in exactly one layer."""
  return [f"{m}: matches layers {layers_of(m) or 'none'}" for m in modules
          if m != PACKAGE and len(layers_of(m)) != 1]


def missing_imports(edges, modules) -> list[Edge]:
  """Edges naming a module that does not exist (a stale import or a bad handler spec)."""
  return [e for e in edges if e.imported not in modules]


def upward_edges(edges) -> list[Edge]:
  """Edges from a module to one in a higher layer (modules without a layer are skipped)."""
  bad = []
  for e in edges:
    low, high = layer_of(e.importer), layer_of(e.imported)
    if low is not None and high is not None and high > low:
      bad.append(e)
  return bad


def trainer_edges(edges) -> list[Edge]:
  """Edges into a trainer (a module of ferjax.train) from anything but the top layer: trainers
  are leaves, so no lower layer and no other trainer imports one."""
  top = len(LAYERS) - 1
  return [e for e in edges if _matches(e.imported, TRAINERS) and e.imported != TRAINERS
          and layer_of(e.importer) != top]


def cycles(edges) -> list[tuple[list[str], list[Edge]]]:
  """(modules, edges among them) of each import cycle: a strongly connected component of
  more than one module (Tarjan's algorithm)."""
  graph = {}
  for e in edges:
    graph.setdefault(e.importer, set()).add(e.imported)
    graph.setdefault(e.imported, set())
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  found = []
  for component in components:
    if len(component) > 1:
      inside = set(component)
      found.append((component, [e for e in edges if e.importer in inside
                                and e.imported in inside]))
  return found


def _describe_upward(edges) -> str:
  return "\n".join(f"  {e.importer} (layer {layer_of(e.importer)}) imports {e.imported} "
                   f"(layer {layer_of(e.imported)}) at {e.where}" for e in edges)


def _describe_cycles(found) -> str:
  return "\n".join(f"  cycle among {', '.join(modules)}:\n" + "\n".join(f"    {e}" for e in edges)
                   for modules, edges in found)


# --- The real package -----------------------------------------------------------------------
def test_every_module_is_in_exactly_one_layer():
  misplaced = misplaced_modules(modules_of(ROOT))
  if misplaced:
    pytest.fail("modules not in exactly one layer of LAYERS:\n  " + "\n  ".join(misplaced),
                pytrace=False)


def test_package_init_imports_nothing_of_ferjax():
  own = [str(e) for e in collect_imports(ROOT) if e.importer == PACKAGE]
  if own:
    pytest.fail("ferjax/__init__.py imports ferjax modules:\n" + "\n".join(own), pytrace=False)


def test_imports_name_existing_modules():
  missing = missing_imports(collect_imports(ROOT), modules_of(ROOT))
  if missing:
    pytest.fail("imports of modules that do not exist:\n" + "\n".join(f"  {e}" for e in missing),
                pytrace=False)


def test_no_module_imports_from_a_higher_layer():
  bad = upward_edges(collect_imports(ROOT))
  if bad:
    pytest.fail(f"{len(bad)} upward import(s):\n" + _describe_upward(bad), pytrace=False)


def test_trainers_are_leaves():
  bad = trainer_edges(collect_imports(ROOT))
  if bad:
    pytest.fail("imports of a trainer from below the top layer or from another trainer:\n"
                + "\n".join(f"  {e}" for e in bad), pytrace=False)


def test_no_import_cycles():
  found = cycles(collect_imports(ROOT))
  if found:
    pytest.fail("import cycles:\n" + _describe_cycles(found), pytrace=False)


# --- The checker sees planted violations ----------------------------------------------------
def _write(root: Path, files: dict[str, str]):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_package(tmp_path) -> Path:
  _write(tmp_path, {
      "ferjax/__init__.py": "",
      "ferjax/errors.py": "",
      "ferjax/cli.py": 'SPECS = ["ferjax.train.y:cli_main",\n         "ferjax.train.z:main"]\n',
      "ferjax/dataset.py": "",
      "ferjax/data/__init__.py": "from ferjax.data.x import load\n",
      "ferjax/data/x.py": ("from ..errors import UserError\n"
                           "def load():\n"
                           "  if True:\n"
                           "    from ferjax.train import y\n"),
      "ferjax/models/__init__.py": "",
      "ferjax/models/a.py": "from . import b\n",
      "ferjax/models/b.py": ("import importlib\n"
                             "def f():\n"
                             "  return importlib.import_module('ferjax.models.a')\n"),
      "ferjax/train/__init__.py": "",
      "ferjax/train/y.py": "from ferjax import __version__\n",
  })
  return tmp_path / "ferjax"


def test_collect_imports_finds_every_kind_of_import(tmp_path):
  edges = collect_imports(_fake_package(tmp_path))
  assert sorted((e.importer, e.imported, e.where) for e in edges) == [
      ("ferjax.cli", "ferjax.train.y", "ferjax/cli.py:1"),
      ("ferjax.cli", "ferjax.train.z", "ferjax/cli.py:2"),
      ("ferjax.data", "ferjax.data.x", "ferjax/data/__init__.py:1"),
      ("ferjax.data.x", "ferjax.errors", "ferjax/data/x.py:1"),
      ("ferjax.data.x", "ferjax.train.y", "ferjax/data/x.py:4"),
      ("ferjax.models.a", "ferjax.models.b", "ferjax/models/a.py:1"),
      ("ferjax.models.b", "ferjax.models.a", "ferjax/models/b.py:3"),
      ("ferjax.train.y", "ferjax", "ferjax/train/y.py:1"),
  ]


def test_planted_violations_are_reported(tmp_path):
  root = _fake_package(tmp_path)
  edges = collect_imports(root)
  assert misplaced_modules(modules_of(root)) == ["ferjax.dataset: matches layers none"]
  assert missing_imports(edges, modules_of(root)) == [
      Edge("ferjax.cli", "ferjax.train.z", "ferjax/cli.py", 2)]
  assert upward_edges(edges) == [Edge("ferjax.data.x", "ferjax.train.y", "ferjax/data/x.py", 4)]
  message = _describe_upward(upward_edges(edges))
  assert "ferjax.data.x" in message and "ferjax.train.y" in message
  assert "ferjax/data/x.py:4" in message
  found = cycles(edges)
  assert [modules for modules, _ in found] == [["ferjax.models.a", "ferjax.models.b"]]
  message = _describe_cycles(found)
  assert "ferjax/models/a.py:1" in message and "ferjax/models/b.py:3" in message


def test_layers_match_whole_components():
  assert layer_of("ferjax") == -1
  assert layer_of("ferjax.data") == layer_of("ferjax.data.splits") == 1
  assert layer_of("ferjax.dataset") is None
  assert layer_of("ferjax.evaluate") == 5 and layer_of("ferjax.evaluate_synthetic") == 7


def test_planted_trainer_imports_are_reported(tmp_path):
  """A trainer imported by another trainer or by a lower layer is caught; the top layer may."""
  _write(tmp_path, {
      "ferjax/__init__.py": "",
      "ferjax/cli.py": "from ferjax.train import a\n",
      "ferjax/evaluate.py": "def f():\n  from ferjax.train import b\n",
      "ferjax/train/__init__.py": "",
      "ferjax/train/a.py": "from ferjax.train.b import step\n",
      "ferjax/train/b.py": "step = None\n",
  })
  edges = collect_imports(tmp_path / "ferjax")
  assert upward_edges(edges) == [Edge("ferjax.evaluate", "ferjax.train.b", "ferjax/evaluate.py", 2)]
  assert trainer_edges(edges) == [
      Edge("ferjax.evaluate", "ferjax.train.b", "ferjax/evaluate.py", 2),
      Edge("ferjax.train.a", "ferjax.train.b", "ferjax/train/a.py", 1)]


# --- docs/architecture.md's copy of the layers -------------------------------------------------
ARCHITECTURE = ROOT.parent / "docs" / "architecture.md"
BEGIN = "<!-- layers: generated from tests/test_layering.py (python tests/test_layering.py) -->"
END = "<!-- layers: end -->"


def _module_files(prefix: str, modules) -> str:
  """`x.py` for a module, `pkg/` (its own modules named) for a package."""
  rel = prefix.removeprefix(PACKAGE + ".").replace(".", "/")
  inside = sorted(m.removeprefix(prefix + ".") for m in modules
                  if m.startswith(prefix + ".") and m.count(".") == prefix.count(".") + 1)
  if not inside:
    return f"`{rel}.py`"
  return f"`{rel}/` ({', '.join(inside)})"


def layer_table(modules) -> str:
  """The architecture page's table of the layers, top first."""
  rows = ["| layer | modules (under `ferjax/`) | what it holds |", "|---|---|---|"]
  for layer in reversed(LAYERS):
    files = ", ".join(_module_files(p, modules) for p in layer.modules)
    rows.append(f"| {layer.name} | {files} | {layer.holds} |")
  return "\n".join([BEGIN, *rows, END])


def test_architecture_layer_table_is_generated_from_layers():
  text = ARCHITECTURE.read_text()
  expected = layer_table(modules_of(ROOT))
  if expected not in text:
    pytest.fail(f"docs/architecture.md's layer table differs from LAYERS; replace the block "
                f"between the "
                f"'{BEGIN}' and '{END}' lines with:\n{expected}", pytrace=False)


def test_architecture_module_table_names_every_module_and_only_existing_ones():
  """Every module file (or its folder) appears in docs/architecture.md's module table, and
  every `ferjax/...` path it names exists."""
  text = ARCHITECTURE.read_text()
  named = set(re.findall(r"`(ferjax/[\w/]*(?:\.py|/))`", text))
  stale = sorted(n for n in named if not (ROOT.parent / n).exists())
  paths = [p.relative_to(ROOT.parent).as_posix() for p in modules_of(ROOT).values()]
  folders = [n for n in named if n.endswith("/")]
  missing = sorted(p for p in paths if not p.endswith("__init__.py") and p not in named
                   and not any(p.startswith(n) for n in folders))
  assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
  assert not missing, f"docs/architecture.md's module table leaves out: {missing}"


if __name__ == "__main__":
  print(layer_table(modules_of(ROOT)))
