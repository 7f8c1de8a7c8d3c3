"""The NaFlex preprocessing op: target size as transformers computes it, patch layout, mask and
spatial shape."""

import numpy as np
import pytest

from big_vision_lite.data.ops import get_preprocess_fn
from big_vision_lite.data.ops_naflex import patchify, size_for_max_num_patches

# (height, width) of source images: square, landscape, portrait, extreme, tiny, huge.
SIZES = [(256, 256), (480, 640), (640, 480), (100, 1000), (1000, 37), (7, 5), (33, 2000),
         (1080, 1920), (224, 224), (17, 300)]


def _hf_size_fn():
  pytest.importorskip("torch")
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  pytest.importorskip("transformers")
  from transformers.models.siglip2 import image_processing_siglip2 as hf
  return hf


@pytest.mark.parametrize("budget", [64, 256, 576, 1024])
def test_target_size_matches_transformers(budget):
  hf = _hf_size_fn()
  for h, w in SIZES:
    assert size_for_max_num_patches(h, w, 16, budget) == \
        hf.get_image_size_for_max_num_patches(h, w, 16, budget), (h, w, budget)


@pytest.mark.parametrize("h,w", SIZES)
def test_target_size_against_a_scan_of_scales(h, w):
  """NumPy reference without bisection: over a fine grid of scales, the grid (each side
  ceil(scale * side / p) patches, at least one) with the most patches within the budget."""
  p, budget = 16, 256
  scales = np.geomspace(1e-5, 100, 400_001)
  gh = np.maximum(1, np.ceil(scales * h / p))
  gw = np.maximum(1, np.ceil(scales * w / p))
  fits = gh * gw <= budget
  best = np.flatnonzero(fits)[-1]  # patch counts grow with the scale
  assert size_for_max_num_patches(h, w, p, budget) == (int(gh[best]) * p, int(gw[best]) * p)


def test_patchify_against_a_loop_reference():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(3 * 4, 5 * 4, 3)).astype(np.float32)
  patches, mask, shape = patchify(image, 4, 20)
  assert patches.shape == (20, 48) and shape.tolist() == [3, 5]
  assert mask.tolist() == [1] * 15 + [0] * 5
  for i in range(3):
    for j in range(5):
      np.testing.assert_array_equal(patches[i * 5 + j],
                                    image[4 * i:4 * i + 4, 4 * j:4 * j + 4].ravel())
  assert not patches[15:].any()


def test_op_resizes_keeps_aspect_and_pads():
  image = np.random.default_rng(1).integers(0, 256, (300, 100, 3), dtype=np.uint8)
  out = get_preprocess_fn("value_range(-1, 1)|naflex_patches(16, 64)")({"image": image, "t": 1})
  assert out["t"] == 1
  gh, gw = out["image_shape"].tolist()
  assert (gh * 16, gw * 16) == size_for_max_num_patches(300, 100, 16, 64) and gh * gw <= 64
  assert out["image"].shape == (64, 768) and out["image"].dtype == np.float32
  assert out["image_mask"].dtype == np.int32 and out["image_mask"].sum() == gh * gw
  assert out["image_mask"][:gh * gw].all() and not out["image"][gh * gw:].any()
  assert -1 <= out["image"].min() and out["image"].max() <= 1


def test_op_equals_siglip2_image_processor_at_its_target_size():
  """An image already at its target size is not resized by either side: same patches (layout,
  normalisation), same mask and spatial shape as transformers' Siglip2ImageProcessor."""
  hf = _hf_size_fn()
  from transformers import Siglip2ImageProcessor
  proc = Siglip2ImageProcessor(patch_size=16, max_num_patches=64)
  for h, w in [(128, 128), (64, 256), (208, 64)]:
    assert hf.get_image_size_for_max_num_patches(h, w, 16, 64) == (h, w)
    image = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = proc(images=[image], return_tensors="np")
    out = get_preprocess_fn("value_range(-1, 1)|naflex_patches(16, 64)")({"image": image})
    np.testing.assert_allclose(out["image"], ref["pixel_values"][0], rtol=0, atol=4e-7)
    np.testing.assert_array_equal(out["image_mask"], ref["pixel_attention_mask"][0])
    np.testing.assert_array_equal(out["image_shape"], ref["spatial_shapes"][0])


@pytest.mark.parametrize("spec,match", [
    ("naflex_patches(0, 64)", "must be positive"),
    ("naflex_patches(16, 64, method='cubic')", "unknown resize method"),
])
def test_bad_arguments_are_one_line(spec, match):
  with pytest.raises(ValueError, match=match):
    get_preprocess_fn(spec)
