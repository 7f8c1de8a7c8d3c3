"""Runs the trainer's main() on a disk that fills up (argv[1]: `ckpt` or `metrics`; the rest: main's).

ckpt: the step-4 checkpoint's commit files find the disk full (its data went through). metrics: metrics.jsonl
takes 4 lines, then its writes and its close fail, as a full disk's buffered writes do.
"""

import errno
import os
import sys

from orbax.checkpoint._src.path import async_path

from big_vision_lite import metrics, train


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


def main():
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
