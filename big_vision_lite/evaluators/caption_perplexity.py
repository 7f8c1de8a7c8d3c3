"""Caption perplexity: teacher-forced next-token NLL of reference captions over a split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite import sharding
from big_vision_lite.config import ConfigError
from big_vision_lite.evaluators import EVALUATORS, Evaluator


@EVALUATORS.register("caption_perplexity")
class CaptionPerplexityEvaluator(Evaluator):
  """Reports `<name>/perplexity` (exp of the mean NLL per scored token, end token included,
  padding not), `<name>/loss` (that mean NLL) and `<name>/token_accuracy`.

  Keys: data, pp (gives the task's image and caption tokens). Needs task 'captioning'.
  """

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.require("data", "pp")
    fns = self.task.predict_fns()
    if "logits" not in fns or not hasattr(self.task, "pad_id"):
      raise ConfigError(f"config.evals.{name}.type: caption_perplexity needs task 'captioning'")
    from big_vision_lite.tasks.captioning import caption_loss
    predict, pad_id, text_key = fns["logits"], self.task.pad_id, self.task.text_key
    self.data = self.eval_data()

    def eval_step(params, batch):
      nll, count, correct = caption_loss(predict(params, batch), batch[text_key], pad_id)
      m = batch["_mask"].astype(jnp.float32)
      return {"nll": jnp.sum(nll * m), "count": jnp.sum(count * m), "correct": jnp.sum(correct * m)}

    self._step = self.jit(eval_step)

  def run(self, params):
    tot = {"nll": 0.0, "count": 0.0, "correct": 0.0}
    for local in self.data:
      for k, v in jax.device_get(self._step(params, sharding.global_batch(local, self.mesh))).items():
        tot[k] += float(v)
    n = max(tot["count"], 1.0)
    return {f"{self.name}/perplexity": float(np.exp(tot["nll"] / n)), f"{self.name}/loss": tot["nll"] / n,
            f"{self.name}/token_accuracy": tot["correct"] / n}
