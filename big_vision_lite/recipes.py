"""Pieces shared by the real-data config files: the image-text input section."""

from __future__ import annotations

from typing import Any

from big_vision_lite.config import ConfigDict, ConfigError


def image_text_input(args: Any, res: int) -> ConfigDict:
  """`config.input` for image-caption data (tar shards, ArrayRecord or tfds) with a local spm model.

  `args` are the config's parsed args: data, files, data_dir, split, batch, text_key, text_len,
  spm. Images are resized to `res`, never flipped (captions may say left/right); captions are
  tokenized into "labels" with a sticky end token.
  """
  if not args.spm:
    raise ConfigError("config arg spm: give a local sentencepiece .model file (e.g. spm=/data/c4_en.model)")
  inp = ConfigDict()
  inp.data = dict(name=args.data, split=args.split)
  if args.data in ("tar", "array_record"):
    inp.data.files = args.files
  else:
    inp.data.data_dir = args.data_dir
  inp.batch_size = args.batch
  inp.num_workers = 8
  tok = (f"tokenize({args.text_len}, model={args.spm!r}, key={args.text_key!r}, key_result='labels', "
         "eos='sticky')")
  inp.pp = f"decode|resize({res})|value_range(-1, 1)|{tok}|keep('image', 'labels')"
  return inp
