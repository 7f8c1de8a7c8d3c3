"""Tests for the ViT model: shapes, big_vision parameter tree, scan/remat equivalence, posembs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from big_vision_lite.models import MODELS, get_model
from big_vision_lite.models import vit as vit_lib

TINY = dict(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
IMG = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 3), jnp.float32)


def _init(model, x=IMG, seed=0):
  # Eager on purpose: op-level compiles are cached across tests, a jitted init is not.
  return model.init(jax.random.key(seed), x)


def _abstract_init(model, x=IMG):
  # Shapes and partition specs only: tracing without compiling keeps the tests fast.
  return jax.eval_shape(model.init, jax.random.key(0), x)


def _flat_shapes(params):
  return {k: v.shape for k, v in traverse_util.flatten_dict(nn.unbox(params), sep="/").items()}


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
@pytest.mark.parametrize("pool", ["gap", "tok", "map", "none"])
def test_output_shapes(pool, posemb):
  model = get_model("vit", num_classes=5, pool_type=pool, posemb=posemb, **TINY)
  variables = _init(model)
  logits, out = model.apply(nn.unbox(variables), IMG)
  n_tok = 16 + (pool == "tok")
  assert out["stem"].shape == (2, 4, 4, 32)
  assert out["with_posemb"].shape == (2, 16, 32)
  assert out["encoded"].shape == (2, n_tok, 32)
  assert out["pre_logits_2d"].shape == (2, 4, 4, 32)
  assert out["logits_2d"].shape == (2, 4, 4, 5)
  if pool == "none":
    assert logits.shape == (2, 16, 5)
    assert out["pre_logits"].shape == (2, 16, 32)
  else:
    assert logits.shape == (2, 5)
    assert out["pre_logits"].shape == (2, 32)
  assert logits is out["logits"]
  params = variables["params"]
  assert ("pos_embedding" in params) == (posemb == "learn")
  assert ("cls" in params) == (pool == "tok")
  assert ("MAPHead_0" in params) == (pool == "map")
  # Zero-init head gives zero logits at init.
  np.testing.assert_array_equal(np.asarray(logits), 0.0)


def test_pooling_math():
  model = get_model("vit", num_classes=0, pool_type="gap", **TINY)
  _, out = model.apply(nn.unbox(_init(model)), IMG)
  np.testing.assert_allclose(out["pre_logits"], np.mean(np.asarray(out["encoded"]), 1), atol=1e-6)
  model = get_model("vit", pool_type="tok", **TINY)
  _, out = model.apply(nn.unbox(_init(model)), IMG)
  np.testing.assert_array_equal(out["pre_logits"], out["encoded"][:, 0])
  assert "logits" not in out


def _block(prefix):
  attn = f"{prefix}/MultiHeadDotProductAttention_0"
  return {
      f"{prefix}/LayerNorm_0/scale": (32,), f"{prefix}/LayerNorm_0/bias": (32,),
      f"{prefix}/LayerNorm_1/scale": (32,), f"{prefix}/LayerNorm_1/bias": (32,),
      **{f"{attn}/{n}/kernel": (32, 4, 8) for n in ("query", "key", "value")},
      **{f"{attn}/{n}/bias": (4, 8) for n in ("query", "key", "value")},
      f"{attn}/out/kernel": (4, 8, 32), f"{attn}/out/bias": (32,),
      f"{prefix}/MlpBlock_0/Dense_0/kernel": (32, 64), f"{prefix}/MlpBlock_0/Dense_0/bias": (64,),
      f"{prefix}/MlpBlock_0/Dense_1/kernel": (64, 32), f"{prefix}/MlpBlock_0/Dense_1/bias": (32,),
  }


def _map_head():
  return {
      "MAPHead_0/probe": (1, 1, 32),
      **{k.replace("X/", "MAPHead_0/"): v for k, v in _block("X").items()
         if "LayerNorm_1" not in k},
  }


def test_param_tree_matches_big_vision():
  model = get_model("vit", num_classes=7, pool_type="map", rep_size=24, **TINY)
  expected = {
      "embedding/kernel": (4, 4, 3, 32), "embedding/bias": (32,),
      "pos_embedding": (1, 16, 32),
      **_block("Transformer/encoderblock_0"), **_block("Transformer/encoderblock_1"),
      "Transformer/encoder_norm/scale": (32,), "Transformer/encoder_norm/bias": (32,),
      **_map_head(),
      "pre_logits/kernel": (32, 24), "pre_logits/bias": (24,),
      "head/kernel": (24, 7), "head/bias": (7,),
  }
  assert _flat_shapes(_abstract_init(model)["params"]) == expected


def test_param_tree_tok_and_scan():
  model = get_model("vit", num_classes=3, pool_type="tok", posemb="sincos2d", scan=True, **TINY)
  stacked = {k.replace("encoderblock_0", "encoderblock"): (2,) + v
             for k, v in _block("Transformer/encoderblock_0").items()}
  expected = {
      "embedding/kernel": (4, 4, 3, 32), "embedding/bias": (32,), "cls": (1, 1, 32),
      **stacked,
      "Transformer/encoder_norm/scale": (32,), "Transformer/encoder_norm/bias": (32,),
      "head/kernel": (32, 3), "head/bias": (3,),
  }
  assert _flat_shapes(_abstract_init(model)["params"]) == expected


def test_init_values():
  model = get_model("vit", num_classes=3, pool_type="map", **TINY)
  p = traverse_util.flatten_dict(nn.unbox(_init(model))["params"], sep="/")
  blk = "Transformer/encoderblock_0"
  np.testing.assert_array_equal(p["head/kernel"], 0.0)
  np.testing.assert_array_equal(p[f"{blk}/MultiHeadDotProductAttention_0/query/bias"], 0.0)
  mlp_b = np.asarray(p[f"{blk}/MlpBlock_0/Dense_0/bias"])
  assert 0 < np.abs(mlp_b).max() < 1e-5  # normal(1e-6)
  # xavier_uniform over the flattened (D, H*hd) kernel: limit sqrt(6 / (32 + 32)).
  qk = np.asarray(p[f"{blk}/MultiHeadDotProductAttention_0/query/kernel"])
  limit = np.sqrt(6 / 64)
  assert np.abs(qk).max() <= limit and np.abs(qk).max() > 0.8 * limit
  pe = np.asarray(p["pos_embedding"])
  assert abs(pe.std() - 1 / np.sqrt(32)) < 0.15 / np.sqrt(32)
  # Non-zero head when asked.
  model = get_model("vit", num_classes=3, head_zeroinit=False, **TINY)
  assert np.abs(np.asarray(nn.unbox(_init(model))["params"]["head"]["kernel"])).max() > 0


def _restack(params, depth):
  """Per-layer `encoderblock_{i}` params -> one `encoderblock` with a leading layer axis."""
  params = jax.tree.map(lambda x: x, params)
  tr = dict(params["Transformer"])
  layers = [tr.pop(f"encoderblock_{i}") for i in range(depth)]
  tr["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "Transformer": tr}


def test_scan_matches_loop():
  kw = dict(num_classes=5, pool_type="map", head_zeroinit=False, **TINY)
  loop = get_model("vit", **kw)
  params = nn.unbox(_init(loop))["params"]
  want, want_out = loop.apply({"params": params}, IMG)
  scanned = get_model("vit", scan=True, **kw)
  got, got_out = scanned.apply({"params": _restack(params, 2)}, IMG)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_out["encoded"], want_out["encoded"], atol=1e-5, rtol=1e-5)
  # The restacked tree is exactly what the scanned model initialises.
  assert (jax.tree.map(jnp.shape, _restack(params, 2))
          == jax.tree.map(jnp.shape, nn.unbox(_abstract_init(scanned))["params"]))


@pytest.mark.parametrize("scan", [False, True])
def test_remat_keeps_outputs_and_grads(scan):
  kw = dict(num_classes=5, head_zeroinit=False, scan=scan, **TINY)
  params = nn.unbox(_init(get_model("vit", **{**kw, "scan": False})))["params"]
  if scan:
    params = _restack(params, 2)  # cheaper than a scanned init

  def loss_and_grad(policy):
    model = get_model("vit", remat_policy=policy, **kw)

    def loss(p):
      logits, _ = model.apply({"params": p}, IMG)
      return jnp.sum(logits ** 2), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (l0, y0), g0 = loss_and_grad("none")
  # One policy under scan keeps the test fast; both paths share the remat wrapper.
  for policy in ("nothing_saveable",) if scan else ("nothing_saveable", "dots_saveable"):
    (l1, y1), g1 = loss_and_grad(policy)
    np.testing.assert_allclose(y1, y0, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)
  assert float(jnp.abs(g0["embedding"]["kernel"]).sum()) > 0


def test_bad_remat_policy_and_pool():
  with pytest.raises(ValueError, match="remat_policy 'bogus'"):
    m = get_model("vit", remat_policy="bogus", **TINY)
    _init(m)
  with pytest.raises(ValueError, match="pool_type 'avg'"):
    _init(get_model("vit", pool_type="avg", **TINY))


def test_decode_variant():
  assert vit_lib.decode_variant("S/16") == dict(
      width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(16, 16))
  assert vit_lib.decode_variant("So400m/14") == dict(
      width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=(14, 14))
  assert vit_lib.decode_variant("Ti/16")["num_heads"] == 3
  assert vit_lib.decode_variant("B/16x8")["patch_size"] == (16, 8)
  assert "patch_size" not in vit_lib.decode_variant("G")
  assert vit_lib.decode_variant(None) == {}
  with pytest.raises(ValueError, match=r"'X/16'.*So400m"):
    vit_lib.decode_variant("X/16")
  with pytest.raises(ValueError, match="bad patch size"):
    vit_lib.decode_variant("B/abc")


def test_factory_overrides_and_registry():
  m = get_model("vit", variant="S/16", depth=12, num_classes=10)  # agrees with the variant: fine
  assert isinstance(m, vit_lib.ViT)
  assert (m.width, m.depth, m.mlp_dim, m.num_heads, m.patch_size) == (384, 12, 1536, 6, (16, 16))
  assert get_model("vit", variant="B", patch_size=8).patch_size == (8, 8)  # B sets no patch
  # A size that contradicts the variant is refused, not silently preferred to it.
  with pytest.raises(vit_lib.VariantClash, match="'S/16' sets depth=12 but depth=2"):
    get_model("vit", variant="S/16", depth=2)
  with pytest.raises(vit_lib.VariantClash, match="'B/32' sets patch_size"):
    get_model("vit", variant="B/32", patch_size=8)
  assert "vit" in MODELS
  with pytest.raises(KeyError, match="unknown model 'vitt'"):
    get_model("vitt")


def test_bf16_matmuls_close_to_fp32():
  kw = dict(num_classes=5, pool_type="map", head_zeroinit=False, **TINY)
  m32 = get_model("vit", **kw)
  m16 = get_model("vit", dtype_mm="bfloat16", **kw)
  v16 = nn.unbox(_init(m16))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v16))  # params stay fp32
  y32, o32 = m32.apply(v16, IMG)
  y16, o16 = m16.apply(v16, IMG)
  assert y16.dtype == jnp.float32 and o16["encoded"].dtype == jnp.float32
  assert o16["stem"].dtype == jnp.bfloat16  # the conv really ran in bf16
  err = np.abs(np.asarray(y16) - np.asarray(y32)).max()
  assert 0 < err < 0.05 * np.abs(np.asarray(y32)).max() + 1e-3
  np.testing.assert_allclose(o16["encoded"], o32["encoded"], atol=0.1)


def _sincos_reference(h, w, d, temperature=10_000.):
  n = d // 4
  omega = [1.0 / temperature ** (k / (n - 1)) for k in range(n)]
  pe = np.zeros((h * w, d))
  for i in range(h):
    for j in range(w):
      for k in range(n):
        pe[i * w + j, k] = np.sin(j * omega[k])
        pe[i * w + j, n + k] = np.cos(j * omega[k])
        pe[i * w + j, 2 * n + k] = np.sin(i * omega[k])
        pe[i * w + j, 3 * n + k] = np.cos(i * omega[k])
  return pe[None]


def test_sincos2d_matches_numpy():
  np.testing.assert_allclose(vit_lib.posemb_sincos_2d(3, 5, 16), _sincos_reference(3, 5, 16),
                             atol=1e-6)
  # Inside the model, on a non-square grid (4 x 2 patches).
  model = get_model("vit", posemb="sincos2d", **TINY)
  img = IMG[:, :, :8]
  _, out = model.apply(nn.unbox(_init(model, img)), img)
  pe = np.asarray(out["with_posemb"]) - np.asarray(out["stem"]).reshape(2, 8, 32)
  np.testing.assert_allclose(pe, np.repeat(_sincos_reference(4, 2, 32), 2, 0), atol=1e-5)
  with pytest.raises(ValueError, match="divisible by 4"):
    vit_lib.posemb_sincos_2d(2, 2, 30)


def test_batch_one_and_boxed_params():
  model = get_model("vit", num_classes=5, pool_type="map", head_zeroinit=False, **TINY)
  variables = _init(model)
  y1, _ = model.apply(nn.unbox(variables), IMG[:1])
  y2, _ = model.apply(nn.unbox(variables), IMG)
  assert y1.shape == (1, 5)
  np.testing.assert_allclose(y1[0], y2[0], atol=1e-5)
  yb, _ = model.apply(variables, IMG[:1])  # boxed params work too
  np.testing.assert_array_equal(yb, y1)


def test_dropout():
  model = get_model("vit", num_classes=5, dropout=0.5, head_zeroinit=False, **TINY)
  variables = nn.unbox(_init(model))
  y_eval, _ = model.apply(variables, IMG)
  y_tr, _ = model.apply(variables, IMG, train=True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(y_tr) - np.asarray(y_eval)).max() > 1e-3
  # Same rng, same result; dropout=0 training equals eval.
  y_tr2, _ = model.apply(variables, IMG, train=True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(y_tr, y_tr2)
  m0 = get_model("vit", num_classes=5, head_zeroinit=False, **TINY)
  np.testing.assert_allclose(m0.apply(variables, IMG, train=True)[0], y_eval, atol=1e-6)
  # Scanned + remat layers draw dropout masks from the "dropout" rng as well.
  ms = get_model("vit", num_classes=5, dropout=0.5, head_zeroinit=False, scan=True,
                 remat_policy="nothing_saveable", **TINY)
  vs = {"params": _restack(variables["params"], 2)}  # cheaper than a scanned init
  ys_eval, _ = ms.apply(vs, IMG)
  ys_tr, _ = ms.apply(vs, IMG, train=True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(ys_tr) - np.asarray(ys_eval)).max() > 1e-3


def _flat_specs(model):
  specs = nn.get_partition_spec(_abstract_init(model))["params"]
  return traverse_util.flatten_dict(specs, sep="/")


def test_partition_specs():
  P = jax.sharding.PartitionSpec
  model = get_model("vit", num_classes=5, pool_type="map", rep_size=True, **TINY)
  specs = _flat_specs(model)
  attn = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0"
  mlp = "Transformer/encoderblock_1/MlpBlock_0"
  want = {
      "embedding/kernel": P(None, None, None, "embed"), "embedding/bias": P("embed"),
      "pos_embedding": P(None, None, "embed"), "MAPHead_0/probe": P(None, None, "embed"),
      f"{attn}/query/kernel": P("embed", "heads", "kv"), f"{attn}/value/bias": P("heads", "kv"),
      f"{attn}/out/kernel": P("heads", "kv", "embed"), f"{attn}/out/bias": P("embed"),
      f"{mlp}/Dense_0/kernel": P("embed", "mlp"), f"{mlp}/Dense_0/bias": P("mlp"),
      f"{mlp}/Dense_1/kernel": P("mlp", "embed"), f"{mlp}/Dense_1/bias": P("embed"),
      "Transformer/encoder_norm/scale": P("embed"), "MAPHead_0/LayerNorm_0/bias": P("embed"),
      "head/kernel": P("embed", "classes"), "head/bias": P("classes"),
      "pre_logits/kernel": P("embed", None),
  }
  for k, v in want.items():
    assert specs[k] == v, k
  # Every param is annotated.
  assert all(isinstance(v, P) for v in specs.values())
  model = get_model("vit", num_classes=5, pool_type="tok", scan=True, **TINY)
  specs = _flat_specs(model)
  blk = "Transformer/encoderblock"
  assert specs["cls"] == P(None, None, "embed")
  assert specs[f"{blk}/MultiHeadDotProductAttention_0/key/kernel"] == P(
      "layers", "embed", "heads", "kv")
  assert specs[f"{blk}/LayerNorm_1/scale"] == P("layers", "embed")
  assert specs[f"{blk}/MlpBlock_0/Dense_0/kernel"] == P("layers", "embed", "mlp")


def test_logical_constraints_under_mesh():
  """With a mesh and rules active, the constraints apply and outputs are unchanged."""
  model = get_model("vit", num_classes=5, head_zeroinit=False, **TINY)
  variables = nn.unbox(_init(model))
  want, _ = model.apply(variables, IMG)
  mesh = jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
           ("heads", "tensor"))
  img = jnp.concatenate([IMG] * 2)
  fn = jax.jit(lambda v, x: model.apply(v, x)[0])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    hlo = fn.lower(variables, img).as_text()
    got = fn(variables, img)
  assert "sharding_constraint" in hlo
  assert "sharding_constraint" not in fn.lower(variables, img).as_text()  # no-op without rules
  np.testing.assert_allclose(got[:2], want, atol=1e-5)


def test_resample_posemb():
  rng = np.random.RandomState(0)
  pe = rng.randn(1, 16, 8).astype(np.float32)
  np.testing.assert_array_equal(vit_lib.resample_posemb(pe, (4, 4)), pe)
  assert vit_lib.resample_posemb(pe, (6, 3)).shape == (1, 18, 8)
  assert vit_lib.resample_posemb(pe, (2, 2)).shape == (1, 4, 8)
  const = np.full((1, 9, 4), 3.0, np.float32)
  np.testing.assert_allclose(vit_lib.resample_posemb(const, (5, 5)), 3.0, rtol=1e-6)
  # Upsampling 2x: half-pixel bilinear with edge clamping, checked along one axis.
  grid = rng.randn(2, 2, 3).astype(np.float32)
  got = vit_lib.resample_posemb(grid.reshape(1, 4, 3), (4, 2)).reshape(4, 2, 3)
  src = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
  want = (1 - src)[:, None, None] * grid[0][None] + src[:, None, None] * grid[1][None]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Non-square old grid needs old_hw.
  with pytest.raises(ValueError, match="not a square grid"):
    vit_lib.resample_posemb(rng.randn(1, 8, 4), (4, 4))
  assert vit_lib.resample_posemb(rng.randn(1, 8, 4), (4, 4), old_hw=(4, 2)).shape == (1, 16, 4)


def test_attention_matches_flax_reference():
  """Same params, same numbers as flax's MultiHeadDotProductAttention (what big_vision uses)."""
  from big_vision_lite.models.common import MultiHeadDotProductAttention
  rng = np.random.RandomState(1)
  q_in = jnp.asarray(rng.randn(2, 3, 32), jnp.float32)
  kv_in = jnp.asarray(rng.randn(2, 5, 32), jnp.float32)
  mine = MultiHeadDotProductAttention(num_heads=4)
  params = nn.unbox(mine.init(jax.random.key(0), q_in, kv_in))
  # Non-zero biases so they are checked too.
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.randn(*p.shape), p.dtype), params)
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, jax.eval_shape(ref.init, jax.random.key(0), q_in, kv_in))
  want = ref.apply(params, q_in, kv_in)
  np.testing.assert_allclose(mine.apply(params, q_in, kv_in), want, atol=1e-5, rtol=1e-5)
  mask = jnp.asarray(rng.rand(2, 1, 3, 5) > 0.3).at[..., 0].set(True)
  np.testing.assert_allclose(mine.apply(params, q_in, kv_in, mask),
                             ref.apply(params, q_in, kv_in, mask=mask), atol=1e-5, rtol=1e-5)


def _np_bilinear_aa(grid: np.ndarray, to: int) -> np.ndarray:
  """Antialiased bilinear shrink of a square (g, g, d) grid along both axes (triangle kernel
  widened by the scale, half-pixel centres, weights renormalised at the edges)."""
  g = grid.shape[0]
  scale = g / to
  def weights():
    w = np.zeros((to, g))
    for i in range(to):
      centre = (i + 0.5) * scale - 0.5
      for j in range(g):
        w[i, j] = max(0.0, 1 - abs(j - centre) / max(scale, 1.0))
      w[i] /= w[i].sum()
    return w
  w = weights()
  return np.einsum("ij,jkd,lk->ild", w, grid, w)


def test_learned_posemb_grid_resizes_for_smaller_inputs_only():
  model = get_model("vit", variant="mu/8", num_classes=0, posemb_grid=4, pool_type="gap")
  plain = get_model("vit", variant="mu/8", num_classes=0, pool_type="gap")
  image = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), image)["params"])
  assert params["pos_embedding"].shape == (1, 16, 32)
  # At its own grid the model is the plain ViT with the same params, bit for bit.
  np.testing.assert_array_equal(model.apply({"params": params}, image)[0],
                                plain.apply({"params": params}, image)[0])
  # A 16 px crop (2 x 2 patches) gets the 4 x 4 grid shrunk with antialiasing.
  small = image[:, :16, :16]
  _, out = model.apply({"params": params}, small)
  stem = out["stem"].reshape(2, 4, -1)
  got = np.asarray(out["with_posemb"] - stem)[0]
  want = _np_bilinear_aa(np.asarray(params["pos_embedding"]).reshape(4, 4, 32), 2).reshape(4, 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  # Without the grid the smaller input does not fit the param.
  with pytest.raises(Exception, match="pos_embedding"):
    plain.apply({"params": params}, small)
