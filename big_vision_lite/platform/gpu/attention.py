"""cuDNN fused (flash) attention on NVIDIA GPUs, via jax.nn.dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# cuDNN's flash kernels take fp16/bf16 operands only (fp8 needs its own scaling path).
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def cudnn_reason(q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtypes: tuple,
                 mask_shape: tuple[int, ...] | None, compute_capability: str) -> str | None:
  """Why cuDNN flash attention cannot take these operands, or None when it can.

  Mirrors the checks jax makes before lowering (jax._src.cudnn.fused_attention_stablehlo:
  check_layout, check_is_flash_attention), so the choice is made before tracing rather
  than by catching its NotImplementedError. Shapes are BTNH.
  """
  if len(q_shape) != 4 or len(k_shape) != 4:
    return f"operands must be rank 4 (batch, length, heads, head_dim), got {q_shape}, {k_shape}"
  if len(set(map(np.dtype, dtypes))) != 1 or np.dtype(dtypes[0]) not in map(np.dtype, CUDNN_DTYPES):
    return f"q/k/v must all be float16 or bfloat16, got {[str(np.dtype(d)) for d in dtypes]}"
  major, minor = (int(x) for x in compute_capability.split(".")[:2])
  if (major, minor) < (8, 0):
    return f"compute capability {compute_capability} < 8.0 (cuDNN flash attention needs Ampere+)"
  _, t, n, h = q_shape
  _, s, kn, kh = k_shape
  if kh != h or n % kn:
    return f"q {q_shape} and k {k_shape} disagree on head_dim or heads"
  # Training (the backward kernel) allows head_dim <= 128 before Hopper, <= 256 from Hopper.
  h_max = 256 if major >= 9 else 128
  if h > h_max or h % 8:
    return f"head_dim {h} must be a multiple of 8 and <= {h_max} on compute capability " \
           f"{compute_capability}"
  if mask_shape is not None:
    # The mask becomes an additive bias, which cuDNN takes only with full (T, S) trailing dims
    # and, for the backward pass, even lengths.
    if len(mask_shape) > 4 or tuple(mask_shape[-2:]) != (t, s):
      return f"mask {mask_shape} must end in the full (q_len, kv_len) = ({t}, {s})"
    if t % 2 or s % 2:
      return f"a mask needs even q_len and kv_len for the backward kernel, got ({t}, {s})"
  return None


def _gpu_compute_capability() -> str | None:
  """The first local GPU's compute capability, or None when the default backend is not CUDA."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return None
  if device.platform != "gpu" or not hasattr(device, "compute_capability"):
    return None
  return str(device.compute_capability)


def supports_cudnn(q: Array, k: Array, v: Array, mask: Array | None) -> bool:
  """True when the default backend is a CUDA GPU and cuDNN flash attention takes these operands."""
  cc = _gpu_compute_capability()
  if cc is None:
    return False
  return cudnn_reason(tuple(q.shape), tuple(k.shape), (q.dtype, k.dtype, v.dtype),
                      None if mask is None else tuple(np.shape(mask)), cc) is None


def fused_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, scale: float,
                    implementation: str) -> Array:
  """jax.nn.dot_product_attention on BTNH operands with a bool mask (True = attend)."""
  if mask is not None:
    mask = jnp.asarray(mask, jnp.bool_)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      implementation=implementation)


def cudnn_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                    scale: float) -> Array:
  """softmax(scale * q k^T, masked) v by cuDNN's flash kernel; check supports_cudnn first."""
  return fused_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")


def xla_fused_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                        scale: float) -> Array:
  """The same call with jax's XLA implementation: the reference cudnn_attention is checked by."""
  return fused_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
