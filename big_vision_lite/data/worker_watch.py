"""Turns the death of a grain input worker into an error in the trainer within a second."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import signal
import threading
from typing import Any, Iterator

_POLL_S = 0.25
_WORKER_PREFIX = "grain-process-prefetch"


class InputWorkerDied(Exception):
  """An input worker process exited while the trainer was reading from it."""


class _Watch:
  """A daemon thread polling the input workers; wakes the main thread blocked in next()."""

  def __init__(self) -> None:
    self.dead = ""
    self.waiting = False
    self.seen: dict[int, Any] = {}
    self._stop = threading.Event()
    self._main = threading.main_thread().ident
    signal.signal(signal.SIGUSR1, self._on_wake)
    self._thread = threading.Thread(target=self._run, name="input-worker-watch", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.wait(_POLL_S):
      # multiprocessing.active_children() would reap a dead worker before we could see it.
      for p in list(multiprocessing.process._children):  # pylint: disable=protected-access
        if p.name.startswith(_WORKER_PREFIX) and p.pid is not None:
          self.seen.setdefault(p.pid, p)
      for index, pid in enumerate(sorted(self.seen)):
        code = self.seen[pid].exitcode
        if code and not self.dead:
          how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
          self.dead = f"input worker {index} (pid {pid}) exited unexpectedly ({how})"
      if self.dead and self.waiting:
        signal.pthread_kill(self._main, signal.SIGUSR1)

  def _on_wake(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if self.waiting and self.dead:
      self.waiting = False
      raise InputWorkerDied(self.dead)

  def stop(self) -> None:
    self._stop.set()


_watch: _Watch | None = None


def next_batch(iterator: Iterator[Any]) -> Any:
  """next(iterator), raising InputWorkerDied once an input worker died (main thread only)."""
  global _watch
  if _watch is None:
    _watch = _Watch()
  if _watch.dead:
    raise InputWorkerDied(_watch.dead)
  _watch.waiting = True
  try:
    return next(iterator)
  except RuntimeError as e:  # grain's own check, where its queue wait has a timeout
    if "terminated unexpectedly" in str(e):
      raise InputWorkerDied(_watch.dead or str(e).split("\n")[0]) from None
    raise
  finally:
    _watch.waiting = False


def stop() -> None:
  """Ends the watch (after the training loop); the next next_batch() starts a new one."""
  global _watch
  if _watch is not None:
    _watch.stop()
    _watch = None
