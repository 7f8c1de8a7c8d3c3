"""Text preprocessing ops: `tokenize` a caption into fixed-length token ids (big_vision's `tok`)."""

from __future__ import annotations

import numpy as np

from big_vision_lite.data.errors import BadExample
from big_vision_lite.data.ops import OPS, Example, Op, get_key
from big_vision_lite.data.tokenizers import get_tokenizer

EOS_MODES = ("none", "yes", "sticky")


def _as_text(value, rng: np.random.Generator | None, key: str) -> str:
  """str / bytes, or a list/array of them (several captions: one is drawn with `rng`)."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) == 0:
      raise ValueError(f"tokenize: key {key!r} holds an empty list of texts")
    value = value[int(rng.integers(len(value))) if rng is not None else 0]
  if isinstance(value, (bytes, np.bytes_)):
    value = bytes(value).decode("utf-8")
  if not isinstance(value, str):
    raise ValueError(f"tokenize: key {key!r} must hold text (str or bytes), got {type(value).__name__}")
  return value


def tokenize_text(text: str, max_len: int, model: str = "bvl_shapes", eos: str = "yes",
                  pad_value: int | None = None) -> np.ndarray:
  """`text` -> int32 ids of length `max_len`: truncated, then padded.

  eos: "none" (no end token), "yes" (appended, then truncated: may be cut off),
  "sticky" (the last kept token is always eos). `pad_value` defaults to the
  tokenizer's pad id.
  """
  if eos not in EOS_MODES:
    raise ValueError(f"tokenize: eos must be one of {EOS_MODES}, got {eos!r}")
  tok = get_tokenizer(model)
  ids = tok.encode(text)
  if eos != "none":
    ids = ids + [tok.eos_id]
  if len(ids) > max_len:
    ids = ids[:max_len]
    if eos == "sticky":
      ids[-1] = tok.eos_id
  pad = tok.pad_id if pad_value is None else pad_value
  out = np.full((max_len,), pad, np.int32)
  out[:len(ids)] = ids
  return out


@OPS.register("tokenize")
def get_tokenize(max_len: int, model: str = "bvl_shapes", key: str = "caption", key_result: str = "labels",
                 pad_value: int | None = None, eos: str = "yes") -> Op:
  """Tokenizes `example[key]` (str/bytes or a list of captions, one drawn at random) into
  `example[key_result]`, int32 of shape (max_len,). See `tokenize_text`."""
  if not isinstance(max_len, int) or max_len <= 0:
    raise ValueError(f"preprocessing op 'tokenize': max_len must be a positive int, got {max_len!r}")
  if eos not in EOS_MODES:
    raise ValueError(f"preprocessing op 'tokenize': eos must be one of {EOS_MODES}, got {eos!r}")
  get_tokenizer(model)  # fail at build time on a bad model, not inside a worker

  def op(example: Example, rng=None) -> Example:
    text = _as_text(get_key(example, key, "tokenize"), rng, key)
    if not text.strip():  # an example with nothing to learn from; the pipeline's policy decides
      raise BadExample(f"tokenize: key {key!r} holds an empty caption")
    out = dict(example)
    out[key_result] = tokenize_text(text, max_len, model, eos, pad_value)
    return out
  return op
