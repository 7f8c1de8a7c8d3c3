"""Image->text and text->image retrieval recall@k over a split of paired images and captions.

Each example's own caption is the ground truth; a retrieved item also counts
as a hit when its caption tokens equal the ground truth's (identical captions
have identical embeddings, so ties could not be broken otherwise).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np

from big_vision_lite import sharding
from big_vision_lite.evaluators import EVALUATORS, Evaluator


def collect(step: Callable[..., Any], params: Any, data: Iterable[dict], mesh,
            keep: tuple[str, ...] = ()) -> tuple[Any, dict[str, np.ndarray]]:
  """Runs a jitted `step(params, batch)` over every batch; returns (outputs, kept batch keys)
  concatenated on the host with padding rows (`_mask` False) dropped."""
  outs, kept = [], {k: [] for k in keep}
  for local in data:
    mask = np.asarray(local["_mask"], bool)
    out = jax.device_get(step(params, sharding.global_batch(local, mesh)))
    outs.append(jax.tree.map(lambda x: np.asarray(x)[mask], out))
    for k in keep:
      kept[k].append(np.asarray(local[k])[mask])
  if not outs:
    raise ValueError("evaluation split is empty")
  merged = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
  return merged, {k: np.concatenate(v) for k, v in kept.items()}


def recall_at_k(sims: np.ndarray, same: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
  """sims (Q, N) query-to-item scores; same (Q, N) bool true-match matrix -> {k: recall@k}."""
  order = np.argsort(-sims, axis=1, kind="stable")
  hits = np.take_along_axis(same, order, axis=1)
  return {k: float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


@EVALUATORS.register("retrieval")
class RetrievalEvaluator(Evaluator):
  """Reports `<name>/i2t@k` and `<name>/t2i@k` for k in `ks` (default 1, 5, 10).

  `pp` must give the image (task.image_key) and the caption tokens (task.text_key).
  """

  allowed_keys = Evaluator.allowed_keys + ("ks",)

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.require("data", "pp")
    self.ks = tuple(int(k) for k in config.get("ks", (1, 5, 10)))
    self.data = self.eval_data()
    self._step = self.jit(self.task.predict_fns()["embed_both"])

  def run(self, params):
    text_key = self.task.text_key
    (zimg, ztxt), kept = collect(self._step, params, self.data, self.mesh, keep=(text_key,))
    tokens = kept[text_key]
    # Equal token rows = equal captions; compare via a hashable view of each row.
    _, caption_id = np.unique(tokens.reshape(len(tokens), -1), axis=0, return_inverse=True)
    caption_id = caption_id.reshape(-1)
    same = caption_id[:, None] == caption_id[None, :]
    sims = zimg.astype(np.float32) @ ztxt.astype(np.float32).T
    out = {}
    for k, r in recall_at_k(sims, same, self.ks).items():
      out[f"{self.name}/i2t@{k}"] = r
    for k, r in recall_at_k(sims.T, same.T, self.ks).items():
      out[f"{self.name}/t2i@{k}"] = r
    out[f"{self.name}/examples"] = len(zimg)
    return out
