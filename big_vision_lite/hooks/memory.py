"""After the first step: the compiled train step's memory per device (and a CPU heap note)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import jax

from big_vision_lite import block_cache, host_memory
from big_vision_lite.hooks.base import StepInfo

log = logging.getLogger("big_vision_lite")


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report_step_memory(train_step: Any, state: Any, batch: Any) -> None:
  """Prints the compiled train step's memory per device, from XLA's memory analysis.

  Called after the first step, when the executable is compiled and cached (lowering again costs
  nothing). On a CPU run whose heap is kept (host_memory), also warns where the heap's growth
  by more blocks of temporaries may not fit in the memory left.
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
  if host_memory.kept_freed_memory() and jax.default_backend() == "cpu":
    temp = stats.temp_size_in_bytes * len(jax.local_devices())
    if note := host_memory.growth_note(temp, host_memory.available_bytes(), block_cache.active()):
      print(f"note: {note}", file=sys.stderr, flush=True)


class StepMemory:
  """Due at the run's first step only (every=lambda s: s == first)."""

  def __init__(self, train_step: Any):
    self.train_step = train_step

  def __call__(self, info: StepInfo) -> None:
    report_step_memory(self.train_step, info.state, info.batch)
