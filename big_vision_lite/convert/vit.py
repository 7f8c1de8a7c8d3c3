"""What a converter must know about one ViT (ours or a tower of ours), read from its params.

Everything but the pooling of a plain `gap`/`none` model and the image size of a
sincos model is visible in the params; the caller supplies those from the run config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from big_vision_lite.convert import tables
from big_vision_lite.convert.tables import ConversionError

ENC = "Transformer/encoderblock"


@dataclasses.dataclass(frozen=True)
class VitSpec:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch: tuple[int, int]
  in_chans: int
  grid: tuple[int, int]  # patches per side of the image size being exported
  pool_type: str  # gap | tok | map | none
  posemb: str  # learn | sincos2d
  num_classes: int  # 0: no head
  rep_size: int  # 0: no pre_logits
  norm_eps: float = 1e-6

  @property
  def image_size(self) -> tuple[int, int]:
    return (self.grid[0] * self.patch[0], self.grid[1] * self.patch[1])

  def model_kwargs(self) -> dict[str, Any]:
    """Kwargs for our `vit(...)` builder that give exactly this model (fp32, unscanned)."""
    return dict(width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                patch_size=self.patch, pool_type=self.pool_type, posemb=self.posemb,
                num_classes=self.num_classes or None, rep_size=self.rep_size or False,
                norm_eps=self.norm_eps, dtype_mm="float32", scan=False)


def spec_from_params(flat: Mapping[str, np.ndarray], *, pool_type: str | None = None,
                     image_size: int | tuple[int, int] | None = None, norm_eps: float = 1e-6,
                     what: str = "params") -> VitSpec:
  """Reads a VitSpec from flat ViT params (scanned or not), relative to the ViT root.

  `pool_type` None guesses: MAPHead_0 -> map, cls -> tok, else gap. `image_size`
  None takes the learned posemb grid as square; a sincos model then needs it.
  """
  def get(k: str) -> np.ndarray:
    if k not in flat:
      raise ConversionError(f"{what}: no {k!r}; not a ViT (keys: {sorted(flat)[:8]} ...)")
    return np.asarray(flat[k])

  flat = tables.unscan(flat)
  kernel = get("embedding/kernel")
  ph, pw, cin, width = kernel.shape
  depth = tables.num_layers(flat)
  if depth == 0:
    raise ConversionError(f"{what}: no {ENC}_0 or scanned {ENC} params")
  q = get(f"{ENC}_0/MultiHeadDotProductAttention_0/query/kernel")
  mlp_dim = get(f"{ENC}_0/MlpBlock_0/Dense_0/kernel").shape[1]
  guess = "map" if "MAPHead_0/probe" in flat else "tok" if "cls" in flat else "gap"
  pool_type = pool_type or guess
  if (pool_type == "map") != (guess == "map") or (pool_type == "tok") != (guess == "tok"):
    raise ConversionError(f"{what}: pool_type {pool_type!r} does not match the params (they look like {guess!r})")
  posemb = "learn" if "pos_embedding" in flat else "sincos2d"
  if image_size is not None:
    ih, iw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if ih % ph or iw % pw:
      raise ConversionError(f"{what}: image size {(ih, iw)} is not a multiple of the patch {(ph, pw)}")
    grid = (ih // ph, iw // pw)
  elif posemb == "learn":
    n = get("pos_embedding").shape[1]
    side = math.isqrt(n)
    if side * side != n:
      raise ConversionError(f"{what}: pos_embedding has {n} tokens (not square): give the image size")
    grid = (side, side)
  else:
    raise ConversionError(f"{what}: sincos2d posemb has no size in the params: give --image_size")
  if posemb == "learn" and get("pos_embedding").shape[1] != grid[0] * grid[1]:
    raise ConversionError(f"{what}: pos_embedding has {get('pos_embedding').shape[1]} tokens, image size "
                          f"{grid[0] * ph}x{grid[1] * pw} needs {grid[0] * grid[1]}")
  num_classes = get("head/kernel").shape[1] if "head/kernel" in flat else 0
  rep_size = get("pre_logits/kernel").shape[1] if "pre_logits/kernel" in flat else 0
  return VitSpec(width=width, depth=depth, num_heads=q.shape[1], mlp_dim=mlp_dim, patch=(ph, pw),
                 in_chans=cin, grid=grid, pool_type=pool_type, posemb=posemb,
                 num_classes=num_classes, rep_size=rep_size, norm_eps=norm_eps)


def run_ours(flat: Mapping[str, np.ndarray], spec: VitSpec, images: np.ndarray,
             model: Any = None) -> np.ndarray:
  """Our model's output on NHWC `images` (the configured `model` if given, else a plain ViT)."""
  import jax
  from big_vision_lite.models import vit as vit_lib
  module = model if model is not None else vit_lib.vit(**spec.model_kwargs())
  params = tables.nest({k: tables.to_f32(v) for k, v in flat.items()})
  out, _ = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, images.astype(np.float32))
  return np.asarray(out, np.float32)


def fixed_images(spec: VitSpec, batch: int = 2, seed: int = 0) -> np.ndarray:
  """Fixed NHWC inputs in [-1, 1] for parity checks."""
  h, w = spec.image_size
  return np.random.default_rng(seed).uniform(-1, 1, (batch, h, w, spec.in_chans)).astype(np.float32)
