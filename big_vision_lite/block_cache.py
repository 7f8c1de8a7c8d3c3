"""Preloads native/block_cache.c into a CPU training process: freed large blocks are reused.

With glibc keeping freed memory (host_memory.keep_freed_memory), XLA:CPU's step temporaries
still map fresh pages now and then: glibc 2.36 reuses a freed block of the size asked for only
sometimes, and the heap grows to 3-4 blocks of temporaries (ViT-S/16 at batch 32: 7.96 GB
resident), each growth step ~1.5-2.3x slower. The block cache serves aligned requests of 1 MiB
and more (`BVL_BLOCK_CACHE_MIN_BYTES`) from mappings it keeps when they are freed, so a step
reuses the previous step's pages: ViT-S then held 2 blocks (5.75 GB) and no step after the
second faulted (benchmarks/RESULTS.md, round 11). A request of 64 MiB and more that finds no
kept block while a live one would fit waits up to 20 ms for it to be freed
(`BVL_BLOCK_CACHE_WAIT_MS`, `BVL_BLOCK_CACHE_WAIT_MIN_BYTES`): a loop that starts each step as
soon as the last one's outputs are ready gets there just before XLA frees its temporaries.

A library must be loaded before the program starts to replace its allocator, so `restart`
re-executes the program once with LD_PRELOAD; the trainer's command line does this first
thing. It does not where LD_PRELOAD is already set (another allocator may be preloaded),
where JAX will not run on the CPU, where BVL_BLOCK_CACHE=0 or BVL_KEEP_HEAP=0, or where no C
compiler can build the library; it says why instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from typing import Callable, Mapping, Sequence

from big_vision_lite import host_memory

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "block_cache.c")
SWITCH = "BVL_BLOCK_CACHE"
MIN_BYTES = "BVL_BLOCK_CACHE_MIN_BYTES"
WAIT_MS = "BVL_BLOCK_CACHE_WAIT_MS"
WAIT_MIN_BYTES = "BVL_BLOCK_CACHE_WAIT_MIN_BYTES"
# Set for the re-executed program, so that it can tell a failed preload from a first start.
_RESTARTED = "BVL_BLOCK_CACHE_RESTARTED"
_PAGE = 4096
_outcome = "only the command line restarts with it; see block_cache.library()"  # restart's last result


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


def why_not(env: Mapping[str, str], *, platforms: str | None = None,
            device_globs: Sequence[str] = host_memory.ACCELERATOR_DEVICES) -> str | None:
  """Why this process should not be restarted with the cache, or None where it should."""
  for switch in (SWITCH, "BVL_KEEP_HEAP"):
    if host_memory.opted_out(env, switch):
      return f"{switch}=0"
  if not sys.platform.startswith("linux") or host_memory.glibc_version() is None:
    return "not glibc on Linux"
  if env.get("LD_PRELOAD", "").strip():
    return (f"LD_PRELOAD is already set ({env['LD_PRELOAD']}); the cache wraps glibc's "
            "allocator and would bypass another preloaded one")
  if not host_memory.cpu_backend_expected(platforms, device_globs):
    return "JAX will not run on the CPU here"
  return None


def restart(argv: Sequence[str], env: Mapping[str, str] = os.environ, *,
            execve: Callable[..., object] = os.execve, build: Callable[[], str] | None = None,
            platforms: str | None = None,
            device_globs: Sequence[str] = host_memory.ACCELERATOR_DEVICES) -> str | None:
  """Re-executes `[sys.executable, *argv]` with the cache preloaded, where it applies.

  Call it first thing in a program's main, before any work: it does not return when it
  restarts. In the restarted program it returns None (or why the preload failed) and removes
  its variables from os.environ, so that the program's children start without the cache.
  Otherwise it returns why it did not restart. Raises ValueError for a bad
  BVL_BLOCK_CACHE_MIN_BYTES, BVL_BLOCK_CACHE_WAIT_MS or BVL_BLOCK_CACHE_WAIT_MIN_BYTES.
  """
  global _outcome
  check_env(env)
  _outcome = _restart(argv, env, execve, build, platforms, device_globs)
  return _outcome


def _restart(argv, env, execve, build, platforms, device_globs) -> str | None:
  if _RESTARTED in env:
    preload = env.get("LD_PRELOAD")
    if env is os.environ:  # the restart set both; LD_PRELOAD was unset before it (why_not)
      os.environ.pop(_RESTARTED)
      os.environ.pop("LD_PRELOAD", None)
    return None if active() else f"the dynamic loader did not preload LD_PRELOAD={preload!r}"
  if active():
    return None  # preloaded by the user
  if reason := why_not(env, platforms=platforms, device_globs=device_globs):
    return reason
  if not argv or argv[0] == "-":
    return "the program came from standard input, which a restart cannot read again"
  try:
    path = (build or library)()
  except RuntimeError as e:
    return f"cannot build {SOURCE}: {e}"
  child_env = dict(env)
  child_env[_RESTARTED] = "1"
  child_env["LD_PRELOAD"] = path
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, [sys.executable, *argv], child_env)
  return "restart returned"  # only a test's execve returns


def library() -> str:
  """The compiled library's path (built on first use); RuntimeError where it cannot be."""
  from big_vision_lite.kernels import cpu_build  # noqa: PLC0415 (imports jax)
  return cpu_build.build(SOURCE, language="c")


def describe() -> str:
  """One line for a run's log: whether the cache is on, else why not."""
  if (st := stats()) is not None:
    return (f"host memory: blocks of {st.min_bytes >> 10} KiB and more are kept for reuse "
            f"(big_vision_lite/native/block_cache.c; {SWITCH}=0 turns this off)")
  return f"host memory: large blocks are not cached ({_outcome})"
