"""Tasks: what turns a batch into a loss, metrics and prediction functions.

The training loop knows nothing of objectives; each task (classification,
contrastive, captioning, ...) is one file here that registers itself in TASKS.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_collections

from big_vision_lite.config import ConfigError
from big_vision_lite.registry import Registry

TASKS = Registry("task", "big_vision_lite.tasks")

Batch = Mapping[str, jax.Array]

# The aux entry in which a stateful task's loss hands `update_state` what it needs (batch means,
# averaged over micro-batches like the metrics); the train step takes it out of the metrics.
STATE_STATS = "task_state_stats"


class Task:
  """Base class. Subclasses implement `loss` and usually `predict_fns`."""

  # Keys every training batch must carry (checked on the first batch).
  required_keys: tuple[str, ...] = ()
  # The `config.task` keys the task reads besides "name"; any other key is refused.
  config_keys: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module):
    self.config = config
    self.model = model
    allowed = {"name", *self.config_keys}
    unknown = set(config.keys()) - allowed
    if unknown:
      name = config.get("name", type(self).__name__.lower())
      bad = sorted(unknown)[0]
      close = difflib.get_close_matches(bad, sorted(allowed), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"config.task.{bad}: unknown key for task {name!r}{hint} "
                        f"(allowed: {', '.join(sorted(allowed))})")

  def init_inputs(self, batch: Batch) -> tuple[Any, ...]:
    """Positional model inputs used to initialise parameters."""
    raise NotImplementedError

  def loss(self, params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar training loss and extra scalar metrics (averaged over the batch).

    A stateful task (init_state not None) is called as loss(params, batch, rng, task_state=...,
    step=...) and may put its STATE_STATS in the metrics."""
    raise NotImplementedError

  # A task's own train state (an EMA teacher, running centres), kept in the train state as
  # `task_state`, checkpointed and restored with it; stateless tasks keep the defaults.

  def init_state(self, params: Any, total_steps: int) -> Any:
    """The task's state for fresh `params` (called by build with the run's total steps), or None."""
    del params, total_steps
    return None

  def state_shardings(self, params_shardings: Any, replicated: Any) -> Any:
    """Shardings of init_state's tree, given the params' and the replicated one."""
    raise NotImplementedError

  def update_state(self, task_state: Any, stats: Any, params: Any, new_params: Any,
                   step: jax.Array) -> Any:
    """The state after step `step` updated `params` to `new_params` (jitted, in the train step;
    kept as it was when the loss guard drops the update)."""
    raise NotImplementedError

  def predict_fns(self) -> dict[str, Callable[..., Any]]:
    """Named `fn(params, batch) -> outputs` used by evaluators."""
    return {}

  def examples_in(self, batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]

  def check_batch(self, batch: Batch, where: str) -> None:
    missing = [k for k in self.required_keys if k not in batch]
    if missing:
      raise ValueError(f"{where}: batch lacks {missing} needed by task {type(self).__name__} "
                       f"(it has {sorted(batch)}); fix the preprocessing string")


def image_input(batch: Batch, key: str = "image") -> Any:
  """The image model's input: `batch[key]`, or, for NaFlex batches (ops_naflex writes
  `<key>_mask` and `<key>_shape`), the tuple (patches, mask, spatial shape) naflex_vit takes."""
  if f"{key}_mask" in batch:
    return (batch[key], batch[f"{key}_mask"], batch[f"{key}_shape"])
  return batch[key]


def get_task(config: ml_collections.ConfigDict, model: nn.Module) -> Task:
  return TASKS.get(config.name)(config, model)
