"""Checkpoints: the periodic (async) save, and the save-and-stop on a preemption signal."""

from __future__ import annotations

from typing import Any

from big_vision_lite import checkpoint, metrics, signals
from big_vision_lite.hooks.base import StepInfo
from big_vision_lite.hooks.metrics import RunLog


class Preempted(Exception):
  """Raised after the state was saved because the job is being preempted."""


def save_and_stop(ckpt: checkpoint.Checkpointer, step: int, state: Any, train_iter: Any,
                  note: str = "") -> None:
  """Saves `step` now, waits for it to be complete, and raises Preempted."""
  ckpt.save(step, state, train_iter, force=True)
  ckpt.wait_until_finished()
  raise Preempted(f"{signals.reason()} at step {step}: checkpoint saved in {ckpt.directory}{note}")


class SaveCheckpoint:
  """Due every step: the checkpointer keeps its own cadence (config.ckpt_steps) and the end."""

  def __init__(self, ckpt: checkpoint.Checkpointer, train_iter: Any, log: RunLog,
               throughput: metrics.Throughput):
    self.ckpt, self.train_iter, self.log, self.throughput = ckpt, train_iter, log, throughput

  def __call__(self, info: StepInfo) -> None:
    with self.throughput.pause():
      if self.ckpt.save(info.step, info.state, self.train_iter, force=info.is_last):
        self.log.writer.sync()  # gs://: the rows up to a checkpoint outlive a kill, like it


class StopOnPreemption:
  """Due every step, after every other hook: once all processes agree a signal arrived (JAX's
  preemption sync point), saves this step and stops the run."""

  def __init__(self, ckpt: checkpoint.Checkpointer, train_iter: Any):
    self.ckpt, self.train_iter = ckpt, train_iter

  def __call__(self, info: StepInfo) -> None:
    if self.ckpt.reached_preemption(info.step):
      save_and_stop(self.ckpt, info.step, info.state, self.train_iter)
