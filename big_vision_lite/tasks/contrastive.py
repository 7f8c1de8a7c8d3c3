"""Image-text contrastive pretraining of a two-tower model: SigLIP (sigmoid), CLIP (softmax), LiT.

LiT is this task plus config: `frozen=['img/.*']` and an image tower loaded via
`model_init` (with `model_load.target_prefix='img'` for a plain ViT checkpoint).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from big_vision_lite import contrastive_loss
from big_vision_lite.config import ConfigError
from big_vision_lite.tasks import TASKS, Batch, Task, image_input

LOSSES = ("sigmoid", "softmax")


@TASKS.register("contrastive")
class Contrastive(Task):
  """Config (`config.task`): loss ('sigmoid' | 'softmax'), chunked (sigmoid only: ring loss
  across the batch devices, default True), image_key ('image'), text_key ('labels')."""

  config_keys = ("loss", "chunked", "image_key", "text_key")

  def __init__(self, config: ml_collections.ConfigDict, model):
    super().__init__(config, model)
    self.loss_name = config.get("loss", "sigmoid")
    if self.loss_name not in LOSSES:
      raise ConfigError(f"config.task.loss: {self.loss_name!r} is not one of {LOSSES}")
    self.chunked = bool(config.get("chunked", True))
    self.image_key = config.get("image_key", "image")
    self.text_key = config.get("text_key", "labels")
    self.required_keys = (self.image_key, self.text_key)

  def images(self, batch: Batch) -> Any:
    """The image tower's input (a NaFlex batch's patches, mask and shape; tasks.image_input)."""
    return image_input(batch, self.image_key)

  def init_inputs(self, batch: Batch) -> tuple[Any, ...]:
    return (self.images(batch), batch[self.text_key])

  def loss(self, params, batch: Batch, rng: jax.Array):
    zimg, ztxt, out = self.model.apply(
        {"params": params}, self.images(batch), batch[self.text_key], train=True,
        rngs={"dropout": rng})
    t = out["t/parameter"]
    metrics = {"t": out["t"]}
    if self.loss_name == "softmax":
      loss = contrastive_loss.softmax_loss(zimg, ztxt, t)
    else:
      if "b" not in out:
        raise ConfigError("config.model.bias_init: the sigmoid loss needs a bias; set it (e.g. -10)")
      fn = contrastive_loss.chunked_sigmoid_loss if self.chunked else contrastive_loss.sigmoid_loss
      loss = fn(zimg, ztxt, t, out["b"])
      metrics["b"] = out["b"]
    return loss, metrics

  def predict_fns(self):
    def embed_image(params, batch):
      zimg, _, _ = self.model.apply({"params": params}, self.images(batch), None, train=False)
      return zimg

    def embed_text(params, batch):
      _, ztxt, _ = self.model.apply({"params": params}, None, batch[self.text_key], train=False)
      return ztxt

    def embed_both(params, batch):
      zimg, ztxt, _ = self.model.apply({"params": params}, self.images(batch),
                                       batch[self.text_key], train=False)
      return zimg, ztxt

    def img_features(params, batch):
      # Pooled image features before the projection head, for linear probes.
      _, _, out = self.model.apply({"params": params}, self.images(batch), None, train=False)
      return out["img/pre_logits"]

    return {"embed_image": embed_image, "embed_text": embed_text, "embed_both": embed_both,
            "img_features": img_features}
