"""Grounded-caption accuracy: the share of boxes whose greedy-decoded region expression equals
the reference exactly (LocCa / SigLIP 2 gcap task)."""

from __future__ import annotations

import jax
import numpy as np

from big_vision_lite import locca, sharding
from big_vision_lite.evaluators import EVALUATORS, Evaluator


@EVALUATORS.register("grounded_caption")
class GroundedCaptionEvaluator(Evaluator):
  """Reports `<name>/exact_match` over the examples (decoded text == reference text, both
  through the tokenizer's decode). Keys: data, pp (must write `gcap_tokens`: locca_targets),
  num_examples (0 = all)."""

  allowed_keys = Evaluator.allowed_keys + ("num_examples",)

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.require("data", "pp")
    predict = self.predict_fn("gcap_tokens", needs="siglip2")
    self.num_examples = int(config.get("num_examples", 0))
    self.data = self.eval_data()
    self._step = self.jit(predict)

  def run(self, params):
    tok, start = self.task.tokenizer, 1 + locca.BOX_TOKENS  # the reference follows task + box
    hits = []
    for local in self.data:
      mask = np.asarray(local["_mask"], bool)
      out = self._step(params, sharding.global_batch(local, self.mesh))
      out = np.asarray(jax.device_get(out))[mask]
      refs = np.asarray(local["gcap_tokens"])[mask][:, start:]
      hits += [tok.decode(o) == tok.decode(r) for o, r in zip(out, refs)]
      if self.num_examples and len(hits) >= self.num_examples:
        break
    hits = hits[:self.num_examples] if self.num_examples else hits
    return {f"{self.name}/exact_match": float(np.mean(hits))}
