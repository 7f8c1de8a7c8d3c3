"""NaFlex ViT (NaViT + FlexiViT: native aspect ratio, any sequence length), registered as
"naflex_vit".

The layout of big_vision's released `proj/image_text/naflex_vit.py` (SigLIP 2 NaFlex) and of
transformers' Siglip2VisionModel: the input is the padded patch sequence of ops_naflex
(patches (B, N, p*p*C), mask (B, N), spatial shape (B, 2) in patches); `embedding` is a dense
layer on flattened patches; `pos_embedding` is a learned (G, G, D) grid resized per image to its
(h, w) grid (bilinear, antialiased when shrinking); attention and the MAP head ignore padding.
Params otherwise named as models/vit.py's, so a square image whose grid equals the posemb grid
gives the standard ViT's numbers from the same (reshaped) weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import MODELS
from big_vision_lite.models.common import DenseGeneral, Encoder, MAPHead, part
from big_vision_lite.models.vit import merge_variant

__all__ = ["NaFlexViT", "naflex_vit", "resize_weights", "posemb_for_tokens"]

POOL_TYPES = ("map", "gap", "none")


def resize_weights(pos: jax.Array, out_size: jax.Array, in_size: int,
                   antialias: bool = True) -> jax.Array:
  """Bilinear resize weights (..., in_size) of output index `pos` of a resize to `out_size`.

  jax.image.resize's (scale_and_translate's) triangle kernel: output sample i sits at input
  coordinate (i + 0.5) * in/out - 0.5; when shrinking with `antialias`, the kernel is widened
  by in/out (torch's F.interpolate(antialias=True) has the same weights). `out_size` may be
  traced (one image's grid side), so one compiled step serves every aspect ratio.
  """
  out_size = jnp.maximum(jnp.asarray(out_size, jnp.float32), 1.0)
  inv_scale = in_size / out_size
  kernel_scale = jnp.maximum(inv_scale, 1.0) if antialias else 1.0
  sample = (jnp.asarray(pos, jnp.float32) + 0.5) * inv_scale - 0.5
  src = jnp.arange(in_size, dtype=jnp.float32)
  dist = jnp.abs(sample[..., None] - src) / jnp.asarray(kernel_scale)[..., None]
  weights = jnp.maximum(0.0, 1.0 - dist)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def posemb_for_tokens(posemb: jax.Array, shapes: jax.Array, num_tokens: int,
                      antialias: bool = True) -> jax.Array:
  """The (G, Gw, D) grid resized to each image's (h, w) grid, one row per token: (B, N, D).

  Token t of an image is patch (t // w, t % w), as ops_naflex lays them out; rows past h*w
  (padding) hold some in-range mix of the grid and are masked downstream.
  """
  gh, gw, d = posemb.shape
  h, w = shapes[:, 0:1], jnp.maximum(shapes[:, 1:2], 1)
  t = jnp.arange(num_tokens)[None, :]
  wy = resize_weights(t // w, h, gh, antialias)  # (B, N, G)
  wx = resize_weights(t % w, w, gw, antialias)
  outer = (wy[..., :, None] * wx[..., None, :]).reshape(*wy.shape[:2], gh * gw)
  return jnp.dot(outer, posemb.astype(jnp.float32).reshape(gh * gw, d))


class NaFlexViT(nn.Module):
  """`__call__((patches, mask, shapes), train)` -> (x, out) like models/vit.py's ViT."""
  num_classes: int | None = None
  patch_size: tuple[int, int] | None = None  # Checked against the patches' length if given.
  width: int = 768
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  posemb_grid: int = 16  # G: the stored grid (big_vision's nposemb; B/16 NaFlex: 16)
  rep_size: int | bool = False
  dropout: float = 0.0
  pool_type: str = "map"
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "none"
  dtype_mm: str = "float32"
  norm_eps: float = 1e-6

  def validate(self) -> None:
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"unknown NaFlexViT pool_type {self.pool_type!r} "
                       f"(valid: {', '.join(POOL_TYPES)})")
    if self.posemb_grid <= 0:
      raise ValueError(f"NaFlexViT posemb_grid must be positive, got {self.posemb_grid}")

  @nn.compact
  def __call__(self, image: Sequence[jax.Array], *, train: bool = False) -> tuple[jax.Array, dict]:
    self.validate()
    if not isinstance(image, (tuple, list)) or len(image) != 3:
      raise ValueError("NaFlexViT expects (patches (B, N, p*p*C), mask (B, N), shapes (B, 2)) "
                       "as naflex_patches writes them; got "
                       f"{getattr(image, 'shape', type(image).__name__)}")
    patches, mask, shapes = image
    if (patches.ndim != 3 or mask.shape != patches.shape[:2]
        or shapes.shape != (patches.shape[0], 2)):
      raise ValueError(f"NaFlexViT: patches {patches.shape}, mask {mask.shape} and shapes "
                       f"{shapes.shape} do not fit (B, N, p*p*C), (B, N), (B, 2)")
    if self.patch_size is not None:
      ph, pw = self.patch_size
      if patches.shape[-1] % (ph * pw):
        raise ValueError(f"NaFlexViT: patches of length {patches.shape[-1]} are not "
                         f"{ph}x{pw}xC patches")
    dtype_mm = jnp.dtype(self.dtype_mm)
    n, num, _ = patches.shape
    valid = jnp.asarray(mask) > 0
    out = {"mask": valid}

    x = out["stem"] = DenseGeneral(
        (self.width,), kernel_axes=(None, "embed"), bias_axes=("embed",), dtype_mm=dtype_mm,
        kernel_init=nn.initializers.lecun_normal(), name="embedding")(patches)
    g = self.posemb_grid
    posemb = self.param("pos_embedding",
                        part(nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                             (None, None, "embed")),
                        (g, g, self.width), jnp.float32)
    x = out["with_posemb"] = x + posemb_for_tokens(posemb, jnp.asarray(shapes), num)
    x = nn.Dropout(rate=self.dropout)(x, not train)

    x, out["encoder"] = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        scan=self.scan, remat_policy=self.remat_policy, dtype_mm=dtype_mm,
        norm_eps=self.norm_eps, name="Transformer")(
            x, deterministic=not train, mask=valid[:, None, None, :])
    out["encoded"] = x

    if self.pool_type == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype_mm=dtype_mm,
                  norm_eps=self.norm_eps)(x, mask=valid)
    elif self.pool_type == "gap":
      m = valid[..., None].astype(x.dtype)
      x = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    out["head_input"] = x

    if self.rep_size:
      rep_size = self.width if self.rep_size is True else self.rep_size
      x = nn.tanh(nn.Dense(rep_size, name="pre_logits",
                           kernel_init=part(nn.initializers.lecun_normal(), ("embed", None)),
                           bias_init=part(nn.initializers.zeros, (None,)))(x))
    out["pre_logits"] = x

    if self.num_classes:
      kinit = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = out["logits"] = nn.Dense(self.num_classes, name="head",
                                   kernel_init=part(kinit, ("embed", "classes")),
                                   bias_init=part(nn.initializers.zeros, ("classes",)))(x)
    return x, out


@MODELS.register("naflex_vit")
def naflex_vit(variant: str | None = None, **kwargs: Any) -> NaFlexViT:
  """Builds a NaFlex ViT from a variant like "B/16" or explicit sizes (as `vit`)."""
  cfg = merge_variant(variant, kwargs)
  if "patch_size" in cfg:
    p = cfg["patch_size"]
    cfg["patch_size"] = (p, p) if isinstance(p, int) else tuple(int(v) for v in p)
  return NaFlexViT(**cfg)
