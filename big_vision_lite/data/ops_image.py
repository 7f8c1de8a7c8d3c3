"""Image preprocessing ops (decode, resizes, crops, flips, value range) on numpy arrays with PIL.

Names and semantics follow big_vision's `pp/ops_image.py`; images are HxWxC uint8 until `value_range`.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from big_vision_lite.data.errors import BadExample
from big_vision_lite.data.ops import OPS, Op, get_key, image_op, need_rng

_METHODS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "lanczos3": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


def _method(method: str, op: str) -> Image.Resampling:
  if method not in _METHODS:
    raise ValueError(f"preprocessing op {op!r}: unknown resize method {method!r} (known: {', '.join(_METHODS)})")
  return _METHODS[method]


def _hw(size: int | Sequence[int], op: str) -> tuple[int, int]:
  """An int means a square; a pair is (height, width)."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
    raise ValueError(f"preprocessing op {op!r}: size must be a positive int or (height, width), got {size!r}")
  return hw


def _check_image(image: np.ndarray, op: str) -> None:
  if image.ndim not in (2, 3):
    raise ValueError(f"preprocessing op {op!r} expects an HxW or HxWxC image, got shape {image.shape}")


def resize_array(image: np.ndarray, hw: tuple[int, int], method: Image.Resampling) -> np.ndarray:
  """PIL resize keeping dtype. PIL's bilinear/bicubic antialias when shrinking, unlike TF's default."""
  h, w = hw
  if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), method))
  # Other layouts and float images: resize channel by channel ("L" for uint8, "F" for the rest).
  planes = image[..., None] if image.ndim == 2 else image
  as_uint8 = image.dtype == np.uint8
  out = []
  for c in range(planes.shape[2]):
    plane = np.ascontiguousarray(planes[..., c] if as_uint8 else planes[..., c].astype(np.float32))
    out.append(np.asarray(Image.fromarray(plane).resize((w, h), method)))
  result = np.stack(out, axis=-1).astype(image.dtype, copy=False)
  return result[..., 0] if image.ndim == 2 else result


# Default pixel budget per decoded image: PIL's MAX_IMAGE_PIXELS (about 89 megapixels).
MAX_PIXELS = 89_478_485


def _open_within_budget(value: Any, key: str, max_pixels: int) -> Image.Image:
  """The lazily opened image (header read, no pixel decoded); over the budget is a bad example."""
  try:
    img = Image.open(io.BytesIO(bytes(value)))
  except Exception as e:
    why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # no addresses in messages
    raise BadExample(f"cannot decode image in key {key!r} ({len(value)} bytes): {why}") from None
  if img.width * img.height > max_pixels:
    raise BadExample(f"decode: image in key {key!r} ({len(value)} bytes): {img.width}x{img.height} = "
                     f"{img.width * img.height} pixels is over the pixel budget of {max_pixels} "
                     f"(decode(max_pixels=...))")
  return img


def _load_rgb(img: Image.Image, value: Any, key: str, channels: int = 3) -> Image.Image:
  """Decodes an opened image to RGB (or L): grayscale, palette, alpha, CMYK, 16-bit all convert."""
  try:
    with img:
      return img.convert("RGB" if channels == 3 else "L")  # alpha is dropped
  except Exception as e:
    why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    raise BadExample(f"cannot decode image in key {key!r} ({len(value)} bytes): {why}") from None


def decode_image(value: Any, channels: int = 3, key: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Encoded bytes (PNG, JPEG, ...) or an array -> uint8 HxWxC with C = `channels` (1 or 3).

  An image of more than `max_pixels` pixels is a bad example, judged from its header
  before any pixel is decoded (a small file can claim a huge size).
  """
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.size == 1:
    value = value.reshape(()).item()  # Bytes wrapped in a 0-d / 1-element array by some sources.
  if isinstance(value, (bytes, bytearray, memoryview)):
    img = _load_rgb(_open_within_budget(value, key, max_pixels), value, key, channels)
    image = np.asarray(img)
  else:
    image = np.asarray(value)
    if image.dtype != np.uint8:
      raise BadExample(f"decode: key {key!r} holds a {image.dtype} array; expected encoded bytes or uint8")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise BadExample(f"decode: key {key!r} has shape {image.shape}; expected HxW or HxWx{{1,3,4}}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise BadExample(f"decode: key {key!r} holds a zero-size image (shape {image.shape})")
  if image.shape[0] * image.shape[1] > max_pixels:
    raise BadExample(f"decode: key {key!r} holds {image.shape[0] * image.shape[1]} pixels, over the "
                     f"pixel budget of {max_pixels} (decode(max_pixels=...))")
  if image.shape[2] == 4:
    image = image[..., :3]  # Drop alpha rather than composite, like tf.io.decode_image(channels=3).
  if channels == 3 and image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  elif channels == 1 and image.shape[2] == 3:
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("L"))[..., None]
  return np.ascontiguousarray(image)


@OPS.register("decode")
def get_decode(channels: int = 3, key: str = "image", max_pixels: int = MAX_PIXELS) -> Op:
  """Decodes encoded image bytes (or normalizes an array) to uint8 HxWx`channels`, within `max_pixels`."""
  if channels not in (1, 3):
    raise ValueError(f"preprocessing op 'decode': channels must be 1 or 3, got {channels!r}")
  if not isinstance(max_pixels, int) or max_pixels <= 0:
    raise ValueError(f"preprocessing op 'decode': max_pixels must be a positive int, got {max_pixels!r}")
  def op(example, rng=None):
    # Not `image_op`: np.asarray on bytes would strip trailing NUL bytes from the encoding.
    out = dict(example)
    out[key] = decode_image(get_key(example, key, "decode"), channels, key, max_pixels)
    return out
  return op


@OPS.register("resize")
def get_resize(size: int | Sequence[int], method: str = "bilinear", key: str = "image") -> Op:
  """Resizes to `size` (int for a square or (height, width)), ignoring the aspect ratio."""
  hw, resample = _hw(size, "resize"), _method(method, "resize")

  def fn(image, rng):
    _check_image(image, "resize")
    return resize_array(image, hw, resample)
  return image_op("resize", key, fn)


def small_side_hw(h: int, w: int, size: int) -> tuple[int, int]:
  """(h, w) scaled so the shorter side is `size`; rounding as in big_vision's resize_small."""
  ratio = size / min(h, w)
  return max(1, round(h * ratio)), max(1, round(w * ratio))


@OPS.register("resize_small")
def get_resize_small(size: int, method: str = "bilinear", key: str = "image") -> Op:
  """Resizes so the shorter side is `size`, keeping the aspect ratio."""
  _hw(size, "resize_small")
  resample = _method(method, "resize_small")

  def fn(image, rng):
    _check_image(image, "resize_small")
    return resize_array(image, small_side_hw(image.shape[0], image.shape[1], size), resample)
  return image_op("resize_small", key, fn)


def _crop_fits(image: np.ndarray, hw: tuple[int, int], op: str) -> None:
  _check_image(image, op)
  if image.shape[0] < hw[0] or image.shape[1] < hw[1]:
    raise ValueError(f"preprocessing op {op!r}: crop {hw} is larger than the image {image.shape[:2]}")


@OPS.register("central_crop")
def get_central_crop(size: int | Sequence[int], key: str = "image") -> Op:
  """Crops the centre `size` window; odd margins leave the extra pixel at the bottom/right."""
  hw = _hw(size, "central_crop")

  def fn(image, rng):
    _crop_fits(image, hw, "central_crop")
    dy, dx = (image.shape[0] - hw[0]) // 2, (image.shape[1] - hw[1]) // 2
    return image[dy:dy + hw[0], dx:dx + hw[1]].copy()
  return image_op("central_crop", key, fn)


@OPS.register("random_crop")
def get_random_crop(size: int | Sequence[int], key: str = "image") -> Op:
  """Crops a `size` window at a uniformly random position."""
  hw = _hw(size, "random_crop")

  def fn(image, rng):
    rng = need_rng(rng, "random_crop")
    _crop_fits(image, hw, "random_crop")
    dy = int(rng.integers(0, image.shape[0] - hw[0] + 1))
    dx = int(rng.integers(0, image.shape[1] - hw[1] + 1))
    return image[dy:dy + hw[0], dx:dx + hw[1]].copy()
  return image_op("random_crop", key, fn)


def inception_crop_box(h: int, w: int, rng: np.random.Generator, area_min: float, area_max: float,
                       attempts: int = 10) -> tuple[int, int, int, int]:
  """(top, left, height, width) of an Inception-style crop: area in [min, max]% and aspect in [3/4, 4/3]."""
  log_ratio = (math.log(3 / 4), math.log(4 / 3))
  for _ in range(attempts):
    area = h * w * rng.uniform(area_min, area_max) / 100
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  # Fallback: the largest central crop whose aspect is within range.
  if w / h < 3 / 4:
    cw, ch = w, min(h, round(w / (3 / 4)))
  elif w / h > 4 / 3:
    cw, ch = min(w, round(h * 4 / 3)), h
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


@OPS.register("inception_crop")
def get_inception_crop(size: int | Sequence[int] | None = None, area_min: float = 5, area_max: float = 100,
                       resize_method: str = "bilinear", key: str = "image") -> Op:
  """Random crop of `area_min`..`area_max` percent of the image (log-uniform aspect 3/4..4/3),
  up to 10 attempts then a central crop; resized to `size` when given."""
  hw = None if size is None else _hw(size, "inception_crop")
  resample = _method(resize_method, "inception_crop")
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"preprocessing op 'inception_crop': need 0 < area_min <= area_max <= 100, "
                     f"got {area_min}, {area_max}")

  def fn(image, rng):
    rng = need_rng(rng, "inception_crop")
    _check_image(image, "inception_crop")
    top, left, ch, cw = inception_crop_box(image.shape[0], image.shape[1], rng, area_min, area_max)
    crop = image[top:top + ch, left:left + cw]
    return resize_array(crop, hw, resample) if hw else crop.copy()
  return image_op("inception_crop", key, fn)


# DCT scalings libjpeg can decode at (Pillow's Image.draft): 1/1, 1/2, 1/4, 1/8.
_DRAFT_SCALES = (8, 4, 2)


def _draft_scale(crop_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
  """The largest DCT downscale that keeps the crop at least as large as the output."""
  for scale in _DRAFT_SCALES:
    if crop_hw[0] >= scale * out_hw[0] and crop_hw[1] >= scale * out_hw[1]:
      return scale
  return 1


def decode_and_inception_crop(value: Any, rng: np.random.Generator, hw: tuple[int, int] | None,
                              area_min: float, area_max: float, method: Image.Resampling,
                              key: str = "image", max_pixels: int = MAX_PIXELS,
                              draft: bool = False) -> np.ndarray:
  """`decode|inception_crop(...)` in one pass of Pillow, bitwise equal to the two ops.

  The crop box is drawn from the JPEG header's size before any pixel is decoded, then the
  image is decoded, cropped and resized inside Pillow: no full-size numpy copies. With
  `draft`, a JPEG whose crop is at least 2x (4x, 8x) the output on both sides is decoded
  at 1/2 (1/4, 1/8) scale by libjpeg's DCT scaling, then resized from the scaled box:
  less to decode and resize, pixel values close to (not equal to) the full decode.
  """
  if not isinstance(value, (bytes, bytearray, memoryview)):  # arrays: the ops one by one
    image = decode_image(value, 3, key, max_pixels)
    top, left, ch, cw = inception_crop_box(image.shape[0], image.shape[1], rng, area_min, area_max)
    crop = image[top:top + ch, left:left + cw]
    return resize_array(crop, hw, method) if hw else crop.copy()
  img = _open_within_budget(value, key, max_pixels)
  width, height = img.size
  top, left, ch, cw = inception_crop_box(height, width, rng, area_min, area_max)
  scale = _draft_scale((ch, cw), hw) if draft and hw and img.format == "JPEG" else 1
  if scale > 1:
    img.draft("RGB", (-(-width // scale), -(-height // scale)))
  rgb = _load_rgb(img, value, key)
  if rgb.size != (width, height):  # decoded at a DCT scale: the same box in its coordinates
    sx, sy = rgb.size[0] / width, rgb.size[1] / height
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    return np.asarray(rgb.resize((hw[1], hw[0]), method, box=box))
  crop = rgb.crop((left, top, left + cw, top + ch))
  if hw:
    crop = crop.resize((hw[1], hw[0]), method)
  return np.asarray(crop)


@OPS.register("decode_jpeg_and_inception_crop")
def get_decode_jpeg_and_inception_crop(size: int | Sequence[int] | None = None, area_min: float = 5,
                                       area_max: float = 100, resize_method: str = "bilinear",
                                       key: str = "image", max_pixels: int = MAX_PIXELS,
                                       draft: bool = False) -> Op:
  """`decode|inception_crop(size, area_min, area_max, resize_method)` fused, as in big_vision;
  bitwise equal to the two ops. `draft=True` decodes a JPEG at a reduced DCT scale when
  the crop stays at least as large as `size` (faster; pixel values change slightly)."""
  hw = None if size is None else _hw(size, "decode_jpeg_and_inception_crop")
  resample = _method(resize_method, "decode_jpeg_and_inception_crop")
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"preprocessing op 'decode_jpeg_and_inception_crop': need 0 < area_min <= "
                     f"area_max <= 100, got {area_min}, {area_max}")
  if draft and hw is None:
    raise ValueError("preprocessing op 'decode_jpeg_and_inception_crop': draft=True needs a size")

  def op(example, rng=None):
    rng = need_rng(rng, "decode_jpeg_and_inception_crop")
    out = dict(example)
    out[key] = decode_and_inception_crop(get_key(example, key, "decode_jpeg_and_inception_crop"),
                                         rng, hw, area_min, area_max, resample, key, max_pixels,
                                         draft)
    return out
  return op


@OPS.register("flip_lr")
def get_flip_lr(p: float = 0.5, key: str = "image") -> Op:
  """Mirrors left-right with probability `p` (always draws one number so the rng stream is fixed)."""
  def fn(image, rng):
    rng = need_rng(rng, "flip_lr")
    _check_image(image, "flip_lr")
    flip = rng.random() < p
    return np.ascontiguousarray(image[:, ::-1]) if flip else image
  return image_op("flip_lr", key, fn)


@OPS.register("value_range")
def get_value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255.0,
                    clip_values: bool = False, key: str = "image") -> Op:
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32, optionally clipping."""
  if in_max == in_min:
    raise ValueError(f"preprocessing op 'value_range': in_min and in_max are both {in_min}")

  lo, hi = np.float32(min(vmin, vmax)), np.float32(max(vmin, vmax))

  def fn(image, rng):
    # (x - in_min) / (in_max - in_min) * (vmax - vmin) + vmin in float32, each step in place on
    # one new array: 4 vector passes, no temporaries (a 256-entry table gather is ~4x slower).
    out = image.astype(np.float32)
    out -= np.float32(in_min)
    out /= np.float32(in_max - in_min)
    out *= np.float32(vmax - vmin)
    out += np.float32(vmin)
    if clip_values:
      np.clip(out, lo, hi, out=out)
    return out
  return image_op("value_range", key, fn)
