"""SIGTERM and SIGINT for the trainer: an exit at once while nothing can be saved, a checkpoint after."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Any, Sequence

# Light on purpose (no JAX): train.py installs it before its heavy imports.

# SIGTERM: EX_TEMPFAIL ("try again later", a launcher retries); SIGINT: 128 + 2, as a shell reports Ctrl-C.
EXIT_CODES = {signal.SIGTERM: 75, signal.SIGINT: 130}
_received: list[int] = []
_state: dict[str, Any] = {"installed": False, "saving": None, "command": "", "previous": {}}


def install(argv: Sequence[str]) -> None:
  """Handles SIGTERM/SIGINT from now on; `argv` (the trainer's arguments) gives the resume command."""
  if not _state["installed"]:
    _state["previous"] = {sig: signal.getsignal(sig) for sig in EXIT_CODES}
  _state.update(installed=True, saving=None, command=shlex.join(["python", "-m", "big_vision_lite.train", *argv]))
  _received.clear()
  for sig in EXIT_CODES:
    signal.signal(sig, _handler)


def uninstall() -> None:
  """Puts back the handlers install() replaced (for callers of train.main in-process)."""
  for sig, previous in _state["previous"].items():
    signal.signal(sig, previous)
  _state.update(installed=False, saving=None, previous={})


def ignore_after_run() -> None:
  """The run has ended (done, preempted or failed) and its result is out: from now on SIGTERM/SIGINT
  are ignored while the process exits. Python's finalization would put back their default action,
  so a signal in the seconds JAX and the input workers take to shut down would end a finished run
  with -15 instead of its exit status; an ignored signal keeps that status."""
  for sig in EXIT_CODES:
    signal.signal(sig, signal.SIG_IGN)


def installed() -> bool:
  return bool(_state["installed"])


def saving_from_now() -> None:
  """The train state and a checkpointer exist: a signal now asks for a checkpoint at the next step."""
  from big_vision_lite import checkpoint  # pylint: disable=import-outside-toplevel (heavy; here, not in the handler)
  _state["saving"] = checkpoint._SIGTERM  # pylint: disable=protected-access (what reached_preemption reads)


def received() -> int | None:
  """The first SIGTERM/SIGINT received since install(), or None."""
  return _received[0] if _received else None


def exit_code() -> int:
  return EXIT_CODES.get(received() or signal.SIGTERM, 75)


def reason() -> str:
  return "interrupted (SIGINT)" if received() == signal.SIGINT else "preempted"


def resume_command() -> str:
  return str(_state["command"])


def _handler(signum: int, frame) -> None:  # pylint: disable=unused-argument
  name = signal.Signals(signum).name
  code = EXIT_CODES[signal.Signals(signum)]
  if not _state["saving"]:
    _exit(f"{name} received before training started: nothing to save; exiting {code} "
          f"(run the same command again: {resume_command()})", code)
  if _received and signum == signal.SIGINT:
    _exit(f"second SIGINT: exiting {code} without waiting for the checkpoint (the previous complete "
          f"one is kept); resume with: {resume_command()}", code)
  _received.append(signum)
  _state["saving"].set()


def _exit(line: str, code: int) -> None:
  print(line, file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access (no state to save; skip atexit joins of input workers)


def ignore_in_worker() -> None:
  """In an input worker: leave SIGTERM/SIGINT to the trainer, as PyTorch's DataLoader workers do."""
  for sig in EXIT_CODES:
    signal.signal(sig, signal.SIG_IGN)
