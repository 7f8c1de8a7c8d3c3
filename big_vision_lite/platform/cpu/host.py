"""Which CPU this host has: a one-line description for logs and benchmarks, and a signature for caches.

The same code ranks differently on different CPUs (benchmarks/RESULTS.md, "vs timm on the AMD EPYC host": ViT
training was 0.86-0.91x timm's on an Intel Xeon VM and 1.03-1.12x on an AMD EPYC one), and
-march=native kernels or a measured peak are only valid for the CPU they came from, so each
benchmark prints `describe()` and each cache of CPU-specific results keys on `signature()`.
"""

from __future__ import annotations

import hashlib
import os
import platform

# Feature flags worth naming in a benchmark's header: the vector ISA decides which GEMM
# kernels XLA's Eigen, MKL (torch) and our -march=native kernels run.
_NAMED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
  """The first processor's fields in /proc/cpuinfo (empty where there is none: macOS, Windows)."""
  fields: dict[str, str] = {}
  try:
    with open(path) as f:
      for line in f:
        if not line.strip():
          if fields:
            break  # one processor is enough: the VMs and hosts we run on are uniform
          continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


def _name(info: dict[str, str]) -> str:
  return (info.get("model name") or info.get("Model name") or platform.processor()
          or platform.machine() or "unknown CPU")


def model_name(path: str = "/proc/cpuinfo") -> str:
  """The CPU's marketing name, e.g. 'AMD EPYC' (a VM may hide the exact model)."""
  return _name(_cpuinfo(path))


def describe(path: str = "/proc/cpuinfo") -> str:
  """E.g. 'AMD EPYC (AuthenticAMD family 25 model 17), 2 cores, avx2 fma avx512f avx512_bf16'."""
  info = _cpuinfo(path)
  name = _name(info)
  ident = " ".join(f"{label} {info[k]}" for k, label in (("cpu family", "family"), ("model", "model"))
                   if k in info)
  vendor = info.get("vendor_id") or info.get("CPU implementer")
  if vendor:
    ident = f"{vendor} {ident}".strip()
  flags = set((info.get("flags") or info.get("Features") or "").split())
  named = " ".join(f for f in _NAMED_FLAGS if f in flags)
  return (f"{name}{f' ({ident})' if ident else ''}, {os.cpu_count()} cores"
          + (f", {named}" if named else ""))


def signature(path: str = "/proc/cpuinfo") -> str:
  """A short stable id of the CPU model and its feature flags, for cache keys."""
  info = _cpuinfo(path)
  parts = [platform.machine()] + [info.get(k, "") for k in (
      "vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer",
      "CPU part", "Features")]
  if not any(parts[1:]):
    parts.append(platform.processor())
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
