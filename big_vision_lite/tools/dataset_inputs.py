"""Lists the examples of an image folder, a CSV/JSONL list or tar shards, for make_dataset."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from typing import Callable

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class InputError(Exception):
  """A problem with the input as a whole (missing, empty, unknown kind); the tool exits 2."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One example before its image is read: where it is (for messages), its label and caption.

  `read()` gives {"image": encoded bytes} and, for tar shards, "caption".
  """
  where: str
  read: Callable[[], dict]
  label: int | None = None
  caption: str | None = None


@dataclasses.dataclass
class Listing:
  """The entries of one input, its class names (if labelled) and the per-line problems met."""
  kind: str
  entries: list[Entry]
  class_names: list[str] | None = None
  problems: list[str] = dataclasses.field(default_factory=list)


def _file_reader(path: str) -> Callable[[], dict]:
  def read() -> dict:
    with open(path, "rb") as f:
      return {"image": f.read()}
  return read


def detect_kind(path: str) -> str:
  """'folder', 'csv', 'jsonl' or 'tar' from the input path."""
  lower = path.lower()
  if lower.endswith(".csv"):
    return "csv"
  if lower.endswith((".jsonl", ".json")):
    return "jsonl"
  if lower.endswith(".tar") or any(c in path for c in "*?["):
    return "tar"
  if os.path.isdir(path) and not _class_dirs(path) and glob.glob(os.path.join(path, "*.tar")):
    return "tar"
  return "folder"


def _class_dirs(root: str) -> list[str]:
  return sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def list_folder(root: str) -> Listing:
  """ROOT/CLASS/**/IMAGE: one class per sub-folder (sorted names give labels 0..K-1)."""
  if not os.path.isdir(root):
    raise InputError(f"input folder {root!r} does not exist")
  classes = _class_dirs(root)
  if not classes:
    raise InputError(f"input folder {root!r} has no class sub-folders (expected {root}/CLASS/IMAGE)")
  entries = []
  for label, name in enumerate(classes):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames.sort()
      for fname in sorted(filenames):
        if fname.lower().endswith(IMAGE_EXTS) and not fname.startswith("."):
          path = os.path.join(dirpath, fname)
          entries.append(Entry(path, _file_reader(path), label=label))
  if not entries:
    raise InputError(f"input folder {root!r}: no image files ({', '.join(IMAGE_EXTS)}) in its class sub-folders")
  return Listing("folder", entries, class_names=classes)


def _rows(path: str, kind: str, problems: list[str]):
  """(line number, dict) per row; malformed rows become problem lines."""
  with open(path, newline="" if kind == "csv" else None, encoding="utf-8") as f:
    if kind == "csv":
      reader = csv.DictReader(f)
      for row in reader:
        yield reader.line_num, row
      return
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError as e:
        problems.append(f"{path}:{number}: not a JSON object: {e}")
        continue
      if not isinstance(row, dict):
        problems.append(f"{path}:{number}: not a JSON object (got {type(row).__name__})")
        continue
      yield number, row


def _labels(raw: list, path: str) -> tuple[list[int | None], list[str] | None]:
  """Integer labels as they are; string labels -> ids of their sorted unique names."""
  given = [v for v in raw if v not in (None, "")]
  if not given:
    return [None] * len(raw), None
  if all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and v.strip().isdigit()
         for v in given):
    return [None if v in (None, "") else int(v) for v in raw], None
  names = sorted({str(v) for v in given})
  ids = {n: i for i, n in enumerate(names)}
  return [None if v in (None, "") else ids[str(v)] for v in raw], names


def list_table(path: str, kind: str, image_key: str = "image", caption_key: str = "caption",
               label_key: str = "label", image_root: str | None = None) -> Listing:
  """CSV (with a header) or JSONL rows naming an image (relative to the list's folder) and a caption/label."""
  if not os.path.isfile(path):
    raise InputError(f"input file {path!r} does not exist")
  root = image_root or os.path.dirname(os.path.abspath(path))
  problems: list[str] = []
  kept = []
  for number, row in _rows(path, kind, problems):
    image = row.get(image_key)
    if not isinstance(image, str) or not image.strip():
      problems.append(f"{path}:{number}: no {image_key!r} (image path) in this row")
      continue
    caption = row.get(caption_key)
    if caption is not None and not isinstance(caption, str):
      problems.append(f"{path}:{number}: {caption_key!r} must be a string, got {type(caption).__name__}")
      continue
    kept.append((number, os.path.join(root, os.path.expanduser(image.strip())), caption, row.get(label_key)))
  if not kept:
    raise InputError(f"input file {path!r}: no usable rows (each needs an image path in {image_key!r})"
                     + (f"; first problem: {problems[0]}" if problems else ""))
  labels, names = _labels([k[3] for k in kept], path)
  entries = [Entry(f"{image} ({path}:{number})", _file_reader(image), label=label,
                   caption=caption.strip() if caption else None)
             for (number, image, caption, _), label in zip(kept, labels)]
  if any(e.label is not None for e in entries) and any(e.label is None for e in entries):
    raise InputError(f"input file {path!r}: some rows have a {label_key!r} and some do not")
  return Listing(kind, entries, class_names=names, problems=problems)


def list_tar(pattern: str) -> Listing:
  """Web-style tar shards (KEY.jpg + KEY.txt, see data/sources_tar.py): a glob, a .tar or a folder of them."""
  from big_vision_lite.data.sources_tar import TarSource
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*.tar")
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise InputError(f"no tar shard matches {pattern!r}")
  try:
    source = TarSource(paths)
  except ValueError as e:
    raise InputError(str(e)) from e
  problems = [f"{pattern}: {source.skipped} tar member groups without both an image and a .txt caption skipped"
              ] if source.skipped else []

  def entry(i: int) -> Entry:
    shard, key = source._index[i][:2]  # pylint: disable=protected-access
    return Entry(f"{paths[shard]}:{key}", lambda: source[i])
  return Listing("tar", [entry(i) for i in range(len(source))], problems=problems)


def list_input(path: str, kind: str = "auto", **table_keys) -> Listing:
  """The Listing of `path`, of `kind` ('auto' guesses from the path)."""
  kind = detect_kind(path) if kind == "auto" else kind
  if kind == "folder":
    return list_folder(path)
  if kind in ("csv", "jsonl"):
    return list_table(path, kind, **table_keys)
  if kind == "tar":
    return list_tar(path)
  raise InputError(f"unknown input kind {kind!r} (folder, csv, jsonl or tar)")
