"""Fused softmax attention for XLA:CPU: builds `cpu_attention.cc` once and calls it via XLA FFI.

On CPU, XLA runs attention as separate batched matmuls (one thread per (batch, head) matmul)
plus passes over the (B, H, L, L) logits and head-major transposes. The kernel does each
(batch, head) block in cache on XLA's thread pool: at ViT-S/16 sizes the attention core's
forward + backward is ~2.4x faster, the whole train step ~9% (benchmarks/RESULTS.md round 6).

The library is compiled on first use with the system C++ compiler (`$CXX`, else c++/g++/clang++)
for the host CPU (-march=native) and cached under `$BVL_CACHE_DIR` (default
~/.cache/big_vision_lite), keyed by the source, compiler and jaxlib. Without a compiler, or
with `BVL_CPU_ATTENTION=0`, attention stays on the XLA path: same math, nothing else changes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

Array = jax.Array

_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_attention.cc")
_FWD, _BWD = "bvl_cpu_attention_fwd", "bvl_cpu_attention_bwd"
# The kernel works in 16-float vectors along the head dimension.
HEAD_DIM_MULTIPLE = 16


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cache_dir() -> str:
  base = os.environ.get("BVL_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "big_vision_lite")
  return os.path.join(base, "kernels")


def _cpu_signature() -> str:
  # -march=native code is only valid on the same kind of CPU; a shared cache (NFS home on a
  # cluster) keeps one library per CPU model and feature set.
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _flags() -> list[str]:
  return ["-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-w",
          f"-I{jax.ffi.include_dir()}"]


def build(force: bool = False) -> str:
  """Compiles the kernel library (or finds it in the cache) and returns its path.

  Raises RuntimeError naming the compiler, the command and its output when it cannot.
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f"C++ compiler {cxx} does not run: {e}") from None
  key = hashlib.sha256(b"\0".join([
      source, version.encode(), " ".join(_flags()).encode(), jaxlib.__version__.encode(),
      platform.machine().encode(), _cpu_signature().encode()])).hexdigest()[:16]
  out_dir = _cache_dir()
  path = os.path.join(out_dir, f"cpu_attention-{key}.so")
  if os.path.exists(path) and not force:
    return path
  os.makedirs(out_dir, exist_ok=True)
  # Written under a temporary name and renamed: a concurrent or interrupted build never
  # leaves a partial library under the final name.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [cxx, *_flags(), _SOURCE, "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE} failed ({' '.join(cmd)}):\n"
                         f"{(proc.stdout + proc.stderr)[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the kernel once per process; None (with a warning) if not."""
  if os.environ.get("BVL_CPU_ATTENTION", "1").strip().lower() in ("0", "false", "no", "off"):
    return "disabled by BVL_CPU_ATTENTION"
  try:
    lib = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.BvlAttentionFwd), platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.BvlAttentionBwd), platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    logging.warning("CPU attention kernel unavailable, attention uses XLA: %s", e)
    return f"unavailable: {e}"
  return None


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered; otherwise why it is not used."""
  return _load()


def supports(q: Array, k: Array, v: Array, mask: Array | None) -> bool:
  """Whether `attention` applies: float32 token-major operands of one shape, no mask, a
  CPU process with one device (the custom call has no sharding rule), and a kernel that
  built. A GPU or TPU process never builds it."""
  return (mask is None and q.dtype == k.dtype == v.dtype == jnp.float32
          and q.shape == k.shape == v.shape and q.ndim >= 3
          and q.shape[-1] % HEAD_DIM_MULTIPLE == 0 and jax.default_backend() == "cpu"
          and jax.device_count() == 1 and _load() is None)


def _ffi_fwd(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
  *lead, length, heads, _ = q.shape
  return jax.ffi.ffi_call(
      _FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
             jax.ShapeDtypeStruct((*lead, heads, length), jnp.float32)),
      vmap_method="broadcast_all")(q, k, v)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array) -> Array:
  return _ffi_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  o, lse = _ffi_fwd(q, k, v)
  return o, (q, k, v, o, lse)


def _attention_bwd(res, do):
  q, k, v, o, lse = res
  grad = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return tuple(jax.ffi.ffi_call(_BWD, (grad, grad, grad), vmap_method="broadcast_all")(
      q, k, v, o, lse, do))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: Array, k: Array, v: Array, xla_fallback) -> Array:
  """softmax(q k^T) v over token-major (..., L, H, D) float32 operands, q pre-scaled.

  The kernel is a CPU custom call, so it is chosen per platform at lowering time:
  `xla_fallback(q, k, v)` (same math) is what a TPU or GPU lowering of the same code gets,
  e.g. when `big_vision_lite.plan` compiles for a TPU topology on a CPU host.
  Check `supports(...)` first.
  """
  return jax.lax.platform_dependent(q, k, v, cpu=_attention, default=xla_fallback)
