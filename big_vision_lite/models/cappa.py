"""CapPa (Image Captioners Are Scalable Vision Learners Too): ViT encoder + cross-attention
text decoder, registered as model "cappa".

Params: `img` (a plain ViT: export or load it as any ViT), `decoder` (models/decoder.py).
Every captioning model (this and OpenVision 2) has the same methods, used by
tasks/captioning.py: `encode`, `decode_text`, `init_cache`, `prefill`, `step`, `extend`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import MODELS
from big_vision_lite.models import decoder as dec_lib
from big_vision_lite.models import vit as vit_lib


def vit_kwargs(image: Any) -> dict[str, Any]:
  """The image ViT's kwargs (variant decoded); no head: the encoder's tokens are the output."""
  kw = dict(image or {})
  variant = kw.pop("variant", None)
  kw = vit_lib.merge_variant(variant, kw)
  kw.setdefault("num_classes", 0)
  return kw


def decoder_kwargs(decoder: Any, image_width: int, vocab_size: int, max_len: int) -> dict[str, Any]:
  """Decoder kwargs with big_vision's defaults: width/heads/mlp as the encoder, 6 layers."""
  kw = dict(decoder or {})
  if "variant" in kw:
    name = kw.pop("variant")
    if name not in vit_lib.VARIANTS:
      raise ValueError(f"unknown decoder variant {name!r} (valid: {', '.join(vit_lib.VARIANTS)})")
    w, d, m, h = vit_lib.VARIANTS[name]
    # The recipes give depth with the variant (a 6-layer decoder of B's width): only the widths clash.
    kw = vit_lib.merge_variant(name, kw, {"width": w, "mlp_dim": m, "num_heads": h})
    kw.setdefault("depth", d)
  kw.setdefault("width", image_width)
  kw.setdefault("depth", 6)
  kw.setdefault("num_heads", max(1, kw["width"] // 64))
  return dict(vocab_size=vocab_size, max_len=max_len, **kw)


class Captioner(nn.Module):
  """What CapPa and OpenVision 2 share: an image ViT (`img`) whose tokens condition a text
  decoder (`decoder_module`). Subclasses define `setup`, `decode_text`, `init_cache`,
  `prefill` and `extend`."""
  image: Any = None     # ViT kwargs (may hold variant="B/16")
  decoder: Any = None   # decoder kwargs: width, depth, mlp_dim, num_heads, dropout, dtype_mm
  vocab_size: int = 32_000
  max_len: int = 64

  def submodels(self) -> dict[str, tuple[Any, dict[str, Any]]]:
    """field -> (factory, kwargs) of the image encoder and the decoder, for config checks."""
    return {"image": (vit_lib.vit, vit_kwargs(self.image)), "decoder": (dec_lib.Decoder, self._dec_kw())}

  def _dec_kw(self) -> dict[str, Any]:
    return decoder_kwargs(self.decoder, vit_kwargs(self.image).get("width", 768),
                          self.vocab_size, self.max_len)

  def _empty_cache(self, batch_size: int, length: int) -> dict:
    kw = self._dec_kw()
    return dec_lib.init_cache(batch_size, length, width=kw["width"], depth=kw["depth"],
                              num_heads=kw["num_heads"], dtype_mm=kw.get("dtype_mm", "float32"))

  def encode(self, image: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(all image tokens (B, N, D) after the encoder norm, pooled features (B, D))."""
    _, out = self.img(image, train=train)
    tokens = out["encoded"]
    return tokens, out.get("head_input", jnp.mean(tokens, axis=1))

  def __call__(self, image, text, *, parallel=None, train: bool = False):
    tokens, features = self.encode(image, train=train)
    logits = self.decode_text(tokens, text, parallel=parallel, train=train)
    return logits, {"features": features, "image_tokens": tokens}

  def step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """tokens (B, 1): the previous output -> logits (B, V) of the next one."""
    logits, cache = self.extend(tokens, cache)
    return logits[:, -1], cache


class CapPa(Captioner):
  """`__call__(image, text, *, parallel=None, train=False) -> (logits (B, L, V), out)`.

  `text` are target tokens (B, L); the decoder sees them shifted right (pad id 0 as
  BOS). `parallel` (B,) bool selects parallel prediction ([MASK] inputs, full mask).
  """

  def setup(self):
    self.img = vit_lib.vit(**vit_kwargs(self.image))
    self.decoder_module = dec_lib.Decoder(cross=True, mask_token=True, name="decoder",
                                          **self._dec_kw())

  def decode_text(self, image_tokens: jax.Array, text: jax.Array, *, parallel=None,
                  train: bool = False) -> jax.Array:
    """Teacher-forced logits (B, L, V) for target tokens `text`."""
    logits, _ = self.decoder_module(dec_lib.shift_right(text), image_tokens, parallel=parallel,
                                    train=train)
    return logits

  # --- cached decoding: prefill with the BOS token, then one token per step.

  def init_cache(self, batch_size: int, num_image_tokens: int) -> dict:
    del num_image_tokens  # cross-attention keys are cached at prefill, not in slots
    return self._empty_cache(batch_size, self.max_len)

  def prefill(self, image_tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Logits (B, V) of the first token, and the cache with the image keys/values."""
    bos = jnp.zeros((image_tokens.shape[0], 1), jnp.int32)
    logits, cache = self.decoder_module(bos, image_tokens, cache=cache)
    return logits[:, -1], cache

  def extend(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """tokens (B, l) written after the cache's content -> logits (B, l, V) of the l next tokens."""
    return self.decoder_module(tokens, None, cache=cache)


@MODELS.register("cappa")
def cappa(**kwargs) -> CapPa:
  return CapPa(**kwargs)
