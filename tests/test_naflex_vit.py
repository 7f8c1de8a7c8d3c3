"""The NaFlex ViT: padding cannot change the output, the posemb resize is jax's/torch's bilinear
antialiased resize, and a square image at the posemb grid gives the standard ViT's numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.data.ops_naflex import patchify
from big_vision_lite.models import get_model
from big_vision_lite.models.naflex_vit import posemb_for_tokens, resize_weights

KW = dict(width=32, depth=2, mlp_dim=64, num_heads=4, pool_type="map", num_classes=8,
          head_zeroinit=False)
P, G = 4, 4  # patch, posemb grid


def _inputs(images, budget, seed=0):
  rows = [patchify(im, P, budget) for im in images]
  return tuple(jnp.asarray(np.stack([r[i] for r in rows])) for i in range(3))


def _images(seed, shapes):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(h * P, w * P, 3)).astype(np.float32) for h, w in shapes]


@pytest.mark.parametrize("hw,out", [((4, 4), (4, 4)), ((4, 4), (2, 7)), ((4, 4), (9, 3)),
                                    ((16, 16), (5, 12)), ((3, 5), (1, 16))])
def test_posemb_resize_is_jax_image_resize_antialiased(hw, out):
  """Upsampling, downsampling and mixed: per token equals jax.image.resize(bilinear, antialias)
  of the whole grid, the resize big_vision's naflex_vit does (scale_and_translate)."""
  grid = jax.random.normal(jax.random.PRNGKey(0), (*hw, 6))
  ref = jax.image.resize(grid, (*out, 6), method="bilinear", antialias=True).reshape(-1, 6)
  n = out[0] * out[1] + 3
  got = posemb_for_tokens(grid, jnp.asarray([out]), n)[0]
  tol = 8 * np.finfo(np.float32).eps * float(jnp.abs(grid).max())
  np.testing.assert_allclose(got[:out[0] * out[1]], ref, rtol=0, atol=tol)


def test_resize_weights_match_torch_interpolate_antialias():
  """transformers' Siglip2 resizes with F.interpolate(bilinear, antialias=True): same weights."""
  torch = pytest.importorskip("torch")
  for in_size, out_size in [(16, 5), (16, 16), (16, 40), (7, 3), (4, 9)]:
    eye = torch.eye(in_size)[None, None].float()  # each column of the identity: one weight row
    ref = torch.nn.functional.interpolate(eye, size=(in_size, out_size), mode="bilinear",
                                          align_corners=False, antialias=True)[0, 0].T.numpy()
    got = np.asarray(resize_weights(jnp.arange(out_size), out_size, in_size))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_padding_cannot_change_the_output():
  model = get_model("naflex_vit", posemb_grid=G, **KW)
  images = _images(0, [(3, 5), (6, 2), (4, 4)])
  patches, mask, shapes = _inputs(images, 20)
  params = model.init(jax.random.PRNGKey(0), (patches, mask, shapes))["params"]
  y, out = model.apply({"params": params}, (patches, mask, shapes))
  noise = jax.random.normal(jax.random.PRNGKey(1), patches.shape) * 100
  y2, out2 = model.apply({"params": params},
                         (jnp.where(mask[..., None] > 0, patches, noise), mask, shapes))
  np.testing.assert_array_equal(y, y2)
  valid = np.asarray(mask) > 0
  np.testing.assert_array_equal(np.asarray(out["encoded"])[valid],
                                np.asarray(out2["encoded"])[valid])
  # A longer budget (more padding) gives the same numbers up to fp32 reassociation.
  y3, _ = model.apply({"params": params}, _inputs(images, 37))
  np.testing.assert_allclose(y3, y, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
  # ...and the padded tokens really were used by nothing: one image alone gives its row.
  y1, _ = model.apply({"params": params}, _inputs(images[:1], 20))
  np.testing.assert_allclose(y1[0], y[0], rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))


def test_padding_would_change_an_unmasked_model():
  """The test above can fail: the same change of the padding, seen as valid tokens, moves y."""
  model = get_model("naflex_vit", posemb_grid=G, **KW)
  patches, mask, shapes = _inputs(_images(0, [(3, 5)]), 20)
  params = model.init(jax.random.PRNGKey(0), (patches, mask, shapes))["params"]
  ones = jnp.ones_like(mask)
  y, _ = model.apply({"params": params}, (patches, ones, shapes))
  y2, _ = model.apply({"params": params}, (patches + 1.0 * (mask[..., None] == 0), ones, shapes))
  assert not np.allclose(y, y2)


@pytest.mark.parametrize("budget", [16, 24])
def test_square_image_at_the_grid_equals_the_standard_vit(budget):
  """big_vision's layouts coincide when the image's grid is the posemb grid: the conv stem is
  a dense layer on (dy, dx, c)-flattened patches and the resize is the identity."""
  vit = get_model("vit", patch_size=(P, P), **KW)
  image = _images(3, [(G, G), (G, G)])
  batch = jnp.asarray(np.stack(image))
  params = nn.meta.unbox(vit.init(jax.random.PRNGKey(0), batch)["params"])
  ref, _ = vit.apply({"params": params}, batch)

  nf = dict(params)
  nf["embedding"] = {"kernel": params["embedding"]["kernel"].reshape(P * P * 3, -1),
                     "bias": params["embedding"]["bias"]}
  nf["pos_embedding"] = params["pos_embedding"].reshape(G, G, -1)
  model = get_model("naflex_vit", posemb_grid=G, patch_size=P, **KW)
  abstract = nn.meta.unbox(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), _inputs(image, budget))["params"])
  assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, nf)
  got, _ = model.apply({"params": nf}, _inputs(image, budget))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_two_towers_take_naflex_inputs_from_the_batch_keys():
  """The contrastive task hands (image, image_mask, image_shape) to a naflex_vit tower."""
  import ml_collections
  from big_vision_lite.tasks import get_task
  model = get_model("two_towers", image_model="naflex_vit",
                    image=dict(posemb_grid=G, **{k: v for k, v in KW.items()
                                                 if k not in ("num_classes", "head_zeroinit")}),
                    text=dict(width=32, depth=1, mlp_dim=64, num_heads=4, vocab_size=16),
                    out_dim=16)
  task = get_task(ml_collections.ConfigDict(dict(name="contrastive", chunked=False)), model)
  patches, mask, shapes = _inputs(_images(0, [(3, 5), (6, 2)]), 20)
  batch = {"image": patches, "image_mask": mask, "image_shape": shapes,
           "labels": jnp.ones((2, 6), jnp.int32)}
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *task.init_inputs(batch))["params"])
  assert params["img"]["pos_embedding"].shape == (G, G, 32)
  loss, _ = task.loss(params, batch, jax.random.PRNGKey(0))
  assert np.isfinite(loss)
  z = task.predict_fns()["embed_image"](params, batch)
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)


def test_bad_input_is_one_clear_error():
  model = get_model("naflex_vit", posemb_grid=G, **KW)
  with pytest.raises(ValueError, match="expects \\(patches"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="pool_type"):
    get_model("naflex_vit", pool_type="tok").init(jax.random.PRNGKey(0),
                                                  _inputs(_images(0, [(2, 2)]), 4))


def test_locca_decoder_does_not_see_the_padding():
  """two_towers_decoder on a NaFlex tower: teacher-forced logits and cached decoding's prefill
  are the same whatever the padding patches hold (the cross-attention is masked too)."""
  tower = {k: v for k, v in KW.items() if k not in ("num_classes", "head_zeroinit")}
  model = get_model("two_towers_decoder", image_model="naflex_vit",
                    image=dict(posemb_grid=G, **tower),
                    text=dict(width=32, depth=1, mlp_dim=64, num_heads=4, vocab_size=16),
                    out_dim=16, decoder=dict(depth=1, mlp_dim=64, num_heads=4), vocab_size=20,
                    max_len=6)
  patches, mask, shapes = _inputs(_images(0, [(3, 5), (6, 2)]), 20)
  noisy = jnp.where(mask[..., None] > 0, patches, 50.0)
  tokens = {"cap": jnp.asarray([[3, 4, 5, 1, 0, 0], [6, 7, 1, 0, 0, 0]], jnp.int32)}
  params = nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), (patches, mask, shapes), None, tokens)["params"])
  # The logits layer starts at zero (any input gives 0): give it weights so a leak would show.
  head = params["decoder"]["LogitsDense"]
  params["decoder"]["LogitsDense"] = {**head, "kernel": jax.random.normal(
      jax.random.PRNGKey(1), head["kernel"].shape)}
  logits = [model.apply({"params": params}, (p, mask, shapes), None, tokens)[2]["decoder/cap"]
            for p in (patches, noisy)]
  np.testing.assert_array_equal(logits[0], logits[1])
  firsts = []
  for p in (patches, noisy):
    memory = model.apply({"params": params}, (p, mask, shapes), method="encode")
    first, _ = model.apply({"params": params}, memory, model.init_cache(2), mask,
                           method="prefill")
    firsts.append(first)
  np.testing.assert_array_equal(firsts[0], firsts[1])
  memory = model.apply({"params": params}, (noisy, mask, shapes), method="encode")
  unmasked, _ = model.apply({"params": params}, memory, model.init_cache(2), method="prefill")
  assert not np.allclose(unmasked, firsts[0])  # without the mask the padding leaks in
