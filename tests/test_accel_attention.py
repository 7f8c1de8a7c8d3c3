"""Fused attention implementations (platform/gpu cuDNN, platform/tpu splash) against a NumPy
reference: what runs on CPU is run (jax's XLA path of dot_product_attention, splash in Pallas
interpret mode); what needs a GPU is checked through the same checks jax makes before lowering."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models, platform, sharding
from big_vision_lite.platform.gpu import attention as gpu
from big_vision_lite.platform.tpu import attention as tpu

EPS32 = float(np.finfo(np.float32).eps)


def np_attention(q, k, v, mask=None, scale=1.0):
  """softmax(scale q k^T, masked) v in float64 on BTNH arrays; mask broadcasts to (B, N, T, S)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _qkv(b, t, s, n, h, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, t, n, h)).astype(np.float32),
          rng.standard_normal((b, s, n, h)).astype(np.float32),
          rng.standard_normal((b, s, n, h)).astype(np.float32))


def _tol(h, s, v):
  # fp32 rounding of a length-h dot (logits), a length-s softmax sum and a length-s weighted
  # sum of v: each error is at most ~length * eps relative to the largest |term|.
  return 4 * EPS32 * (h + 2 * s) * float(np.abs(v).max())


@pytest.mark.parametrize("with_mask", [False, True])
def test_xla_fused_path_matches_numpy(with_mask):
  """cudnn_attention's wrapper (mask reshaping, scale, BTNH) through jax's XLA implementation."""
  q, k, v = _qkv(2, 9, 13, 3, 16)
  mask = np.random.default_rng(1).random((2, 1, 9, 13)) > 0.3 if with_mask else None
  if with_mask:
    mask[..., 0] = True  # no fully-masked row: its softmax is undefined
  scale = 16 ** -0.5
  out = gpu.xla_fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask,
                                scale=scale)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_attention(q, k, v, mask, scale), rtol=0,
                             atol=_tol(16, 13, v))


@pytest.mark.parametrize("q_shape,k_shape,dtypes,mask_shape,cc,refusal", [
    ((2, 197, 12, 64), (2, 197, 12, 64), ("bfloat16",) * 3, None, "9.0", None),
    ((2, 197, 12, 64), (2, 197, 12, 64), ("float16",) * 3, None, "8.0", None),
    ((2, 197, 12, 64), (2, 197, 12, 64), ("float32",) * 3, None, "9.0", "float16 or bfloat16"),
    ((2, 197, 12, 64), (2, 197, 12, 64), ("bfloat16", "bfloat16", "float16"), None, "9.0",
     "float16 or bfloat16"),
    ((2, 197, 12, 64), (2, 197, 12, 64), ("bfloat16",) * 3, None, "7.5", "Ampere"),
    ((2, 64, 4, 192), (2, 64, 4, 192), ("bfloat16",) * 3, None, "9.0", None),
    ((2, 64, 4, 192), (2, 64, 4, 192), ("bfloat16",) * 3, None, "8.0", "<= 128"),
    ((2, 64, 4, 100), (2, 64, 4, 100), ("bfloat16",) * 3, None, "9.0", "multiple of 8"),
    ((2, 64, 4, 64), (2, 64, 4, 64), ("bfloat16",) * 3, (2, 1, 64, 64), "9.0", None),
    ((2, 64, 4, 64), (2, 64, 4, 64), ("bfloat16",) * 3, (2, 1, 1, 64), "9.0", "full (q_len"),
    ((2, 65, 4, 64), (2, 65, 4, 64), ("bfloat16",) * 3, (1, 1, 65, 65), "9.0", "even"),
    ((2, 64, 4), (2, 64, 4), ("bfloat16",) * 3, None, "9.0", "rank 4"),
])
def test_cudnn_reason(q_shape, k_shape, dtypes, mask_shape, cc, refusal):
  reason = gpu.cudnn_reason(q_shape, k_shape, dtypes, mask_shape, cc)
  if refusal is None:
    assert reason is None, reason
  else:
    assert reason is not None and refusal in reason, reason


def test_cudnn_is_not_chosen_without_a_gpu():
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  assert not gpu.supports_cudnn(q, q, q, None)


@pytest.mark.parametrize("n,padded,block", [(197, 256, 256), (257, 384, 128), (64, 128, 128),
                                            (1024, 1024, 512), (1, 128, 128), (577, 640, 128)])
def test_splash_padding_and_blocks(n, padded, block):
  assert tpu.padded_length(n) == padded and tpu.block_size(padded) == block


def test_splash_refuses_what_it_cannot_take():
  q = jnp.zeros((2, 16, 2, 64), jnp.float32)
  assert tpu.supports_splash(q, q, q, None)
  assert not tpu.supports_splash(q, q, q, jnp.ones((1, 1, 16, 16), bool))
  assert not tpu.supports_splash(q.astype(jnp.float16), q, q, None)
  assert not tpu.supports_splash(jnp.zeros((2, 16, 2, 12)), q, q, None)
  with pytest.raises(ValueError, match="masks are not supported"):
    tpu.splash_attention(q, q, q, mask=jnp.ones((1, 1, 16, 16), bool), scale=1.0)


@pytest.mark.parametrize("t,s", [(70, 70), (1, 70)])  # ViT-like odd length; a MAP-head probe
def test_splash_interpret_matches_numpy_and_grads_match_xla(t, s):
  """Padding to the 128 block and masking the padded keys leaves forward and gradients exact."""
  q, k, v = _qkv(2, t, s, 2, 64, seed=t)
  scale = 64 ** -0.5
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  splash = lambda q, k, v: tpu.splash_attention(q, k, v, scale=scale, interpret=True)
  np.testing.assert_allclose(splash(q, k, v), np_attention(q, k, v, None, scale), rtol=0,
                             atol=_tol(64, s, v))
  # Gradients against jax's own attention (XLA): a weighted loss so every output matters.
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale)
  got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=0, atol=_tol(64, s, v) * float(jnp.abs(w).max()) * 8)


def test_splash_under_a_mesh_runs_per_shard():
  """With a mesh and the model's logical rules active, splash runs under shard_map, batch split."""
  q, k, v = (jnp.asarray(x) for x in _qkv(4, 20, 20, 2, 16, seed=5))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}, jax.devices()[:4])
  rules = (("batch", ("data", "fsdp", "expert")), ("length", None), ("heads", "tensor"),
           ("kv", None))
  fn = jax.jit(lambda q, k, v: tpu.splash_attention(q, k, v, scale=0.25, interpret=True))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    out = fn(q, k, v)
  assert "shard_map" in jaxpr
  np.testing.assert_allclose(out, np_attention(q, k, v, None, 0.25), rtol=0, atol=_tol(16, 20, v))


def _vit_jaxpr(impl: str, dtype_mm: str = "float32") -> str:
  model = models.get_model("vit", variant="mu/8", num_classes=4, dtype_mm=dtype_mm)
  image = jnp.zeros((2, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
  with platform.override(attention=impl):
    return str(jax.make_jaxpr(lambda p: model.apply(p, image))(params))


def test_model_attention_calls_the_selected_kernel():
  """The override is read while the model is traced: splash puts a Pallas call in every block,
  cuDNN without a GPU (and XLA) leave the plain math."""
  xla = _vit_jaxpr("xla")
  assert "pallas_call" not in xla
  assert _vit_jaxpr("splash").count("pallas_call") >= 1
  assert _vit_jaxpr("cudnn", "bfloat16") == _vit_jaxpr("xla", "bfloat16")
  with pytest.raises(platform.PlatformConfigError, match="config.model.attention_impl: must be one of"):
    with platform.override(attention="flash"):
      pass
