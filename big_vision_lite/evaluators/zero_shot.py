"""Zero-shot classification: class names through prompt templates -> text embeddings -> nearest class."""

from __future__ import annotations

import jax
import numpy as np

from big_vision_lite import sharding
from big_vision_lite.config import ConfigError
from big_vision_lite.data import ops as pp_ops
from big_vision_lite.evaluators import EVALUATORS, Evaluator
from big_vision_lite.evaluators.retrieval import collect

DEFAULT_TEMPLATES = ("a {}", "a {} on a background", "a photo of a {}")


def _builtin_class_names(data_config) -> tuple[str, ...] | None:
  if str(data_config.get("name", "")).split("/")[0] == "bvl_shapes":
    from big_vision_lite.data import shapes
    return shapes.CLASS_NAMES
  from big_vision_lite.data import sources
  return sources.class_names(data_config)  # from a dataset_info.json next to array_record shards



def prompt_settings(name: str, config) -> tuple[tuple[str, ...], tuple[str, ...], str]:
  """(class_names, templates, label_key) of a class-name-prompt evaluator; checks its keys.

  Shared by zero_shot (embedding similarity) and scoring_classifier (caption likelihood).
  """
  for key in ("data", "pp", "pp_txt"):
    if key not in config:
      raise ConfigError(f"config.evals.{name}.{key}: missing")
  names = config.get("class_names", None) or _builtin_class_names(config.data)
  if not names:
    raise ConfigError(f"config.evals.{name}.class_names: missing (defaults only for bvl_shapes and "
                      "array_record data with a dataset_info.json)")
  templates = tuple(config.get("templates", None) or DEFAULT_TEMPLATES)
  bad = [t for t in templates if "{}" not in t]
  if bad:
    raise ConfigError(f"config.evals.{name}.templates: {bad[0]!r} has no '{{}}' for the class name")
  return tuple(names), templates, config.get("label_key", "label")

@EVALUATORS.register("zero_shot")
class ZeroShotEvaluator(Evaluator):
  """Reports `<name>/accuracy`.

  Keys: data, pp (gives the image and the int label `label_key`), pp_txt (turns
  {"texts": prompt} into the task's text tokens, e.g. "tokenize(16, key='texts')"),
  class_names (default: bvl_shapes' names for that dataset), templates (with "{}").
  Each class embedding is the renormalised mean over its templates' embeddings.
  """

  allowed_keys = Evaluator.allowed_keys + ("pp_txt", "class_names", "templates", "label_key")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.class_names, self.templates, self.label_key = prompt_settings(name, config)
    self.pp_txt = pp_ops.get_preprocess_fn(config.pp_txt)
    self.data = self.eval_data()
    fns = self.task.predict_fns()
    self._img = self.jit(fns["embed_image"])
    self._txt = self.jit(fns["embed_text"])

  def class_embeddings(self, params) -> np.ndarray:
    """(num_classes, D) L2-normalised mean prompt embeddings."""
    key = self.task.text_key
    prompts = [t.format(c) for c in self.class_names for t in self.templates]
    tokens = np.stack([self.pp_txt({"texts": p}, None)[key] for p in prompts])
    n, bs = len(tokens), self.batch_size
    padded = np.zeros((-(-n // bs) * bs,) + tokens.shape[1:], tokens.dtype)
    padded[:n] = tokens
    z = np.concatenate([
        np.asarray(jax.device_get(self._txt(params, sharding.global_batch({key: padded[i:i + bs]},
                                                                         self.mesh))))
        for i in range(0, len(padded), bs)])[:n]
    z = z.reshape(len(self.class_names), len(self.templates), -1).mean(axis=1)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)

  def run(self, params):
    classes = self.class_embeddings(params)
    zimg, kept = collect(self._img, params, self.data, self.mesh, keep=(self.label_key,))
    labels = kept[self.label_key]
    if labels.ndim == 2:  # one-hot labels
      labels = labels.argmax(axis=-1)
    pred = np.argmax(zimg.astype(np.float32) @ classes.T, axis=1)
    return {f"{self.name}/accuracy": float(np.mean(pred == labels)),
            f"{self.name}/examples": len(zimg)}
