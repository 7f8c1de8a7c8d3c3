"""Runs the trainer's main() on a disk that fills up (argv[1]: `ckpt`, `metrics` or `fill`; the rest: main's).

ckpt: the step-4 checkpoint's commit files find the disk full (its data went through). metrics: metrics.jsonl
takes 4 lines, then its writes and its close fail, as a full disk's buffered writes do.
fill FOLDER STEP: a real disk (a small tmpfs at FOLDER): once the saves before STEP are done, a file
fills FOLDER to 64 KiB short of full, so STEP's save starts and its array writes (tensorstore,
in orbax's background thread) hit ENOSPC, as do the metrics writes after it.
"""

import errno
import os
import sys

from orbax.checkpoint._src.path import async_path

from big_vision_lite import checkpoint, metrics, train

MARGIN = 1 << 16  # what the filler leaves free: the save's folders and first files fit, its arrays do not


def _enospc(path):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _FullFile:
  def __init__(self, path):
    self.path, self.lines = path, 0

  def write(self, text):
    self.lines += 1
    if self.lines > 4:
      raise _enospc(self.path)

  def flush(self):
    pass

  def close(self):
    raise _enospc(self.path)


def fill(folder):
  """Writes FOLDER/filler until the disk is full, then gives MARGIN bytes back."""
  path = os.path.join(folder, "filler")
  chunk = b"\0" * (1 << 20)
  with open(path, "wb", buffering=0) as f:
    while chunk:
      try:
        f.write(chunk)
      except OSError:
        chunk = chunk[:len(chunk) // 2]
  os.truncate(path, max(0, os.path.getsize(path) - MARGIN))


def main():
  if sys.argv[1] == "fill":
    folder, at = sys.argv[2], int(sys.argv[3])
    real_save = checkpoint.Checkpointer.save

    def save(self, step, *a, **k):
      if step == at:
        self.wait_until_finished()  # the previous step is complete: it must stay so
        fill(folder)
      return real_save(self, step, *a, **k)
    checkpoint.Checkpointer.save = save
    return train.main(sys.argv[4:])
  if sys.argv[1] == "ckpt":
    real = async_path.write_text

    async def full_disk(path, text, *a, **k):
      if f"{os.sep}4." in str(path) and "commit_success" in str(path):
        raise _enospc(path)
      return await real(path, text, *a, **k)
    async_path.write_text = full_disk
  else:
    metrics.open = lambda path, mode="r": _FullFile(path)
  return train.main(sys.argv[2:])


if __name__ == "__main__":
  sys.exit(main())
