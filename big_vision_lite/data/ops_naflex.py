"""NaFlex preprocessing: resize within a patch budget keeping the aspect ratio, patchify, pad.

The op writes what big_vision's `resize_to_sequence|patchify` and transformers'
Siglip2ImageProcessor produce: `image` becomes the patch sequence (max_num_patches,
patch*patch*C) in (row, column, dy, dx, channel) order, padded with zeros; `image_mask` (N,)
int32 is 1 on the image's patches; `image_shape` (2,) int32 is its grid (h_patches, w_patches).
The tasks hand the three to the image model as one tuple when the batch has `image_mask`.
"""

from __future__ import annotations

import math

import numpy as np

from big_vision_lite.data.ops import OPS, Example, Op, get_key
from big_vision_lite.data.ops_image import _check_image, _method, resize_array


def size_for_max_num_patches(height: int, width: int, patch_size: int, max_num_patches: int,
                             eps: float = 1e-5) -> tuple[int, int]:
  """The (height, width) in pixels, multiples of `patch_size`, an image is resized to.

  The largest scale found by bisection on [eps/10, 100] whose patch grid (each side rounded up
  to whole patches, at least one) holds at most `max_num_patches` patches: big_vision's
  `_get_image_size_for_seq` and transformers' `get_image_size_for_max_num_patches`.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if patch_size <= 0 or max_num_patches <= 0:
    raise ValueError(f"patch_size and max_num_patches must be positive, got {patch_size}, "
                     f"{max_num_patches}")

  def side(scale: float, size: int) -> int:
    return max(patch_size, int(math.ceil(size * scale / patch_size) * patch_size))

  lo, hi = eps / 10, 100.0
  while hi - lo >= eps:
    mid = (lo + hi) / 2
    if (side(mid, height) // patch_size) * (side(mid, width) // patch_size) <= max_num_patches:
      lo = mid
    else:
      hi = mid
  return side(lo, height), side(lo, width)


def patchify(image: np.ndarray, patch_size: int, max_num_patches: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(H, W, C) with H, W multiples of the patch -> (patches (N, p*p*C), mask (N,), shape (2,)).

  Patches are in row-major grid order, each flattened as (dy, dx, channel); rows past the
  image's h*w patches are zeros with mask 0.
  """
  h, w, c = image.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image {h}x{w} is not a multiple of the patch {p}")
  gh, gw = h // p, w // p
  if gh * gw > max_num_patches:
    raise ValueError(f"image {h}x{w} has {gh * gw} patches of {p}, more than {max_num_patches}")
  grid = image.reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p * c)
  patches = np.zeros((max_num_patches, p * p * c), np.float32)
  patches[:gh * gw] = grid
  mask = np.zeros((max_num_patches,), np.int32)
  mask[:gh * gw] = 1
  return patches, mask, np.asarray([gh, gw], np.int32)


@OPS.register("naflex_patches")
def get_naflex_patches(patch_size: int, max_num_patches: int, method: str = "bilinear",
                       key: str = "image") -> Op:
  """Resizes `key` (H, W, C) to `size_for_max_num_patches` (PIL `method`, antialiased when
  shrinking) and replaces it by its padded patch sequence; writes `<key>_mask` and
  `<key>_shape` (module docstring). Put value_range before it: the padding stays zero."""
  name = "naflex_patches"
  if int(patch_size) <= 0 or int(max_num_patches) <= 0:
    raise ValueError(f"preprocessing op {name!r}: patch_size and max_num_patches must be "
                     f"positive, got {patch_size!r}, {max_num_patches!r}")
  resample = _method(method, name)

  def op(example: Example, rng=None) -> Example:
    image = np.asarray(get_key(example, key, name))
    _check_image(image, name)
    if image.ndim == 2:
      image = image[..., None]
    hw = size_for_max_num_patches(image.shape[0], image.shape[1], patch_size, max_num_patches)
    if hw != image.shape[:2]:
      image = resize_array(image, hw, resample)
    out = dict(example)
    out[key], out[f"{key}_mask"], out[f"{key}_shape"] = patchify(
        image.astype(np.float32), patch_size, max_num_patches)
    return out
  return op
