"""The portable implementations: attention and LayerNorm as plain jnp math that XLA compiles on
every backend (the `xla` implementation, and the reference the others are tested against)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def sum_leading(g: Array, shape: tuple[int, ...]) -> Array:
  """Sums g over its leading axes down to its trailing `shape`, as a float32 ones @ g matmul.

  XLA:CPU lowers such a reduction over batch and length (a bias or LayerNorm-scale
  gradient) as a windowed column reduction: 11-12 ms for a (32, 197, 1536) tensor on
  a 2-core machine, against ~1 ms as a matmul (benchmarks/RESULTS.md, "bias and LayerNorm gradients as matmuls").
  """
  size = math.prod(shape)
  rows = g.size // size
  return jnp.dot(jnp.ones((rows,), g.dtype), g.reshape(rows, size),
                 preferred_element_type=jnp.float32).reshape(shape)


def head_major_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  """softmax(q k^T + mask) v for head-major (..., H, L, hd) operands; q comes pre-scaled."""
  dtype = q.dtype
  logits = jnp.einsum("...hqd,...hkd->...hqk", q, k)
  # Softmax in fp32 whatever the matmul dtype: bf16 logits lose too much.
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  # softmax(l) @ v, normalised after the matmul: dividing the (.., Q, hd) output
  # instead of the (.., Q, K) weights is fewer FLOPs and one pass less over the
  # largest tensor. Same math as jax.nn.softmax (max-shifted, so exp <= 1).
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  y = jnp.einsum("...hqk,...hkd->...hqd", e.astype(dtype), v)
  return (y / jnp.sum(e, axis=-1, keepdims=True)).astype(dtype)


def attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
              scale: float) -> Array:
  """softmax(scale q k^T, masked) v for BTNH operands: q (B, Q, H, hd), k and v (B, K, H, hd).

  `mask`: bool, broadcastable to (B, H, Q, K), True = attend. The matmuls run in q's dtype,
  the softmax in float32; the output has q's shape and dtype.
  """
  q = q * jnp.asarray(scale, q.dtype)
  # Head-major (B, H, L, hd) operands make both attention matmuls plain batched
  # matmuls; XLA:CPU otherwise transposes inside each dot (~25% slower attention).
  q, k, v = (jnp.swapaxes(t, -3, -2) for t in (q, k, v))
  return jnp.swapaxes(head_major_attention(q, k, v, mask), -3, -2)


def supports_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> bool:
  """The XLA path takes every shape, dtype and mask."""
  del q, k, v, mask
  return True


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """LayerNorm over the last axis, in float32; flax's LayerNorm but with a two-pass variance.

  Hand-written backward: the scale and bias gradients go through sum_leading, and the
  input gradient is one fused expression; flax's autodiff LayerNorm ran fwd+bwd in
  7-9 ms vs 4-4.5 ms for this at (32, 197, 384) on a 2-core machine.
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, tuple]:
  x32 = x.astype(jnp.float32)
  xc = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  xhat = xc * rstd
  # A 0-d array of x's dtype carries that dtype to the backward (residuals are arrays).
  return xhat * scale + bias, (xhat, rstd, scale, jnp.zeros((), x.dtype))


def _layer_norm_bwd(eps: float, res: tuple, dy: Array) -> tuple[Array, Array, Array]:
  del eps
  xhat, rstd, scale, x_like = res
  dy = dy.astype(jnp.float32)
  g = dy * scale
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
               - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  return (dx.astype(x_like.dtype), sum_leading(dy * xhat, scale.shape).astype(scale.dtype),
          sum_leading(dy, scale.shape).astype(scale.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def supports_layer_norm(x: Array, scale: Array, bias: Array) -> bool:
  del x, scale, bias
  return True
