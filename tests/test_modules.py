"""The module layout docs/design.md#modules describes, checked on the source."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "optaxclip"
DESIGN = PACKAGE.parent / "docs" / "design.md"

# The modules every transform may build on (design.md's table, above the
# transform families), with what each of them may import in turn.
FOUNDATION = {
  "_validate": set(),
  "_tree": set(),
  "_grouping": set(),
  "_norms": {"_grouping", "_tree", "_validate"},
  "_moments": {"_norms"},
  "_scale": set(),
  "_stats": {"_tree"},
}


def _modules():
  return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _imports(module):
  """The optaxclip modules ``module`` imports, at any depth of its code."""
  tree = ast.parse((PACKAGE / f"{module}.py").read_text())
  found = set()
  for node in ast.walk(tree):
    if not isinstance(node, ast.ImportFrom) or not node.module:
      continue
    if node.module == "optaxclip":
      found.update(alias.name for alias in node.names)
    elif node.module.startswith("optaxclip."):
      found.add(node.module.split(".")[1])
  return found


def test_foundation_modules_import_only_what_the_design_allows():
  for module, allowed in FOUNDATION.items():
    assert _imports(module) <= allowed, module


def test_no_module_but_init_imports_a_transform_module():
  for module in _modules():
    if module == "__init__":
      continue
    transforms = _imports(module) - set(FOUNDATION)
    assert not transforms, f"{module} imports {sorted(transforms)}"


def test_every_module_is_in_the_design_table():
  table = DESIGN.read_text().split("## Modules", 1)[1]
  listed = set(re.findall(r"`(_?\w+)\.py`", table))
  assert set(_modules()) <= listed, set(_modules()) - listed


def test_square_roots_only_in_the_norm_kernel():
  raw = re.compile(r"\b(jnp|np|lax|math)\.sqrt\(|linalg\.norm\(|\*\*\s*0?\.5\b")
  for path in PACKAGE.glob("*.py"):
    if path.stem == "_norms":
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#", 1)[0]
      assert not raw.search(code), f"{path.name}:{number}: {line.strip()}"
