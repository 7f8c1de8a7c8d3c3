"""Tests for the hand-written gradients in models/common.py: add_bias, layer_norm_fn, LayerNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.models import common

RNG = np.random.RandomState(0)


def _np_layer_norm(x, scale, bias, eps):
  x = x.astype(np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _plain_layer_norm(x, scale, bias, eps):
  # Autodiff reference: the same math, with jax's own gradients.
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def test_add_bias_value_and_gradients_match_numpy():
  y = RNG.randn(3, 5, 4, 6).astype(np.float32)
  b = RNG.randn(4, 6).astype(np.float32)
  g = RNG.randn(3, 5, 4, 6).astype(np.float32)
  out, vjp = jax.vjp(common.add_bias, jnp.asarray(y), jnp.asarray(b))
  dy, db = vjp(jnp.asarray(g))
  np.testing.assert_allclose(out, y + b, rtol=1e-6)
  np.testing.assert_allclose(dy, g, rtol=1e-6)
  np.testing.assert_allclose(db, g.sum((0, 1)), rtol=1e-5, atol=1e-5)
  assert db.shape == b.shape and db.dtype == jnp.float32


def test_add_bias_bf16_gradient_is_accurate_to_one_bf16_step():
  g = jnp.asarray(RNG.rand(4096, 8), jnp.bfloat16)
  _, vjp = jax.vjp(common.add_bias, jnp.zeros((4096, 8), jnp.bfloat16), jnp.zeros((8,), jnp.bfloat16))
  _, db = vjp(g)
  assert db.dtype == jnp.bfloat16
  exact = np.asarray(g, np.float64).sum(0)
  np.testing.assert_allclose(np.asarray(db, np.float64), exact, rtol=2 ** -8)


@pytest.mark.parametrize("shape", [(2, 7, 16), (5, 33)])
def test_layer_norm_value_and_gradients(shape):
  x = (RNG.randn(*shape) * 3 + 1).astype(np.float32)
  scale = (1 + 0.1 * RNG.randn(shape[-1])).astype(np.float32)
  bias = (0.1 * RNG.randn(shape[-1])).astype(np.float32)
  g = RNG.randn(*shape).astype(np.float32)
  args = tuple(jnp.asarray(a) for a in (x, scale, bias))
  out, vjp = jax.vjp(lambda *a: common.layer_norm_fn(*a, 1e-6), *args)
  np.testing.assert_allclose(out, _np_layer_norm(x, scale, bias, 1e-6), rtol=1e-5, atol=1e-5)
  _, ref_vjp = jax.vjp(lambda *a: _plain_layer_norm(*a, 1e-6), *args)
  grads = vjp(jnp.asarray(g))
  for got, want, name in zip(grads, ref_vjp(jnp.asarray(g)), ("x", "scale", "bias")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
  # The bias gradient is the plain column sum; the scale gradient the sum of g * xhat.
  xhat = _np_layer_norm(x, 1.0, 0.0, 1e-6)
  _, dscale, dbias = grads
  lead = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(dbias, g.sum(lead), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dscale, (g * xhat).sum(lead), rtol=1e-4, atol=1e-4)


def test_layer_norm_bf16_input_gives_f32_output_and_bf16_input_gradient():
  x = jnp.asarray(RNG.randn(4, 16), jnp.bfloat16)
  scale, bias = jnp.ones((16,)), jnp.zeros((16,))
  out, vjp = jax.vjp(lambda *a: common.layer_norm_fn(*a, 1e-6), x, scale, bias)
  assert out.dtype == jnp.float32
  dx, dscale, _ = vjp(jnp.ones_like(out))
  assert dx.dtype == jnp.bfloat16 and dscale.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_layer_norm(np.asarray(x, np.float32), 1, 0, 1e-6), atol=1e-5)


def test_layer_norm_module_keeps_flax_names_and_values():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return common.layer_norm(1e-6)(x) + common.layer_norm(1e-6, name="final")(x)

  x = jnp.asarray(RNG.randn(2, 3, 8), jnp.float32)
  params = nn.unbox(Two().init(jax.random.key(0), x))["params"]
  assert set(params) == {"LayerNorm_0", "final"}
  assert {k: v.shape for k, v in params["LayerNorm_0"].items()} == {"scale": (8,), "bias": (8,)}
  p = {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1, 1, 8)}
  ours = common.layer_norm(1e-6).apply({"params": p}, x)
  theirs = nn.LayerNorm(epsilon=1e-6).apply({"params": p}, x)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
