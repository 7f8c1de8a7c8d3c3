"""Training metrics: a metrics.jsonl row, the progress line, throughput and bad-example counts."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from big_vision_lite import bad_examples, metrics
from big_vision_lite.hooks.base import StepInfo


@dataclasses.dataclass
class RunLog:
  """Where hooks report: the metrics writer, the progress line, and the last logged values
  (training metrics of the last logged step, updated by the evaluations after it)."""
  writer: metrics.MetricWriter
  progress: metrics.Progress
  last: dict[str, float] = dataclasses.field(default_factory=dict)


class TrainMetrics:
  """Due at the logged steps (every=config.log_training_steps): writes the step's metrics."""

  def __init__(self, log: RunLog, throughput: metrics.Throughput, train_iter: Any, *,
               global_batch_size: int, bad_policy: str, max_bad_fraction: float):
    self.log, self.throughput, self.train_iter = log, throughput, train_iter
    self.batch_size, self.bad_policy, self.max_bad_fraction = (
        global_batch_size, bad_policy, max_bad_fraction)

  def __call__(self, info: StepInfo) -> None:
    row = {k: float(v) for k, v in jax.device_get(info.metrics).items()}
    bad = bad_examples.skipped_bad_examples(self.train_iter, info.step, self.batch_size)
    if bad is not None:
      row["skipped_bad_examples"] = float(bad)
    row.update(self.throughput.tick(info.step, self.batch_size))
    self.log.writer.write(info.step, row)
    self.log.progress.update(info.step, row)
    self.log.last = row
    if bad is not None and self.bad_policy == "skip":
      bad_examples.check_bad_fraction(bad, info.step * self.batch_size + bad,
                                      self.max_bad_fraction, info.step)
