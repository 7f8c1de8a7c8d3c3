"""RandAugment (Cubuk et al. 2019) on uint8 images with numpy and PIL, as big_vision's TF autoaugment does it.

Each of `num_layers` layers applies one op drawn uniformly from the list below at the fixed `magnitude`
(0..10), mapped to op arguments exactly as TF's `autoaugment.py` does, including its quirks: Posterize
keeps int(m/10*4) bits (so magnitude 0 is black), Solarize's threshold is int(m/10*256) (so magnitude 10
changes nothing). Deviations: translations and cutout scale with the image (TF uses a fixed 100 and 40
pixels meant for 224px images), and Contrast blends toward the true mean grey (PIL) where TF used a buggy
mean. Rotate, shear and translate use nearest-neighbour sampling and fill with grey 128, like TF.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from big_vision_lite.data.ops import OPS, Op, image_op, need_rng

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
TRANSLATE_FRACTION = 0.45  # ~100 px at 224 px, TF's translate_const.
CUTOUT_FRACTION = 40 / 224  # TF's cutout_const for 224 px images.

RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
               "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout",
               "SolarizeAdd")


# The image functions, each uint8 HxWx3 -> uint8 HxWx3, without touching the input.

def autocontrast(image: np.ndarray) -> np.ndarray:
  """Stretches each channel to [0, 255]; constant channels are left alone."""
  out = image.copy()
  for c in range(image.shape[2]):
    lo, hi = float(image[..., c].min()), float(image[..., c].max())
    if hi > lo:
      scale = 255.0 / (hi - lo)
      out[..., c] = np.clip(image[..., c].astype(np.float32) * scale - lo * scale, 0, 255).astype(np.uint8)
  return out


def equalize(image: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalization with TF's (and PIL's) lookup table."""
  out = image.copy()
  for c in range(image.shape[2]):
    histo = np.bincount(image[..., c].ravel(), minlength=256)
    nonzero = histo[histo != 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      continue
    lut = (np.cumsum(histo) + step // 2) // step
    lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)
    out[..., c] = lut[image[..., c]]
  return out


def invert(image: np.ndarray) -> np.ndarray:
  return 255 - image


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  shift = 8 - bits
  return ((image.astype(np.int32) >> shift) << shift).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int = 128) -> np.ndarray:
  return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def solarize_add(image: np.ndarray, addition: int = 0, threshold: int = 128) -> np.ndarray:
  added = np.clip(image.astype(np.int32) + addition, 0, 255).astype(np.uint8)
  return np.where(image < threshold, added, image)


def _enhance(enhancer: type) -> Callable[[np.ndarray, float], np.ndarray]:
  def fn(image: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(enhancer(Image.fromarray(np.ascontiguousarray(image))).enhance(factor))
  return fn


color = _enhance(ImageEnhance.Color)
contrast = _enhance(ImageEnhance.Contrast)
brightness = _enhance(ImageEnhance.Brightness)
sharpness = _enhance(ImageEnhance.Sharpness)


def _affine(image: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
  """Output pixel (x, y) takes input (a*x + b*y + c, d*x + e*y + f), as TF's `transform`."""
  a, b, c, d, e, f = coeffs
  # TF maps integer pixel indices; PIL maps pixel centres (x + 0.5) and floors. Shift so both agree.
  pil_coeffs = (a, b, c + 0.5 * (1 - a - b), d, e, f + 0.5 * (1 - d - e))
  img = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(img.transform(img.size, Image.Transform.AFFINE, pil_coeffs, Image.Resampling.NEAREST,
                                  fillcolor=FILL))


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """Counter-clockwise about the centre."""
  img = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(img.rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=FILL))


def shear_x(image: np.ndarray, level: float) -> np.ndarray:
  return _affine(image, (1, level, 0, 0, 1, 0))


def shear_y(image: np.ndarray, level: float) -> np.ndarray:
  return _affine(image, (1, 0, 0, level, 1, 0))


def translate_x(image: np.ndarray, pixels: float) -> np.ndarray:
  """Content moves left by `pixels` (TF's `translate(image, [-pixels, 0])`)."""
  return _affine(image, (1, 0, pixels, 0, 1, 0))


def translate_y(image: np.ndarray, pixels: float) -> np.ndarray:
  """Content moves up by `pixels`."""
  return _affine(image, (1, 0, 0, 0, 1, pixels))


def cutout(image: np.ndarray, pad: int, cy: int, cx: int) -> np.ndarray:
  """Greys the square [cy - pad, cy + pad) x [cx - pad, cx + pad), clipped to the image."""
  out = image.copy()
  out[max(0, cy - pad):cy + pad, max(0, cx - pad):cx + pad] = FILL[0]
  return out


def _signed(value: float, rng: np.random.Generator) -> float:
  return value if rng.random() < 0.5 else -value


def apply_op(image: np.ndarray, name: str, magnitude: float, rng: np.random.Generator) -> np.ndarray:
  """Applies RandAugment op `name` at `magnitude` (0..10), drawing signs / positions from `rng`."""
  level = magnitude / MAX_LEVEL
  h, w = image.shape[:2]
  enhance_factor = level * 1.8 + 0.1
  if name == "AutoContrast":
    return autocontrast(image)
  if name == "Equalize":
    return equalize(image)
  if name == "Invert":
    return invert(image)
  if name == "Rotate":
    return rotate(image, _signed(level * 30.0, rng))
  if name == "Posterize":
    return posterize(image, int(level * 4))
  if name == "Solarize":
    return solarize(image, int(level * 256))
  if name == "SolarizeAdd":
    return solarize_add(image, int(level * 110))
  if name == "Color":
    return color(image, enhance_factor)
  if name == "Contrast":
    return contrast(image, enhance_factor)
  if name == "Brightness":
    return brightness(image, enhance_factor)
  if name == "Sharpness":
    return sharpness(image, enhance_factor)
  if name == "ShearX":
    return shear_x(image, _signed(level * 0.3, rng))
  if name == "ShearY":
    return shear_y(image, _signed(level * 0.3, rng))
  if name == "TranslateX":
    return translate_x(image, _signed(level * TRANSLATE_FRACTION * w, rng))
  if name == "TranslateY":
    return translate_y(image, _signed(level * TRANSLATE_FRACTION * h, rng))
  if name == "Cutout":
    pad = int(level * CUTOUT_FRACTION * min(h, w))
    return cutout(image, pad, int(rng.integers(0, h)), int(rng.integers(0, w)))
  raise KeyError(f"unknown RandAugment op {name!r} (known: {', '.join(RANDAUG_OPS)})")


def randaugment(image: np.ndarray, num_layers: int, magnitude: float, rng: np.random.Generator,
                ops: Sequence[str] = RANDAUG_OPS) -> np.ndarray:
  """`num_layers` times: apply one op drawn uniformly from `ops` at `magnitude`."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"randaug expects a uint8 HxWx3 image (put it before value_range), "
                     f"got {image.dtype} {image.shape}")
  for _ in range(num_layers):
    image = apply_op(image, ops[int(rng.integers(0, len(ops)))], magnitude, rng)
  return image


@OPS.register("randaug")
def get_randaug(num_layers: int = 2, magnitude: float = 10, ops: Sequence[str] | None = None,
                key: str = "image") -> Op:
  """RandAugment with `num_layers` ops per image at `magnitude` in [0, 10]; `ops` restricts the op list."""
  if not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(f"preprocessing op 'randaug': num_layers must be an int >= 0, got {num_layers!r}")
  if not 0 <= magnitude <= MAX_LEVEL:
    raise ValueError(f"preprocessing op 'randaug': magnitude must be in [0, 10], got {magnitude!r}")
  ops = tuple(RANDAUG_OPS if ops is None else ((ops,) if isinstance(ops, str) else ops))
  unknown = [o for o in ops if o not in RANDAUG_OPS]
  if unknown or not ops:
    raise ValueError(f"preprocessing op 'randaug': unknown ops {unknown} (known: {', '.join(RANDAUG_OPS)})")

  def fn(image, rng):
    return randaugment(image, num_layers, magnitude, need_rng(rng, "randaug"), ops)
  return image_op("randaug", key, fn)
