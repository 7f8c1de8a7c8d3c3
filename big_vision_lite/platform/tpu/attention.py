"""Pallas splash (flash) attention on TPU, padded to the kernel's 128-token blocks (ViT lengths)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array

# The kernel tiles q and kv in blocks that are multiples of the TPU's 128 lanes.
LANES = 128
BLOCKS = (512, 256, 128)  # tried largest first; 512 is MaxText's default splash block
SPLASH_DTYPES = (jnp.float32, jnp.bfloat16)
# Activation layout the model constrains q/k/v to (models.common.ACT_HEADS).
_ACT_HEADS = ("batch", "length", "heads", "kv")


def padded_length(n: int) -> int:
  """n rounded up to a multiple of 128: 197 -> 256, 257 -> 384, 64 -> 128."""
  return -(-n // LANES) * LANES


def block_size(padded: int) -> int:
  """The largest of 512/256/128 dividing a padded length (256 -> 256, 384 -> 128, 1024 -> 512)."""
  return next(b for b in BLOCKS if padded % b == 0)


def splash_reason(q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtypes: tuple,
                  mask_shape: tuple[int, ...] | None) -> str | None:
  """Why splash_attention cannot take these BTNH operands, or None when it can.

  Only shapes and dtypes: the platform is the dispatcher's choice (plan compiles for TPU
  topologies on a CPU backend, so the default backend says nothing here).
  """
  if len(q_shape) != 4 or len(k_shape) != 4:
    return f"operands must be rank 4 (batch, length, heads, head_dim), got {q_shape}, {k_shape}"
  kinds = set(map(np.dtype, dtypes))
  if len(kinds) != 1 or kinds.pop() not in map(np.dtype, SPLASH_DTYPES):
    return f"q/k/v must all be float32 or bfloat16, got {[str(np.dtype(d)) for d in dtypes]}"
  if q_shape[0] != k_shape[0] or q_shape[2:] != k_shape[2:]:
    return f"q {q_shape} and k {k_shape} must agree on batch, heads and head_dim"
  if q_shape[3] % 8 or q_shape[3] > 256:
    return f"head_dim {q_shape[3]} must be a multiple of 8 and <= 256"
  if mask_shape is not None:
    # Padding is masked through segment ids; a model mask (causal, prefix) would need a
    # static splash mask object, which the model's traced bool mask cannot give.
    return f"masks are not supported (got one shaped {mask_shape}); use the XLA path"
  return None


def supports_splash(q: Array, k: Array, v: Array, mask: Array | None) -> bool:
  """True when splash_attention takes these operands (shapes and dtypes; see splash_reason)."""
  return splash_reason(tuple(q.shape), tuple(k.shape), (q.dtype, k.dtype, v.dtype),
                       None if mask is None else tuple(np.shape(mask))) is None


def _local_splash(q: Array, k: Array, v: Array, *, scale: float, interpret: bool) -> Array:
  """Splash on one device's BTNH shard: scale, go head-major, pad to blocks, mask padded keys."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  _, t, n, _ = q.shape
  s = k.shape[1]
  tp, sp = padded_length(t), padded_length(s)
  # The kernel computes softmax(q k^T) v with no scale of its own: scale q first.
  q = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, N, L, hd)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  bq, bkv = block_size(tp), block_size(sp)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                         block_kv_dq=bkv)
  mask = sa.MultiHeadMask([sa.FullMask((tp, sp)) for _ in range(n)])
  kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  if tp == t and sp == s:
    out = jax.vmap(kernel)(q, k, v)
  else:
    # Real tokens are segment 0 and padding segment 1: real queries never see padded keys,
    # and padded query rows (dropped below) see only padding, so no row is fully masked.
    ids = sa.SegmentIds(q=(jnp.arange(tp) >= t).astype(jnp.int32),
                        kv=(jnp.arange(sp) >= s).astype(jnp.int32))
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, ids)
  return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)


def _shard_spec() -> tuple[object, P] | None:
  """(mesh, spec) for q/k/v from the active mesh and flax logical rules; None without a mesh.

  Pallas calls are not partitioned by XLA, so splash runs per shard under shard_map with
  batch and heads split as the model's logical constraints split them, length unsplit.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  spec = nn.logical_to_mesh_axes(_ACT_HEADS)
  fitted = []
  for i, axes in enumerate(tuple(spec) + (None,) * (4 - len(spec))):
    names = () if axes is None or i in (1, 3) else (axes if isinstance(axes, tuple) else (axes,))
    names = tuple(a for a in names if mesh.shape[a] > 1)
    fitted.append(names or None)
  return mesh, P(*fitted)


def splash_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, scale: float,
                     interpret: bool = False) -> Array:
  """softmax(scale * q k^T) v on BTNH operands with the Pallas TPU splash kernel.

  Lengths that are not multiples of 128 (197, 257) are padded and the padded keys masked.
  `interpret` runs the kernel in Pallas interpret mode (any backend, slow; for checking).
  """
  reason = splash_reason(tuple(q.shape), tuple(k.shape), (q.dtype, k.dtype, v.dtype),
                         None if mask is None else tuple(np.shape(mask)))
  if reason:
    raise ValueError(f"splash attention: {reason}")
  local = functools.partial(_local_splash, scale=scale, interpret=interpret)
  sharded = _shard_spec()
  if sharded is None:
    return local(q, k, v)
  mesh, spec = sharded
  for dim, axes in zip(q.shape, spec):
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    if dim % math.prod(mesh.shape[a] for a in axes):
      raise ValueError(f"splash attention: q {q.shape} does not divide over mesh axes {spec}")
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
