"""SigLIP 2's training model: the two towers plus a LocCa decoder that cross-attends to the
image tower's un-pooled tokens. Registered as "two_towers_decoder".

Params: those of two_towers (`img`, `txt`, `t`, `b`, so the towers load and export as a
SigLIP model) and `decoder` (models/decoder.py), dropped after training.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import MODELS
from big_vision_lite.models import decoder as dec_lib
from big_vision_lite.models.cappa import decoder_kwargs
from big_vision_lite.models.two_towers import TwoTowers


class TwoTowersDecoder(TwoTowers):
  """`__call__(image, text, decoder_tokens=None, *, train)` -> (zimg, ztxt, out).

  `decoder_tokens`: {name: target tokens (B, L)} (e.g. cap / aref / gcap); each is decoded
  teacher-forced on the image tokens into `out["decoder/<name>"]` (B, L, vocab_size).
  `decoder`: decoder kwargs (width, depth, mlp_dim, num_heads; width defaults to the image
  tower's); `vocab_size` and `max_len` are the decoder's (text, task and coordinate tokens).
  """
  decoder: Any = None
  vocab_size: int = 64
  max_len: int = 32

  def submodels(self) -> dict[str, tuple[Any, dict[str, Any]]]:
    return {**super().submodels(), "decoder": (dec_lib.Decoder, self._dec_kw())}

  def _dec_kw(self) -> dict[str, Any]:
    return decoder_kwargs(self.decoder, dict(self.image or {}).get("width", 768), self.vocab_size,
                          self.max_len)

  @nn.compact
  def __call__(self, image: jax.Array | None, text: jax.Array | None = None,
               decoder_tokens: dict[str, jax.Array] | None = None, *, train: bool = False,
               memory: jax.Array | None = None, cache: dict | None = None,
               memory_mask: jax.Array | None = None):
    """With `cache` (cached decoding): `decoder_tokens` are raw decoder inputs (B, l) written at
    the cache's index, `memory` the image tokens at prefill (None after) and `memory_mask`
    their valid ones (NaFlex); returns (logits, cache)."""
    dec = dec_lib.Decoder(cross=True, mask_token=False, name="decoder", **self._dec_kw())
    if cache is not None:
      return dec(decoder_tokens, memory, cache=cache, memory_mask=memory_mask)
    zimg, ztxt, out = super().__call__(image, text, train=train)
    if decoder_tokens is not None:
      if image is None:
        raise ValueError("two_towers_decoder: decoder tokens need the image")
      memory = out["img/encoded"]
      # A NaFlex tower's padding tokens are no image: the decoder must not see them either.
      memory_mask = out.get("img/mask")
      for name, tokens in decoder_tokens.items():
        out[f"decoder/{name}"], _ = dec(dec_lib.shift_right(tokens), memory, train=train,
                                        memory_mask=memory_mask)
    elif self.is_initializing() and image is not None:
      dec(jnp.zeros((out["img/encoded"].shape[0], 1), jnp.int32), out["img/encoded"])  # create its params
    return zimg, ztxt, out

  # --- cached decoding (evaluation): encode, prefill with BOS, then extend / step.

  def encode(self, image: jax.Array) -> jax.Array:
    """The image tower's un-pooled tokens (B, N, D), the decoder's memory."""
    return self(image, None, train=False)[2]["img/encoded"]

  def init_cache(self, batch_size: int) -> dict:
    kw = self._dec_kw()
    return dec_lib.init_cache(batch_size, self.max_len, width=kw["width"], depth=kw["depth"],
                              num_heads=kw["num_heads"], dtype_mm=kw.get("dtype_mm", "float32"))

  def prefill(self, image_tokens: jax.Array, cache: dict,
              memory_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Logits (B, V) of the first token after BOS, and the cache holding the image keys (and
    `memory_mask`, the valid ones of a NaFlex tower's tokens)."""
    bos = jnp.zeros((image_tokens.shape[0], 1), jnp.int32)
    logits, cache = self(None, None, bos, memory=image_tokens, cache=cache,
                         memory_mask=memory_mask)
    return logits[:, -1], cache

  def extend(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """tokens (B, l) after the cache's content -> logits (B, l, V) of the l next tokens."""
    return self(None, None, tokens, cache=cache)

  def step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    logits, cache = self.extend(tokens, cache)
    return logits[:, -1], cache


@MODELS.register("two_towers_decoder")
def two_towers_decoder(**kwargs) -> TwoTowersDecoder:
  return TwoTowersDecoder(**kwargs)
