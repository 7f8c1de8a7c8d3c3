"""The loss guard's report: warns of newly skipped updates, stops under nan_policy='stop' or
past config.max_consecutive_skips (the counters live in the optimizer state, loss_guard.py)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import jax

from big_vision_lite import checkpoint, loss_guard
from big_vision_lite.hooks.base import StepInfo
from big_vision_lite.hooks.metrics import RunLog

log = logging.getLogger("big_vision_lite")


class LossGuardReport:
  """Due at the logged and the checkpoint steps, before a save: under nan_policy='stop' no
  checkpoint is written after a bad step."""

  def __init__(self, *, nan_policy: str, max_consecutive_skips: int,
               ckpt: checkpoint.Checkpointer | None, log: RunLog, initial_state: Any,
               is_main: bool):
    self.nan_policy, self.limit, self.ckpt, self.log, self.is_main = (
        nan_policy, max_consecutive_skips, ckpt, log, is_main)
    self.reported = loss_guard.status(initial_state["opt_state"])[:2]

  def _stop(self, info: StepInfo, message: str) -> None:
    self.log.writer.write(info.step, {k: float(v) for k, v in jax.device_get(info.metrics).items()})
    if self.ckpt:
      self.ckpt.wait_until_finished()  # so "last complete checkpoint" counts a save in flight
    last = self.ckpt.latest_step() if self.ckpt else None
    raise FloatingPointError(message.format(last=last))

  def __call__(self, info: StepInfo) -> None:
    nonfinite, spikes, first, in_a_row = loss_guard.status(info.state["opt_state"])
    if self.limit and in_a_row > self.limit:
      self._stop(info, f"{in_a_row} updates in a row were skipped by step {info.step} (more than "
                 f"config.max_consecutive_skips={self.limit}; {nonfinite} non-finite, {spikes} "
                 f"spike(s) in all); the last complete checkpoint is step {{last}}, saved before "
                 f"or between skips so its parameters are finite (lower config.lr?)")
    if nonfinite and self.nan_policy == "stop":
      self._stop(info, f"loss, gradient or updated params not finite at step {first} "
                 f"(nan_policy='stop'); stopped at step {info.step}; metrics written; the last "
                 f"complete checkpoint is step {{last}} (set config.nan_policy='skip' to drop "
                 f"such updates)")
    if (nonfinite, spikes) != tuple(self.reported):
      msg = (f"step {info.step}: skipped {nonfinite + spikes} update(s) so far ({nonfinite} with "
             f"a non-finite loss, {spikes} loss spike(s)); params and optimizer state left "
             f"unchanged for them")
      log.warning(msg)
      if self.is_main:
        print(f"warning: {msg}", file=sys.stderr, flush=True)
    self.reported = (nonfinite, spikes)
