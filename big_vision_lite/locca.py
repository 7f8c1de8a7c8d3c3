"""LocCa decoder targets: the token layout (text, task, coordinate tokens), quantisation, IoU.

LocCa (Wan et al. 2024) and SigLIP 2 train one decoder on three tasks, told apart by a task
token at the start of the sequence:
- cap:  [<cap>] -> caption of the whole image
- aref: [<aref>, referring expression] -> the region's box as 4 coordinate tokens
- gcap: [<gcap>, 4 coordinate tokens of a box] -> the region's expression (grounded caption)
The decoder sees `prompt + target` (shifted right, pad as BOS); only the target and its end
token are scored. Coordinates are quantised into `bins` bins, each an extra vocabulary token
after the text tokenizer's ids: [text ids][<cap> <aref> <gcap>][coord 0 .. coord bins-1].
A box is (ymin, xmin, ymax, xmax) in [0, 1] (big_vision's and PaliGemma's order).
"""

from __future__ import annotations

import dataclasses

import numpy as np

TASKS = ("cap", "aref", "gcap")
BOX_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The decoder vocabulary: `text_size` tokenizer ids, then the task tokens, then `bins`
  coordinate tokens."""
  text_size: int
  bins: int

  def __post_init__(self):
    if self.bins < 2:
      raise ValueError(f"locca: coordinate bins must be >= 2, got {self.bins}")
    if self.text_size < 1:
      raise ValueError(f"locca: text vocabulary size must be >= 1, got {self.text_size}")

  def task_id(self, task: str) -> int:
    if task not in TASKS:
      raise ValueError(f"locca: unknown task {task!r} (known: {', '.join(TASKS)})")
    return self.text_size + TASKS.index(task)

  @property
  def coord_offset(self) -> int:
    return self.text_size + len(TASKS)

  @property
  def size(self) -> int:
    return self.coord_offset + self.bins


def quantize(coords: np.ndarray, bins: int) -> np.ndarray:
  """Coordinates in [0, 1] -> bin indices in [0, bins): bin k covers [k/bins, (k+1)/bins);
  1.0 falls in the last bin, values outside [0, 1] are clipped."""
  c = np.asarray(coords, np.float64)
  return np.clip(np.floor(c * bins), 0, bins - 1).astype(np.int32)


def dequantize(indices, bins: int):
  """Bin indices -> the bins' centres, (k + 0.5) / bins (numpy or jax arrays)."""
  return (indices + 0.5) / bins


def box_to_tokens(box: np.ndarray, vocab: Vocab) -> np.ndarray:
  """A box (..., 4) in [0, 1] -> its 4 coordinate token ids (..., 4)."""
  return quantize(box, vocab.bins) + vocab.coord_offset


def tokens_to_box(tokens, vocab: Vocab):
  """4 token ids (..., 4) -> (box (..., 4) of bin centres, valid (...,): all 4 are coordinate
  tokens and ymin <= ymax, xmin <= xmax). numpy or jax arrays."""
  idx = tokens - vocab.coord_offset
  is_coord = (idx >= 0) & (idx < vocab.bins)
  box = dequantize(idx, vocab.bins)
  valid = is_coord.all(axis=-1) & (box[..., 0] <= box[..., 2]) & (box[..., 1] <= box[..., 3])
  return box, valid


def box_iou(a, b):
  """Intersection over union of boxes (..., 4) = (ymin, xmin, ymax, xmax), elementwise over
  the leading axes; 0 where the union is empty. numpy or jax arrays (same namespace as `a`)."""
  xp = _namespace(a)
  ih = xp.clip(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0, None)
  iw = xp.clip(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = ih * iw
  area = lambda x: xp.clip(x[..., 2] - x[..., 0], 0, None) * xp.clip(x[..., 3] - x[..., 1], 0, None)
  union = area(a) + area(b) - inter
  return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0)


def _namespace(x):
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp
  return jnp


def sequence(prompt: list[int], target: list[int], length: int, eos_id: int,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (length,), weights (length,)): prompt + target + eos, padded; weights are 1 on the
  target and its end token. The prompt has a fixed length per task, so the target always
  starts at the same position; a target that does not fit is an error, not cut."""
  body = list(prompt) + list(target) + [eos_id]
  if len(body) > length:
    raise ValueError(f"locca: prompt {len(prompt)} + target {len(target)} + eos exceed "
                     f"{length} tokens")
  tokens = np.full((length,), pad_id, np.int32)
  tokens[:len(body)] = body
  weights = np.zeros((length,), np.float32)
  weights[len(prompt):len(body)] = 1.0
  return tokens, weights
