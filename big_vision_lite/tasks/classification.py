"""Supervised image classification: softmax or sigmoid cross-entropy, optional mixup."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from big_vision_lite import losses
from big_vision_lite.tasks import TASKS, Batch, Task
from big_vision_lite.config import ConfigError

_LOSSES = {"softmax_xent": losses.softmax_xent, "sigmoid_xent": losses.sigmoid_xent}


@TASKS.register("classification")
class Classification(Task):
  """Config (`config.task`): loss ('softmax_xent' | 'sigmoid_xent'), mixup (Beta p, 0 = off)."""

  required_keys = ("image", "labels")
  config_keys = ("loss", "mixup")

  def __init__(self, config: ml_collections.ConfigDict, model):
    super().__init__(config, model)
    self.loss_name = config.get("loss", "softmax_xent")
    if self.loss_name not in _LOSSES:
      raise ConfigError(f"config.task.loss: {self.loss_name!r} is not one of {sorted(_LOSSES)}")
    self.mixup = float(config.get("mixup", 0.0))

  def init_inputs(self, batch: Batch) -> tuple[Any, ...]:
    return (batch["image"],)

  def loss(self, params, batch: Batch, rng: jax.Array):
    images, labels = batch["image"], batch["labels"]
    mix_rng, dropout_rng = jax.random.split(rng)
    if self.mixup > 0:
      images, labels = losses.mixup(mix_rng, self.mixup, images, labels)
    logits, out = self.model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    if logits.shape[-1] != labels.shape[-1]:  # checked while tracing, before any compile
      raise ConfigError(f"config.model.num_classes gives {logits.shape[-1]} logits but the labels from "
                       f"config.input.pp have depth {labels.shape[-1]} (see its onehot op)")
    loss = jnp.mean(_LOSSES[self.loss_name](logits, labels))
    if "aux_loss" not in out:  # plain models: unchanged
      return loss, {}
    # Models with auxiliary losses (MoE load balancing): add them, log both parts and their metrics.
    metrics = {"main_loss": loss, "aux_loss": out["aux_loss"], **out.get("moe_metrics", {})}
    return loss + out["aux_loss"], metrics

  def predict_fns(self):
    def predict(params, batch):
      logits, _ = self.model.apply({"params": params}, batch["image"], train=False)
      return logits
    return {"predict": predict}
