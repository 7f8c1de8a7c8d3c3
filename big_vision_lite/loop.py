"""The one training loop: takes steps and calls the hooks due after each (hooks/)."""

from __future__ import annotations

from typing import Any, Callable

from big_vision_lite.hooks.base import Every, Hook, StepInfo


class Loop:
  """`add_hook(fn, every=N)` for periodic work (as Levanter's); `run` steps from a state.

  Hooks run in the order added, after the step they are due at; a hook that raises ends the
  run. Every hook's `close()` runs when the loop ends, whatever the outcome.
  """

  def __init__(self, train_step: Callable[[Any, Any], tuple[Any, Any]], total_steps: int):
    self.train_step = train_step
    self.total_steps = total_steps
    self.hooks: list[Hook] = []

  def add_hook(self, fn: Callable[[StepInfo], None] | Hook, every: Every = 1, name: str = "") -> None:
    self.hooks.append(fn if isinstance(fn, Hook) else Hook(fn, every, name or _name(fn)))

  def run(self, state: Any, start_step: int, next_batch: Callable[[int, Any], Any]) -> Any:
    """Steps start_step + 1 .. total_steps; `next_batch(step, state)` gives each step's batch."""
    try:
      for step in range(start_step + 1, self.total_steps + 1):
        batch = next_batch(step, state)
        state, metrics = self.train_step(state, batch)
        info = StepInfo(step, self.total_steps, state, metrics, batch)
        for hook in self.hooks:
          if hook.due(step, self.total_steps):
            hook.fn(info)
    finally:
      for hook in self.hooks:
        hook.close()
    return state


def _name(fn: Any) -> str:
  return getattr(fn, "__name__", type(fn).__name__)
