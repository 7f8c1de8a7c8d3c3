"""The summary file (dataset_info.json) that bvl-make-dataset writes next to its ArrayRecord shards.

It holds, per split, the shard file names and the number of examples, whether
the records were shuffled, and the class names (if the examples have labels),
so the trainer learns a split's size, the number of classes and the names a
zero-shot evaluator prompts with without reading any record. Format: docs/data.md.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from big_vision_lite.config import ConfigError

INFO_FILE = "dataset_info.json"
FORMAT = "big_vision_lite.array_record/1"


def write(directory: str, info: dict[str, Any]) -> str:
  """Writes `info` as `directory`/dataset_info.json (stable key order); returns its path."""
  path = os.path.join(directory, INFO_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read(directory: str) -> dict[str, Any] | None:
  """The summary in `directory`, or None if there is none; a corrupt one is a ConfigError."""
  path = os.path.join(os.path.expanduser(directory), INFO_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: not a readable dataset summary: {e}") from e
  if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("splits"), dict):
    raise ConfigError(f"{path}: not a dataset summary written by bvl-make-dataset (format {FORMAT!r})")
  return info


def load(directory: str, key: str = "data") -> dict[str, Any]:
  """The summary in `directory` for a config that needs it; a one-line ConfigError if missing."""
  if not directory:
    raise ConfigError(f"config arg {key!r}: not set (the folder bvl-make-dataset wrote, e.g. :{key}=/path/ds)")
  if not os.path.isdir(os.path.expanduser(directory)):
    raise ConfigError(f"config arg {key!r}: directory {directory!r} does not exist")
  info = read(directory)
  if info is None:
    raise ConfigError(f"config arg {key!r}: no {INFO_FILE} in {directory!r} (write the dataset with "
                      f"bvl-make-dataset)")
  return info


def for_files(paths: Sequence[str]) -> tuple[dict[str, Any], str] | None:
  """(summary, split name) when `paths` are exactly one split's shards of one summary, else None."""
  dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
  if len(dirs) != 1:
    return None
  info = read(dirs.pop())
  if info is None:
    return None
  names = sorted(os.path.basename(p) for p in paths)
  for split, entry in info["splits"].items():
    if sorted(entry.get("files", [])) == names:
      return info, split
  return None
