"""One trainer per workdir: an exclusive lock on `<workdir>/.lock`, refused with the holder's name.

On a local disk it is flock(2): the kernel frees it when the holder exits, however it exits
(kill -9 included). On an object store (gs://...), where there are no locks, it is a lease:
the file names the holder's host and pid and a heartbeat time that a thread refreshes every
`heartbeat_s`; a lease not refreshed for `stale_s` is taken over. Two runs starting within
the same moment on an object store can both write a lease; the one that reads back the
other's name after writing gives way. A lease whose holder ran in this very pid namespace
(same boot, same namespace: the lease names both) and is no longer alive is free at once,
so a run killed with -9 resumes on the same machine without waiting `stale_s`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Iterator

from etils import epath

LOCK_NAME = ".lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class WorkdirBusy(Exception):
  """Another live run holds the workdir."""


def _pid_namespace() -> str | None:
  """'<boot id>:<pid namespace inode>': where a pid means the same process (None off Linux)."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f"{f.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
  except OSError:
    return None


def _holder_text() -> str:
  return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                     "heartbeat": time.time()})


def _holder_is_dead(info: dict) -> bool:
  """Whether the lease's holder ran in this pid namespace and has exited."""
  ns = _pid_namespace()
  if ns is None or info.get("pidns") != ns or info.get("host") != socket.gethostname():
    return False
  try:
    os.kill(int(info["pid"]), 0)
  except ProcessLookupError:
    return True
  except (OSError, ValueError, TypeError, KeyError):
    return False
  return False


def _describe(text: str) -> str:
  try:
    info = json.loads(text)
    return f"pid {info['pid']} on host {info['host']}"
  except (ValueError, KeyError, TypeError):
    return "another process (its lock file names no holder)"


class _FileLock:
  """flock(2) on a local file; the holder's host and pid are written into it for the message."""

  def __init__(self, path: epath.Path):
    import fcntl  # pylint: disable=import-outside-toplevel (POSIX only)
    self._fcntl = fcntl
    self._fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(self._fd, 4096, 0).decode(errors="replace")
      os.close(self._fd)
      raise WorkdirBusy(f"workdir {path.parent} is in use by {_describe(holder)} "
                        f"(lock {path}); not starting a second run on it") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, _holder_text().encode(), 0)

  def release(self) -> None:
    os.ftruncate(self._fd, 0)
    self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)
    os.close(self._fd)


class _Lease:
  """A lease file with a heartbeat, for file systems without locks."""

  def __init__(self, path: epath.Path, heartbeat_s: float, stale_s: float):
    self._path, self._heartbeat_s = path, heartbeat_s
    self._check_free(stale_s)
    mine = _holder_text()
    path.write_text(mine)
    # Read back after a moment: of two runs that wrote at once, the one overwritten gives way.
    time.sleep(min(1.0, heartbeat_s / 4))
    back = path.read_text()
    if json.loads(back).get("pid") != os.getpid() or json.loads(back).get("host") != socket.gethostname():
      raise WorkdirBusy(f"workdir {path.parent} is in use by {_describe(back)} (lease {path}); "
                        f"not starting a second run on it")
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
    self._thread.start()

  def _check_free(self, stale_s: float) -> None:
    if not self._path.exists():
      return
    text = self._path.read_text()
    try:
      info = json.loads(text)
      age = time.time() - float(info["heartbeat"])
    except (ValueError, KeyError, TypeError):
      info, age = {}, float("inf")  # an empty or garbled lease holds nothing
    if age < stale_s and not _holder_is_dead(info):
      raise WorkdirBusy(f"workdir {self._path.parent} is in use by {_describe(text)} (lease {self._path}, "
                        f"heartbeat {age:.0f} s ago; stale after {stale_s:.0f} s); not starting a "
                        f"second run on it")

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      self._path.write_text(_holder_text())

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    with contextlib.suppress(OSError):
      self._path.unlink()


@contextlib.contextmanager
def hold(workdir: epath.PathLike | None, *, lease: bool | None = None, heartbeat_s: float = HEARTBEAT_S,
         stale_s: float = STALE_S) -> Iterator[None]:
  """Holds `workdir`'s lock for the block (no-op for None); raises WorkdirBusy if another run has it.

  `lease`: use the heartbeat lease instead of flock; by default only for URLs (gs://...).
  """
  if not workdir:
    yield
    return
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / LOCK_NAME
  if lease is None:
    lease = "://" in str(workdir)
  lock = _Lease(path, heartbeat_s, stale_s) if lease else _FileLock(path)
  try:
    yield
  finally:
    lock.release()
