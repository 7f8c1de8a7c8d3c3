"""OpenVision 2 (caption-only generative pretraining): ViT tokens, a random subset kept in
training, projected and placed before the caption in one prefix-masked decoder.
Registered as model "openvision2".

Params: `img` (a plain ViT), `img_proj` (ViT width -> decoder width), `decoder`.
Same methods as models/cappa.py's CapPa, so tasks/captioning.py drives both.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import MODELS
from big_vision_lite.models import decoder as dec_lib
from big_vision_lite.models import vit as vit_lib
from big_vision_lite.models.cappa import Captioner, vit_kwargs
from big_vision_lite.models.common import DenseGeneral


def num_kept(num_tokens: int, keep_ratio: float) -> int:
  """round(N * ratio) (halves round up), at least one token."""
  return max(1, min(num_tokens, int(math.floor(num_tokens * keep_ratio + 0.5))))


def keep_tokens(x: jax.Array, rng: jax.Array, keep_ratio: float) -> tuple[jax.Array, jax.Array]:
  """Keeps a random `num_kept(N, keep_ratio)` of the N tokens of each example, independently
  per example, in their original order. Returns (kept (B, K, D), indices (B, K))."""
  b, n, _ = x.shape
  k = num_kept(n, keep_ratio)
  noise = jax.random.uniform(rng, (b, n))
  idx = jnp.sort(jnp.argsort(noise, axis=1)[:, :k], axis=1)
  return jnp.take_along_axis(x, idx[:, :, None], axis=1), idx


class OpenVision2(Captioner):
  """`__call__(image, text, *, train=False) -> (logits (B, L, V), out)`.

  `keep_ratio` (0 < r <= 1): in training each example keeps round(N * r) random image
  tokens (rng stream "keep"); evaluation always uses all of them.
  """
  keep_ratio: float = 1.0

  def setup(self):
    if not 0.0 < self.keep_ratio <= 1.0:
      raise ValueError(f"openvision2: keep_ratio must be in (0, 1], got {self.keep_ratio}")
    kw = self._dec_kw()
    self.img = vit_lib.vit(**vit_kwargs(self.image))
    # DenseGeneral (nn.Dense's params): its bias gradient over (batch, tokens) is a matmul.
    self.img_proj = DenseGeneral(features=(kw["width"],), kernel_axes=(None, "embed"),
                                 bias_axes=("embed",), kernel_init=nn.initializers.lecun_normal(),
                                 name="img_proj")
    self.decoder_module = dec_lib.Decoder(cross=False, mask_token=False, name="decoder", **kw)

  def visual_prefix(self, image_tokens: jax.Array, train: bool = False) -> jax.Array:
    """Token keeping (training only) then the projection into the decoder."""
    if train and self.keep_ratio < 1.0:
      image_tokens, _ = keep_tokens(image_tokens, self.make_rng("keep"), self.keep_ratio)
    return self.img_proj(image_tokens)

  def decode_text(self, image_tokens: jax.Array, text: jax.Array, *, parallel=None,
                  train: bool = False) -> jax.Array:
    if parallel is not None:
      raise ValueError("openvision2: parallel prediction is CapPa's; set config.task.parallel_fraction=0")
    prefix = self.visual_prefix(image_tokens, train)
    logits, _ = self.decoder_module(dec_lib.shift_right(text), prefix=prefix, train=train)
    return logits

  def init_cache(self, batch_size: int, num_image_tokens: int) -> dict:
    return self._empty_cache(batch_size, num_image_tokens + self.max_len)

  def prefill(self, image_tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Writes [image tokens, BOS] into the cache; logits (B, V) of the first caption token."""
    bos = jnp.zeros((image_tokens.shape[0], 1), jnp.int32)
    logits, cache = self.decoder_module(bos, prefix=self.visual_prefix(image_tokens), cache=cache)
    return logits[:, -1], cache

  def extend(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """tokens (B, l) written after the cache's content -> logits (B, l, V) of the l next tokens."""
    return self.decoder_module(tokens, cache=cache)


@MODELS.register("openvision2")
def openvision2(**kwargs) -> OpenVision2:
  return OpenVision2(**kwargs)
