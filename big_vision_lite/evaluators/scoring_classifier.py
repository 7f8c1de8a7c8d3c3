"""CapPa's scoring classifier: zero-shot classification by caption likelihood.

Every class name is put into prompt templates; an image's class is the one whose
prompts the captioner finds most likely (log-sum-exp over the class's templates).
"""

from __future__ import annotations

import jax
import numpy as np

from big_vision_lite import sharding
from big_vision_lite.config import ConfigError
from big_vision_lite.data import ops as pp_ops
from big_vision_lite.evaluators import EVALUATORS, Evaluator
from big_vision_lite.evaluators.retrieval import collect
from big_vision_lite.evaluators.zero_shot import prompt_settings


@EVALUATORS.register("scoring_classifier")
class ScoringClassifierEvaluator(Evaluator):
  """Reports `<name>/accuracy`.

  Keys: data, pp (gives the image and the int label `label_key`), pp_txt (turns
  {"texts": prompt} into the caption tokens, e.g. "tokenize(16, key='texts')"),
  class_names (default: bvl_shapes' names for that dataset), templates (with "{}").
  Needs task 'captioning'.
  """

  allowed_keys = Evaluator.allowed_keys + ("pp_txt", "class_names", "templates", "label_key")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.class_names, self.templates, self.label_key = prompt_settings(name, config)
    if not hasattr(self.task, "score_classes"):
      raise ConfigError(f"config.evals.{name}.type: scoring_classifier needs task 'captioning'")
    pp_txt = pp_ops.get_preprocess_fn(config.pp_txt)
    key = self.task.text_key
    prompts = [t.format(c) for c in self.class_names for t in self.templates]
    self.class_tokens = np.stack([np.asarray(pp_txt({"texts": p}, None)[key]) for p in prompts])
    self._class_tokens = jax.device_put(self.class_tokens, sharding.replicated(self.mesh))
    self.data = self.eval_data()
    score = self.task.score_classes
    self._step = self.jit(lambda params, batch, toks: score(params, batch[self.task.image_key], toks))

  def run(self, params):
    step = lambda p, b: self._step(p, b, self._class_tokens)
    scores, kept = collect(step, params, self.data, self.mesh, keep=(self.label_key,))
    labels = kept[self.label_key]
    if labels.ndim == 2:
      labels = labels.argmax(axis=-1)
    per_class = np.logaddexp.reduce(
        scores.reshape(len(scores), len(self.class_names), len(self.templates)), axis=2)
    pred = np.argmax(per_class, axis=1)
    return {f"{self.name}/accuracy": float(np.mean(pred == labels)),
            f"{self.name}/examples": len(scores)}
