"""Ops for the built-in bvl_shapes dataset: captions re-drawn from its attribute labels, and its
example in bvl_shapes_multi's layout."""

from __future__ import annotations

import numpy as np

from big_vision_lite.data import shapes
from big_vision_lite.data.ops import OPS, Example, Op, get_key, need_rng

_ATTRIBUTES = ("size", "color", "background", "position")


def partial_caption(label: int, color: int, size: int, background: int, position: int,
                    keep: dict[str, bool]) -> str:
  """The full caption's words in the same order, with the attributes not in `keep` left out."""
  words = ["a"]
  if keep["size"]:
    words.append(shapes.SIZE_NAMES[size])
  if keep["color"]:
    words.append(shapes.COLOR_NAMES[color])
  words.append(shapes.CLASS_NAMES[label])
  if keep["background"]:
    words += ["on", "a", shapes.BACKGROUND_NAMES[background], "background"]
  if keep["position"]:
    words.append(shapes.POSITION_NAMES[position])
  return " ".join(words)


@OPS.register("shapes_caption")
def get_shapes_caption(keep_prob: float = 0.5, key_result: str = "caption") -> Op:
  """Writes a caption naming the shape and each other attribute with probability `keep_prob`.

  Why: with all four other attributes named, size/colour/background/position alone
  tell a caption's image apart from the rest of a 128-image batch (~1300
  combinations), so a contrastive model never needs the shape; dropping attributes
  at random makes the shape word carry the match. keep_prob=1 gives the full caption.
  """
  if not 0.0 <= keep_prob <= 1.0:
    raise ValueError(f"preprocessing op 'shapes_caption': keep_prob must be in [0, 1], got {keep_prob!r}")

  def op(example: Example, rng=None) -> Example:
    fields = {k: int(np.asarray(get_key(example, k, "shapes_caption")))
              for k in ("label",) + _ATTRIBUTES}
    if keep_prob < 1.0:
      draws = need_rng(rng, "shapes_caption").random(len(_ATTRIBUTES))
    else:
      draws = np.zeros(len(_ATTRIBUTES))
    keep = {a: bool(d < keep_prob) for a, d in zip(_ATTRIBUTES, draws)}
    out = dict(example)
    out[key_result] = partial_caption(**fields, keep=keep)
    return out
  return op


@OPS.register("shapes_as_multi")
def get_shapes_as_multi() -> Op:
  """A bvl_shapes example in bvl_shapes_multi's per-object layout (one object, the other slots
  zero), so the several-object ops (shapes_multi_regions, locca_targets) read it; `caption`,
  `background` and `image` are kept."""
  def op(example: Example, rng=None) -> Example:
    from big_vision_lite.data import shapes_multi  # pylint: disable=import-outside-toplevel
    n = shapes_multi.MAX_OBJECTS

    def slots(key: str) -> np.ndarray:
      out = np.zeros(n, np.int64)
      out[0] = int(np.asarray(get_key(example, key, "shapes_as_multi")))
      return out

    boxes = np.zeros((n, 4), np.float32)
    boxes[0] = np.asarray(get_key(example, "box", "shapes_as_multi"), np.float32)
    out = {k: v for k, v in example.items() if k not in ("label", "color", "size", "position", "box")}
    out.update(num_objects=np.int64(1), labels=slots("label"), colors=slots("color"),
               sizes=slots("size"), boxes=boxes)
    return out
  return op
