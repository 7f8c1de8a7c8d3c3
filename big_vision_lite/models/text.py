"""Text transformer encoder (big_vision's proj/image_text/text_transformer), registered as model "text".

Parameter names follow big_vision (`Embed_0`, `pos_embedding`, `Encoder_0`,
`MAPHead_0`, `head`), so the text towers of released SigLIP checkpoints load as is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import MODELS
from big_vision_lite.models.common import Encoder, MAPHead, part
from big_vision_lite.models.vit import VARIANTS, merge_variant

POOL_TYPES = ("last", "first", "mean", "map")


class TextTransformer(nn.Module):
  """Token ids (B, L) -> (B, num_classes or width) embedding, plus an out dict.

  No padding mask, as big_vision: with fixed-length padded inputs the encoder
  learns to ignore pad tokens. `pool_type="last"` takes position L-1.
  """
  num_classes: int | None = None  # None or 0: no head, output the pooled width.
  width: int = 512
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 8
  dropout: float = 0.0
  vocab_size: int = 32_000
  pool_type: str = "last"
  scan: bool = False
  remat_policy: str = "none"
  dtype_mm: str = "float32"
  norm_eps: float = 1e-6

  def validate(self) -> None:
    """Raises ValueError for an option value this model does not know (checked before any data)."""
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"unknown text pool_type {self.pool_type!r} (valid: {', '.join(POOL_TYPES)})")

  @nn.compact
  def __call__(self, text: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
    self.validate()
    if text.ndim != 2:
      raise ValueError(f"text model expects token ids shaped (B, L), got shape {text.shape}")
    out = {}
    dtype_mm = jnp.dtype(self.dtype_mm)
    embed = nn.Embed(num_embeddings=self.vocab_size, features=self.width, name="Embed_0",
                     embedding_init=part(nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    x = out["embedded"] = embed(text)
    _, l, d = x.shape
    pe = self.param("pos_embedding",
                    part(nn.initializers.normal(stddev=1 / np.sqrt(d)), (None, None, "embed")),
                    (1, l, d), jnp.float32)
    x = x + pe
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x, out["encoder"] = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        scan=self.scan, remat_policy=self.remat_policy, dtype_mm=dtype_mm, norm_eps=self.norm_eps,
        name="Encoder_0")(x, deterministic=not train)
    out["encoded"] = x

    if self.pool_type == "last":
      x = x[:, -1, :]
    elif self.pool_type == "first":
      x = x[:, 0, :]
    elif self.pool_type == "mean":
      x = jnp.mean(x, axis=1)
    else:
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype_mm=dtype_mm,
                  norm_eps=self.norm_eps, name="MAPHead_0")(x)
    out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = nn.Dense(
          self.num_classes, name="head",
          kernel_init=part(nn.initializers.lecun_normal(), ("embed", "classes")),
          bias_init=part(nn.initializers.zeros, ("classes",)))(x)
    return x, out


@MODELS.register("text")
def text(variant: str | None = None, **kwargs) -> TextTransformer:
  """Builds a text encoder; `variant` ("B", "So400m", ...) sets width/depth/mlp_dim/num_heads like ViT."""
  cfg = {}
  if variant is not None:
    name = variant.split("/")[0]
    if name not in VARIANTS:
      raise ValueError(f"unknown text variant {variant!r} (valid: {', '.join(VARIANTS)})")
    width, depth, mlp_dim, num_heads = VARIANTS[name]
    cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  return TextTransformer(**merge_variant(variant, kwargs, cfg))
