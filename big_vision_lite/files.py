"""Writing a file so that a concurrent reader or a crash never leaves it half-written."""

from __future__ import annotations

import os

from big_vision_lite import storage


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file renamed over it.

  A reader that opens `path` meanwhile sees the old file or the new one, never a
  truncated one; a kill mid-write leaves the old file (and a stray `.tmp<pid>`).
  On an object store (gs://) an upload replaces the object whole, so it is written directly.
  """
  if storage.is_remote(path):
    with storage.open_file(path, "w") as f:
      f.write(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
