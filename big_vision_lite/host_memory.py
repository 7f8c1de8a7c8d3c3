"""glibc malloc settings for XLA:CPU runs: keep freed memory mapped, or hint at huge pages.

XLA:CPU frees its step temporaries (2.9 GB for ViT-S/16 at batch 32) after every step and
faults them back in on the next one: ~636,000 page faults per step with 4 KB pages, because
glibc gives large blocks back to the kernel (mmap'd chunks and whole thread-arena heaps are
unmapped on free). Two ways out, each worth 9-15% on one-device CPU train steps
(benchmarks/RESULTS.md rounds 4-7; with XLA's attention instead of the fused kernel, keeping
freed memory gains nothing):

- `keep_freed_memory()`: one malloc arena, no mmap, no trimming (mallopt), so freed memory
  stays mapped and is reused without faults. It must run before JAX's backends start (XLA's
  threads take their own arenas on their first allocation); the trainer calls it first thing.
  Reuse is not complete: XLA asks posix_memalign for each block, and glibc (2.36 here) asks
  for the size plus alignment padding, so a freed block of exactly the old size is sometimes
  too small for the next request and the heap grows instead. On the README's run that leaves
  3% of the default's page faults, and peak resident memory is 2.0 GB against 1.3 GB. Where
  the temporaries are one large block the heap settles at 3-4 such blocks; block_cache.py,
  which the trainer's command line preloads, serves those blocks itself and stops this.
  `growth_note` tells the trainer when the growth may not fit in the memory available.
- GLIBC_TUNABLES=glibc.malloc.hugetlb=1: transparent huge pages for large allocations, ~30x
  fewer faults. glibc reads it only when a process starts, so it is set for child processes
  (the local launcher) or suggested to the user where keep_freed_memory could not run.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys
from typing import Mapping, Sequence

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
# Device nodes of TPUs, NVIDIA and AMD GPUs: where one exists, JAX may not pick its CPU backend.
ACCELERATOR_DEVICES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
# mallopt parameters, from <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_kept = False  # whether keep_freed_memory applied its settings in this process


def opted_out(env: Mapping[str, str], name: str) -> bool:
  """Whether the BVL_* switch `name` is set to 0/false/no/off in `env` (unset means on)."""
  return env.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def glibc_version() -> tuple[int, ...] | None:
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return None
  try:
    return tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    return None


def _thp_mode(path: str | None = None) -> str | None:
  """The kernel's THP mode ('always', 'madvise' or 'never'), None where there is no THP."""
  try:
    with open(path or _THP_ENABLED) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def has_hugepages_tunable(env: Mapping[str, str]) -> bool:
  return HUGEPAGES_TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def applies(thp_path: str | None = None) -> bool:
  """Whether the tunable can do anything here: Linux, glibc >= 2.35, THP not 'never'."""
  glibc = glibc_version()
  return (sys.platform.startswith("linux") and glibc is not None and glibc >= _MIN_GLIBC
          and _thp_mode(thp_path) in ("always", "madvise"))


def add_tunable(env: Mapping[str, str]) -> dict[str, str]:
  """A copy of `env` with the huge-page tunable in GLIBC_TUNABLES, other tunables kept."""
  out = dict(env)
  if not has_hugepages_tunable(out):
    out["GLIBC_TUNABLES"] = ":".join(
        t for t in (out.get("GLIBC_TUNABLES", ""), HUGEPAGES_TUNABLE) if t)
  return out


def with_hugepages(env: Mapping[str, str], thp_path: str | None = None) -> dict[str, str]:
  """`add_tunable(env)` where the tunable applies; BVL_HUGEPAGES=0 in `env` leaves it as is."""
  if opted_out(env, "BVL_HUGEPAGES") or not applies(thp_path):
    return dict(env)
  return add_tunable(env)


def hint(backend: str, env: Mapping[str, str] = os.environ,
         thp_path: str | None = None) -> str | None:
  """One line for the user when a CPU run would be faster with the tunable, else None."""
  if backend != "cpu" or _kept or has_hugepages_tunable(env) or not applies(thp_path):
    return None
  tunable = (f"GLIBC_TUNABLES={HUGEPAGES_TUNABLE} set before Python starts (fewer page faults on "
             "XLA's temporaries; see the README)")
  if opted_out(env, "BVL_KEEP_HEAP"):
    return f"CPU train steps are ~10% faster with {tunable}"
  # The usual way here: a script that imports the trainer and ran JAX before calling it.
  return ("glibc does not keep what XLA:CPU frees in this process: CPU train steps are ~10-15% "
          "faster when big_vision_lite.host_memory.keep_freed_memory() runs before JAX starts "
          f"(the trainer's command line does it), or with {tunable}")


def cpu_backend_expected(platforms: str | None = None,
                         device_globs: Sequence[str] = ACCELERATOR_DEVICES) -> bool:
  """Whether JAX will run on its CPU backend, judged before any backend starts.

  Yes when `platforms` (default: the jax_platforms setting, i.e. JAX_PLATFORMS) names cpu
  first, or names nothing and no TPU or GPU device node exists.
  """
  if platforms is None and "jax" not in sys.modules:
    # Nothing can have changed the setting yet, and importing JAX to read it costs ~0.5 s.
    platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms is None:
    import jax  # noqa: PLC0415 (reading a setting starts no backend)
    platforms = jax.config.jax_platforms or ""
  if platforms.strip():
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in device_globs)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # noqa: PLC0415
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a jax without it: assume the worst
    return True


def keep_freed_memory(env: Mapping[str, str] = os.environ, *, platforms: str | None = None,
                      device_globs: Sequence[str] = ACCELERATOR_DEVICES) -> str | None:
  """Makes glibc keep the memory XLA:CPU frees, for a process that will run JAX on the CPU.

  Sets one malloc arena (so XLA's threads allocate from the main heap), no mmap for large
  blocks and no trimming: freed memory stays mapped and the next step reuses it without page
  faults. The price is that the process never hands freed memory back to the kernel; its
  resident size stays at its peak. Returns None once applied, else why it was not:
  BVL_KEEP_HEAP=0, not glibc, JAX's backends already started, or not a CPU run.
  """
  global _kept
  if _kept:
    return None
  if opted_out(env, "BVL_KEEP_HEAP"):
    return "BVL_KEEP_HEAP=0"
  if not sys.platform.startswith("linux") or glibc_version() is None:
    return "not glibc"
  if _backends_started():
    return "JAX's backends have started, XLA's threads already have their own malloc arenas"
  if not cpu_backend_expected(platforms, device_globs):
    return "JAX will not run on the CPU here"
  mallopt = ctypes.CDLL(None).mallopt
  # -1 as the trim threshold means never trim (mallopt(3)).
  for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
    if mallopt(param, value) != 1:
      return f"mallopt({param}, {value}) failed"
  _kept = True
  return None


def available_bytes(path: str = "/proc/meminfo") -> int | None:
  """The kernel's estimate of memory available to new work (MemAvailable), None where unknown."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


# Where the temporaries are one large block, kept memory has grown the heap to 3-4 such blocks
# in the first few dozen steps (benchmarks/RESULTS.md, rounds 9-10): up to 3 more than the
# first step maps. With the block cache (block_cache.py) it held 2 (round 11): 1 more.
KEPT_HEAP_EXTRA_BLOCKS = 3
CACHED_EXTRA_BLOCKS = 1


def growth_note(temp_bytes: int, available: int | None, cached: bool = False) -> str | None:
  """A warning where kept memory's growth may not fit in this host's free memory.

  `temp_bytes`: the step's temporaries on this host (all its local devices), already mapped
  once by the first step; `available`: MemAvailable after that step; `cached`: whether the
  block cache serves the large blocks (one more block at most, not three).
  """
  if available is None or temp_bytes <= 0:
    return None
  blocks = CACHED_EXTRA_BLOCKS if cached else KEPT_HEAP_EXTRA_BLOCKS
  extra = blocks * temp_bytes
  if extra <= available:
    return None
  why = ("a step may allocate them before the previous step frees its own" if cached else
         "as glibc reuses freed blocks incompletely")
  return (f"kept memory can grow this process by up to {extra / 2**30:.1f} GiB more "
          f"({blocks} more block{'s' * (blocks > 1)} of the step's {temp_bytes / 2**30:.1f} GiB "
          f"of temporaries, {why}), and {available / 2**30:.1f} GiB is available: set "
          "BVL_KEEP_HEAP=0 if the run runs out of memory")


def kept_freed_memory() -> bool:
  """Whether keep_freed_memory applied its settings in this process."""
  return _kept
