"""The jitted train step: grads (accumulated over micro-batches), the guarded update, scalar metrics."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from big_vision_lite import loss_guard, optim, platform, sharding, tasks
from big_vision_lite.build import Setup


def _grads(loss_fn: Any, params: Any, batch: dict, rng: jax.Array, grad_accum_steps: int):
  """((loss, aux), grads), averaged over `grad_accum_steps` micro-batches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    return grad_fn(params, batch, rng)

  # Micro-batch i takes rows i, i+k, i+2k, ...: each device keeps its own rows, no reshuffle.
  def split(x):
    x = x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  micro = jax.tree.map(split, batch)

  def body(carry, inputs):
    i, mb = inputs
    (l, a), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
    acc_g, acc_l, acc_a = carry
    return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_a, a)), None

  zeros_g = jax.tree.map(jnp.zeros_like, params)
  _, aux_shape = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros_a = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  (grads, loss, aux), _ = jax.lax.scan(
      body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a), (jnp.arange(grad_accum_steps), micro))
  scale = 1.0 / grad_accum_steps
  return (loss * scale, jax.tree.map(lambda a: a * scale, aux)), jax.tree.map(lambda g: g * scale, grads)


def make_train_step(setup: Setup, grad_accum_steps: int) -> Callable[[dict, dict], tuple[dict, dict]]:
  """(state, batch) -> (state, metrics), jitted with the state donated.

  A dropped update (loss_guard) leaves params, optimizer state and task state bit for bit as
  they were.
  """
  task, tx, lr_fn = setup.task, setup.tx, setup.lr_fn

  def step_fn(state, batch):
    params, step = state["params"], state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    task_state = state.get("task_state")
    loss_fn = task.loss if task_state is None else functools.partial(
        task.loss, task_state=task_state, step=step)
    (loss, aux), grads = _grads(loss_fn, params, batch, rng, grad_accum_steps)
    stats = aux.pop(tasks.STATE_STATS, None)
    grad_norm = optim.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params, loss=loss)
    new_params = jax.tree.map(jnp.add, params, updates)
    guard = loss_guard.find(opt_state)
    out_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(step),
                   "param_norm": optim.global_norm(new_params), "skipped_nonfinite": guard.nonfinite,
                   "skipped_spikes": guard.spikes, **aux}
    new_state = {"params": new_params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}
    if task_state is not None:
      accepted = guard.count > loss_guard.find(state["opt_state"]).count
      updated = task.update_state(task_state, stats, params, new_params, step)
      new_state["task_state"] = jax.tree.map(lambda n, o: jnp.where(accepted, n, o), updated,
                                             task_state)
    return new_state, out_metrics

  repl = sharding.replicated(setup.mesh)
  batch_sh = {k: sharding.batch_sharding(setup.mesh, v.ndim) for k, v in setup.example.items()}
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, repl), donate_argnums=(0,),
                 compiler_options=platform.compiler_options())
