"""Dict and label preprocessing ops: onehot, keep, drop, copy, rename (big_vision's `pp/ops_general.py`)."""

from __future__ import annotations

import numpy as np

from big_vision_lite.data.errors import BadExample
from big_vision_lite.data.ops import OPS, Example, Op, get_key


def _check_keys(example: Example, keys: tuple[str, ...], name: str) -> None:
  missing = [k for k in keys if k not in example]
  if missing:
    raise KeyError(f"preprocessing op {name!r}: key(s) {missing} not in the example (it has {sorted(example)})")


@OPS.register("onehot")
def get_onehot(depth: int, key: str = "label", key_result: str | None = None, on: float = 1.0,
               off: float = 0.0) -> Op:
  """Integer label -> float32 one-hot of length `depth`; a 1-D array of labels gives a multi-hot."""
  if not isinstance(depth, int) or depth <= 0:
    raise ValueError(f"preprocessing op 'onehot': depth must be a positive int, got {depth!r}")
  key_result = key_result or key

  def op(example: Example, rng=None) -> Example:
    labels = np.asarray(get_key(example, key, "onehot"))
    if labels.dtype.kind not in "iub" or labels.ndim > 1:
      raise ValueError(f"onehot: key {key!r} must hold an int label or a 1-D array of them, "
                       f"got {labels.dtype} with shape {labels.shape}")
    bad = labels[(labels < 0) | (labels >= depth)]
    if bad.size:
      raise BadExample(f"onehot: label {bad.flat[0]} in key {key!r} is outside [0, {depth})")
    out = np.full((depth,), off, np.float32)
    out[labels.astype(np.int64)] = on
    result = dict(example)
    result[key_result] = out
    return result
  return op


@OPS.register("keep")
def get_keep(*keys: str) -> Op:
  """Keeps only `keys` (each must be present, so a typo fails loudly)."""
  def op(example: Example, rng=None) -> Example:
    _check_keys(example, keys, "keep")
    return {k: v for k, v in example.items() if k in keys}
  return op


@OPS.register("drop")
def get_drop(*keys: str) -> Op:
  """Removes `keys` (each must be present, so a typo fails loudly)."""
  def op(example: Example, rng=None) -> Example:
    _check_keys(example, keys, "drop")
    return {k: v for k, v in example.items() if k not in keys}
  return op


@OPS.register("copy")
def get_copy(inkey: str, outkey: str) -> Op:
  """`example[outkey] = example[inkey]` (the value is shared; ops never modify values in place)."""
  def op(example: Example, rng=None) -> Example:
    result = dict(example)
    result[outkey] = get_key(example, inkey, "copy")
    return result
  return op


@OPS.register("rename")
def get_rename(inkey: str, outkey: str) -> Op:
  """Moves `example[inkey]` to `example[outkey]`."""
  def op(example: Example, rng=None) -> Example:
    result = dict(example)
    result[outkey] = get_key(example, inkey, "rename")
    if outkey != inkey:
      del result[inkey]
    return result
  return op
