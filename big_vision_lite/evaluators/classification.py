"""Top-1 accuracy and loss over a full split; padded examples of the last batch are masked out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite import losses, sharding
from big_vision_lite.evaluators import EVALUATORS, Evaluator


@EVALUATORS.register("classification")
class ClassificationEvaluator(Evaluator):
  """Reports `<name>/prec@1` (top-1 is correct when its label entry is positive) and `<name>/loss`."""

  allowed_keys = Evaluator.allowed_keys + ("predict",)

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.require("data", "pp")
    predict = self.task.predict_fns()[config.get("predict", "predict")]
    self.data = self.eval_data()

    def eval_step(params, batch):
      logits = predict(params, batch)
      labels, mask = batch["labels"], batch["_mask"].astype(jnp.float32)
      top1 = jnp.argmax(logits, axis=-1)
      correct = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
      loss = losses.softmax_xent(logits, labels)
      return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}

    self._step = self.jit(eval_step)

  def run(self, params):
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for local_batch in self.data:
      out = self._step(params, sharding.global_batch(local_batch, self.mesh))
      for k, v in jax.device_get(out).items():
        totals[k] += float(v)
    n = max(totals["count"], 1.0)
    return {f"{self.name}/prec@1": totals["correct"] / n, f"{self.name}/loss": totals["loss"] / n,
            f"{self.name}/examples": int(np.round(totals["count"]))}
