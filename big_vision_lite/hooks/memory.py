"""After the first step: the compiled train step's memory per device."""

from __future__ import annotations

import logging
from typing import Any

from big_vision_lite.hooks.base import StepInfo

log = logging.getLogger("big_vision_lite")


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report_step_memory(train_step: Any, state: Any, batch: Any) -> None:
  """Prints the compiled train step's memory per device, from XLA's memory analysis.

  Called after the first step, when the executable is compiled and cached (lowering again costs
  nothing).
  """
  try:
    stats = train_step.lower(state, batch).compile().memory_analysis()
  except Exception as e:  # noqa: BLE001 - the analysis is optional; some backends lack it.
    log.info("no memory analysis of the train step: %s", e)
    return
  if stats is None:
    return
  print(f"train step memory per device (XLA's analysis): arguments "
        f"{_size(stats.argument_size_in_bytes)}, temporaries {_size(stats.temp_size_in_bytes)}, "
        f"outputs {_size(stats.output_size_in_bytes)} ({_size(stats.alias_size_in_bytes)} of them "
        f"in donated arguments)", flush=True)


class StepMemory:
  """Due at the run's first step only (every=lambda s: s == first)."""

  def __init__(self, train_step: Any):
    self.train_step = train_step

  def __call__(self, info: StepInfo) -> None:
    report_step_memory(self.train_step, info.state, info.batch)
