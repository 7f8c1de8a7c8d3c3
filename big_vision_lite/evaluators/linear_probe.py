"""Few-shot linear probe: closed-form ridge regression on frozen image features.

For each shot count k, the first k training examples of every class fit
W = (X^T X + l2 I)^-1 X^T Y (Y = +-1 one-hot), and test accuracy is reported.
"""

from __future__ import annotations

import numpy as np

from big_vision_lite.config import ConfigError
from big_vision_lite.data import pipeline
from big_vision_lite.evaluators import EVALUATORS, Evaluator
from big_vision_lite.evaluators.retrieval import collect


def ridge_fit(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
  """Closed-form ridge regression with a bias column; returns W of shape (D + 1, C)."""
  x = np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1).astype(np.float64)
  reg = l2 * np.eye(x.shape[1])
  reg[-1, -1] = 0.0  # the bias is not regularised
  return np.linalg.solve(x.T @ x + reg, x.T @ y.astype(np.float64))


def ridge_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  return np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1) @ w


def few_shot_indices(labels: np.ndarray, shots: int, num_classes: int) -> np.ndarray:
  """The first `shots` indices of every class, in order; raises if a class has fewer."""
  idx = []
  for c in range(num_classes):
    mine = np.flatnonzero(labels == c)[:shots]
    if len(mine) < shots:
      raise ValueError(f"linear probe: class {c} has only {len(mine)} training examples, "
                       f"fewer than {shots} shots; use a larger train split")
    idx.append(mine)
  return np.concatenate(idx)


@EVALUATORS.register("linear_probe")
class LinearProbeEvaluator(Evaluator):
  """Reports `<name>/{k}shot` accuracy for k in `shots`.

  Keys: train_data/train_pp (examples to fit on; keep the split small, e.g.
  "train[:1000]"), data/pp (the test split), num_classes, shots (default
  [1, 5, 10]), l2_reg (1.0), label_key ("label", int), predict ("img_features").
  Features are centred with the fitting set's mean and L2-normalised.
  """

  allowed_keys = Evaluator.allowed_keys + (
      "train_data", "train_pp", "num_classes", "shots", "l2_reg", "label_key", "predict")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    for key in ("data", "pp", "train_data", "train_pp", "num_classes"):
      if key not in config:
        raise ConfigError(f"config.evals.{name}.{key}: missing")
    self.num_classes = int(config.num_classes)
    self.shots = tuple(int(s) for s in config.get("shots", (1, 5, 10)))
    self.l2 = float(config.get("l2_reg", 1.0))
    self.label_key = config.get("label_key", "label")
    self.train = pipeline.make_eval_iterator(config.train_data, config.train_pp,
                                             global_batch_size=self.batch_size,
                                             config_key=f"config.evals.{name}.train_data")
    self.test = self.eval_data()
    predict = self.task.predict_fns()[config.get("predict", "img_features")]
    self._step = self.jit(predict)

  def _features(self, params, data):
    x, kept = collect(self._step, params, data, self.mesh, keep=(self.label_key,))
    y = kept[self.label_key]
    return x.reshape(len(x), -1).astype(np.float64), (y.argmax(-1) if y.ndim == 2 else y)

  def run(self, params):
    xtr, ytr = self._features(params, self.train)
    xte, yte = self._features(params, self.test)
    out = {}
    for k in self.shots:
      idx = few_shot_indices(ytr, k, self.num_classes)
      x, y = xtr[idx], ytr[idx]
      mean = x.mean(axis=0, keepdims=True)
      norm = lambda f: (f - mean) / np.maximum(np.linalg.norm(f - mean, axis=1, keepdims=True), 1e-8)
      targets = 2.0 * np.eye(self.num_classes)[y] - 1.0
      w = ridge_fit(norm(x), targets, self.l2)
      pred = ridge_predict(w, norm(xte)).argmax(axis=1)
      out[f"{self.name}/{k}shot"] = float(np.mean(pred == yte))
    return out
