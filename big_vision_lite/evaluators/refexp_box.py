"""Referring-expression box accuracy: the share of greedy-decoded boxes with IoU >= a threshold
against the true box (LocCa / SigLIP 2 aref task)."""

from __future__ import annotations

import jax
import numpy as np

from big_vision_lite import locca, sharding
from big_vision_lite.evaluators import EVALUATORS, Evaluator


@EVALUATORS.register("refexp_box")
class RefExpBoxEvaluator(Evaluator):
  """Reports `<name>/accuracy` (IoU >= `iou` with `aref_box`, 0.5 by default), `<name>/mean_iou`
  and `<name>/valid` (share of decodes that are 4 coordinate tokens of a proper box; the others
  count as misses). Keys: data, pp (must write `aref_tokens` and `aref_box`: locca_targets),
  iou, num_examples (0 = all)."""

  allowed_keys = Evaluator.allowed_keys + ("iou", "num_examples")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.require("data", "pp")
    predict = self.predict_fn("aref_box", needs="siglip2")
    self.iou = float(config.get("iou", 0.5))
    self.num_examples = int(config.get("num_examples", 0))
    self.data = self.eval_data()
    self._step = self.jit(predict)

  def run(self, params):
    ious, valid = [], []
    for local in self.data:
      mask = np.asarray(local["_mask"], bool)
      box, ok = jax.device_get(self._step(params, sharding.global_batch(local, self.mesh)))
      box, ok = np.asarray(box)[mask], np.asarray(ok)[mask]
      iou = locca.box_iou(box.astype(np.float64), np.asarray(local["aref_box"], np.float64)[mask])
      ious.append(np.where(ok, iou, 0.0))
      valid.append(ok)
      if self.num_examples and sum(map(len, ious)) >= self.num_examples:
        break
    iou, ok = np.concatenate(ious), np.concatenate(valid)
    if self.num_examples:
      iou, ok = iou[:self.num_examples], ok[:self.num_examples]
    return {f"{self.name}/accuracy": float(np.mean(iou >= self.iou)),
            f"{self.name}/mean_iou": float(np.mean(iou)), f"{self.name}/valid": float(np.mean(ok))}
