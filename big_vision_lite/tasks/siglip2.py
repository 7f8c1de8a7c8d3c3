"""SigLIP 2 pretraining, its first part: the sigmoid image-text loss plus a LocCa decoder on the
image tokens trained on captioning, referring expressions (-> box) and grounded captions.

loss = contrastive + decoder_weight * mean over the tasks of each task's token-averaged NLL.
The batch carries the text tower's tokens (`labels`) and, per decoder task t, `t_tokens` and
`t_weights` (ops_locca.locca_targets). The model is "two_towers_decoder".

With `self_distill` (self_distill_phase.py), the last part of training (from `start_fraction`
of the steps) adds SILC's local-to-global and TIPS' masked-prediction losses against an EMA
teacher kept in the train state's `task_state`; the model then needs `distill` heads.
NaFlex is a model and preprocessing change under the same loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from big_vision_lite import contrastive_loss, decoding, locca, self_distill_phase
from big_vision_lite.config import ConfigError
from big_vision_lite.data.tokenizers import get_tokenizer
from big_vision_lite.tasks import STATE_STATS as TASK_STATE_STATS, TASKS, Batch
from big_vision_lite.tasks.contrastive import Contrastive


def weighted_nll(logits: jax.Array, targets: jax.Array,
                 weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum over the batch of weighted token NLL, sum of weights); logits (B, L, V)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(weights)


@TASKS.register("siglip2")
class SigLIP2(Contrastive):
  """Config (`config.task`): those of `contrastive` (loss, chunked, image_key, text_key), plus
  decoder_weight (1.0), tasks (the decoder tasks, default cap, aref, gcap), coord_bins (the
  coordinate tokens' bins; must match the locca_targets op), region_len (likewise),
  tokenizer ('bvl_shapes'), self_distill (None: off; else a dict of
  self_distill_phase.Settings' fields, {} for the paper's)."""

  config_keys = Contrastive.config_keys + ("decoder_weight", "tasks", "coord_bins", "region_len",
                                           "tokenizer", "self_distill")

  def __init__(self, config: ml_collections.ConfigDict, model):
    super().__init__(config, model)
    for method in ("encode", "init_cache", "prefill", "step", "extend"):
      if not hasattr(model, method):
        raise ConfigError(f"config.model_name: task 'siglip2' needs model 'two_towers_decoder'; "
                          f"{type(model).__name__} lacks {method}()")
    self.decoder_weight = float(config.get("decoder_weight", 1.0))
    self.tasks = tuple(config.get("tasks", locca.TASKS))
    bad = [t for t in self.tasks if t not in locca.TASKS]
    if bad or not self.tasks:
      raise ConfigError(f"config.task.tasks: {bad or 'empty'}; choose from {locca.TASKS}")
    if "coord_bins" not in config or "region_len" not in config:
      raise ConfigError("config.task.coord_bins and config.task.region_len: set them as in the "
                        "locca_targets op of config.input.pp")
    self.tokenizer = get_tokenizer(config.get("tokenizer", "bvl_shapes"))
    self.vocab = locca.Vocab(self.tokenizer.vocab_size, int(config.coord_bins))
    self.region_len = int(config.region_len)
    if model.vocab_size != self.vocab.size:
      raise ConfigError(f"config.model.vocab_size: {model.vocab_size}, but the decoder's "
                        f"vocabulary "
                        f"(text {self.vocab.text_size} + {len(locca.TASKS)} task + "
                        f"{self.vocab.bins} coordinate tokens) has {self.vocab.size}")
    self.required_keys = self.required_keys + tuple(
        f"{t}_{k}" for t in self.tasks for k in ("tokens", "weights"))
    self.phase = None
    if config.get("self_distill") is not None:
      if getattr(model, "distill", None) is None:
        raise ConfigError("config.model.distill: task 'siglip2' with self_distill needs the "
                          "model's distill heads (e.g. distill=dict(prototypes=256))")
      image = dict(model.image or {})
      if getattr(model, "image_model", "vit") != "vit":
        raise ConfigError(f"config.task.self_distill: the phase crops and masks a fixed-size "
                          f"image; image_model {model.image_model!r} takes patch sequences")
      if image.get("posemb", "learn") == "learn" and not image.get("posemb_grid"):
        raise ConfigError("config.model.image.posemb_grid: the self-distillation phase's local "
                          "crops have fewer patches than the image; a learned posemb needs its "
                          "grid side (res // patch) to be resized for them, or posemb='sincos2d'")
      from big_vision_lite.models.cappa import vit_kwargs  # noqa: PLC0415 (the variant decoded)
      patch = vit_kwargs(image).get("patch_size", (16, 16))
      patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
      settings = self_distill_phase.settings_from_config(config.self_distill, patch)
      self.phase = self_distill_phase.Phase(settings, model, patch, self.image_key)

  # ------------------------------------------------------------ the task state (teacher)

  def init_state(self, params, total_steps: int):
    return None if self.phase is None else self.phase.init_state(params, total_steps)

  def state_shardings(self, params_shardings, replicated):
    return self.phase.state_shardings(params_shardings, replicated)

  def update_state(self, task_state, stats, params, new_params, step):
    return self.phase.update_state(task_state, stats, params, new_params, step)

  def init_inputs(self, batch: Batch):
    return (self.images(batch), batch[self.text_key],
            {t: batch[f"{t}_tokens"] for t in self.tasks})

  def loss(self, params, batch: Batch, rng: jax.Array, task_state=None, step=None):
    zimg, ztxt, out = self.model.apply(
        {"params": params}, self.images(batch), batch[self.text_key],
        {t: batch[f"{t}_tokens"] for t in self.tasks}, train=True, rngs={"dropout": rng})
    metrics = {"t": out["t"]}
    if self.loss_name == "softmax":
      contrastive = contrastive_loss.softmax_loss(zimg, ztxt, out["t/parameter"])
    else:
      if "b" not in out:
        raise ConfigError("config.model.bias_init: the sigmoid loss needs a bias; "
                          "set it (e.g. -10)")
      fn = contrastive_loss.chunked_sigmoid_loss if self.chunked else contrastive_loss.sigmoid_loss
      contrastive = fn(zimg, ztxt, out["t/parameter"], out["b"])
      metrics["b"] = out["b"]
    per_task = []
    for t in self.tasks:
      nll, count = weighted_nll(out[f"decoder/{t}"], batch[f"{t}_tokens"], batch[f"{t}_weights"])
      per_task.append(nll / jnp.maximum(count, 1.0))
      metrics[f"loss_{t}"] = per_task[-1]
    decoder = sum(per_task) / len(per_task)
    metrics.update(loss_contrastive=contrastive, loss_decoder=decoder)
    loss = contrastive + self.decoder_weight * decoder
    if self.phase is not None:
      extra, sd_metrics, stats = self.phase.losses(params, batch, rng, task_state, step)
      metrics.update(sd_metrics)
      metrics[TASK_STATE_STATS] = stats
      loss = loss + extra
    return loss, metrics

  # ----------------------------------------------------------------------- prediction

  def _apply(self, params, *args, method: str):
    return self.model.apply({"params": params}, *args, method=method)

  def complete(self, params, images, prompt: jax.Array, length: int) -> jax.Array:
    """Greedy continuation (B, length) of the decoder prompt (B, P) on each image (KV cache)."""
    memory = self._apply(params, images, method="encode")
    cache = self.model.init_cache(memory.shape[0])
    mask = images[1] if isinstance(images, tuple) else None  # NaFlex: its padding is no image
    _, cache = self._apply(params, memory, cache, mask, method="prefill")
    logits, cache = self._apply(params, prompt, cache, method="extend")
    step = lambda c, t: self._apply(params, t, c, method="step")
    return decoding.greedy(logits[:, -1], cache, step, max_len=length, eos_id=self.tokenizer.eos_id,
                           pad_id=self.tokenizer.pad_id)

  def predict_fns(self):
    fns = super().predict_fns()
    p_aref, p_gcap = 1 + self.region_len, 1 + locca.BOX_TOKENS

    def aref_box(params, batch):
      """The decoded box (B, 4) of each example's aref prompt, and whether it is well formed."""
      out = self.complete(params, self.images(batch), batch["aref_tokens"][:, :p_aref],
                          locca.BOX_TOKENS)
      return locca.tokens_to_box(out, self.vocab)

    def gcap_tokens(params, batch):
      """The decoded expression tokens (B, region_len + 1) of each example's gcap box."""
      return self.complete(params, self.images(batch), batch["gcap_tokens"][:, :p_gcap],
                           self.region_len + 1)

    return {**fns, "aref_box": aref_box, "gcap_tokens": gcap_tokens}
