"""LayerNorm for XLA:CPU: builds `cpu_layer_norm.cc` once and calls it via XLA FFI.

XLA:CPU runs LayerNorm's row statistics, normalisation and (in the backward) the scale and
bias gradients as separate fusions with scalar minor-axis reductions. The kernel does 64 rows
per task on XLA's thread pool in 16-float vectors and saves only each row's mean and 1/std
for the backward (benchmarks/RESULTS.md, "a LayerNorm kernel for XLA:CPU"). Same math as `platform.xla.layer_norm`
(two-pass variance, float32), up to float rounding.

Built and cached like the attention kernel (`build`). Without a compiler the dispatcher keeps
the XLA path.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.platform import xla
from big_vision_lite.platform.cpu import build as cpu_build

Array = jax.Array

SOURCE = os.path.join(os.path.dirname(__file__), "layer_norm.cc")  # the kernel, built on first use
_FWD, _BWD = "bvl_cpu_layer_norm_fwd", "bvl_cpu_layer_norm_bwd"
WIDTH_MULTIPLE = 16  # the kernel works in 16-float vectors along the normalised axis
# The kernel takes one (D,) scale and bias. Under vmap they may be batched too, which the
# kernel cannot take, so a vmapped call runs it once per batch element (nothing in this
# codebase vmaps a LayerNorm).
_VMAP = "sequential"


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the kernel once per process; None (with a warning) if not."""
  return cpu_build.load(SOURCE, {_FWD: "BvlLayerNormFwd", _BWD: "BvlLayerNormBwd"},
                        "LayerNorm")


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered; otherwise why it is not used."""
  return _load()


def supports(x: Array, scale: Array, bias: Array) -> bool:
  """Whether `layer_norm` applies: float32 x, scale and bias over x's last axis, a width that
  is a multiple of 16, a CPU process with one device (the custom call has no sharding rule),
  and a kernel that built. A GPU or TPU process never builds it."""
  d = x.shape[-1] if x.ndim else 0
  return (x.dtype == scale.dtype == bias.dtype == jnp.float32 and x.ndim >= 1
          and scale.shape == bias.shape == (d,) and d % WIDTH_MULTIPLE == 0 and d > 0
          and jax.default_backend() == "cpu" and jax.device_count() == 1 and _load() is None)


def _ffi_fwd(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, Array, Array]:
  rows = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
  return jax.ffi.ffi_call(
      _FWD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), rows, rows),
      vmap_method=_VMAP)(x, scale, bias, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  return _ffi_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  y, mean, rstd = _ffi_fwd(x, scale, bias, eps)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, res, dy):
  del eps
  x, scale, mean, rstd = res
  vec = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  return tuple(jax.ffi.ffi_call(
      _BWD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), vec, vec),
      vmap_method=_VMAP)(x, scale, mean, rstd, dy.astype(jnp.float32)))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over x's last axis, float32.

  The kernel is a CPU custom call, chosen per platform at lowering time: a TPU or GPU
  lowering of the same code gets `platform.xla.layer_norm` (same math). Check `supports`
  first.
  """
  if (why := _load()) is not None:
    raise RuntimeError(f"the CPU kernel is {why}")
  return jax.lax.platform_dependent(
      x, scale, bias, cpu=lambda x, s, b: _layer_norm(x, s, b, eps),
      default=lambda x, s, b: xla.layer_norm(x, s, b, eps))
