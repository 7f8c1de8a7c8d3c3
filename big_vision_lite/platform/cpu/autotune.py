"""Times candidate implementations of one operation on this CPU and caches the winner per CPU
model, jax version and shape (~/.cache/big_vision_lite/autotune.json)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable, Mapping

import jax

from big_vision_lite.platform.cpu import build, host

# A candidate other than the default is chosen only when its median is this much faster: a
# loaded host's noise must not flip a choice towards code that is not faster.
MARGIN = 0.03
ROUNDS = 5  # timed calls of each candidate, interleaved


def cache_path() -> str:
  return os.path.join(build.cache_root(), "autotune.json")


def cache_key(op: str, shape: str) -> str:
  """The CPU model and features, core count, jax version, the operation and its shape."""
  return (f"{op}|{shape}|{host.model_name()} {host.signature()}|{os.cpu_count()} cores|"
          f"jax {jax.__version__}")


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def _write(path: str, key: str, entry: dict) -> None:
  """Adds one entry, re-reading the file first (other processes may have added theirs)."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read(path)
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json")
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError:
    pass  # a read-only home: measure again next time


def time_calls(calls: Mapping[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
  """Median seconds of each zero-argument call (each returns arrays to wait for), interleaved."""
  for call in calls.values():  # warm-up: compile caches, first-touch page faults
    jax.block_until_ready(call())
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def choose(op: str, shape: str, default: str,
           prepare: Mapping[str, Callable[[], Callable[[], object]]]) -> dict:
  """The fastest of `prepare`'s candidates (each builds a timed call), from the cache if there.

  Returns {"impl", "times_ms", "measured": bool}. `default` wins unless another is MARGIN
  faster. Runs outside any trace (jax.ensure_compile_time_eval), so a model may call it while
  it is being traced.
  """
  key = cache_key(op, shape)
  path = cache_path()
  entry = _read(path).get(key)
  if isinstance(entry, dict) and entry.get("impl") in prepare:
    return {**entry, "measured": False}
  with jax.ensure_compile_time_eval():
    times = time_calls({name: make() for name, make in prepare.items()})
  best = min(times, key=times.get)
  if best != default and times[best] > times[default] * (1 - MARGIN):
    best = default
  entry = {"impl": best, "times_ms": {k: round(v * 1e3, 3) for k, v in times.items()}}
  _write(path, key, entry)
  return {**entry, "measured": True}
