"""Ops for LocCa decoder targets (locca.py): regions of bvl_shapes_multi, captions with
attribute dropout, and the cap / aref / gcap token sequences."""

from __future__ import annotations

import json

import numpy as np

from big_vision_lite import locca
from big_vision_lite.data import shapes, shapes_multi
from big_vision_lite.data.ops import OPS, Example, Op, get_key, need_rng
from big_vision_lite.data.tokenizers import get_tokenizer


def _objects(example: Example, name: str) -> list[dict]:
  n = int(np.asarray(get_key(example, "num_objects", name)))
  fields = {k: np.asarray(get_key(example, k, name))
            for k in ("labels", "colors", "sizes", "boxes")}
  return [{k: v[i] for k, v in fields.items()} for i in range(n)]


@OPS.register("shapes_multi_regions")
def get_shapes_multi_regions() -> Op:
  """bvl_shapes_multi's objects -> `region_texts` (their referring expressions, a list of str)
  and `region_boxes` (n, 4) float32: the regions `locca_targets` reads."""
  def op(example: Example, rng=None) -> Example:
    objs = _objects(example, "shapes_multi_regions")
    out = dict(example)
    out["region_texts"] = [
        shapes_multi.expression_for(shapes.CLASS_NAMES[o["labels"]], shapes.COLOR_NAMES[o["colors"]])
        for o in objs]
    out["region_boxes"] = np.stack([o["boxes"] for o in objs]).astype(np.float32)
    return out
  return op


@OPS.register("shapes_multi_caption")
def get_shapes_multi_caption(keep_prob: float = 0.5, key_result: str = "caption") -> Op:
  """A caption of a bvl_shapes_multi image naming every object's shape, and its size, its colour
  and the background each with probability `keep_prob` (why: see ops_shapes.shapes_caption)."""
  if not 0.0 <= keep_prob <= 1.0:
    raise ValueError(f"preprocessing op 'shapes_multi_caption': keep_prob must be in [0, 1], "
                     f"got {keep_prob!r}")

  def op(example: Example, rng=None) -> Example:
    objs = _objects(example, "shapes_multi_caption")
    bg = int(np.asarray(get_key(example, "background", "shapes_multi_caption")))
    draws = (need_rng(rng, "shapes_multi_caption").random(2 * len(objs) + 1) if keep_prob < 1.0
             else np.zeros(2 * len(objs) + 1))
    keep = draws < keep_prob
    parts = []
    for i, o in enumerate(objs):
      words = ["a"]
      if keep[2 * i]:
        words.append(shapes.SIZE_NAMES[o["sizes"]])
      if keep[2 * i + 1]:
        words.append(shapes.COLOR_NAMES[o["colors"]])
      parts.append(" ".join(words + [shapes.CLASS_NAMES[o["labels"]]]))
    text = " and ".join(parts)
    if keep[-1]:
      text += f" on a {shapes.BACKGROUND_NAMES[bg]} background"
    out = dict(example)
    out[key_result] = text
    return out
  return op


@OPS.register("json_regions")
def get_json_regions(key: str = "json") -> Op:
  """Regions of an image-text example (e.g. a tar shard's KEY.json, pseudo-annotations as
  LocCa and SigLIP 2 use): `{"regions": [{"text": str, "box": [ymin, xmin, ymax, xmax]}, ...]}`
  with box coordinates in [0, 1] -> `region_texts` and `region_boxes`, as
  shapes_multi_regions writes them for `locca_targets`."""
  def op(example: Example, rng=None) -> Example:
    raw = get_key(example, key, "json_regions")
    try:
      regions = json.loads(_text(raw))["regions"]
      texts = [str(r["text"]) for r in regions]
      boxes = np.asarray([r["box"] for r in regions], np.float32).reshape(len(regions), 4)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"json_regions: {key!r} is not {{'regions': [{{'text', 'box'}}...]}} "
                       f"({type(e).__name__}: {e})") from None
    if not texts:
      raise ValueError(f"json_regions: {key!r} has no regions")
    if (boxes < 0).any() or (boxes > 1).any():
      raise ValueError(f"json_regions: boxes must be in [0, 1], got {boxes.tolist()}")
    out = dict(example)
    out["region_texts"], out["region_boxes"] = texts, boxes
    return out
  return op


def _text(value) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


@OPS.register("locca_targets")
def get_locca_targets(bins: int, cap_len: int, region_len: int, model: str = "bvl_shapes",
                      caption_key: str = "caption", truncate: bool = False) -> Op:
  """Writes the three LocCa sequences (locca.py) of an example with `caption_key`,
  `region_texts` and `region_boxes`: `{cap,aref,gcap}_tokens` (int32) and `..._weights`
  (float32, 1 where scored), cap of length `cap_len`, aref and gcap of `2 + region_len + 4`
  (task token, expression padded to `region_len` tokens or box, target, eos); and the chosen
  region's box `aref_box` (4,) float32. The region is drawn with the op's rng (evaluation's
  is fixed per example), one for both aref and gcap. A caption or expression longer than its
  room is an error, or with `truncate` (web captions) cut to it."""
  tok = get_tokenizer(model)
  vocab = locca.Vocab(tok.vocab_size, bins)
  seq_len = 2 + region_len + locca.BOX_TOKENS

  def ids(text: str, limit: int, what: str) -> list[int]:
    out = tok.encode(text)
    if truncate:
      return out[:limit]
    if len(out) > limit:
      raise ValueError(f"locca_targets: {what} {text!r} has {len(out)} tokens, more than {limit}")
    return out

  def op(example: Example, rng=None) -> Example:
    caption = _text(get_key(example, caption_key, "locca_targets"))
    texts = [_text(t) for t in get_key(example, "region_texts", "locca_targets")]
    boxes = np.asarray(get_key(example, "region_boxes", "locca_targets"), np.float32)
    if not texts or len(texts) != len(boxes):
      raise ValueError(f"locca_targets: {len(texts)} region texts for {len(boxes)} boxes")
    k = int(rng.integers(len(texts))) if rng is not None else 0
    region = ids(texts[k], region_len, "region text")
    box = list(locca.box_to_tokens(boxes[k], vocab))
    out = dict(example)
    seqs = {
        "cap": ([vocab.task_id("cap")], ids(caption, cap_len - 2, "caption"), cap_len),
        "aref": ([vocab.task_id("aref")] + region + [tok.pad_id] * (region_len - len(region)), box,
                 seq_len),
        "gcap": ([vocab.task_id("gcap")] + box, region, seq_len),
    }
    for task, (prompt, target, length) in seqs.items():
      out[f"{task}_tokens"], out[f"{task}_weights"] = locca.sequence(prompt, target, length,
                                                                     tok.eos_id, tok.pad_id)
    out["aref_box"] = boxes[k]
    return out
  return op
