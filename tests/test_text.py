"""Text transformer and two-tower model: big_vision param names, pool types, normalised outputs."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import models

TINY_TXT = dict(width=16, depth=2, mlp_dim=32, num_heads=2, vocab_size=50)


def _names(params):
  return set(flax.traverse_util.flatten_dict(nn.unbox(params), sep="/"))


def test_text_param_names_follow_big_vision():
  m = models.get_model("text", num_classes=8, pool_type="map", **TINY_TXT)
  params = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 5), jnp.int32))["params"]
  names = _names(params)
  for want in ["Embed_0/embedding", "pos_embedding", "Encoder_0/encoderblock_0/LayerNorm_0/scale",
               "Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/kernel", "Encoder_0/encoder_norm/bias",
               "MAPHead_0/probe", "head/kernel", "head/bias"]:
    assert want in names, (want, sorted(names))
  assert nn.unbox(params)["Embed_0"]["embedding"].shape == (50, 16)
  assert nn.unbox(params)["pos_embedding"].shape == (1, 5, 16)


@pytest.mark.parametrize("pool", ["last", "first", "mean", "map"])
def test_pool_types(pool):
  m = models.get_model("text", pool_type=pool, **TINY_TXT)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 6)), jnp.int32)
  variables = m.init(jax.random.PRNGKey(0), tokens)
  y, out = m.apply(variables, tokens)
  assert y.shape == (3, 16)
  enc = out["encoded"]
  if pool == "last":
    np.testing.assert_allclose(y, enc[:, -1])
  elif pool == "first":
    np.testing.assert_allclose(y, enc[:, 0])
  elif pool == "mean":
    np.testing.assert_allclose(y, enc.mean(axis=1), rtol=1e-6)


def test_text_bad_inputs():
  with pytest.raises(ValueError, match="pool_type"):
    m = models.get_model("text", pool_type="max", **TINY_TXT)
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"\(B, L\)"):
    m = models.get_model("text", **TINY_TXT)
    m.init(jax.random.PRNGKey(0), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="unknown text variant"):
    models.get_model("text", variant="Q")


def test_text_variant_and_scan():
  m = models.get_model("text", variant="Ti", vocab_size=10, scan=True)
  assert (m.width, m.num_heads, m.depth) == (192, 3, 12)
  with pytest.raises(ValueError, match="'Ti' sets depth=12 but depth=2"):
    models.get_model("text", variant="Ti", depth=2)
  m = models.get_model("text", variant="mu", vocab_size=10, scan=True)
  assert (m.width, m.num_heads, m.depth) == (32, 2, 1)
  params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))["params"]
  assert "Encoder_0/encoderblock/MlpBlock_0/Dense_0/kernel" in _names(params)


def test_two_towers_outputs_and_params():
  m = models.get_model(
      "two_towers", image=dict(width=16, depth=1, num_heads=2, patch_size=(8, 8), pool_type="map"),
      text=dict(pool_type="last", **TINY_TXT), out_dim=(12, 12))
  img, txt = jnp.ones((3, 16, 16, 3)), jnp.ones((3, 5), jnp.int32)
  variables = m.init(jax.random.PRNGKey(0), img, txt)
  params = nn.unbox(variables["params"])
  assert set(params) == {"img", "txt", "t", "b"}
  np.testing.assert_allclose(params["t"], [np.log(10.0)], rtol=1e-6)
  np.testing.assert_allclose(params["b"], [-10.0])
  zimg, ztxt, out = m.apply(variables, img, txt)
  assert zimg.shape == ztxt.shape == (3, 12)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
  assert float(out["t"]) == pytest.approx(10.0, rel=1e-5) and float(out["b"]) == -10.0
  # Either tower alone.
  zi, zt, _ = m.apply(variables, img, None)
  assert zt is None and np.allclose(zi, zimg, atol=1e-6)
  zi, zt, _ = m.apply(variables, None, txt)
  assert zi is None and np.allclose(zt, ztxt, atol=1e-6)


def test_two_towers_without_bias():
  m = models.get_model("two_towers", image=dict(width=16, depth=1, num_heads=2, patch_size=(8, 8)),
                       text=TINY_TXT, out_dim=8, bias_init=None, temperature_init=1.0)
  params = nn.unbox(m.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)), jnp.ones((1, 4), jnp.int32))["params"])
  assert "b" not in params and float(params["t"][0]) == 0.0
