"""The profiler: a jax.profiler trace of config.profile.num_steps steps from start_step, written to
<workdir>/profile/plugins/profile/<time>/ (TensorBoard's xplane.pb; perfetto_trace.json.gz for
ui.perfetto.dev)."""

from __future__ import annotations

import logging

import jax

from big_vision_lite.hooks.base import StepInfo

log = logging.getLogger("big_vision_lite")


class Profile:
  """Due every step: traces steps [start_step, start_step + num_steps) of this run.

  Built right before the loop: `first_step` is the step the run starts after (0, or the
  resumed checkpoint's); a run resumed past start_step - 1 takes no trace.
  """

  def __init__(self, directory: str, start_step: int, num_steps: int, first_step: int):
    self.directory, self.start_step, self.num_steps = directory, start_step, num_steps
    self.active = False
    if num_steps > 0 and first_step == start_step - 1:
      self._start()

  def _start(self) -> None:
    jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
    self.active = True

  def __call__(self, info: StepInfo) -> None:
    if self.num_steps <= 0:
      return
    if info.step == self.start_step - 1 and not self.active:
      self._start()
    elif self.active and info.step >= self.start_step + self.num_steps - 1:
      jax.block_until_ready(info.state)  # the traced steps' device work, not only their dispatch
      self.close()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      print(f"profile of steps {self.start_step}..{self.start_step + self.num_steps - 1} "
            f"written to {self.directory}", flush=True)
