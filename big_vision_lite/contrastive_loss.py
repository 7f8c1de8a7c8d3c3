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
  (b, b) block of logits, never the global (B, B) matrix. Each ring step is
  rematerialised so the backward pass stores just the travelling text blocks.
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

  def block(zi, zt, t_, b_, positive):
    logits = jnp.exp(t_) * (zi @ zt.T) + b_
    labels = jnp.where(positive, 2.0 * jnp.eye(zi.shape[0], dtype=jnp.float32) - 1.0, -1.0)
    return jnp.sum(jax.nn.log_sigmoid(labels * logits))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  def ring(zi, zt, t_, b_):
    zi, zt = zi.astype(jnp.float32), zt.astype(jnp.float32)
    total = block(zi, zt, t_, b_, True)  # own block: the positives sit on its diagonal

    @jax.checkpoint
    def step(carry, _):
      zt_k, acc = carry
      zt_k = jax.lax.ppermute(zt_k, axes, perm)
      return (zt_k, acc + block(zi, zt_k, t_, b_, False)), None

    (_, total), _ = jax.lax.scan(step, (zt, total), None, length=n - 1)
    return -jax.lax.psum(total, axes) / (n * zi.shape[0])

  return ring(zimg, ztxt, jnp.asarray(t, jnp.float32), jnp.asarray(b, jnp.float32))
