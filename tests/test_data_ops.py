"""Tests for the preprocessing-op registry, parser and ops, each against a small NumPy / hand reference."""

import io
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from big_vision_lite.data import ops, randaug
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import input_pipeline  # noqa: E402  (benchmarks/: its photo-like JPEG generator)
from big_vision_lite.data.ops import get_preprocess_fn


def _rng(seed=0):
  return np.random.default_rng(seed)


def _image(h=12, w=10, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _coords(h, w):
  """Each pixel holds (row, col, 7), so a crop reveals where it came from."""
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([yy, xx, np.full_like(yy, 7)], axis=-1).astype(np.uint8)


def _encode(array, fmt="PNG"):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _apply(spec, example, seed=0):
  return get_preprocess_fn(spec)(example, _rng(seed))


# Parser and registry.

def test_unknown_op_suggests_close_name():
  with pytest.raises(KeyError, match=r"'resze'.*did you mean 'resize'"):
    get_preprocess_fn("decode|resze(32)")


@pytest.mark.parametrize("spec, piece", [
    ("decode|resize(32", "resize(32"),
    ("resize(x)", "resize(x)"),
    ("decode|ops.resize(3)", "ops.resize(3)"),
    ("resize(*[3])", "resize(*[3])"),
    ("decode|3", "3"),
])
def test_malformed_spec_quotes_piece(spec, piece):
  with pytest.raises(ValueError, match="malformed") as e:
    get_preprocess_fn(spec)
  assert repr(piece) in str(e.value)


def test_empty_piece_is_malformed():
  with pytest.raises(ValueError, match="empty op"):
    get_preprocess_fn("decode||resize(3)")


@pytest.mark.parametrize("spec", ["resize(1, 2, 3, 4, 5)", "resize(32, bogus=1)", "flip_lr(0.5, 'image', 3)",
                                  "onehot()"])
def test_bad_args_raise_type_error_naming_op(spec):
  name = spec.split("(")[0]
  with pytest.raises(TypeError, match=f"preprocessing op '{name}'"):
    get_preprocess_fn(spec)


def test_bad_values_raise_value_error():
  with pytest.raises(ValueError, match="size"):
    get_preprocess_fn("resize(-3)")
  with pytest.raises(ValueError, match="resize method"):
    get_preprocess_fn("resize(3, method='cubicle')")


def test_parse_literals_and_quoted_bar():
  assert ops.parse_op("value_range(-1, 1, clip_values=True)") == ("value_range", (-1, 1), {"clip_values": True})
  assert ops.parse_op("resize((4, 6))") == ("resize", ((4, 6),), {})
  assert ops.split_spec("keep('a|b')|drop('c')") == ["keep('a|b')", "drop('c')"]


def test_empty_spec_is_identity():
  example = {"image": _image(), "label": 1}
  for spec in ["", "  "]:
    out = get_preprocess_fn(spec)(example, _rng())
    assert out is not example and out.keys() == example.keys() and out["image"] is example["image"]


def test_ops_run_left_to_right():
  out = _apply("copy('a', 'b')|rename('b', 'c')|drop('a')", {"a": 1})
  assert out == {"c": 1}


def test_runtime_error_names_op_and_missing_key():
  fn = get_preprocess_fn("decode|resize(4)")
  with pytest.raises(KeyError, match="'image'") as e:
    fn({"img": _image()}, _rng())
  assert any("decode" in note for note in getattr(e.value, "__notes__", []))


def test_random_op_without_rng_fails_deterministic_ok():
  assert get_preprocess_fn("central_crop(4)")({"image": _image()})["image"].shape == (4, 4, 3)
  with pytest.raises(ValueError, match="'flip_lr' is random"):
    get_preprocess_fn("flip_lr")({"image": _image()})


def test_pickle_round_trip():
  spec = "decode|inception_crop(8)|flip_lr|randaug(2, 9)|value_range(-1, 1)|onehot(5, key_result='labels')"
  fn = get_preprocess_fn(spec)
  data = pickle.dumps(fn)
  assert len(data) < 1000  # Only the spec travels.
  fn2 = pickle.loads(data)
  example = {"image": _image(20, 24), "label": 2}
  a, b = fn(example, _rng(3)), fn2(example, _rng(3))
  assert fn2.spec == spec and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_input_dict_not_mutated():
  image = _image(16, 16)
  example = {"image": image, "label": 3, "extra": "x"}
  snapshot = image.copy()
  get_preprocess_fn("decode|random_crop(8)|flip_lr(1.0)|randaug(2, 10)|value_range|onehot(4)|keep('image', 'label')"
                    )(example, _rng())
  assert set(example) == {"image", "label", "extra"} and example["label"] == 3
  assert example["image"] is image
  np.testing.assert_array_equal(image, snapshot)


# decode

def test_decode_png_exact_and_jpeg_close():
  image = _image(9, 7)
  out = _apply("decode", {"image": _encode(image)})["image"]
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, image)
  smooth = np.repeat(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], 16, 0).repeat(3, 2)
  out = _apply("decode", {"image": _encode(smooth, "JPEG")})["image"]
  assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - smooth).mean() < 4


def test_decode_grayscale_rgba_palette():
  gray = _image(5, 6)[..., 0]
  out = _apply("decode", {"image": _encode(gray)})["image"]
  assert out.shape == (5, 6, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)
  rgba = np.concatenate([_image(5, 6), np.full((5, 6, 1), 9, np.uint8)], -1)
  np.testing.assert_array_equal(_apply("decode", {"image": _encode(rgba)})["image"], rgba[..., :3])
  pal = Image.fromarray(_image(5, 6)).convert("P")
  buf = io.BytesIO()
  pal.save(buf, format="PNG")
  np.testing.assert_array_equal(_apply("decode", {"image": buf.getvalue()})["image"], np.asarray(pal.convert("RGB")))


def test_decode_arrays_and_wrapped_bytes():
  gray = _image(4, 5)[..., 0]
  for arr in [gray, gray[..., None]]:
    np.testing.assert_array_equal(_apply("decode", {"image": arr})["image"], np.stack([gray] * 3, -1))
  rgba = np.concatenate([_image(4, 5), np.zeros((4, 5, 1), np.uint8)], -1)
  np.testing.assert_array_equal(_apply("decode", {"image": rgba})["image"], rgba[..., :3])
  wrapped = np.array([_encode(_image(4, 5))], dtype=object)
  np.testing.assert_array_equal(_apply("decode", {"image": wrapped})["image"], _image(4, 5))
  one = _apply("decode(channels=1)", {"image": _image(4, 5)})["image"]
  assert one.shape == (4, 5, 1)


def test_decode_errors():
  with pytest.raises(ValueError, match="cannot decode image in key 'image'"):
    _apply("decode", {"image": b"definitely not an image"})
  with pytest.raises(ValueError, match="float32"):
    _apply("decode", {"image": np.zeros((4, 4, 3), np.float32)})


# Resizes.

def test_resize_shape_dtype_and_nearest_reference():
  image = _image(6, 5)
  out = _apply("resize(4)", {"image": image})["image"]
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  out = _apply("resize((12, 10), method='nearest')", {"image": image})["image"]
  np.testing.assert_array_equal(out, image.repeat(2, 0).repeat(2, 1))
  const = np.full((7, 9, 3), 77, np.uint8)
  np.testing.assert_array_equal(_apply("resize((3, 4))", {"image": const})["image"], np.full((3, 4, 3), 77))


def test_resize_float_and_single_channel():
  image = np.full((6, 8, 3), 0.25, np.float32)
  out = _apply("resize(3)", {"image": image})["image"]
  assert out.shape == (3, 3, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 0.25, atol=1e-6)
  gray = _image(6, 5)[..., :1]
  out = _apply("resize((12, 10), method='nearest')", {"image": gray})["image"]
  np.testing.assert_array_equal(out, gray.repeat(2, 0).repeat(2, 1))


@pytest.mark.parametrize("hw, size, expected", [((40, 30), 15, (20, 15)), ((30, 40), 15, (15, 20)),
                                                ((10, 10), 4, (4, 4)), ((21, 50), 7, (7, 17))])
def test_resize_small_keeps_aspect(hw, size, expected):
  out = _apply(f"resize_small({size})", {"image": _image(*hw)})["image"]
  assert out.shape == (*expected, 3) and out.dtype == np.uint8


# Crops.

def test_central_crop_exact_pixels():
  image = _coords(5, 6)
  out = _apply("central_crop(2)", {"image": image})["image"]
  np.testing.assert_array_equal(out, image[1:3, 2:4])
  out = _apply("central_crop((3, 2))", {"image": image})["image"]
  np.testing.assert_array_equal(out, image[1:4, 2:4])
  with pytest.raises(ValueError, match="larger than the image"):
    _apply("central_crop(7)", {"image": image})


def test_random_crop_deterministic_in_bounds_and_covers_positions():
  image = _coords(4, 5)
  seen = set()
  for seed in range(60):
    out = _apply("random_crop((2, 3))", {"image": image}, seed)["image"]
    dy, dx = int(out[0, 0, 0]), int(out[0, 0, 1])
    assert 0 <= dy <= 2 and 0 <= dx <= 2
    np.testing.assert_array_equal(out, image[dy:dy + 2, dx:dx + 3])
    np.testing.assert_array_equal(out, _apply("random_crop((2, 3))", {"image": image}, seed)["image"])
    seen.add((dy, dx))
  assert len(seen) == 9


def test_inception_crop_size_determinism_and_box():
  image = _coords(40, 50)
  fn = get_preprocess_fn("inception_crop(8)")
  out = fn({"image": image}, _rng(1))["image"]
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, fn({"image": image}, _rng(1))["image"])
  sizes = set()
  for seed in range(20):
    crop = _apply("inception_crop(area_min=30, area_max=60)", {"image": image}, seed)["image"]
    h, w = crop.shape[:2]
    top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
    np.testing.assert_array_equal(crop, image[top:top + h, left:left + w])
    assert 0.28 <= h * w / 2000 <= 0.62 and 0.7 <= w / h <= 1.4
    sizes.add((h, w))
  assert len(sizes) > 5


def test_inception_crop_fallback_is_central():
  # A 10x100 strip cannot hold a crop of 100% area with aspect <= 4/3: fall back to a central crop.
  image = _coords(10, 100)
  crop = _apply("inception_crop(area_min=100, area_max=100)", {"image": image})["image"]
  np.testing.assert_array_equal(crop, image[:, 43:56])


# flip_lr, value_range

def test_flip_lr_exact_and_both_outcomes():
  image = _image(3, 4)
  outcomes = set()
  for seed in range(20):
    out = _apply("flip_lr", {"image": image}, seed)["image"]
    if np.array_equal(out, image):
      outcomes.add("same")
    else:
      np.testing.assert_array_equal(out, image[:, ::-1])
      outcomes.add("flipped")
  assert outcomes == {"same", "flipped"}
  np.testing.assert_array_equal(_apply("flip_lr(1.0)", {"image": image})["image"], image[:, ::-1])
  np.testing.assert_array_equal(_apply("flip_lr(0.0)", {"image": image})["image"], image)


def test_value_range_numbers():
  image = np.array([[[0, 51, 255]]], np.uint8)
  out = _apply("value_range(-1, 1)", {"image": image})["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[-1, 51 / 255 * 2 - 1, 1]]], rtol=1e-6)
  out = _apply("value_range(0, 10, in_min=51, in_max=102)", {"image": image})["image"]
  np.testing.assert_allclose(out, [[[-10, 0, 40]]], rtol=1e-6)
  out = _apply("value_range(0, 10, 51, 102, clip_values=True)", {"image": image})["image"]
  np.testing.assert_allclose(out, [[[0, 0, 10]]])


def test_value_range_is_the_float32_formula_bit_for_bit():
  # (x - in_min) / (in_max - in_min) * (vmax - vmin) + vmin, each step rounded to float32, for
  # every uint8 value and for float inputs: what a run trained before this op was rewritten saw.
  for args in [(-1, 1, 0, 255), (0, 10, 51, 102), (0.5, -3, 0, 1)]:
    vmin, vmax, in_min, in_max = (np.float32(a) for a in args)
    for image in [np.arange(256, dtype=np.uint8).reshape(1, 256, 1),
                  np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)]:
      want = vmin + ((image.astype(np.float32) - in_min) / (in_max - in_min)) * (vmax - vmin)
      out = _apply(f"value_range({args[0]}, {args[1]}, {args[2]}, {args[3]})", {"image": image})["image"]
      assert out.dtype == np.float32 and out.shape == image.shape
      np.testing.assert_array_equal(out.view(np.uint32), want.astype(np.float32).view(np.uint32))


# Label and dict ops.

def test_onehot_numbers_and_errors():
  out = _apply("onehot(4, key='label', key_result='labels')", {"label": np.int64(2)})
  np.testing.assert_array_equal(out["labels"], [0, 0, 1, 0])
  assert out["labels"].dtype == np.float32 and out["label"] == 2
  out = _apply("onehot(3, on=0.9, off=0.05)", {"label": 0})
  np.testing.assert_allclose(out["label"], [0.9, 0.05, 0.05])
  np.testing.assert_array_equal(_apply("onehot(5)", {"label": np.array([0, 3])})["label"], [1, 0, 0, 1, 0])
  for bad in [4, -1]:
    with pytest.raises(ValueError, match=f"label {bad} .*outside \\[0, 4\\)"):
      _apply("onehot(4)", {"label": bad})
  with pytest.raises(ValueError, match="int label"):
    _apply("onehot(4)", {"label": 1.5})


def test_keep_drop_copy_rename():
  example = {"a": 1, "b": 2, "c": 3}
  assert _apply("keep('a', 'c')", example) == {"a": 1, "c": 3}
  assert _apply("drop('a', 'c')", example) == {"b": 2}
  assert _apply("copy('a', 'z')", example) == {"a": 1, "b": 2, "c": 3, "z": 1}
  assert _apply("rename('a', 'z')", example) == {"b": 2, "c": 3, "z": 1}
  assert example == {"a": 1, "b": 2, "c": 3}
  for spec in ["keep('a', 'q')", "drop('q')", "copy('q', 'a')"]:
    with pytest.raises(KeyError, match="'q'"):
      _apply(spec, example)


# RandAugment.

def test_randaug_shape_dtype_determinism():
  image = _image(24, 20)
  fn = get_preprocess_fn("randaug(2, 10)")
  outs = [fn({"image": image}, _rng(s))["image"] for s in range(8)]
  for out in outs:
    assert out.shape == image.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(outs[0], fn({"image": image}, _rng(0))["image"])
  assert len({o.tobytes() for o in outs}) > 4


def test_randaug_magnitude_zero_geometric_is_identity():
  image = _image(16, 16)
  ops_ = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
  fn = get_preprocess_fn(f"randaug(3, 0, ops={ops_!r})")
  for seed in range(10):
    np.testing.assert_array_equal(fn({"image": image}, _rng(seed))["image"], image)


def test_randaug_rejects_bad_input():
  with pytest.raises(ValueError, match="magnitude"):
    get_preprocess_fn("randaug(2, 11)")
  with pytest.raises(ValueError, match="unknown ops"):
    get_preprocess_fn("randaug(2, 5, ops=('Blur',))")
  with pytest.raises(ValueError, match="uint8 HxWx3"):
    _apply("randaug", {"image": np.zeros((4, 4, 3), np.float32)})


def test_randaug_pixel_ops_against_numpy():
  image = _image(6, 7)
  np.testing.assert_array_equal(randaug.invert(image), 255 - image.astype(int))
  np.testing.assert_array_equal(randaug.posterize(image, 4), image & 0xF0)
  np.testing.assert_array_equal(randaug.solarize(image, 100), np.where(image < 100, image, 255 - image))
  np.testing.assert_array_equal(randaug.solarize_add(image, 50),
                                np.where(image < 128, np.minimum(image.astype(int) + 50, 255), image))
  ramp = np.array([[[10, 5, 9], [20, 5, 9], [30, 5, 9]]], np.uint8)
  np.testing.assert_array_equal(randaug.autocontrast(ramp), [[[0, 5, 9], [127, 5, 9], [255, 5, 9]]])
  np.testing.assert_array_equal(randaug.equalize(image), np.asarray(ImageOps.equalize(Image.fromarray(image))))
  np.testing.assert_allclose(randaug.brightness(image, 0.5), image * 0.5, atol=1)
  gray = np.full((4, 4, 3), 100, np.uint8)
  np.testing.assert_array_equal(randaug.contrast(gray, 1.9), gray)  # No contrast to amplify.


def test_randaug_geometric_ops_against_numpy():
  image = _image(8, 8)
  out = randaug.translate_x(image, 3)
  np.testing.assert_array_equal(out[:, :5], image[:, 3:])
  assert (out[:, 5:] == 128).all()
  out = randaug.translate_y(image, -2)
  np.testing.assert_array_equal(out[2:], image[:-2])
  assert (out[:2] == 128).all()
  np.testing.assert_array_equal(randaug.rotate(image, 90), np.rot90(image))
  out = randaug.shear_x(image, 1.0)  # Row y reads input columns x + y.
  for y in range(8):
    np.testing.assert_array_equal(out[y, :8 - y], image[y, y:])
    assert (out[y, 8 - y:] == 128).all()
  out = randaug.shear_y(image, -1.0)  # Column x reads input rows y - x.
  for x in range(8):
    np.testing.assert_array_equal(out[x:, x], image[:8 - x, x])
    assert (out[:x, x] == 128).all()
  out = randaug.cutout(image, 2, 0, 5)
  expected = image.copy()
  expected[0:2, 3:7] = 128
  np.testing.assert_array_equal(out, expected)


def test_randaug_magnitude_mapping():
  image = _image(10, 20)
  signs = set()
  for seed in range(12):
    out = randaug.apply_op(image, "TranslateX", 10, _rng(seed))  # 0.45 * 20 = 9 pixels.
    if np.array_equal(out, randaug.translate_x(image, 9)):
      signs.add(1)
    else:
      np.testing.assert_array_equal(out, randaug.translate_x(image, -9))
      signs.add(-1)
  assert signs == {1, -1}
  assert not randaug.apply_op(image, "Posterize", 0, _rng()).any()  # TF quirk: 0 bits kept.
  np.testing.assert_array_equal(randaug.apply_op(image, "Solarize", 10, _rng()), image)  # Threshold 256.
  np.testing.assert_array_equal(randaug.apply_op(image, "Posterize", 10, _rng()), image & 0xF0)


# Full chain.

def test_full_chain_on_synthetic_image():
  image = _image(12, 14)
  spec = ("decode|central_crop(8)|flip_lr(1.0)|value_range(0, 1)"
          "|onehot(4, key='label', key_result='labels')|keep('image', 'labels')")
  out = _apply(spec, {"image": _encode(image), "label": 3, "id": 7})
  assert set(out) == {"image", "labels"}
  np.testing.assert_allclose(out["image"], image[2:10, 3:11][:, ::-1] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(out["labels"], [0, 0, 0, 1])
  train = ("decode|inception_crop(16)|flip_lr|randaug(2, 10)|value_range(-1, 1)"
           "|onehot(10, key='label', key_result='labels')|keep('image', 'labels')")
  out = _apply(train, {"image": _encode(_image(40, 30)), "label": 9})
  assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
  assert out["image"].min() >= -1 and out["image"].max() <= 1


def test_bad_content_is_a_bad_example_for_the_pipeline_policy():
  """Out-of-range labels and empty captions raise BadExample, which config.input.bad_examples handles."""
  from big_vision_lite.data.errors import BadExample
  with pytest.raises(BadExample, match="outside"):
    ops.get_preprocess_fn("onehot(4)")({"label": np.int64(7)}, None)
  with pytest.raises(BadExample, match="empty caption"):
    ops.get_preprocess_fn("tokenize(8)")({"caption": b"  "}, None)


def _photo_jpeg(seed: int, h: int, w: int, mode: str = "RGB") -> bytes:
  """The input-pipeline benchmark's photo-like JPEG (quality 90)."""
  return input_pipeline.photo_jpeg(np.random.default_rng(seed), h, w, mode=mode)


@pytest.mark.parametrize("mode,size", [("RGB", (375, 500)), ("L", (300, 200)), ("RGB", (40, 30))])
def test_decode_then_inception_crop_is_fused_and_bitwise_equal(mode, size):
  data = _photo_jpeg(1, *size, mode)
  spec = "decode|inception_crop(224, area_min=8)|flip_lr"
  fused = ops.get_preprocess_fn(spec)
  assert [piece for piece, _ in fused._ops] == ["decode|inception_crop(224, area_min=8)", "flip_lr"]
  pair = [ops.build_op(p) for p in ops.split_spec(spec)]
  for seed in range(8):
    want = {"image": data}
    rng = np.random.default_rng(seed)
    for op in pair:
      want = op(want, rng)
    got = fused({"image": data}, np.random.default_rng(seed))["image"]
    assert got.dtype == np.uint8 and got.shape == (224, 224, 3)
    np.testing.assert_array_equal(got, want["image"])


def test_value_range_table_is_bitwise_the_arithmetic():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16)
  for args in [(-1, 1), (0, 1), (-2, 3, 10, 200, True)]:
    got = ops.get_preprocess_fn(f"value_range{args}")({"image": image})["image"]
    vmin, vmax, in_min, in_max, clip = (*args, 0, 255.0, False)[:5] if len(args) == 2 else args
    want = (image.astype(np.float32) - np.float32(in_min)) / np.float32(in_max - in_min)
    want = np.float32(vmin) + want * np.float32(vmax - vmin)
    if clip:
      want = np.clip(want, min(vmin, vmax), max(vmin, vmax))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_draft_decode_stays_close_to_the_full_decode():
  """DCT-scaled decoding (draft=True) changes pixels; bounded by PSNR against the full decode."""
  data = _photo_jpeg(2, 1200, 1600)
  full = ops.get_preprocess_fn("decode_jpeg_and_inception_crop(224, area_min=60)")
  draft = ops.get_preprocess_fn("decode_jpeg_and_inception_crop(224, area_min=60, draft=True)")
  psnrs = []
  for seed in range(6):
    a = full({"image": data}, np.random.default_rng(seed))["image"].astype(np.float64)
    b = draft({"image": data}, np.random.default_rng(seed))["image"].astype(np.float64)
    assert a.shape == b.shape == (224, 224, 3)
    psnrs.append(10 * np.log10(255 ** 2 / max(np.mean((a - b) ** 2), 1e-12)))
  # A crop of >= 60% of 1600x1200 is >= 2x the output, so every seed decodes at 1/2 or 1/4 and
  # differs; by less than JPEG at quality 90 differs from its source (about 40 dB).
  assert max(psnrs) < 100 and min(psnrs) > 40, psnrs
