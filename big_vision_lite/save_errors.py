"""A failed checkpoint save kept to one line: the innermost cause, none of the background tracebacks."""

from __future__ import annotations

import errno
import logging as py_logging
import os
import sys
from typing import Any


def short_error(e: BaseException, limit: int = 300) -> str:
  """One line for an orbax/tensorstore error: the innermost cause, without the spec dump.

  A longer first line is cut at `limit`, but an OS error's text (an errno's strerror such as
  "No space left on device") found anywhere in the chain is kept.
  """
  chain, seen = [e], {id(e)}
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
    chain.append(nxt)
    seen.add(id(nxt))
  inner = chain[-1]
  text = (str(inner).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
  if len(text) > limit:
    text = text[:limit] + " ..."
  everything = " ".join(str(x) for x in chain)
  causes = [os.strerror(n) for n in sorted(errno.errorcode) if os.strerror(n) in everything]
  causes = [c for c in causes if c not in text and not any(c in o and c != o for o in causes)]
  return f"{type(inner).__name__}: {text}" + (f" ({'; '.join(causes)})" if causes else "")


class _DropOrbaxTracebacks(py_logging.Filter):
  """Drops the tracebacks orbax's background threads log: the error comes back as a CheckpointError."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (record.levelno >= py_logging.ERROR and record.exc_info
                and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_FILTER = _DropOrbaxTracebacks()


def _from_a_save(exc: BaseException | None) -> bool:
  """Whether `exc` is a failed tensorstore/orbax write (its text or frames name them)."""
  if exc is None:
    return False
  if "tensorstore" in str(exc) or "OCDBT" in str(exc):
    return True
  tb = exc.__traceback__
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _DropUnretrievedSaveErrors(py_logging.Filter):
  """Drops asyncio's "exception was never retrieved" for the other writes of a failed save.

  When one array write of an async save fails (a full disk), orbax raises that one; the
  sibling writes that failed alike are collected later and asyncio logs each, with its
  tensorstore spec, as the interpreter exits. The save's error is reported once, as a
  CheckpointError.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (_from_a_save(exc) or f"{os.sep}orbax{os.sep}" in record.getMessage())


_ASYNCIO_FILTER = _DropUnretrievedSaveErrors()


def _is_closed_loop_callback(unraisable: Any) -> bool:
  """tensorstore completing a write of a failed save after orbax closed that save's event loop."""
  exc = unraisable.exc_value
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    return False
  tb, files = exc.__traceback__, []
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return bool(files) and all(f"{os.sep}asyncio{os.sep}" in f for f in files)


def quiet_failed_saves() -> None:
  """Keeps a failed background save to its one CheckpointError (installed once per process).

  Besides orbax's own logged tracebacks (_DropOrbaxTracebacks) a save that hits a full disk
  makes two more kinds of noise: asyncio's unretrieved-exception logs (_DropUnretrievedSaveErrors)
  and tensorstore's callbacks into the closed loop, which Python reports as unraisable
  "RuntimeError: Event loop is closed" tracebacks. Other unraisable errors go to the
  previous hook unchanged.
  """
  py_logging.getLogger("absl").addFilter(_ORBAX_FILTER)
  py_logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)
  if getattr(sys.unraisablehook, "_bvl_quiet_saves", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)
  hook._bvl_quiet_saves = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook
