"""A local folder copied to a remote one, for files written by appending (metrics.jsonl, TensorBoard events).

Object stores (gs://) cannot append: the files grow in a local staging folder
and every changed file is uploaded whole by `push`, at most every
`interval_s` seconds unless forced (at close). Reading a resumed run's files
back is `pull`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from big_vision_lite import storage


class Mirror:
  """Stages files for `remote_dir` in a local temporary folder (`self.local`)."""

  def __init__(self, remote_dir: str, interval_s: float = 30.0):
    self.remote = remote_dir
    self.local = tempfile.mkdtemp(prefix="bvl_mirror_")
    self.interval_s = interval_s
    self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) uploaded
    self._last = 0.0

  def pull(self, name: str) -> None:
    """Downloads `remote_dir/name` into the staging folder, if it exists."""
    src = storage.join(self.remote, name)
    if storage.exists(src):
      dst = os.path.join(self.local, name)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      storage.copy(src, dst)
      st = os.stat(dst)
      self._pushed[name] = (st.st_size, st.st_mtime_ns)

  def push(self, force: bool = False) -> None:
    """Uploads the files changed since the last push (unless pushed under `interval_s` ago)."""
    now = time.monotonic()
    if not force and now - self._last < self.interval_s:
      return
    self._last = now
    for root, _, names in os.walk(self.local):
      for n in names:
        path = os.path.join(root, n)
        rel = os.path.relpath(path, self.local)
        st = os.stat(path)
        if self._pushed.get(rel) != (st.st_size, st.st_mtime_ns):
          storage.copy(path, storage.join(self.remote, *rel.split(os.sep)))
          self._pushed[rel] = (st.st_size, st.st_mtime_ns)

  def close(self) -> None:
    """Pushes everything, then removes the staging folder."""
    try:
      self.push(force=True)
    finally:
      shutil.rmtree(self.local, ignore_errors=True)
