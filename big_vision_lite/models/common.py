"""Transformer layers shared by the ViT and text towers, with big_vision parameter names.

Every parameter carries logical axis names (nn.with_logical_partitioning) and
activations get logical constraints; both are no-ops until a mesh and rules are active.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.kernels import cpu_attention, cpu_layer_norm
from big_vision_lite.platform import attention_override

Array = jax.Array
Initializer = Callable[..., Any]

# Activation layouts, named once so every module constrains the same way.
ACT_EMBED = ("batch", "length", "embed")
ACT_MLP = ("batch", "length", "mlp")
ACT_HEADS = ("batch", "length", "heads", "kv")

REMAT_POLICIES = (
    "none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
    "everything_saveable")


def part(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so the created param is boxed with logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def remat_policy(name: str | None) -> Callable[..., Any] | None:
  """Maps a policy name to jax.checkpoint_policies.<name>; "none" means do not remat."""
  if name is None or name == "none":
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {name!r} (valid: {', '.join(REMAT_POLICIES)})")
  return getattr(jax.checkpoint_policies, name)


def sum_leading(g: Array, shape: tuple[int, ...]) -> Array:
  """Sums g over its leading axes down to its trailing `shape`, as a float32 ones @ g matmul.

  XLA:CPU lowers such a reduction over batch and length (a bias or LayerNorm-scale
  gradient) as a windowed column reduction: 11-12 ms for a (32, 197, 1536) tensor on
  the 2-core machine, against ~1 ms as a matmul (benchmarks/RESULTS.md, round 5).
  """
  size = math.prod(shape)
  rows = g.size // size
  return jnp.dot(jnp.ones((rows,), g.dtype), g.reshape(rows, size),
                 preferred_element_type=jnp.float32).reshape(shape)


@jax.custom_vjp
def add_bias(y: Array, b: Array) -> Array:
  """y + b, b broadcast over y's leading axes; the bias gradient goes through sum_leading."""
  return y + b


def _add_bias_fwd(y: Array, b: Array) -> tuple[Array, Array]:
  return y + b, b


def _add_bias_bwd(b: Array, g: Array) -> tuple[Array, Array]:
  return g, sum_leading(g, b.shape).astype(b.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_fn(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """LayerNorm over the last axis, in float32; flax's LayerNorm but with a two-pass variance.

  Hand-written backward: the scale and bias gradients go through sum_leading, and the
  input gradient is one fused expression; flax's autodiff LayerNorm ran fwd+bwd in
  7-9 ms vs 4-4.5 ms for this at (32, 197, 384) on the 2-core machine.
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


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with flax's params (`scale`, `bias`, "embed" axis) and layer_norm_fn's math.

  On a one-device CPU process, float32 input of a width divisible by 16 runs the
  `kernels.cpu_layer_norm` kernel (same math; XLA's path on every other platform), unless
  `use_kernel` is False.
  """
  epsilon: float = 1e-6
  use_kernel: bool = True
  use_bias: bool = True  # False: no `bias` param (big_vision's CapPa decoder_bias=False)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", part(nn.initializers.ones, ("embed",)), (d,), jnp.float32)
    if self.use_bias:
      bias = self.param("bias", part(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    else:
      bias = jnp.zeros((d,), jnp.float32)
    if self.use_kernel and cpu_layer_norm.supports(x, scale, bias):
      eps = self.epsilon
      return cpu_layer_norm.layer_norm(
          x, scale, bias, eps, lambda x, s, b: layer_norm_fn(x, s, b, eps))
    return layer_norm_fn(x, scale, bias, self.epsilon)


def layer_norm(eps: float, name: str | None = None, use_bias: bool = True) -> LayerNorm:
  """The towers' LayerNorm (params `scale`, `bias`, annotated with the "embed" axis)."""
  return LayerNorm(epsilon=eps, name=name, use_bias=use_bias)


class DenseGeneral(nn.Module):
  """Contracts the last `num_in` axes of x with a kernel of shape in_shape + features.

  Same params as flax DenseGeneral/Dense (`kernel`, `bias` of shape `features`),
  but the initializer sees the real kernel shape, so logical partitioning boxes
  work. The product runs as one 2-D matmul (leading axes and the in/out axes
  flattened): XLA:CPU runs the gradient of a dot_general over (batch, length)
  ~1.7x slower than the same numbers as a plain (B*S, D) x (D, F) matmul.
  """
  features: tuple[int, ...]
  num_in: int = 1
  kernel_axes: tuple[str | None, ...] = ()
  bias_axes: tuple[str | None, ...] = ()
  dtype_mm: Any = jnp.float32
  use_bias: bool = True
  kernel_init: Initializer | None = None  # None: xavier_uniform over the flattened kernel.
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = tuple(x.shape[-self.num_in:])
    kshape = in_shape + tuple(self.features)
    # Fans as if the kernel were flattened to (prod(in), prod(out)), like flax does.
    in_axis = tuple(range(self.num_in))
    out_axis = tuple(range(self.num_in, len(kshape)))
    kinit = self.kernel_init or nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
    kernel = self.param("kernel", part(kinit, self.kernel_axes), kshape, jnp.float32)
    lead = x.shape[:x.ndim - self.num_in]
    n_in, n_out = math.prod(in_shape), math.prod(self.features)
    y = jnp.dot(x.reshape((-1, n_in)).astype(self.dtype_mm),
                kernel.reshape((n_in, n_out)).astype(self.dtype_mm))
    y = y.reshape(lead + tuple(self.features))
    if self.use_bias:
      bias = self.param("bias", part(self.bias_init, self.bias_axes),
                        tuple(self.features), jnp.float32)
      y = add_bias(y, bias.astype(self.dtype_mm))
    return y


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                          dtype_mm: Any = jnp.float32) -> Array:
  """softmax(q k^T + mask) v for head-major (..., H, L, hd) operands; q comes pre-scaled."""
  logits = jnp.einsum("...hqd,...hkd->...hqk", q, k)
  # Softmax in fp32 whatever the matmul dtype: bf16 logits lose too much.
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  # softmax(l) @ v, normalised after the matmul: dividing the (.., Q, hd) output
  # instead of the (.., Q, K) weights is fewer FLOPs and one pass less over the
  # largest tensor. Same math as jax.nn.softmax (max-shifted, so exp <= 1).
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  y = jnp.einsum("...hqk,...hkd->...hqd", e.astype(dtype_mm), v)
  return (y / jnp.sum(e, axis=-1, keepdims=True)).astype(dtype_mm)


def token_major_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                          dtype_mm: Any = jnp.float32) -> Array:
  """`dot_product_attention` for token-major (..., L, H, hd) operands, as projected."""
  # Head-major (B, H, L, hd) operands make both attention matmuls plain batched
  # matmuls; XLA:CPU otherwise transposes inside each dot (~25% slower attention).
  q, k, v = (jnp.swapaxes(t, -3, -2) for t in (q, k, v))
  return jnp.swapaxes(dot_product_attention(q, k, v, mask, dtype_mm), -3, -2)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with big_vision's query/key/value/out parameters.

  `mask` (optional, bool) broadcasts to (B, heads, Q, K); True means attend.
  On one CPU device, float32 attention without a mask whose queries and keys have one
  shape (self-attention) runs the fused `kernels.cpu_attention` kernel (same math);
  everything else runs through XLA.
  """
  num_heads: int = 12
  dtype_mm: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None) -> Array:
    d = inputs_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    hd = d // self.num_heads
    proj = dict(features=(self.num_heads, hd), num_in=1, kernel_axes=("embed", "heads", "kv"),
                bias_axes=("heads", "kv"), dtype_mm=self.dtype_mm)
    q = DenseGeneral(name="query", **proj)(inputs_q)
    k = DenseGeneral(name="key", **proj)(inputs_kv)
    v = DenseGeneral(name="value", **proj)(inputs_kv)
    q = nn.with_logical_constraint(q, ACT_HEADS)
    k = nn.with_logical_constraint(k, ACT_HEADS)
    v = nn.with_logical_constraint(v, ACT_HEADS)
    q = q / jnp.sqrt(hd).astype(q.dtype)
    fused = attention_override.fused_attention(q, k, v, mask)
    if fused is not None:
      y = fused
    elif cpu_attention.supports(q, k, v, mask):
      y = cpu_attention.attention(q, k, v, functools.partial(
          token_major_attention, dtype_mm=self.dtype_mm))
    else:
      y = token_major_attention(q, k, v, mask, self.dtype_mm)
    return DenseGeneral(features=(d,), num_in=2, kernel_axes=("heads", "kv", "embed"),
                        bias_axes=("embed",), dtype_mm=self.dtype_mm, name="out")(y)


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh form, as big_vision) -> dropout -> Dense."""
  mlp_dim: int | None = None  # Defaults to 4 * width.
  dropout: float = 0.0
  dtype_mm: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    d = x.shape[-1]
    kinit = nn.initializers.xavier_uniform()
    binit = nn.initializers.normal(stddev=1e-6)
    # Named as nn.Dense would be auto-named, so checkpoints keep Dense_0/Dense_1.
    x = DenseGeneral((self.mlp_dim or 4 * d,), kernel_axes=("embed", "mlp"), bias_axes=("mlp",),
                     dtype_mm=self.dtype_mm, use_bias=self.use_bias, kernel_init=kinit,
                     bias_init=binit, name="Dense_0")(x)
    x = nn.with_logical_constraint(x, ACT_MLP)
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return DenseGeneral((d,), kernel_axes=("mlp", "embed"), bias_axes=("embed",),
                        dtype_mm=self.dtype_mm, use_bias=self.use_bias, kernel_init=kinit,
                        bias_init=binit, name="Dense_1")(x)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: Any = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True,
               mask: Array | None = None) -> tuple[Array, Array]:
    x = nn.with_logical_constraint(x, ACT_EMBED)
    y = layer_norm(self.norm_eps)(x)
    y = MultiHeadDotProductAttention(num_heads=self.num_heads, dtype_mm=self.dtype_mm)(y, y, mask)
    y = nn.with_logical_constraint(y, ACT_EMBED)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    # The residual stream stays fp32: bf16 matmul outputs promote on the add.
    x = x + y
    y = layer_norm(self.norm_eps)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm)(
        y, deterministic)
    y = nn.with_logical_constraint(y, ACT_EMBED)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    x = nn.with_logical_constraint(x, ACT_EMBED)
    # Second output is what nn.scan stacks per layer (kept for inspection).
    return x, x


class Encoder(nn.Module):
  """`depth` blocks (`encoderblock_{i}`, or one scanned `encoderblock`) then `encoder_norm`."""
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  dtype_mm: Any = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True,
               mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
    out = {}
    policy = remat_policy(self.remat_policy)
    block = Encoder1DBlock
    if policy is not None:
      # static_argnums counts self: 2 is `deterministic`. Under scan, CSE across
      # iterations cannot happen, so prevent_cse only costs there.
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(2,), policy=policy)
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              dtype_mm=self.dtype_mm, norm_eps=self.norm_eps)
    if self.scan:
      scanned = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, per_layer = scanned(name="encoderblock", **kw)(x, deterministic, mask)
      for i in range(self.depth):
        out[f"block{i:02d}"] = per_layer[i]
    else:
      for i in range(self.depth):
        x, out[f"block{i:02d}"] = block(name=f"encoderblock_{i}", **kw)(x, deterministic, mask)
    out["pre_ln"] = x
    return layer_norm(self.norm_eps, name="encoder_norm")(x), out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over tokens, then x + MLP(LN(x))."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dtype_mm: Any = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, _, d = x.shape
    probe = self.param("probe", part(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d), jnp.float32)
    probe = jnp.tile(probe, [n, 1, 1])
    x = MultiHeadDotProductAttention(num_heads=self.num_heads, dtype_mm=self.dtype_mm)(probe, x)
    y = layer_norm(self.norm_eps)(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype_mm=self.dtype_mm)(y)
    return x[:, 0]


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Any = jnp.float32) -> Array:
  """Fixed 2-D sin-cos position embedding (1, h*w, width), big_vision's layout.

  Channels are [sin(x), cos(x), sin(y), cos(y)], each width//4 frequencies.
  """
  if width % 4:
    raise ValueError(f"sincos2d posemb needs width divisible by 4, got {width}")
  y, x = np.mgrid[:h, :w]
  n = width // 4
  omega = np.arange(n) / max(n - 1, 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None, :, :]
