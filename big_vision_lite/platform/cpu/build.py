"""Compiles, caches and registers the XLA:CPU FFI kernels in this folder (one .cc file each).

Each library is compiled on first use with the system C++ compiler (`$CXX`, else
c++/g++/clang++) for the host CPU (-march=native) and cached under `$BVL_CACHE_DIR` (default
~/.cache/big_vision_lite), keyed by the source and the headers beside it, compiler, flags,
jaxlib and CPU model. A kernel that cannot be built is reported, once, and its callers keep
XLA's path. `build(..., language="c")` compiles the C library here
(block_cache.c) the same way, with the C compiler and no JAX headers.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Mapping

import jaxlib  # only its version: `import jax` costs ~0.5 s, which launch/cpu.sh's library lookup avoids

from big_vision_lite.platform.cpu import host as host_cpu


_COMPILERS = {"c++": ("CXX", "c++", "g++", "clang++"), "c": ("CC", "cc", "gcc", "clang")}


def compiler(language: str = "c++") -> str | None:
  variable, *names = _COMPILERS[language]
  for name in (os.environ.get(variable), *names):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def cache_root() -> str:
  """$BVL_CACHE_DIR, else ~/.cache/big_vision_lite: built libraries and autotune results."""
  return os.environ.get("BVL_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "big_vision_lite")


def cache_dir() -> str:
  return os.path.join(cache_root(), "kernels")


def _flags(language: str = "c++") -> list[str]:
  if language == "c":
    return ["-O2", "-fPIC", "-shared", "-pthread", "-w"]
  import jax  # noqa: PLC0415 (see the import of jaxlib)
  return ["-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-w",
          f"-I{jax.ffi.include_dir()}"]


def build(source_path: str, force: bool = False, language: str = "c++") -> str:
  """Compiles `source_path` into a shared library (or finds it in the cache); its path.

  `language`: "c++" (the FFI kernels) or "c". Raises RuntimeError naming the compiler, the
  command and its output when it cannot.
  """
  cxx = compiler(language)
  if cxx is None:
    variable, *names = _COMPILERS[language]
    raise RuntimeError(f"no {language.upper()} compiler found (set ${variable}, or install "
                       f"{' or '.join(names[1:])})")
  # The key covers the headers beside the source too (cpu_kernel_common.h).
  folder = os.path.dirname(os.path.abspath(source_path))
  source = b""
  for path in [source_path, *sorted(glob.glob(os.path.join(folder, "*.h")))]:
    with open(path, "rb") as f:
      source += f.read() + b"\0"
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f"{language.upper()} compiler {cxx} does not run: {e}") from None
  key = hashlib.sha256(b"\0".join([
      source, version.encode(), " ".join(_flags(language)).encode(), jaxlib.__version__.encode(),
      # -march=native code is only valid on the same kind of CPU; a shared cache (NFS home on
      # a cluster) keeps one library per CPU model and feature set.
      platform.machine().encode(), host_cpu.signature().encode()])).hexdigest()[:16]
  out_dir = cache_dir()
  stem = os.path.splitext(os.path.basename(source_path))[0]
  path = os.path.join(out_dir, f"{stem}-{key}.so")
  if os.path.exists(path) and not force:
    return path
  os.makedirs(out_dir, exist_ok=True)
  # Written under a temporary name and renamed: a concurrent or interrupted build never
  # leaves a partial library under the final name.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  # -ldl after the source: dlsym lives there before glibc 2.34.
  cmd = [cxx, *_flags(language), source_path, *(["-ldl"] if language == "c" else []), "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {source_path} failed ({' '.join(cmd)}):\n"
                         f"{(proc.stdout + proc.stderr)[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load(source_path: str, targets: Mapping[str, str], what: str) -> str | None:
  """Builds `source_path`, loads it and registers `targets` ({FFI target: symbol}) for CPU.

  Returns None on success, else why not (with a warning naming `what` falls back to XLA).
  """
  import jax  # noqa: PLC0415 (see the import of jaxlib)
  try:
    lib = ctypes.cdll.LoadLibrary(build(source_path))
    for target, symbol in targets.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    logging.warning("CPU %s kernel unavailable, %s uses XLA: %s", what, what, e)
    return f"unavailable: {e}"
  return None
