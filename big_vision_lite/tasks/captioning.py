"""Captioning pretraining (CapPa, OpenVision 2): next-token cross-entropy on image captions.

The model is "cappa" or "openvision2" (same methods, see models/cappa.py). CapPa's
parallel prediction is `parallel_fraction` of the examples; OpenVision 2's token
keeping is its model's `keep_ratio`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from big_vision_lite import decoding
from big_vision_lite.config import ConfigError
from big_vision_lite.data.tokenizers import get_tokenizer
from big_vision_lite.tasks import TASKS, Batch, Task


def caption_loss(logits: jax.Array, labels: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example (sum of token NLL, number of tokens, number of correct argmax tokens).

  Tokens equal to `pad_id` are not scored; the end token is.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  w = (labels != pad_id).astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1), jnp.sum(correct * w, axis=1)


@TASKS.register("captioning")
class Captioning(Task):
  """Config (`config.task`): parallel_fraction (CapPa: share of examples trained with parallel
  prediction, 0.75 in the paper; 0 = autoregressive only), image_key ('image'), text_key
  ('labels', target tokens from the `tokenize` op), tokenizer ('bvl_shapes': pad and end ids,
  and the text of generated captions)."""

  config_keys = ("parallel_fraction", "image_key", "text_key", "tokenizer")

  def __init__(self, config: ml_collections.ConfigDict, model):
    super().__init__(config, model)
    for method in ("encode", "decode_text", "init_cache", "prefill", "step", "extend"):
      if not hasattr(model, method):
        raise ConfigError(f"config.model_name: task 'captioning' needs a captioning model "
                          f"('cappa' or 'openvision2'); {type(model).__name__} lacks {method}()")
    self.parallel_fraction = float(config.get("parallel_fraction", 0.0))
    if not 0.0 <= self.parallel_fraction <= 1.0:
      raise ConfigError(f"config.task.parallel_fraction: {self.parallel_fraction} is not in [0, 1]")
    if self.parallel_fraction > 0 and type(model).__name__ != "CapPa":
      raise ConfigError("config.task.parallel_fraction: parallel prediction needs model 'cappa'")
    self.image_key = config.get("image_key", "image")
    self.text_key = config.get("text_key", "labels")
    self.required_keys = (self.image_key, self.text_key)
    self.tokenizer = get_tokenizer(config.get("tokenizer", "bvl_shapes"))
    self.pad_id, self.eos_id = self.tokenizer.pad_id, self.tokenizer.eos_id

  def init_inputs(self, batch: Batch) -> tuple[Any, ...]:
    return (batch[self.image_key], batch[self.text_key])

  def loss(self, params, batch: Batch, rng: jax.Array):
    images, labels = batch[self.image_key], batch[self.text_key]
    if labels.shape[1] > self.model.max_len:
      raise ConfigError(f"config.model.max_len={self.model.max_len} is shorter than the "
                        f"{labels.shape[1]} caption tokens from config.input.pp")
    par_rng, drop_rng, keep_rng = jax.random.split(rng, 3)
    parallel = None
    if self.parallel_fraction > 0:
      parallel = jax.random.uniform(par_rng, (labels.shape[0],)) < self.parallel_fraction
    logits, _ = self.model.apply({"params": params}, images, labels, parallel=parallel, train=True,
                                 rngs={"dropout": drop_rng, "keep": keep_rng})
    nll, count, correct = caption_loss(logits, labels, self.pad_id)
    loss = jnp.sum(nll) / jnp.maximum(jnp.sum(count), 1.0)
    metrics = {"token_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(count), 1.0)}
    if parallel is not None:
      par = parallel.astype(jnp.float32)
      metrics["parallel_share"] = jnp.mean(par)
      metrics["loss_parallel"] = jnp.sum(nll * par) / jnp.maximum(jnp.sum(count * par), 1.0)
      metrics["loss_ar"] = jnp.sum(nll * (1 - par)) / jnp.maximum(jnp.sum(count * (1 - par)), 1.0)
    return loss, metrics

  # ----------------------------------------------------------------------- prediction

  def _apply(self, params, *args, method: str, **kwargs):
    return self.model.apply({"params": params}, *args, method=method, **kwargs)

  def generate(self, params, images: jax.Array, beam_size: int = 1) -> jax.Array:
    """Captions (B, max_len) token ids, greedy (beam_size=1) or beam search, with the KV cache."""
    tokens, _ = self._apply(params, images, method="encode")
    cache = self.model.init_cache(images.shape[0], tokens.shape[1])
    first, cache = self._apply(params, tokens, cache, method="prefill")
    step = lambda c, t: self._apply(params, t, c, method="step")
    kw = dict(max_len=self.model.max_len, eos_id=self.eos_id, pad_id=self.pad_id)
    if beam_size == 1:
      return decoding.greedy(first, cache, step, **kw)
    return decoding.beam_search(first, cache, step, beam_size=beam_size, **kw)[0]

  def score_classes(self, params, images: jax.Array, class_tokens: jax.Array) -> jax.Array:
    """Log-likelihood (B, C) of each of the C token sequences (C, L) as the caption of each image."""
    image_tokens, _ = self._apply(params, images, method="encode")
    b = images.shape[0]
    # The image part (cross-attention keys, or OpenVision 2's prefix) is prefilled into the KV
    # cache once; each class then only runs its own text tokens against it.
    first, cache = self._apply(params, image_tokens, self.model.init_cache(b, image_tokens.shape[1]),
                               method="prefill")

    def one(text):
      text = jnp.broadcast_to(text[None], (b,) + text.shape)
      rest, _ = self._apply(params, text[:, :-1], cache, method="extend")
      logits = jnp.concatenate([first[:, None], rest], axis=1)
      return -caption_loss(logits, text, self.pad_id)[0]

    return jax.lax.map(one, class_tokens).T

  def predict_fns(self):
    def logits(params, batch):
      return self.model.apply({"params": params}, batch[self.image_key], batch[self.text_key])[0]

    def img_features(params, batch):
      return self._apply(params, batch[self.image_key], method="encode")[1]

    def greedy(params, batch):
      return self.generate(params, batch[self.image_key])

    return {"logits": logits, "img_features": img_features, "greedy": greedy,
            "score_classes": self.score_classes}
