"""SigLIP 2's training model: the two towers plus a LocCa decoder that cross-attends to the
image tower's un-pooled tokens. Registered as "two_towers_decoder".

Params: those of two_towers (`img`, `txt`, `t`, `b`, so the towers load and export as a
SigLIP model) and `decoder` (models/decoder.py), dropped after training. With `distill` (SigLIP 2's
self-distillation, tasks/siglip2.py) also `distill_global` (a DINO head on the pooled image
features), `distill_patch` (one on the patch tokens) and `distill_mask_token` (masked
prediction's); dropped after training too.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import MODELS
from big_vision_lite.models import decoder as dec_lib
from big_vision_lite.models.cappa import decoder_kwargs, vit_kwargs
from big_vision_lite.models.two_towers import TwoTowers, l2_normalize


class DinoHead(nn.Module):
  """DINO's projection head (Caron et al. 2021, Sec. 3.1 and its code): an MLP (2 GELU layers
  of `hidden`, then `bottleneck`), L2 normalisation, and a weight-normalised bias-free linear
  layer to `prototypes` logits (each prototype's weight vector has norm 1)."""
  prototypes: int
  hidden: int
  bottleneck: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(nn.Dense(self.hidden, name="Dense_0")(x))
    x = nn.gelu(nn.Dense(self.hidden, name="Dense_1")(x))
    x = l2_normalize(nn.Dense(self.bottleneck, name="Dense_2")(x))
    w = self.param("prototypes", nn.initializers.lecun_normal(), (self.bottleneck, self.prototypes))
    w = w / jnp.sqrt(jnp.sum(w * w, axis=0, keepdims=True) + 1e-12)
    return x @ w


class TwoTowersDecoder(TwoTowers):
  """`__call__(image, text, decoder_tokens=None, *, train)` -> (zimg, ztxt, out).

  `decoder_tokens`: {name: target tokens (B, L)} (e.g. cap / aref / gcap); each is decoded
  teacher-forced on the image tokens into `out["decoder/<name>"]` (B, L, vocab_size).
  `decoder`: decoder kwargs (width, depth, mlp_dim, num_heads; width defaults to the image
  tower's); `vocab_size` and `max_len` are the decoder's (text, task and coordinate tokens).
  `distill`: None, or the self-distillation heads' sizes {prototypes, hidden, bottleneck}
  (hidden defaults to 2x and bottleneck to 1x the image width). `__call__(image, distill=True,
  patch_mask=None)` then runs only the image tower (masked patches get the mask token) and the
  heads: out["distill/global"] (B, K) from the pooled features, out["distill/patch"] (B, N, K).
  """
  decoder: Any = None
  distill: Any = None
  vocab_size: int = 64
  max_len: int = 32

  def submodels(self) -> dict[str, tuple[Any, dict[str, Any]]]:
    return {**super().submodels(), "decoder": (dec_lib.Decoder, self._dec_kw())}

  def _dec_kw(self) -> dict[str, Any]:
    return decoder_kwargs(self.decoder, self._image_width(), self.vocab_size,
                          self.max_len)

  @nn.compact
  def __call__(self, image: jax.Array | None, text: jax.Array | None = None,
               decoder_tokens: dict[str, jax.Array] | None = None, *, train: bool = False,
               memory: jax.Array | None = None, cache: dict | None = None,
               memory_mask: jax.Array | None = None, distill: bool = False,
               patch_mask: jax.Array | None = None):
    """With `cache` (cached decoding): `decoder_tokens` are raw decoder inputs (B, l) written at
    the cache's index, `memory` the image tokens at prefill (None after) and `memory_mask`
    their valid ones (NaFlex); returns (logits, cache)."""
    dec = dec_lib.Decoder(cross=True, mask_token=False, name="decoder", **self._dec_kw())
    if cache is not None:
      return dec(decoder_tokens, memory, cache=cache, memory_mask=memory_mask)
    if distill:
      return self._distill(image, patch_mask, train=train)
    zimg, ztxt, out = super().__call__(image, text, train=train)
    if self.distill is not None and self.is_initializing() and image is not None:
      self._mask_token()  # create the heads' and the mask token's params
      self._heads(out)
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

  def _image_width(self) -> int:
    # The width its variant gives ("B/16": 768), or the explicit one.
    return int(vit_kwargs(self.image).get("width", 768))

  def _distill_kw(self) -> dict[str, int]:
    kw = dict(self.distill or {})
    width = self._image_width()
    unknown = set(kw) - {"prototypes", "hidden", "bottleneck"}
    if unknown:
      raise ValueError(f"distill: unknown key {sorted(unknown)[0]!r} (allowed: prototypes, hidden, "
                       "bottleneck)")
    return dict(prototypes=int(kw.get("prototypes", 1024)), hidden=int(kw.get("hidden", 2 * width)),
                bottleneck=int(kw.get("bottleneck", width)))

  def _distill(self, image: jax.Array, patch_mask: jax.Array | None, *, train: bool):
    if self.distill is None:
      raise ValueError("two_towers_decoder: distill=True needs the model's `distill` heads")
    image_kwargs = None if patch_mask is None else {"patch_mask": patch_mask,
                                                    "mask_token": self._mask_token()}
    _, _, out = TwoTowers.__call__(self, image, None, train=train, image_kwargs=image_kwargs)
    return self._heads(out)

  def _mask_token(self) -> jax.Array:
    # iBOT's mask token starts at zero.
    width = self._image_width()
    return self.param("distill_mask_token", nn.initializers.zeros, (width,), jnp.float32)

  def _heads(self, out: dict) -> dict[str, jax.Array]:
    kw = self._distill_kw()
    return {"distill/global": DinoHead(**kw, name="distill_global")(out["img/pre_logits"]),
            "distill/patch": DinoHead(**kw, name="distill_patch")(out["img/encoded"])}

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
