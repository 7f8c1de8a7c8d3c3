"""Image-text contrastive losses (pure functions): SigLIP sigmoid (full matrix and chunked ring), CLIP softmax.

All take L2-normalised embeddings zimg, ztxt of shape (B, D) where row i of each
is a matching pair, a log-temperature `t` (the scale is exp(t)) and a bias `b`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

# Mesh axes the batch is sharded over (config.sharding_rules' "batch" rule).
BATCH_AXES = ("data", "fsdp", "expert")


def sigmoid_logits(zimg: Array, ztxt: Array, t: Array, b: Array) -> Array:
  """(B, B) logits exp(t) * zimg @ ztxt^T + b, in fp32."""
  zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  return jnp.exp(t) * (zimg @ ztxt.T) + b


def sigmoid_loss(zimg: Array, ztxt: Array, t: Array, b: Array) -> Array:
  """SigLIP loss on the full B x B matrix: -1/B sum_ij log sigmoid(label_ij * logit_ij).

  label_ij is +1 on the diagonal and -1 elsewhere.
  """
  logits = sigmoid_logits(zimg, ztxt, t, b)
  n = logits.shape[0]
  labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


def softmax_loss(zimg: Array, ztxt: Array, t: Array) -> Array:
  """CLIP loss: mean of the image->text and text->image softmax cross-entropies, scale exp(t)."""
  logits = jnp.exp(t) * (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T)
  i2t = jax.nn.log_softmax(logits, axis=1)
  t2i = jax.nn.log_softmax(logits, axis=0)
  return -0.5 * (jnp.mean(jnp.diagonal(i2t)) + jnp.mean(jnp.diagonal(t2i)))


def _batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def chunked_sigmoid_loss(zimg: Array, ztxt: Array, t: Array, b: Array, *, mesh=None,
                         axes: Sequence[str] | None = None) -> Array:
  """The SigLIP loss computed blockwise around a ring of devices; equals `sigmoid_loss`.

  The batch (rows of zimg and ztxt) must be sharded over `axes` (default: the
  mesh's data/fsdp/expert axes). Each device keeps its b = B/n images; the text
  blocks travel around the ring with ppermute, so a device only ever holds a
  (b, b) block of logits, never the global (B, B) matrix; the backward pass
  (a custom VJP) sends the blocks around once more instead of storing them.
  `mesh` defaults to the abstract mesh of the surrounding `jax.set_mesh`; with
  no mesh, or a single batch device, this is the plain `sigmoid_loss`.
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return sigmoid_loss(zimg, ztxt, t, b)
  axes = tuple(axes) if axes is not None else _batch_axes(mesh)
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  if n == 1:
    return sigmoid_loss(zimg, ztxt, t, b)
  if zimg.shape[0] % n:
    raise ValueError(f"chunked_sigmoid_loss: batch {zimg.shape[0]} is not divisible by the {n} "
                     f"devices of mesh axes {axes}")
  # Device j sends its text block to j+1: after k hops device i holds block i-k.
  perm = [(j, (j + 1) % n) for j in range(n)]

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P(),
                     check_vma=False)
  def ring(zi, zt, t_, b_):
    zi, zt = zi.astype(jnp.float32), zt.astype(jnp.float32)
    return -jax.lax.psum(_ring_sum(zi, zt, t_, b_, axes, perm), axes) / (n * zi.shape[0])

  return ring(zimg, ztxt, jnp.asarray(t, jnp.float32), jnp.asarray(b, jnp.float32))


def _block_labels(rows: int, positive: bool) -> Array:
  return 2.0 * jnp.eye(rows, dtype=jnp.float32) - 1.0 if positive else -jnp.ones((rows, rows))


def _block_sum(zi: Array, zt: Array, t: Array, b: Array, positive: bool) -> Array:
  """sum_ij log sigmoid(label_ij * logit_ij) over one (b, b) block."""
  logits = jnp.exp(t) * (zi @ zt.T) + b
  return jnp.sum(jax.nn.log_sigmoid(_block_labels(zi.shape[0], positive) * logits))


def _block_grads(zi, zt, t, b, ct, positive):
  """Gradients of ct * _block_sum w.r.t. (zi, zt, t, b), written out by hand."""
  sim = zi @ zt.T
  labels = _block_labels(zi.shape[0], positive)
  # d/dx log sigmoid(l x) = l * sigmoid(-l x)
  g = ct * labels * jax.nn.sigmoid(-labels * (jnp.exp(t) * sim + b))
  scale = jnp.exp(t)
  return scale * (g @ zt), scale * (g.T @ zi), scale * jnp.sum(g * sim), jnp.sum(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_sum(zi: Array, zt: Array, t: Array, b: Array, axes, perm) -> Array:
  """This device's images against every text block, the blocks travelling around the ring.

  A custom VJP because autodiff of the ring would keep every block that passed
  by for the backward pass (n-1 text blocks, ~O(B*D) per device); instead the
  backward pass sends the blocks around the ring once more, each together with
  the gradient accumulated for it, and a last hop returns that gradient home.
  """
  total = _block_sum(zi, zt, t, b, True)  # own block: the positives sit on its diagonal

  def step(carry, _):
    zt_k, acc = carry
    zt_k = jax.lax.ppermute(zt_k, axes, perm)
    return (zt_k, acc + _block_sum(zi, zt_k, t, b, False)), None

  (_, total), _ = jax.lax.scan(step, (zt, total), None, length=len(perm) - 1)
  return total


def _ring_sum_fwd(zi, zt, t, b, axes, perm):
  return _ring_sum(zi, zt, t, b, axes, perm), (zi, zt, t, b)


def _ring_sum_bwd(axes, perm, res, ct):
  zi, zt, t, b = res
  dzi, dzt, dt, db = _block_grads(zi, zt, t, b, ct, True)

  def step(carry, _):
    zt_k, dzt_k, dzi, dt, db = carry
    zt_k, dzt_k = jax.lax.ppermute((zt_k, dzt_k), axes, perm)
    gi, gt, gtt, gb = _block_grads(zi, zt_k, t, b, ct, False)
    return (zt_k, dzt_k + gt, dzi + gi, dt + gtt, db + gb), None

  (_, dzt, dzi, dt, db), _ = jax.lax.scan(step, (zt, dzt, dzi, dt, db), None,
                                          length=len(perm) - 1)
  dzt = jax.lax.ppermute(dzt, axes, perm)  # the block visited every device: one hop home
  # t and b are replicated inputs: shard_map's transpose sums these per-device shares.
  return dzi, dzt, dt, db


_ring_sum.defvjp(_ring_sum_fwd, _ring_sum_bwd)
