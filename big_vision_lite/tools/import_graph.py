"""The package's import graph from its sources (nothing imported), checked to point one way.

    python -m big_vision_lite.tools.import_graph [--edges]

Prints `module -> module` for every import between the package's modules (with --edges), then
each rule broken; exit 1 if any is. Rules: the command line (train) is imported by nothing; the
run (run) only by train; the loop and the hooks import neither; tasks, models and evaluators
import none of train, run, loop and hooks.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

PACKAGE = "big_vision_lite"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (importer prefix, imported prefixes it must not reach); "" matches every module.
RULES = (
    ("", ("train",)),
    ("loop", ("run",)),
    ("hooks", ("run", "loop")),
    ("tasks", ("run", "loop", "hooks")),
    ("models", ("run", "loop", "hooks")),
    ("evaluators", ("run", "loop", "hooks")),
)
RUN_IMPORTERS = ("train",)  # the one module that may import run


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str) -> set[str]:
  """The package modules `module` imports (`from pkg import x` counts x where x is a module)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  is_pkg = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
        name = ".".join(base + ([node.module] if node.module else []))
      else:
        name = node.module or ""
      if name.split(".")[0] != PACKAGE:
        continue
      out.add(name)
      out.update(f"{name}.{a.name}" for a in node.names)
  return out


def graph() -> dict[str, set[str]]:
  """module -> the package modules it imports, names relative to the package."""
  files = {}
  for dirpath, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
    for n in names:
      if n.endswith(".py"):
        path = os.path.join(dirpath, n)
        files[_module_name(path)] = path
  edges = {}
  for module, path in sorted(files.items()):
    targets = {t for t in _imports(path, module) if t in files and t != module and t != PACKAGE}
    edges[_short(module)] = {_short(t) for t in targets}
  return edges


def _short(module: str) -> str:
  return module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else module


def _under(module: str, prefix: str) -> bool:
  return prefix == "" or module == prefix or module.startswith(prefix + ".")


def violations(edges: dict[str, set[str]]) -> list[str]:
  """One line per import against RULES (or of run from outside RUN_IMPORTERS)."""
  bad = []
  for src, targets in sorted(edges.items()):
    for dst in sorted(targets):
      why = [f"{importer or 'nothing'} may not import {dst}" for importer, forbidden in RULES
             if _under(src, importer) and any(_under(dst, f) for f in forbidden)]
      if _under(dst, "run") and not any(_under(src, m) for m in RUN_IMPORTERS):
        why.append(f"only {', '.join(RUN_IMPORTERS)} imports run")
      if why:
        bad.append(f"{src} -> {dst}: {why[0]}")
  return bad


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--edges", action="store_true", help="print every edge")
  args = parser.parse_args(argv)
  edges = graph()
  if args.edges:
    for src, targets in sorted(edges.items()):
      for dst in sorted(targets):
        print(f"{src} -> {dst}")
  bad = violations(edges)
  for line in bad:
    print(f"error: {line}", file=sys.stderr)
  print(f"{sum(map(len, edges.values()))} imports between {len(edges)} modules; "
        f"{'arrows one way' if not bad else f'{len(bad)} against the layering'} "
        f"(train -> run -> loop, hooks; tasks, models, evaluators import none of them)")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
