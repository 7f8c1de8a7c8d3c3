"""Text tokenizers, all offline: sentencepiece models from a local file, and the word-level
vocabulary of the built-in `bvl_shapes` captions shipped in data/assets/.

`get_tokenizer("bvl_shapes")` or `get_tokenizer("/path/to/spm.model")`.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Sequence

from big_vision_lite import storage

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SHAPES_VOCAB = os.path.join(ASSETS, "bvl_shapes_vocab.txt")
# Extra words so common prompt templates ("a photo of a {}") stay in-vocabulary.
_TEMPLATE_WORDS = ("photo", "of", "picture", "image", "shape", "drawing", "this", "is", "an")
_WORD = re.compile(r"[a-z0-9]+")
# Words added after the first vocabulary, appended (not sorted in) so earlier ids never move:
# "and" joins the objects of bvl_shapes_multi's captions.
_APPENDED_WORDS = ("and",)


def _isfile(path: str) -> bool:
  """os.path.isfile, also for gs:// and other storage paths."""
  if not storage.is_remote(path):
    return os.path.isfile(path)
  return storage.exists(path) and not storage.isdir(path)


class Tokenizer:
  """Interface: text <-> ids. `pad_id` fills short sequences; `eos_id` ends a text."""
  vocab_size: int
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError


class WordTokenizer(Tokenizer):
  """Lower-cased words split on non-alphanumerics; ids are line numbers of a vocab file.

  The file starts with <pad>, <eos>, <unk>; unknown words map to <unk>.
  """

  def __init__(self, vocab_file: str):
    if not _isfile(vocab_file):
      raise FileNotFoundError(f"tokenizer vocab file {vocab_file!r} does not exist")
    with storage.open_file(vocab_file) as f:
      self.words = [w.strip() for w in f if w.strip()]
    if self.words[:3] != ["<pad>", "<eos>", "<unk>"]:
      raise ValueError(f"{vocab_file}: must start with the lines <pad>, <eos>, <unk>")
    self.ids = {w: i for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words)
    self.pad_id, self.eos_id, self.unk_id = 0, 1, 2

  def encode(self, text: str) -> list[int]:
    return [self.ids.get(w, self.unk_id) for w in _WORD.findall(text.lower())]

  def decode(self, ids: Sequence[int]) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i != self.pad_id:
        out.append(self.words[i] if 0 <= i < self.vocab_size else "<unk>")
    return " ".join(out)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model read from a local file (nothing is downloaded)."""

  def __init__(self, model_file: str):
    import sentencepiece as spm  # Lazy: only sentencepiece users need the package.
    if not _isfile(model_file):
      raise FileNotFoundError(f"sentencepiece model {model_file!r} does not exist")
    if storage.is_remote(model_file):  # sentencepiece reads local files; it also takes the bytes
      with storage.open_file(model_file, "rb") as f:
        self.sp = spm.SentencePieceProcessor(model_proto=f.read())
    else:
      self.sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = self.sp.get_piece_size()
    self.eos_id = self.sp.eos_id()
    # Models trained without a pad piece report -1; big_vision pads with 0 then.
    self.pad_id = max(self.sp.pad_id(), 0)

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.sp.decode([i for i in ids if i != self.pad_id])


# `plan` compiles a recipe without its sentencepiece file: the step's shapes need only the
# vocabulary size. Training refuses this tokenizer (config_check).
STAND_IN_PREFIX = "stand-in:"


class StandInTokenizer(Tokenizer):
  """`stand-in:V`: V ids, pad 0, eos 1, text bytes mapped to ids 2.. (shapes only, no vocabulary)."""

  def __init__(self, vocab_size: int):
    if vocab_size < 3:
      raise ValueError(f"stand-in tokenizer: vocab size must be >= 3, got {vocab_size}")
    self.vocab_size, self.pad_id, self.eos_id = vocab_size, 0, 1

  def encode(self, text: str) -> list[int]:
    return [2 + b % (self.vocab_size - 2) for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)


def shapes_vocab_words() -> list[str]:
  """The bvl_shapes vocabulary: specials, every word of every caption part sorted, then the
  words appended later (`_APPENDED_WORDS`, in order)."""
  from big_vision_lite.data import shapes
  parts = (shapes.CLASS_NAMES + shapes.COLOR_NAMES + shapes.SIZE_NAMES + shapes.BACKGROUND_NAMES
           + shapes.POSITION_NAMES + (shapes.caption_for("", "", "", "", ""),) + _TEMPLATE_WORDS)
  words = sorted({w for p in parts for w in _WORD.findall(p.lower())} - set(_APPENDED_WORDS))
  return ["<pad>", "<eos>", "<unk>"] + words + list(_APPENDED_WORDS)


def write_shapes_vocab(path: str = SHAPES_VOCAB) -> None:
  """Regenerates the shipped vocab file (run after changing the dataset's words)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(shapes_vocab_words()) + "\n")


@functools.lru_cache(maxsize=16)
def get_tokenizer(model: str) -> Tokenizer:
  """"bvl_shapes" (the shipped word vocabulary), a path to a `.model` sentencepiece file,
  a path to a word-per-line `.txt` vocabulary, or `stand-in:V` (plan only, see above)."""
  if model == "bvl_shapes":
    return WordTokenizer(SHAPES_VOCAB)
  if model.startswith(STAND_IN_PREFIX):
    size = model[len(STAND_IN_PREFIX):]
    if not size.isdigit():
      raise ValueError(f"tokenizer {model!r}: expected {STAND_IN_PREFIX}<vocab size>")
    return StandInTokenizer(int(size))
  path = os.path.expanduser(model)
  if path.endswith(".txt"):
    return WordTokenizer(path)
  if path.endswith(".model") or _isfile(path):
    return SentencePieceTokenizer(path)
  raise ValueError(f"unknown tokenizer {model!r}: use 'bvl_shapes', a sentencepiece .model "
                   "file or a word-per-line .txt vocabulary (local or gs://) (nothing is downloaded)")
