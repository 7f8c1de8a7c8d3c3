"""Name -> factory registries for models, tasks, evaluators and data ops.

A registry also imports `<package>.<name>` on a miss, so adding a component is
writing one file that registers itself; nothing central needs editing.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable


class UnknownNameError(KeyError):
  """A name that is not registered; the message lists the known names."""

  def __str__(self) -> str:  # KeyError would quote the whole message
    return str(self.args[0])


class Registry:
  """A mapping from names to factories, filled by `@registry.register(name)`."""

  def __init__(self, kind: str, package: str | None = None):
    self.kind = kind
    self.package = package
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(fn):
      if name in self._entries and self._entries[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = fn
      return fn
    return decorator

  def get(self, name: str) -> Callable[..., Any]:
    if name not in self._entries and self.package:
      module = name.split(".")[0]
      try:
        importlib.import_module(f"{self.package}.{module}")
      except ModuleNotFoundError as e:
        # Only swallow "this module does not exist", not import errors inside it.
        if e.name != f"{self.package}.{module}":
          raise
    if name not in self._entries:
      known = sorted(self._entries)
      close = difflib.get_close_matches(name, known, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known) or 'none'})")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
