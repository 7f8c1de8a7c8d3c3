"""Web-style tar shards (the layout img2dataset writes) as a random-access source for grain.

Each example is a group of members sharing a key: `KEY.jpg` (or .png/.jpeg/.webp)
plus `KEY.txt` (the caption) and optionally `KEY.json`. An index of
(shard, offset, size) per member is built by scanning the tar headers once;
reads then seek straight to the bytes, so any example is one read away.
Examples: {"image": encoded bytes, "caption": str, "json": str (if present), "key": str}.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any, Sequence

from big_vision_lite import storage
from big_vision_lite.data import sources

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"


def _scan(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
  """[(key, {ext: (offset, size)})] in file order for one tar shard."""
  groups: dict[str, dict[str, tuple[int, int]]] = {}
  try:
    # Uncompressed only ("r:"): compressed tars cannot seek.
    with storage.open_file(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for m in tar:
        if not m.isfile():
          continue
        base = os.path.basename(m.name)
        if base.startswith("."):
          continue
        key, _, ext = m.name.rpartition(".")
        if not key:
          continue
        groups.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
  except tarfile.TarError as e:
    raise ValueError(f"cannot read tar shard {path}: {e} (only uncompressed .tar is supported)") from e
  return list(groups.items())


class TarSource:
  """Examples with an image member and a caption (.txt) member across `paths` (see module doc).

  Groups lacking an image or a caption are skipped, counted in `skipped` and the first
  described in `first_skipped`; the input pipeline counts them with the bad examples.
  """

  def __init__(self, paths: Sequence[str], start: int = 0, stop: int | None = None):
    self.paths = list(paths)
    if not self.paths:
      raise ValueError("TarSource needs at least one tar file")
    self._index: list[tuple[int, str, tuple[int, int], tuple[int, int], tuple[int, int] | None]] = []
    self.skipped = 0
    self.first_skipped = ""
    for shard, path in enumerate(self.paths):
      for key, members in _scan(path):
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None or TEXT_EXT not in members:
          self.skipped += 1
          if not self.first_skipped:
            lacks = " and ".join(w for w, miss in (("an image", image is None), ("a caption (.txt)",
                                                   TEXT_EXT not in members)) if miss)
            self.first_skipped = f"key {key!r} in {path} lacks {lacks}"
          continue
        self._index.append((shard, key, image, members[TEXT_EXT], members.get("json")))
    n = len(self._index)
    self.start, self.stop = start, n if stop is None else stop
    if not 0 <= self.start <= self.stop <= n:
      raise ValueError(f"bad slice [{start}:{stop}] of {n} examples in {self.paths[0]}...")

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} out of range (0..{len(self) - 1})")
    shard, key, image, text, js = self._index[self.start + index]
    with storage.open_file(self.paths[shard], "rb") as f:
      def read(span):
        f.seek(span[0])
        return f.read(span[1])
      out = {"image": read(image), "caption": read(text).decode("utf-8").strip(), "key": key}
      if js is not None:
        out["json"] = read(js).decode("utf-8")
    return out

  def __repr__(self) -> str:
    # Stable (no addresses): grain compares reprs on restore.
    return f"TarSource({len(self)} examples from {len(self.paths)} tars, e.g. {self.paths[0]})"


@sources.register("tar", keys=("files",), required=("files",))
def open_tar(data_config, config_key: str) -> TarSource:
  """`name="tar"`: `files` (a glob or list of tar shards), sliced by `split`."""
  return sources.open_files(TarSource, data_config, config_key)
