"""Evaluation: one hook per evaluator, due where the evaluator says (its log_steps and the end)."""

from __future__ import annotations

from big_vision_lite import metrics
from big_vision_lite.hooks.base import Hook, StepInfo
from big_vision_lite.hooks.metrics import RunLog


class Evaluate:
  """Runs `evaluator` on the step's params; its time is not counted as training throughput."""

  def __init__(self, evaluator, log: RunLog, throughput: metrics.Throughput):
    self.evaluator, self.log, self.throughput = evaluator, log, throughput

  def __call__(self, info: StepInfo) -> None:
    with self.throughput.pause():
      results = self.evaluator.run(info.state["params"])
    self.log.writer.write(info.step, results)
    self.log.last.update(results)
    self.log.progress.report_eval(info.step, results)


def hook(evaluator, log: RunLog, throughput: metrics.Throughput) -> Hook:
  return Hook(Evaluate(evaluator, log, throughput), every=evaluator.should_run,
              name=f"eval/{evaluator.name}")
