"""Vision Transformer (big_vision's ViT), registered as model "vit".

Parameter names follow big_vision exactly so its public checkpoints load as is.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import MODELS
from big_vision_lite.models.common import (
    Encoder, MAPHead, add_bias, part, posemb_sincos_2d)

__all__ = ["ViT", "PatchEmbed", "vit", "decode_variant", "merge_variant", "resample_posemb", "posemb_sincos_2d",
           "VARIANTS"]

# name -> (width, depth, mlp_dim, num_heads)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),  # big_vision's smallest, for tests and smoke runs
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

POOL_TYPES = ("gap", "tok", "map", "none")
POSEMB_TYPES = ("learn", "sincos2d")


def decode_variant(variant: str | None) -> dict[str, Any]:
  """"S/16" -> {width, depth, mlp_dim, num_heads, patch_size=(16, 16)}; "B" has no patch.

  The patch may also be given as "HxW" (e.g. "B/16x8").
  """
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r} (valid names: {', '.join(VARIANTS)}, "
                     "optionally followed by /patch, e.g. 'S/16')")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  out: dict[str, Any] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    try:
      sizes = tuple(int(p) for p in patch.split("x"))
    except ValueError:
      raise ValueError(f"bad patch size in ViT variant {variant!r}: {patch!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
      raise ValueError(f"bad patch size in ViT variant {variant!r}: {patch!r}")
    out["patch_size"] = sizes * 2 if len(sizes) == 1 else sizes
  return out


def _pair(p: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  if isinstance(p, int):
    return (p, p)
  p = tuple(int(v) for v in p)
  if len(p) != 2:
    raise ValueError(f"patch_size must be an int or a pair, got {p!r}")
  return p


class PatchEmbed(nn.Module):
  """The patchify stem: nn.Conv(width, patch, strides=patch, "VALID")'s params and math.

  Runs as reshape + one (N*h*w, ph*pw*C) x (ph*pw*C, width) matmul: XLA:CPU's
  strided conv and its kernel gradient are ~1.5x slower than the same matmul.
  Rows/columns past the last whole patch are dropped, as VALID padding does.
  """
  width: int
  patch: tuple[int, int]
  dtype_mm: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    n, ih, iw, c = image.shape
    ph, pw = self.patch
    h, w = ih // ph, iw // pw
    if h == 0 or w == 0:
      raise ValueError(f"image {ih}x{iw} is smaller than the patch {ph}x{pw}")
    if ih % ph or iw % pw:  # Traced once per shape: one line, not one per step.
      logging.getLogger("big_vision_lite").warning(
          "image %dx%d is not a multiple of the patch %dx%d: the last %d rows and %d columns are "
          "dropped", ih, iw, ph, pw, ih % ph, iw % pw)
    kernel = self.param("kernel", part(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                        (ph, pw, c, self.width), jnp.float32)
    bias = self.param("bias", part(nn.initializers.zeros, ("embed",)), (self.width,), jnp.float32)
    x = jnp.asarray(image, self.dtype_mm)[:, :h * ph, :w * pw]
    x = x.reshape(n, h, ph, w, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n * h * w, ph * pw * c)
    y = jnp.dot(x, kernel.reshape(ph * pw * c, self.width).astype(self.dtype_mm))
    return add_bias(y, bias.astype(self.dtype_mm)).reshape(n, h, w, self.width)


def resize_posemb(pe: jax.Array, grid: tuple[int, int], to: tuple[int, int]) -> jax.Array:
  """A (1, gh * gw, D) learned posemb resized to a (h, w) patch grid: (1, h * w, D), bilinear
  (antialiased when shrinking, `jax.image.resize`'s default), as DINO/SILC feed smaller crops."""
  d = pe.shape[-1]
  grid_pe = pe.reshape(grid[0], grid[1], d)
  return jax.image.resize(grid_pe, (to[0], to[1], d), "bilinear").reshape(1, to[0] * to[1], d)


class ViT(nn.Module):
  """ViT: patchify conv, posemb, transformer encoder, pooling, optional pre-logits and head."""
  num_classes: int | None = None  # None or 0: no head.
  patch_size: tuple[int, int] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: int | None = None  # Defaults to 4 * width.
  num_heads: int = 12
  posemb: str = "learn"  # "learn" | "sincos2d"
  # "learn" only: the learned grid's side (e.g. res // patch). Given, the param is that grid and
  # inputs with another patch grid (SigLIP 2's local crops) get it resized; None: sized by the
  # input at init, and only that grid works.
  posemb_grid: int | None = None
  rep_size: int | bool = False  # Pre-logits dense + tanh; True means `width`.
  dropout: float = 0.0
  pool_type: str = "gap"  # "gap" | "tok" | "map" | "none"
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "none"
  dtype_mm: str = "float32"
  norm_eps: float = 1e-6

  def validate(self) -> None:
    """Raises ValueError for an option value this model does not know (checked before any data)."""
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"unknown {type(self).__name__} pool_type {self.pool_type!r} (valid: {', '.join(POOL_TYPES)})")
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f"unknown {type(self).__name__} posemb {self.posemb!r} (valid: {', '.join(POSEMB_TYPES)})")

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False, patch_mask: jax.Array | None = None,
               mask_token: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """`patch_mask` (B, N) bool with `mask_token` (width,): masked patches' embeddings are replaced
    by the token before the posemb is added (iBOT / TIPS masked image modelling)."""
    self.validate()
    if image.ndim != 4:
      raise ValueError(f"{type(self).__name__} expects images shaped (B, H, W, C), got shape {image.shape}")
    out = {}
    dtype_mm = jnp.dtype(self.dtype_mm)
    patch = _pair(self.patch_size)

    x = out["stem"] = PatchEmbed(self.width, patch, dtype_mm=dtype_mm, name="embedding")(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    if patch_mask is not None:
      x = jnp.where(patch_mask[..., None], mask_token.astype(x.dtype), x)

    if self.posemb == "learn":
      gh, gw = (h, w) if self.posemb_grid is None else (self.posemb_grid, self.posemb_grid)
      pe = self.param("pos_embedding",
                      part(nn.initializers.normal(stddev=1 / np.sqrt(c)), (None, None, "embed")),
                      (1, gh * gw, c), jnp.float32)
      if (gh, gw) != (h, w):
        pe = resize_posemb(pe, (gh, gw), (h, w))
    else:
      pe = posemb_sincos_2d(h, w, c)
    # Adding the fp32 posemb promotes a bf16 stem output: the residual stream is fp32.
    x = out["with_posemb"] = x + pe

    if self.pool_type == "tok":
      cls = self.param("cls", part(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]).astype(x.dtype), x], axis=1)

    x = nn.Dropout(rate=self.dropout)(x, not train)
    x, extra = self.encode(x, train=train, dtype_mm=dtype_mm)
    out.update(extra)
    encoded = out["encoded"] = x

    if self.pool_type == "map":
      x = out["head_input"] = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                      dtype_mm=dtype_mm, norm_eps=self.norm_eps)(x)
    elif self.pool_type == "gap":
      x = out["head_input"] = jnp.mean(x, axis=1)
    elif self.pool_type == "tok":
      x = out["head_input"] = x[:, 0]
      encoded = encoded[:, 1:]
    # "none": keep every token; the head (if any) applies per token.

    x_2d = jnp.reshape(encoded, [n, h, w, -1])
    if self.rep_size:
      rep_size = self.width if self.rep_size is True else self.rep_size
      hid = nn.Dense(rep_size, name="pre_logits",
                     kernel_init=part(nn.initializers.lecun_normal(), ("embed", None)),
                     bias_init=part(nn.initializers.zeros, (None,)))
      x_2d = nn.tanh(hid(x_2d))
      x = nn.tanh(hid(x))
    out["pre_logits_2d"] = x_2d
    out["pre_logits"] = x

    if self.num_classes:
      kinit = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      head = nn.Dense(self.num_classes, name="head",
                      kernel_init=part(kinit, ("embed", "classes")),
                      bias_init=part(nn.initializers.zeros, ("classes",)))
      out["logits_2d"] = head(x_2d)
      x = out["logits"] = head(x)
    return x, out


  def encode(self, x: jax.Array, *, train: bool, dtype_mm: Any) -> tuple[jax.Array, dict]:
    """The transformer encoder ("Transformer"); subclasses (V-MoE) swap in their own."""
    x, encoder_out = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        scan=self.scan, remat_policy=self.remat_policy, dtype_mm=dtype_mm,
        norm_eps=self.norm_eps, name="Transformer")(x, deterministic=not train)
    return x, {"encoder": encoder_out}


class VariantClash(ValueError):
  """A model config gives a variant and an explicit size that disagrees with it."""


def merge_variant(variant: str | None, kwargs: dict[str, Any], dims: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
  """`kwargs` with the sizes `variant` sets; a size given both ways with another value is refused.

  `dims` are the variant's sizes where the caller decoded them itself (text, decoder).
  """
  dims = decode_variant(variant) if dims is None else dims
  for key, value in dims.items():
    given = kwargs.get(key)
    if given is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(value)):
      raise VariantClash(f"{variant!r} sets {key}={value} but {key}={given} is also given; "
                         "set the variant or the sizes, not both")
  return {**dims, **kwargs}


@MODELS.register("vit")
def vit(variant: str | None = None, **kwargs) -> ViT:
  """Builds a ViT from a variant like "B/16" or from explicit sizes (not conflicting ones)."""
  cfg = merge_variant(variant, kwargs)
  if "patch_size" in cfg:
    cfg["patch_size"] = _pair(cfg["patch_size"])
  return ViT(**cfg)


def resample_posemb(posemb: np.ndarray, new_num_tokens_hw: tuple[int, int],
                    old_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Bilinearly resamples a (1, h*w, D) posemb grid to (1, H*W, D).

  The old grid is taken as square unless `old_hw` says otherwise. Used to load a
  checkpoint at another resolution or patch size.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"resample_posemb expects shape (1, N, D), got {posemb.shape}")
  _, num, d = posemb.shape
  if old_hw is None:
    side = int(round(np.sqrt(num)))
    if side * side != num:
      raise ValueError(f"posemb has {num} tokens, not a square grid; pass old_hw")
    old_hw = (side, side)
  gh, gw = old_hw
  if gh * gw != num:
    raise ValueError(f"old_hw {old_hw} does not match the {num} posemb tokens")
  nh, nw = new_num_tokens_hw
  if (nh, nw) == (gh, gw):
    return posemb
  grid = posemb.reshape(gh, gw, d)
  # Plain bilinear without antialiasing, as big_vision's scipy zoom(order=1);
  # computed in fp32 then cast back.
  new = jax.image.resize(jnp.asarray(grid, jnp.float32), (nh, nw, d), method="bilinear",
                         antialias=False)
  return np.asarray(new, dtype=posemb.dtype).reshape(1, nh * nw, d)
