"""Fused softmax attention for XLA:CPU: builds `cpu_attention.cc` once and calls it via XLA FFI.

On CPU, XLA runs attention as separate batched matmuls (one thread per (batch, head) matmul)
plus passes over the (B, H, L, L) logits and head-major transposes. The kernel does each
(batch, head) block in cache on XLA's thread pool: at ViT-S/16 sizes the attention core's
forward + backward is ~2.4x faster, the whole train step ~9% (benchmarks/RESULTS.md,
"a fused attention kernel for XLA:CPU").

The library is compiled on first use and cached (`build`). Without a compiler the
dispatcher (big_vision_lite/platform) keeps the XLA path. The kernel and XLA's path differ by
float rounding only (the kernel's exp is ~2 ulp, its sums run in another order).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from big_vision_lite.platform import xla
from big_vision_lite.platform.cpu import build as cpu_build

Array = jax.Array

SOURCE = os.path.join(os.path.dirname(__file__), "attention.cc")  # the kernel, built on first use
_FWD, _BWD = "bvl_cpu_attention_fwd", "bvl_cpu_attention_bwd"
# The kernel works in 16-float vectors along the head dimension.
HEAD_DIM_MULTIPLE = 16


def build(force: bool = False) -> str:
  """Compiles the kernel library (or finds it in the cache) and returns its path."""
  return cpu_build.build(SOURCE, force)


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the kernel once per process; None (with a warning) if not."""
  return cpu_build.load(SOURCE, {_FWD: "BvlAttentionFwd", _BWD: "BvlAttentionBwd"}, "attention")


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered; otherwise why it is not used."""
  return _load()


def supports(q: Array, k: Array, v: Array, mask: Array | None = None) -> bool:
  """Whether `attention` applies: float32 BTNH operands of one shape (self-attention), no
  mask, a head dim that is a multiple of 16, a CPU process with one device (the custom call
  has no sharding rule), and a kernel that built. A GPU or TPU process never builds it."""
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


def attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
              scale: float) -> Array:
  """softmax(scale q k^T) v over BTNH (..., L, H, D) float32 operands; `supports` must hold.

  The kernel is a CPU custom call, so it is chosen per platform at lowering time: a TPU or
  GPU lowering of the same code (e.g. `big_vision_lite.plan` compiling for a TPU topology
  on a CPU host) gets `platform.xla.attention`, the same math.
  """
  if (why := _load()) is not None:
    raise RuntimeError(f"the CPU kernel is {why}")
  del mask  # supports() requires None
  q = q * jnp.asarray(scale, q.dtype)
  return jax.lax.platform_dependent(
      q, k, v, cpu=_attention,
      default=lambda q, k, v: xla.attention(q, k, v, mask=None, scale=1.0))
