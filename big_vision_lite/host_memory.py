"""glibc's transparent-huge-page setting for XLA:CPU runs: detect it, hint at it, hand it on.

XLA:CPU frees its step temporaries (2.9 GB for ViT-S/16 at batch 32) after every step and
faults them back in on the next one: ~700,000 page faults per step with 4 KB pages. With
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 glibc backs large allocations with transparent huge
pages (madvise), the faults drop ~30x and CPU train steps get 9-14% faster
(benchmarks/RESULTS.md, rounds 4-6). glibc reads the tunable only when a process starts, so
it can be set for a child process or suggested to the user, not switched on in place.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def _glibc_version() -> tuple[int, ...] | None:
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
  glibc = _glibc_version()
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
  if (env.get("BVL_HUGEPAGES", "1").strip().lower() in ("0", "false", "no", "off")
      or not applies(thp_path)):
    return dict(env)
  return add_tunable(env)


def hint(backend: str, env: Mapping[str, str] = os.environ,
         thp_path: str | None = None) -> str | None:
  """One line for the user when a CPU run would be faster with the tunable, else None."""
  if backend != "cpu" or has_hugepages_tunable(env) or not applies(thp_path):
    return None
  return (f"CPU train steps are ~10% faster with GLIBC_TUNABLES={HUGEPAGES_TUNABLE} set before "
          "Python starts (fewer page faults on XLA's temporaries; see the README)")
