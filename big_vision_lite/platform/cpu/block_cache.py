"""block_cache.c for CPU training processes (preloaded by launch/cpu.sh): freed large blocks are reused.

With glibc keeping freed memory (launch/cpu.sh's GLIBC_TUNABLES), XLA:CPU's step temporaries
still map fresh pages now and then: glibc 2.36 reuses a freed block of the size asked for only
sometimes, and the heap grows to 3-4 blocks of temporaries (ViT-S/16 at batch 32: 7.96 GB
resident), each growth step ~1.5-2.3x slower. The block cache serves aligned requests of 1 MiB
and more (`BVL_BLOCK_CACHE_MIN_BYTES`) from mappings it keeps when they are freed, so a step
reuses the previous step's pages: ViT-S then held 2 blocks (5.75 GB) and no step after the
second faulted (benchmarks/RESULTS.md, "a block cache for XLA:CPU's large blocks"). A request
of 64 MiB and more that finds no
kept block while a live one would fit waits up to 20 ms for it to be freed
(`BVL_BLOCK_CACHE_WAIT_MS`, `BVL_BLOCK_CACHE_WAIT_MIN_BYTES`): a loop that starts each step as
soon as the last one's outputs are ready gets there just before XLA frees its temporaries.

A library must be loaded before the program starts to replace its allocator, so it is
preloaded by a launcher (launch/cpu.sh sets LD_PRELOAD to `library()`), never by the trainer
re-executing itself. It changes where memory comes from, never a result.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from typing import Mapping

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_cache.c")
MIN_BYTES = "BVL_BLOCK_CACHE_MIN_BYTES"
WAIT_MS = "BVL_BLOCK_CACHE_WAIT_MS"
WAIT_MIN_BYTES = "BVL_BLOCK_CACHE_WAIT_MIN_BYTES"
_PAGE = 4096


@dataclasses.dataclass(frozen=True)
class Stats:
  """The cache's counters in this process (bytes, and blocks since the process started)."""
  live_bytes: int  # handed out and not freed
  kept_bytes: int  # freed and kept mapped for reuse
  peak_live_bytes: int
  mapped: int  # blocks mapped afresh (each first touch faults its pages in)
  reused: int  # requests served from a kept block
  unmapped: int  # freed blocks given back, the kept ones being at the peak already
  min_bytes: int  # smaller requests go to glibc
  waits: int  # large requests that waited for a live block to be freed (BVL_BLOCK_CACHE_WAIT_MS)
  waits_served: int  # ... and got a freed block, rather than a fresh mapping


def stats() -> Stats | None:
  """The counters, or None where the library is not loaded in this process."""
  try:
    fn = ctypes.CDLL(None).bvl_block_cache_stats
  except AttributeError:
    return None
  out = (ctypes.c_uint64 * 9)()
  fn(out)
  return Stats(*(int(v) for v in out))


def counters() -> str | None:
  """The counters in one line, for the end of a run; None where the library is not loaded."""
  if (st := stats()) is None:
    return None
  return (f"block cache: {st.mapped} blocks mapped, {st.reused} reused, {st.unmapped} unmapped, "
          f"peak live {st.peak_live_bytes / 2**30:.2f} GiB, {st.waits} waits for a free "
          f"({st.waits_served} served)")


def active() -> bool:
  """Whether the block cache serves this process's large aligned allocations."""
  return stats() is not None


def check_env(env: Mapping[str, str]) -> None:
  """Raises ValueError naming the variable where one of the cache's settings is set but not usable.

  The library reads them when it loads and cannot report an error, so they are checked here.
  """
  checks = ((MIN_BYTES, _PAGE, None, f"bytes >= {_PAGE} (the smallest aligned request the block "
             "cache serves)"),
            (WAIT_MS, 0, 10_000, "milliseconds in [0, 10000] (0: large requests never wait)"),
            (WAIT_MIN_BYTES, _PAGE, None, f"bytes >= {_PAGE}"))
  for name, low, high, what in checks:
    value = env.get(name, "").strip()
    if value and not (value.isdigit() and int(value) >= low and (high is None or int(value) <= high)):
      raise ValueError(f"{name}={env[name]!r} is not a whole number of {what}")


def library() -> str:
  """The compiled library's path (built on first use); RuntimeError where it cannot be."""
  from big_vision_lite.platform.cpu import build as cpu_build  # noqa: PLC0415
  return cpu_build.build(SOURCE, language="c")


def describe() -> str:
  """One line for a run's log: whether the cache serves this process."""
  if (st := stats()) is not None:
    return (f"host memory: blocks of {st.min_bytes >> 10} KiB and more are kept for reuse "
            "(big_vision_lite/platform/cpu/block_cache.c, preloaded)")
  return "host memory: large blocks are not cached (block_cache.c is not preloaded)"
