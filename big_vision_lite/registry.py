"""Name -> factory registries for models, tasks, evaluators, data sources and data ops.

A registry finds its components itself: a lookup that misses imports `<package>.<name>`, and
listing (or a miss that import does not fill) imports every module of the package whose name
matches `modules`, once. Adding a component is writing one file that registers itself;
nothing central needs editing, and nothing needs importing before `names()` lists it.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from typing import Any, Callable, Sequence


class UnknownNameError(KeyError):
  """A name that is not registered; the message lists the known names."""

  def __str__(self) -> str:  # KeyError would quote the whole message
    return str(self.args[0])


class Registry:
  """A mapping from names to factories, filled by `@registry.register(name)`.

  `package`: where the components live; `modules`: glob patterns of the module names (within
  `package`) that register components, e.g. ("ops_*",) when the package holds other modules.
  """

  def __init__(self, kind: str, package: str | None = None, modules: Sequence[str] = ("*",)):
    self.kind = kind
    self.package = package
    self.modules = tuple(modules)
    self._entries: dict[str, Callable[..., Any]] = {}
    self._discovered = package is None

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(fn):
      if name in self._entries and self._entries[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = fn
      return fn
    return decorator

  def _import(self, module: str) -> None:
    try:
      importlib.import_module(f"{self.package}.{module}")
    except ModuleNotFoundError as e:
      # Only swallow "this module does not exist", not import errors inside it.
      if e.name != f"{self.package}.{module}":
        raise

  def discover(self) -> None:
    """Imports every module of the package that matches `modules` (once)."""
    if self._discovered:
      return
    self._discovered = True
    package = importlib.import_module(self.package)
    for info in pkgutil.iter_modules(package.__path__):
      if not info.name.startswith("_") and any(fnmatch.fnmatch(info.name, p) for p in self.modules):
        self._import(info.name)

  def get(self, name: str) -> Callable[..., Any]:
    if name not in self._entries and self.package:
      self._import(name.split(".")[0])
    if name not in self._entries:
      self.discover()
    if name not in self._entries:
      known = sorted(self._entries)
      close = difflib.get_close_matches(name, known, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known) or 'none'})")
    return self._entries[name]

  def names(self) -> list[str]:
    """Every registered name, the package's modules imported first."""
    self.discover()
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    if name not in self._entries:
      self.discover()
    return name in self._entries
