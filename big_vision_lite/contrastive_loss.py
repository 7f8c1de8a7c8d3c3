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
  (a custom VJP) sends the blocks around again instead of storing them.
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


# Rows of a (b, b) block handled at once: the block's intermediates are (ROW_CHUNK, b),
# so at b=512 the loss's temporaries are dominated by the (b, D) embedding buffers.
ROW_CHUNK = 128


def _row_chunks(rows: int) -> int:
  chunk = min(rows, ROW_CHUNK)
  while rows % chunk:
    chunk -= 1
  return chunk


def _labels(first_row: Array, rows: int, cols: int, positive: bool) -> Array:
  """+1 where row first_row+i is column i's pair (own block only), else -1."""
  if not positive:
    return -jnp.ones((rows, cols), jnp.float32)
  r = first_row + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  return jnp.where(r == jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1), 1.0, -1.0)


def _chunk_g(zi_r, zt, t, b, ct, first_row, positive):
  """d(ct * sum log sigmoid(label * logit))/d logit for some rows; and their similarities."""
  sim = zi_r @ zt.T
  labels = _labels(first_row, zi_r.shape[0], zt.shape[0], positive)
  # d/dx log sigmoid(l x) = l * sigmoid(-l x)
  return ct * labels * jax.nn.sigmoid(-labels * (jnp.exp(t) * sim + b)), sim


def _over_rows(fn, zi: Array, init):
  """Scans fn(carry, zi_rows, first_row) -> carry over the row chunks of zi."""
  rows, dim = zi.shape
  chunk = _row_chunks(rows)
  starts = jnp.arange(0, rows, chunk, dtype=jnp.int32)
  body = lambda carry, x: (fn(carry, x[0], x[1]), None)
  return jax.lax.scan(body, init, (zi.reshape(rows // chunk, chunk, dim), starts))[0]


def _block_sum(zi: Array, zt: Array, t: Array, b: Array, positive: bool) -> Array:
  """sum_ij log sigmoid(label_ij * logit_ij) over one (b, b) block."""
  def rows(acc, zi_r, first_row):
    logits = jnp.exp(t) * (zi_r @ zt.T) + b
    labels = _labels(first_row, zi_r.shape[0], zt.shape[0], positive)
    return acc + jnp.sum(jax.nn.log_sigmoid(labels * logits))
  return _over_rows(rows, zi, jnp.zeros((), jnp.float32))


def _grads_images(zi, zt, t, b, ct, positive, acc):
  """acc + d/d(zi, t, b) of ct * _block_sum; acc = (dzi, dt, db)."""
  chunk = _row_chunks(zi.shape[0])
  scale = jnp.exp(t)

  def rows(carry, zi_r, first_row):
    dzi, dt, db = carry
    g, sim = _chunk_g(zi_r, zt, t, b, ct, first_row, positive)
    upd = jax.lax.dynamic_slice_in_dim(dzi, first_row, chunk) + scale * (g @ zt)
    return (jax.lax.dynamic_update_slice_in_dim(dzi, upd, first_row, 0),
            dt + scale * jnp.sum(g * sim), db + jnp.sum(g))
  return _over_rows(rows, zi, acc)


def _grads_texts(zi, zt, t, b, ct, positive, dzt):
  """dzt + d/dzt of ct * _block_sum."""
  scale = jnp.exp(t)

  def rows(dzt, zi_r, first_row):
    g, _ = _chunk_g(zi_r, zt, t, b, ct, first_row, positive)
    return dzt + scale * (g.T @ zi_r)
  return _over_rows(rows, zi, dzt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_sum(zi: Array, zt: Array, t: Array, b: Array, axes, perm) -> Array:
  """This device's images against every text block, the blocks travelling around the ring.

  A custom VJP because autodiff of the ring would keep every block that passed
  by for the backward pass (n-1 text blocks, ~O(B*D) per device); instead the
  backward pass sends the blocks around the ring again (see _ring_sum_bwd).
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
  # Two ring passes, each carrying one block and one accumulator that stays home:
  # 1) the text blocks travel and each device sums d/dzi over them (plus dt, db);
  # 2) the image blocks travel (with their device's cotangent) and each device
  #    sums d/dzt for its own texts. Carrying a text block together with its
  #    travelling gradient would do it in one pass, but holds more buffers.
  zi, zt, t, b = res
  steps = len(perm) - 1
  zero = jnp.zeros((), jnp.float32)
  first = _grads_images(zi, zt, t, b, ct, True, (jnp.zeros_like(zi), zero, zero))

  def text_step(carry, _):
    zt_k, acc = carry
    zt_k = jax.lax.ppermute(zt_k, axes, perm)
    return (zt_k, _grads_images(zi, zt_k, t, b, ct, False, acc)), None

  (_, (dzi, dt, db)), _ = jax.lax.scan(text_step, (zt, first), None, length=steps)

  first = _grads_texts(zi, zt, t, b, ct, True, jnp.zeros_like(zt))

  def image_step(carry, _):
    zi_k, ct_k, dzt = carry
    zi_k, ct_k = jax.lax.ppermute((zi_k, ct_k), axes, perm)
    return (zi_k, ct_k, _grads_texts(zi_k, zt, t, b, ct_k, False, dzt)), None

  (_, _, dzt), _ = jax.lax.scan(image_step, (zi, ct, first), None, length=steps)
  # t and b are replicated inputs: shard_map's transpose sums these per-device shares.
  return dzi, dzt, dt, db


_ring_sum.defvjp(_ring_sum_fwd, _ring_sum_bwd)
