"""Everything built from the config before the first step: mesh, model, task, optimizer, state layout."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_vision_lite import config as config_lib, loss_guard, models, optim, sharding, tasks
from big_vision_lite.data import ops as pp_ops, sources, sources_mixture
from big_vision_lite.data.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class Setup:
  """The run's parts; `init_state(rng)` makes a fresh, sharded train state."""
  mesh: Any
  rules: Any
  model: nn.Module
  task: tasks.Task
  tx: Any  # the optimizer, wrapped in the loss guard (loss_guard.py)
  lr_fn: Any
  total_steps: int
  state_shardings: Any
  abstract_state: Any
  example: dict
  init_state: Callable[[jax.Array], dict]


def example_batch(input_config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """One preprocessed example with a leading batch dim of 1, to learn shapes and dtypes.

  The first record that preprocesses is used (bad ones are skipped unless
  config.input.bad_examples='error'); if the first 100 all fail, the pp spec is
  the likely culprit and the error names record 0's problem.
  """
  source = sources.get_source(input_config.data, config_key="config.input.data")
  if len(source) == 0:
    raise ValueError(f"config.input.data: dataset {input_config.data.name!r} split "
                     f"{input_config.data.split!r} is empty")
  pp = sources_mixture.preprocess_for(source, pp_ops.get_preprocess_fn(input_config.pp))
  first_error = None
  for index in range(min(len(source), 100)):
    try:
      example = pp(source[index], np.random.default_rng(0))
      break
    except Exception as e:  # noqa: BLE001 - one record's problem, reported below.
      first_error = first_error or f"record {index}: {type(e).__name__}: {e}"
      if input_config.get("bad_examples", "error") == "error":
        raise BadInputError(f"config.input.pp on {first_error}") from e
  else:
    raise BadInputError(f"config.input.pp fails on each of the first {min(len(source), 100)} "
                        f"records; {first_error}")
  return {k: np.asarray(v)[None] for k, v in example.items()}


def total_steps_of(config: ml_collections.ConfigDict) -> int:
  """config.total_steps, or total_epochs over the training split's size, rounded up."""
  if config.total_steps > 0:
    return int(config.total_steps)
  n = sources.num_examples(config.input.data, config_key="config.input.data")
  return max(1, int(math.ceil(config.total_epochs * n / config.input.batch_size)))


def build(config: ml_collections.ConfigDict, mesh=None, example: dict | None = None) -> Setup:
  """Model, task, optimizer and the (abstract, sharded) train state layout.

  `example` (one preprocessed example with a batch dim of 1) defaults to the
  first training example run through `config.input.pp`.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.sharding_rules)
  model = models.get_model(config.model_name, **config.model.to_dict())
  task = tasks.get_task(config.task, model)
  example = example if example is not None else example_batch(config.input)
  task.check_batch(example, "config.input.pp")
  total_steps = total_steps_of(config)
  init_task_state = lambda params: task.init_state(params, total_steps)

  def init_params(rng):
    variables = model.init({"params": rng, "dropout": rng}, *task.init_inputs(example))
    return variables["params"]

  rng = jax.random.PRNGKey(config.seed)
  try:
    boxed = jax.eval_shape(init_params, rng)
  except ValueError as e:
    # Models check their options (pool_type, ...) when first called: a config problem.
    raise config_lib.ConfigError(f"config.model ({config.model_name}): {e}") from e
  params_sh = sharding.param_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  tx, lr_fn = optim.make_optimizer(config, abstract_params, total_steps)
  tx = loss_guard.from_config(config, tx)
  repl = sharding.replicated(mesh)
  state_sh = {
      "params": params_sh,
      "opt_state": sharding.opt_state_shardings(tx, abstract_params, params_sh, mesh),
      "step": repl,
      "rng": repl,
  }
  if jax.eval_shape(init_task_state, abstract_params) is not None:
    state_sh["task_state"] = task.state_shardings(params_sh, repl)

  def init_state(rng):
    params = nn.unbox(init_params(rng))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": rng}
    task_state = init_task_state(params)
    return state if task_state is None else {**state, "task_state": task_state}

  abstract = jax.eval_shape(init_state, rng)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sh)
  return Setup(mesh, rules, model, task, tx, lr_fn, total_steps, state_sh, abstract, example,
               init_state=jax.jit(init_state, out_shardings=state_sh))
