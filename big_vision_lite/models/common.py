"""Transformer layers shared by the ViT and text towers, with big_vision parameter names.

Every parameter carries logical axis names (nn.with_logical_partitioning) and
activations get logical constraints; both are no-ops until a mesh and rules are active.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite import platform
from big_vision_lite.platform.xla import layer_norm as layer_norm_fn, sum_leading  # noqa: F401

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


@jax.custom_vjp
def add_bias(y: Array, b: Array) -> Array:
  """y + b, b broadcast over y's leading axes; the bias gradient goes through sum_leading."""
  return y + b


def _add_bias_fwd(y: Array, b: Array) -> tuple[Array, Array]:
  return y + b, b


def _add_bias_bwd(b: Array, g: Array) -> tuple[Array, Array]:
  return g, sum_leading(g, b.shape).astype(b.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with flax's params (`scale`, `bias`, "embed" axis), two-pass variance in float32.

  The implementation is the platform layer's (config.model.norm_impl); `impl` overrides it.
  """
  epsilon: float = 1e-6
  impl: str | None = None
  use_bias: bool = True  # False: no `bias` param (big_vision's CapPa decoder_bias=False)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", part(nn.initializers.ones, ("embed",)), (d,), jnp.float32)
    if self.use_bias:
      bias = self.param("bias", part(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    else:
      bias = jnp.zeros((d,), jnp.float32)
    return platform.layer_norm(x, scale, bias, self.epsilon, impl=self.impl)


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


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with big_vision's query/key/value/out parameters.

  `mask` (optional, bool) broadcasts to (B, heads, Q, K); True means attend. The softmax
  attention itself is the platform layer's (config.model.attention_impl).
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
    y = platform.attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(hd))
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
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """x (B, N, D) -> (B, D); `mask` (B, N) bool, True on the tokens the probe may attend to."""
    n, _, d = x.shape
    probe = self.param("probe", part(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d), jnp.float32)
    probe = jnp.tile(probe, [n, 1, 1])
    if mask is not None:
      mask = mask[:, None, None, :]  # (B, heads, queries, keys)
    x = MultiHeadDotProductAttention(num_heads=self.num_heads, dtype_mm=self.dtype_mm)(
        probe, x, mask)
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
