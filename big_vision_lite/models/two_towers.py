"""Two-tower image-text model (big_vision's proj/image_text/two_towers), registered as "two_towers".

Params: `img` (any image model, ViT by default), `txt` (the text model), the
log-temperature `t` and the bias `b` of SigLIP's logits exp(t) * zimg.ztxt + b.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import MODELS


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTowers(nn.Module):
  """`__call__(image, text)` -> (zimg, ztxt, out); either input may be None (then its z is None).

  `out_dim` (int or (img, txt)) becomes each tower's `num_classes`, i.e. its
  projection head. `t` starts at log(temperature_init); `b` at bias_init
  (None: no bias param, as CLIP).
  """
  image: Any = None  # kwargs of the image model
  text: Any = None   # kwargs of the text model
  image_model: str = "vit"
  text_model: str = "text"
  out_dim: Any = 128
  temperature_init: float = 10.0
  bias_init: float | None = -10.0

  def submodels(self) -> dict[str, tuple[str, dict[str, Any]]]:
    """field -> (registered model name, kwargs) of each tower, for config checks."""
    return {"image": (self.image_model, dict(self.image or {})), "text": (self.text_model, dict(self.text or {}))}

  @nn.compact
  def __call__(self, image: jax.Array | None, text: jax.Array | None = None, *,
               train: bool = False, image_kwargs: dict | None = None
               ) -> tuple[jax.Array | None, jax.Array | None, dict]:
    """`image_kwargs`: extra keyword arguments of the image model's call (e.g. a patch mask)."""
    out = {}
    dims = (self.out_dim, self.out_dim) if isinstance(self.out_dim, int) else tuple(self.out_dim)
    zimg = ztxt = None
    if image is not None:
      kw = {"num_classes": dims[0], **dict(self.image or {})}
      if self.image_model in ("vit", "naflex_vit"):
        # A zero-init projection would give all-zero embeddings (undefined direction).
        kw.setdefault("head_zeroinit", False)
      zimg, out_img = MODELS.get(self.image_model)(name="img", **kw)(image, train=train,
                                                                   **(image_kwargs or {}))
      out.update({f"img/{k}": v for k, v in out_img.items()})
      zimg = out["img/norm"] = l2_normalize(zimg)
    if text is not None:
      kw = {"num_classes": dims[1], **dict(self.text or {})}
      ztxt, out_txt = MODELS.get(self.text_model)(name="txt", **kw)(text, train=train)
      out.update({f"txt/{k}": v for k, v in out_txt.items()})
      ztxt = out["txt/norm"] = l2_normalize(ztxt)
    t_init = math.log(self.temperature_init)
    t = self.param("t", lambda _, shape: jnp.full(shape, t_init, jnp.float32), (1,))
    out["t/parameter"] = t[0]
    out["t"] = jnp.exp(t[0])
    if self.bias_init is not None:
      b = self.param("b", lambda _, shape: jnp.full(shape, self.bias_init, jnp.float32), (1,))
      out["b"] = b[0]
    return zimg, ztxt, out


@MODELS.register("two_towers")
def two_towers(**kwargs) -> TwoTowers:
  return TwoTowers(**kwargs)
