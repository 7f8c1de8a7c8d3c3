"""Contrastive losses: NumPy references, and the chunked ring loss == the full-matrix loss (8 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vision_lite import contrastive_loss as cl

AXES = ("data", "fsdp", "tensor", "expert")


def _mesh(shape):
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _emb(n, d, seed):
  z = np.random.default_rng(seed).normal(size=(n, d))
  return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def _np_sigmoid(zi, zt, t, b):
  logits = np.exp(t) * zi.astype(np.float64) @ zt.T.astype(np.float64) + b
  labels = 2 * np.eye(len(zi)) - 1
  return -np.sum(-np.log1p(np.exp(-labels * logits))) / len(zi)


def _np_softmax(zi, zt, t):
  logits = np.exp(t) * zi.astype(np.float64) @ zt.T.astype(np.float64)
  def lsm(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))
  return -0.5 * (np.mean(np.diag(lsm(logits, 1))) + np.mean(np.diag(lsm(logits, 0))))


def test_sigmoid_loss_matches_numpy():
  zi, zt = _emb(12, 8, 0), _emb(12, 8, 1)
  zt[:4] = zi[:4]  # some perfect pairs
  for t, b in [(np.log(10.0), -10.0), (1.3, 0.5)]:
    got = cl.sigmoid_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.float32(t), jnp.float32(b))
    np.testing.assert_allclose(float(got), _np_sigmoid(zi, zt, t, b), rtol=1e-5)


def test_softmax_loss_matches_numpy():
  zi, zt = _emb(10, 8, 2), _emb(10, 8, 3)
  got = cl.softmax_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.float32(2.0))
  np.testing.assert_allclose(float(got), _np_softmax(zi, zt, 2.0), rtol=1e-5)


def test_loss_is_lower_for_matching_pairs():
  zi = _emb(16, 8, 4)
  args = (jnp.float32(np.log(10.0)), jnp.float32(-10.0))
  assert cl.sigmoid_loss(zi, zi, *args) < cl.sigmoid_loss(zi, _emb(16, 8, 5), *args)


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 1, 2), (4, 1, 2, 1)])
def test_chunked_equals_full_value_and_grads(shape):
  mesh = _mesh(shape)
  zi, zt = _emb(32, 16, 6), _emb(32, 16, 7)
  zt[::3] = 0.8 * zi[::3] + 0.2 * zt[::3]
  t, b = jnp.float32(np.log(10.0)), jnp.float32(-3.0)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
  v_full, g_full = grad(cl.sigmoid_loss)(jnp.asarray(zi), jnp.asarray(zt), t, b)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P(cl.BATCH_AXES))
    a, c = jax.device_put(zi, sh), jax.device_put(zt, sh)
    v_ch, g_ch = grad(cl.chunked_sigmoid_loss)(a, c, t, b)
  np.testing.assert_allclose(float(v_ch), float(v_full), rtol=1e-5, atol=1e-5)
  for x, y in zip(g_ch, g_full):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_chunked_with_explicit_mesh_and_no_mesh():
  zi, zt = _emb(16, 8, 8), _emb(16, 8, 9)
  t, b = jnp.float32(1.0), jnp.float32(-2.0)
  full = float(cl.sigmoid_loss(zi, zt, t, b))
  # No mesh anywhere: falls back to the full loss.
  assert float(cl.chunked_sigmoid_loss(zi, zt, t, b)) == pytest.approx(full, rel=1e-6)
  got = jax.jit(lambda *a: cl.chunked_sigmoid_loss(*a, mesh=_mesh((8, 1, 1, 1))))(zi, zt, t, b)
  assert float(got) == pytest.approx(full, rel=1e-5)


def test_chunked_never_builds_the_global_matrix():
  mesh = _mesh((8, 1, 1, 1))
  n = 64
  zi = jax.ShapeDtypeStruct((n, 16), jnp.float32)
  s = jax.ShapeDtypeStruct((), jnp.float32)
  f = jax.value_and_grad(lambda a, c, t, b: cl.chunked_sigmoid_loss(a, c, t, b, mesh=mesh), argnums=(0, 1))
  jaxpr = str(jax.make_jaxpr(f)(zi, zi, s, s))
  assert f"[{n},{n}]" not in jaxpr and f"[{n // 8},{n // 8}]" in jaxpr
  full = str(jax.make_jaxpr(jax.value_and_grad(cl.sigmoid_loss, argnums=(0, 1)))(zi, zi, s, s))
  assert f"[{n},{n}]" in full  # the check above can fail


def test_chunked_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="not divisible"):
    cl.chunked_sigmoid_loss(jnp.zeros((12, 4)), jnp.zeros((12, 4)), 0.0, 0.0, mesh=_mesh((8, 1, 1, 1)))
