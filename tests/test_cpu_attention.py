"""The fused CPU attention kernel against NumPy, XLA's path and its own fallbacks.

conftest gives this process 8 CPU devices, where layers keep the XLA path (the custom call
has no sharding rule); the kernel itself is called directly here, and the one-device model
path runs in a subprocess.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_checks
from big_vision_lite.platform import xla
from big_vision_lite.platform.cpu import attention as cpu_attention

if cpu_attention.unavailable_reason() is not None:
  pytest.skip(f"CPU attention kernel: {cpu_attention.unavailable_reason()}",
              allow_module_level=True)



def np_attention(q, k, v):
  """softmax(q k^T) v per (batch, head) for token-major (B, L, H, D), in float64."""
  q, k, v = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = q @ k.transpose(0, 1, 3, 2)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return (p @ v).transpose(0, 2, 1, 3), p


def np_attention_grads(q, k, v, do):
  """The VJP of np_attention with cotangent do, written out by hand."""
  _, p = np_attention(q, k, v)
  qh, kh, vh, doh = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v, do))
  dv = p.transpose(0, 1, 3, 2) @ doh
  dp = doh @ vh.transpose(0, 1, 3, 2)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq, dk = ds @ kh, ds.transpose(0, 1, 3, 2) @ qh
  return tuple(t.transpose(0, 2, 1, 3) for t in (dq, dk, dv))


def operands(shape, seed=0, scale=1.0):
  r = np.random.default_rng(seed)
  return tuple(np.float32(r.normal(size=shape) * s) for s in (scale / np.sqrt(shape[-1]), 1, 1, 1))


@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 17, 2, 32), (3, 33, 1, 64), (2, 197, 2, 64)])
def test_forward_and_grads_match_numpy(shape):
  q, k, v, do = operands(shape, scale=4.0)
  out, vjp = jax.vjp(jax.jit(cpu_attention._attention), q, k, v)
  want, _ = np_attention(q, k, v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for got, ref in zip(vjp(jnp.asarray(do)), np_attention_grads(q, k, v, do)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


def test_large_logits_stay_finite():
  """Rows with logits spread over hundreds (exp underflows for most keys) stay exact."""
  q, k, v, do = operands((2, 40, 2, 16), seed=1, scale=400.0)
  out = cpu_attention._attention(q, k, v)
  want, _ = np_attention(q, k, v)
  assert np.isfinite(np.asarray(out)).all()
  # Logits of ~1e3 carry float32 rounding of ~1e-4 into the softmax, in any float32 kernel.
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out, xla.attention(q, k, v, scale=1.0), rtol=1e-4, atol=1e-4)


def test_matches_xla_path_and_vmaps():
  q, k, v, do = operands((2, 3, 19, 2, 16), seed=2)

  def both(f):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * do), argnums=(0, 1, 2))(
        q, k, v)

  ker = both(lambda q, k, v: cpu_attention.attention(q, k, v, scale=1.0))
  xla_out = both(lambda q, k, v: xla.attention(q, k, v, scale=1.0))
  for a, b in zip(jax.tree.leaves(ker), jax.tree.leaves(xla_out)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Extra leading dims (above) and vmap both reach the kernel as batch.
  vm = jax.vmap(cpu_attention._attention)(q, k, v)
  np.testing.assert_allclose(vm, xla.attention(q, k, v, scale=1.0), rtol=1e-5, atol=1e-5)


def test_lowers_for_cpu_only():
  """A CPU lowering holds the custom call; a TPU lowering of the same function does not."""
  q, k, v, _ = operands((1, 8, 1, 16))
  f = jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, scale=1.0))
  assert cpu_attention._FWD in f.lower(q, k, v).as_text()
  tpu = f.trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
  assert cpu_attention._FWD not in tpu and "dot_general" in tpu


def test_supports():
  q = jnp.zeros((2, 8, 2, 16))
  assert not cpu_attention.supports(q, q, q, None)  # 8 devices in this process
  assert not cpu_attention.supports(q, q, q, jnp.ones((8, 8), bool))
  assert not cpu_attention.supports(q.astype(jnp.bfloat16), q, q, None)
  assert not cpu_attention.supports(q[..., :8], q[..., :8], q[..., :8], None)


def test_model_uses_kernel_on_one_device_and_falls_back(tmp_path):
  """A (scanned, remat) Encoder on one CPU device runs the kernel; with config.model.attention_impl='xla', or with
  no compiler, it runs XLA, logs why, and computes the same gradients."""
  kernel_checks.check_model_uses_kernel_and_falls_back(
      tmp_path, "attention", "attention_impl", "attention")


def test_build_error_names_the_compiler_output(tmp_path, monkeypatch):
  """A source that does not compile raises with the command and the compiler's message, and
  leaves nothing in the cache."""
  bad = tmp_path / "bad.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(cpu_attention, "SOURCE", str(bad))
  monkeypatch.setenv("BVL_CACHE_DIR", str(tmp_path / "cache"))
  with pytest.raises(RuntimeError, match=r"compiling .*bad\.cc failed") as e:
    cpu_attention.build()
  assert "error" in str(e.value)
  assert os.listdir(tmp_path / "cache" / "kernels") == []
