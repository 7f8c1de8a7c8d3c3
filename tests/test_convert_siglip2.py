"""The NaFlex tower exported to transformers' Siglip2VisionModel gives the same outputs on
images of several aspect ratios, through ops_naflex's arrays (as Siglip2ImageProcessor's)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

pytest.importorskip("torch")
from big_vision_lite.convert import torch_env  # noqa: E402

torch_env.setup()
pytest.importorskip("transformers")

from big_vision_lite.convert import hf_siglip2  # noqa: E402
from big_vision_lite.data.ops import get_preprocess_fn  # noqa: E402
from big_vision_lite.models import get_model  # noqa: E402

KW = dict(width=64, depth=2, mlp_dim=128, num_heads=4, pool_type="map", posemb_grid=4,
          patch_size=8)
BUDGET = 24


def _batch():
  rng = np.random.default_rng(0)
  pp = get_preprocess_fn(f"value_range(-1, 1)|naflex_patches(8, {BUDGET})")
  # Square at the grid, wide, tall, very wide: posembs resampled up and down, 0 to 8 pad rows.
  rows = [pp({"image": rng.integers(0, 256, hw + (3,), dtype=np.uint8)})
          for hw in [(32, 32), (30, 70), (200, 50), (50, 300)]]
  return tuple(np.stack([r[k] for r in rows]) for k in ("image", "image_mask", "image_shape"))


@pytest.mark.parametrize("scan", [False, True])
def test_naflex_tower_matches_siglip2_vision_model(scan):
  model = get_model("naflex_vit", scan=scan, **KW)
  batch = _batch()
  assert batch[2].tolist() == [[4, 4], [3, 7], [8, 2], [2, 12]]
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"])
  # Every weight random (biases too, which start at zero): a swapped or dropped rule shows.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  y, out = model.apply({"params": params}, batch)

  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  spec = hf_siglip2.vision_spec(flat, num_heads=KW["num_heads"])
  assert spec == dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch=8, grid=4, norm_eps=1e-6,
                      in_chans=3)
  hf = hf_siglip2.run_vision(hf_siglip2.export_vision(flat, spec), *batch)
  scale = float(np.abs(y).max())
  np.testing.assert_allclose(hf["pooled"], y, rtol=0, atol=1e-4 * max(scale, 1.0))
  valid = batch[1] > 0
  np.testing.assert_allclose(hf["encoded"][valid], np.asarray(out["encoded"])[valid], rtol=0,
                             atol=1e-4 * max(float(np.abs(out["encoded"]).max()), 1.0))


def test_a_tower_with_a_projection_is_refused():
  model = get_model("naflex_vit", num_classes=8, **KW)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), _batch())["params"])
  flat = traverse_util.flatten_dict(params, sep="/")
  with pytest.raises(hf_siglip2.ConversionError, match="MAP head"):
    hf_siglip2.vision_spec(flat, num_heads=4)


def test_siglip2_recipe_model_matches_siglip2_model():
  """A SigLIP 2 NaFlex model (two_towers_decoder, as configs/siglip2_b16_naflex.py) exported to
  Siglip2Model without its decoder: same embeddings and logits within 1e-4."""
  from big_vision_lite.convert import towers
  tower = {k: v for k, v in KW.items()}
  model = get_model("two_towers_decoder", image_model="naflex_vit", image=tower,
                    text=dict(width=64, depth=1, mlp_dim=128, num_heads=4, vocab_size=50,
                              pool_type="last"),
                    out_dim=(None, 64), decoder=dict(depth=1, mlp_dim=128, num_heads=4),
                    vocab_size=60, max_len=8)
  batch = _batch()
  texts = np.random.default_rng(2).integers(0, 50, (4, 8)).astype(np.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch, texts,
                                    {"cap": texts})["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  zimg, ztxt, out = model.apply({"params": params}, batch, texts)
  logits = np.asarray(out["t"] * zimg @ ztxt.T + out["b"])

  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  vspec = hf_siglip2.vision_spec({k[4:]: v for k, v in flat.items() if k.startswith("img/")},
                                 num_heads=4)
  txt = towers.text_spec_from_params({k[4:]: v for k, v in flat.items() if k.startswith("txt/")},
                                     pool_type="last")
  hf = hf_siglip2.run_model(hf_siglip2.export_model(flat, vspec, txt, has_bias=True), *batch, texts)
  for name, ours in (("zimg", zimg), ("ztxt", ztxt), ("logits", logits)):
    ours = np.asarray(ours)
    np.testing.assert_allclose(hf[name], ours, rtol=0, atol=1e-4 * max(np.abs(ours).max(), 1.0),
                               err_msg=name)
