"""glibc malloc settings for XLA:CPU processes, applied through the environment by launchers.

XLA:CPU frees its step temporaries (2.9 GB for ViT-S/16 at batch 32) after every step and
faults them back in on the next one: ~636,000 page faults per step with 4 KB pages, because
glibc gives large blocks back to the kernel. Two environment settings avoid that; glibc reads
GLIBC_TUNABLES only when a process starts, so launchers set them (launch/cpu.sh,
launch/local_multiprocess.py), never the trainer:

- `KEEP_HEAP_TUNABLES`: one malloc arena, no mmap, no trimming, so freed memory stays mapped
  and is reused without faults (what block_cache.c builds on). The price: the process keeps
  its peak resident size.
- `HUGEPAGES_TUNABLE`: transparent huge pages for large allocations, ~30x fewer faults.

Neither changes a result. benchmarks/RESULTS.md says what each pays on which CPU.
"""

from __future__ import annotations

import platform
import sys
from typing import Mapping, Sequence

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# mallopt(M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, max) as tunables.
KEEP_HEAP_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                      f"glibc.malloc.trim_threshold={2**63 - 1}")
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


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


def add_tunable(env: Mapping[str, str], tunables: Sequence[str] = (HUGEPAGES_TUNABLE,)
                ) -> dict[str, str]:
  """A copy of `env` with `tunables` in GLIBC_TUNABLES, other tunables kept."""
  out = dict(env)
  have = out.get("GLIBC_TUNABLES", "").split(":")
  out["GLIBC_TUNABLES"] = ":".join(t for t in (*have, *(t for t in tunables if t not in have)) if t)
  return out


def with_hugepages(env: Mapping[str, str], thp_path: str | None = None) -> dict[str, str]:
  """`add_tunable(env)` where the tunable applies; BVL_HUGEPAGES=0 in `env` leaves it as is."""
  if opted_out(env, "BVL_HUGEPAGES") or not applies(thp_path):
    return dict(env)
  return add_tunable(env)


def keep_heap_env(env: Mapping[str, str], preload: str | None = None) -> dict[str, str]:
  """A copy of `env` for a CPU process that keeps freed memory: KEEP_HEAP_TUNABLES added, and
  `preload` (block_cache.library()) first in LD_PRELOAD. What launch/cpu.sh exports."""
  out = add_tunable(env, KEEP_HEAP_TUNABLES)
  if preload and preload not in out.get("LD_PRELOAD", "").split(":"):
    out["LD_PRELOAD"] = ":".join(p for p in (preload, out.get("LD_PRELOAD", "")) if p)
  return out


def keeps_heap(env: Mapping[str, str]) -> bool:
  """Whether `env` (this process's, when it started) holds KEEP_HEAP_TUNABLES."""
  have = env.get("GLIBC_TUNABLES", "").split(":")
  return all(t in have for t in KEEP_HEAP_TUNABLES)
