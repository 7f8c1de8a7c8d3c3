"""Evaluators: plugins run by the loop every `log_steps` and at the end of training.

Each evaluator is one file here registering a class in EVALUATORS; the loop
only calls `should_run(step)` and `run(params)`.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from big_vision_lite import platform, sharding
from big_vision_lite.registry import Registry
from big_vision_lite.config import ConfigError
from big_vision_lite.data import pipeline

EVALUATORS = Registry("evaluator", "big_vision_lite.evaluators")


class Evaluator:
  """Common config keys: type, log_steps (0 = only at the end), batch_size, data, pp."""

  allowed_keys: tuple[str, ...] = ("type", "log_steps", "batch_size", "data", "pp")

  def __init__(self, name: str, config: ml_collections.ConfigDict, *, task, mesh: Mesh,
               default_batch_size: int, total_steps: int, workdir: str | None = None):
    unknown = set(config.keys()) - set(self.allowed_keys)
    if unknown:
      raise ConfigError(f"config.evals.{name}.{sorted(unknown)[0]}: unknown key for evaluator "
                       f"{config.type!r} (allowed: {sorted(self.allowed_keys)})")
    self.name = name
    self.config = config
    self.task = task
    self.mesh = mesh
    self.batch_size = int(config.get("batch_size", default_batch_size))
    self.log_steps = int(config.get("log_steps", 0))
    self.total_steps = total_steps
    self.workdir = workdir  # the trainer's; evaluators that write files (caption_samples) use it

  def require(self, *keys: str) -> None:
    """One ConfigError naming the first of `keys` missing from this evaluator's config."""
    for key in keys:
      if key not in self.config:
        raise ConfigError(f"config.evals.{self.name}.{key}: missing")

  def eval_data(self):
    """The iterator over config.data preprocessed by config.pp, in this evaluator's batches."""
    return pipeline.make_eval_iterator(self.config.data, self.config.pp,
                                       global_batch_size=self.batch_size,
                                       config_key=f"config.evals.{self.name}")

  def predict_fn(self, key: str, needs: str):
    """The task's predict function `key`; a ConfigError naming the task `needs` where it has none."""
    fns = self.task.predict_fns()
    if key not in fns:
      raise ConfigError(f"config.evals.{self.name}.type: {self.config.type} needs task {needs!r}")
    return fns[key]

  def jit(self, fn):
    """jax.jit for an eval step: replicated outputs, the backend's compile options (platform)."""
    return jax.jit(fn, out_shardings=sharding.replicated(self.mesh),
                   compiler_options=platform.compiler_options())

  def should_run(self, step: int) -> bool:
    return step == self.total_steps or (self.log_steps > 0 and step % self.log_steps == 0)

  def run(self, params: Any) -> dict[str, float]:
    raise NotImplementedError


def get_evaluators(config: ml_collections.ConfigDict, **kwargs) -> list[Evaluator]:
  out = []
  for name, ev_config in config.evals.items():
    if "type" not in ev_config:
      raise ConfigError(f"config.evals.{name}.type: missing")
    out.append(EVALUATORS.get(ev_config.type)(name, ev_config, **kwargs))
  return out
