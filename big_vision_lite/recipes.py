"""The shipped recipes (configs/*.py): listed and found by name, and the input section the
real-data ones share.

    >>> from big_vision_lite import recipes
    >>> recipes.list_recipes("vit_*")
    ['vit_i1k', 'vit_shapes']

`--config vit_shapes:steps=100` names a shipped recipe from any directory (installed, the recipes
are the package's `big_vision_lite/configs/`; in a source tree, the top-level `configs/`).
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import os
from typing import Any

from big_vision_lite.config import ConfigDict, ConfigError

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def recipes_dir() -> str:
  """The folder of the shipped recipes: inside the package once installed, else the source tree's."""
  installed = os.path.join(_PACKAGE, "configs")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(_PACKAGE), "configs")


def list_recipes(pattern: str = "*") -> list[str]:
  """The names of the shipped recipes matching the glob `pattern`, sorted (like timm.list_models)."""
  folder = recipes_dir()
  names = [f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")] \
      if os.path.isdir(folder) else []
  return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def recipe_path(name: str) -> str | None:
  """The file of the shipped recipe `name` ("vit_shapes" or "vit_shapes.py"), None if there is none."""
  name = name.removesuffix(".py")
  if not name or os.sep in name or "/" in name or name not in list_recipes():
    return None
  return os.path.join(recipes_dir(), f"{name}.py")


def summary(name: str) -> str:
  """The first line of the recipe's docstring (read, not run)."""
  with open(recipe_path(name) or name, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  return (doc or "").strip().split("\n")[0]


def table() -> str:
  """One line per shipped recipe: its name and summary."""
  names = list_recipes()
  width = max(map(len, names), default=0)
  return "\n".join(f"  {n:<{width}}  {summary(n)}" for n in names)


def missing_config(path: str) -> str:
  """The one-line error for a --config that is neither a file nor a shipped recipe's name."""
  names = list_recipes()
  base = os.path.basename(path).removesuffix(".py")
  if os.path.dirname(path):
    hint = f" (the shipped recipe of that name is --config {base})" if base in names else ""
    return f"--config: file {path!r} does not exist{hint}"
  close = difflib.get_close_matches(base, names, n=1)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return f"--config: {path!r} is neither a file nor a shipped recipe{hint} (recipes: {', '.join(names)})"


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
