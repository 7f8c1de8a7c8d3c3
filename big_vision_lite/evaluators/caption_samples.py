"""Caption samples: captions of the first N images of a split, written to the workdir as JSON,
with their exact-match and word accuracy against the reference captions."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from big_vision_lite import sharding, storage
from big_vision_lite.config import ConfigError
from big_vision_lite.evaluators import EVALUATORS, Evaluator


def word_accuracy(pred: str, ref: str) -> float:
  """Share of the reference's words matched at the same position."""
  p, r = pred.split(), ref.split()
  return sum(a == b for a, b in zip(p, r)) / max(len(r), 1)


@EVALUATORS.register("caption_samples")
class CaptionSamplesEvaluator(Evaluator):
  """Reports `<name>/exact_match` and `<name>/word_accuracy` over `num_samples` images and
  writes `<workdir>/<name>.json` (overwritten each run; a list of {index, caption,
  reference}) plus one line per run to `<workdir>/<name>.jsonl`.

  Keys: data, pp (image and, for references, the caption tokens), num_samples (32),
  beam_size (1 = greedy). The workdir is the trainer's (the `workdir` it was built with) or
  the key `out_dir`; without either nothing is written.
  """

  allowed_keys = Evaluator.allowed_keys + ("num_samples", "beam_size", "out_dir")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.require("data", "pp")
    if not hasattr(self.task, "generate"):
      raise ConfigError(f"config.evals.{name}.type: caption_samples needs task 'captioning'")
    self.num_samples = int(config.get("num_samples", 32))
    self.beam_size = int(config.get("beam_size", 1))
    self.out_dir = config.get("out_dir", None)
    self.data = self.eval_data()
    gen, key, beam = self.task.generate, self.task.image_key, self.beam_size
    self._step = self.jit(lambda params, batch: gen(params, batch[key], beam))
    self.runs = 0

  def run(self, params):
    tok, text_key = self.task.tokenizer, self.task.text_key
    rows = []
    for local in self.data:
      mask = np.asarray(local["_mask"], bool)
      out = np.asarray(jax.device_get(self._step(params, sharding.global_batch(local, self.mesh))))[mask]
      refs = np.asarray(local[text_key])[mask] if text_key in local else [None] * len(out)
      for ids, ref in zip(out, refs):
        rows.append({"index": len(rows), "caption": tok.decode(ids),
                     "reference": None if ref is None else tok.decode(ref)})
        if len(rows) == self.num_samples:
          break
      if len(rows) >= self.num_samples:
        break
    self.runs += 1
    result = {}
    scored = [r for r in rows if r["reference"] is not None]
    if scored:
      result[f"{self.name}/exact_match"] = float(np.mean([r["caption"] == r["reference"] for r in scored]))
      result[f"{self.name}/word_accuracy"] = float(np.mean([word_accuracy(r["caption"], r["reference"])
                                                           for r in scored]))
    out_dir = self.workdir or self.out_dir
    if out_dir and jax.process_index() == 0:
      line = json.dumps({"run": self.runs, **result, "samples": rows[:8]}) + "\n"
      if storage.is_remote(out_dir):
        # Object stores cannot append: the (small) history file is rewritten whole.
        with storage.open_file(storage.join(out_dir, f"{self.name}.json"), "w") as f:
          json.dump(rows, f, indent=1)
        hist = storage.join(out_dir, f"{self.name}.jsonl")
        old = storage.read_text(hist) if storage.exists(hist) else ""
        with storage.open_file(hist, "w") as f:
          f.write(old + line)
      else:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{self.name}.json"), "w") as f:
          json.dump(rows, f, indent=1)
        with open(os.path.join(out_dir, f"{self.name}.jsonl"), "a") as f:
          f.write(line)
    return result
