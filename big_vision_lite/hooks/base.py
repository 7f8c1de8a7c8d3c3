"""What the loop passes to a hook after each step, and when a hook is due."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

# every=N: steps N, 2N, ... and the last; every=0: the last step only; or a step -> bool.
Every = Union[int, Callable[[int], bool]]


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """The step just taken: `state` and `metrics` are the train step's outputs (on device),
  `batch` its input."""
  step: int
  total_steps: int
  state: Any
  metrics: Any
  batch: Any = None

  @property
  def is_last(self) -> bool:
    return self.step == self.total_steps


def every_n(n: int) -> Callable[[int, int], bool]:
  """(step, total_steps) -> due at steps n, 2n, ... and at the last step (n=0: only the last)."""
  return lambda step, total: step == total or (n > 0 and step % n == 0)


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(info)` run after the steps where it is due; `close()` (optional) when the loop ends."""
  fn: Callable[[StepInfo], None]
  every: Every = 1
  name: str = ""

  def due(self, step: int, total_steps: int) -> bool:
    if callable(self.every):
      return bool(self.every(step))
    return every_n(int(self.every))(step, total_steps)

  def close(self) -> None:
    close = getattr(self.fn, "close", None)
    if close is not None:
      close()
