"""The CPU LayerNorm kernel against NumPy, XLA's path (layer_norm_fn) and its own fallbacks.

conftest gives this process 8 CPU devices, where layers keep the XLA path (the custom call
has no sharding rule); the kernel itself is called directly here, and the one-device model
path runs in a subprocess.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_checks
from big_vision_lite.platform import xla
from big_vision_lite.platform.cpu import layer_norm as cpu_layer_norm

if cpu_layer_norm.unavailable_reason() is not None:
  pytest.skip(f"CPU LayerNorm kernel: {cpu_layer_norm.unavailable_reason()}",
              allow_module_level=True)

EPS = 1e-6


def np_layer_norm(x, scale, bias):
  """LayerNorm over the last axis in float64; also returns xhat and 1/std for the VJP."""
  x = np.asarray(x, np.float64)
  xc = x - x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt((xc * xc).mean(-1, keepdims=True) + EPS)
  xhat = xc * rstd
  return xhat * scale + bias, xhat, rstd


def np_layer_norm_grads(x, scale, bias, dy):
  """The VJP of np_layer_norm with cotangent dy, written out by hand."""
  _, xhat, rstd = np_layer_norm(x, scale, bias)
  dy = np.asarray(dy, np.float64)
  g = dy * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  rows = dy.reshape(-1, dy.shape[-1])
  return dx, (rows * xhat.reshape(rows.shape)).sum(0), rows.sum(0)


def operands(shape, seed=0, offset=1.0, spread=3.0):
  r = np.random.default_rng(seed)
  d = shape[-1]
  return (np.float32(r.normal(size=shape) * spread + offset), np.float32(r.normal(size=d)),
          np.float32(r.normal(size=d)), np.float32(r.normal(size=shape)))


# Widths 16 (one vector) to 384; row counts below, at and across the kernel's 64-row tasks;
# rows whose mean is 100x their spread. There float32 rounding of the mean alone leaves ~4e-5;
# a one-pass variance (E[x^2] - mean^2) is off by ~5e-3 (numpy, float32).
@pytest.mark.parametrize("shape,offset,spread,atol", [
    ((5, 16), 1.0, 3.0, 2e-5), ((64, 48), 1.0, 3.0, 2e-5), ((3, 70, 48), 1.0, 3.0, 2e-5),
    ((2, 197, 192), 1.0, 3.0, 2e-5), ((1, 1, 384), 1.0, 3.0, 2e-5),
    ((4, 33, 64), 100.0, 1.0, 1e-4)])
def test_forward_and_grads_match_numpy(shape, offset, spread, atol):
  x, scale, bias, dy = operands(shape, offset=offset, spread=spread)
  out, vjp = jax.vjp(jax.jit(lambda x, s, b: cpu_layer_norm._layer_norm(x, s, b, EPS)),
                     x, scale, bias)
  want, _, _ = np_layer_norm(x, scale, bias)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=atol)
  for got, ref in zip(vjp(jnp.asarray(dy)), np_layer_norm_grads(x, scale, bias, dy)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


def test_matches_xla_path_and_vmaps():
  x, scale, bias, dy = operands((2, 3, 19, 32), seed=2)

  def both(f):
    return jax.value_and_grad(lambda x, s, b: jnp.sum(f(x, s, b) * dy), argnums=(0, 1, 2))(
        x, scale, bias)

  ref = lambda x, s, b: xla.layer_norm(x, s, b, EPS)
  ker = both(lambda x, s, b: cpu_layer_norm.layer_norm(x, s, b, EPS))
  for a, b in zip(jax.tree.leaves(ker), jax.tree.leaves(both(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # A vmapped call runs the kernel per batch element, with the (unbatched) scale and bias.
  vm = jax.vmap(lambda x: cpu_layer_norm._layer_norm(x, scale, bias, EPS))(x)
  np.testing.assert_allclose(vm, ref(x, scale, bias), rtol=1e-5, atol=1e-5)
  per_example = jax.vmap(jax.grad(lambda x, s: jnp.sum(cpu_layer_norm._layer_norm(
      x, s, bias, EPS) * dy[0]), argnums=1), in_axes=(0, None))(x, scale)
  want = [np_layer_norm_grads(x[i], scale, bias, dy[0])[1] for i in range(len(x))]
  np.testing.assert_allclose(per_example, want, rtol=1e-4, atol=1e-4)


def test_repeat_calls_are_bitwise_equal():
  """The scale and bias gradients are summed in a fixed order, whatever thread ran which rows."""
  x, scale, bias, dy = operands((8, 197, 64), seed=3)
  grad = jax.jit(jax.grad(lambda x, s, b: jnp.sum(cpu_layer_norm._layer_norm(x, s, b, EPS) * dy),
                          argnums=(0, 1, 2)))
  first = grad(x, scale, bias)
  for _ in range(3):
    for a, b in zip(first, grad(x, scale, bias)):
      np.testing.assert_array_equal(a, b)


def test_lowers_for_cpu_only():
  """A CPU lowering holds the custom call; a TPU lowering of the same function does not."""
  x, scale, bias, _ = operands((2, 8, 16))
  f = jax.jit(lambda x, s, b: cpu_layer_norm.layer_norm(x, s, b, EPS))
  assert cpu_layer_norm._FWD in f.lower(x, scale, bias).as_text()
  tpu = f.trace(x, scale, bias).lower(lowering_platforms=("tpu",)).as_text()
  assert cpu_layer_norm._FWD not in tpu and "rsqrt" in tpu


def test_supports_and_rejects():
  x, s = jnp.zeros((2, 8, 32)), jnp.zeros((32,))
  assert not cpu_layer_norm.supports(x, s, s)  # 8 devices in this process
  assert not cpu_layer_norm.supports(x.astype(jnp.bfloat16), s, s)
  assert not cpu_layer_norm.supports(x[..., :8], s[:8], s[:8])
  assert not cpu_layer_norm.supports(x, s[:16], s[:16])
  # Called directly with a width the kernel cannot take, it fails with a message, not garbage.
  with pytest.raises(Exception, match="multiple of 16"):
    jax.block_until_ready(cpu_layer_norm._layer_norm(x[..., :8], s[:8], s[:8], EPS))


def test_model_uses_kernel_on_one_device_and_falls_back(tmp_path):
  """A (scanned, remat) Encoder on one CPU device runs the kernel; with config.model.norm_impl='xla',
  or with no compiler, it runs XLA, logs why, and computes the same gradients."""
  kernel_checks.check_model_uses_kernel_and_falls_back(
      tmp_path, "layer_norm", "norm_impl", "LayerNorm")
