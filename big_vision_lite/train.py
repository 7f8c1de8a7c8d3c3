"""The one training loop. Nothing here is model- or objective-specific: tasks decide the loss.

    python -m big_vision_lite.train --config configs/vit_shapes.py --workdir runs/vit \
        [--config.total_steps=100 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Sequence

from absl import flags as absl_flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_vision_lite import checkpoint, config as config_lib, flops, metrics, optim, pretrained, sharding
from big_vision_lite import evaluators, models, tasks
from big_vision_lite.data import ops as pp_ops, pipeline, sources
from big_vision_lite.registry import UnknownNameError

log = logging.getLogger("big_vision_lite")

# Exit status after a preemption (SIGTERM) was handled by saving a checkpoint:
# EX_TEMPFAIL from sysexits.h, "try again later", so launchers can tell it from a failure.
PREEMPTED_EXIT_CODE = 75


def _inject_fault(step: int) -> None:
  """Test hook: BVL_FAULT=kill@N or term@N sends SIGKILL/SIGTERM to this process after step N.

  Used by the resume tests to stop a run at an exact step, e.g. while an async
  checkpoint write is still in flight; never set in normal runs.
  """
  spec = os.environ.get("BVL_FAULT")
  if not spec:
    return
  kind, _, at = spec.partition("@")
  if int(at) == step:
    os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind])


class Preempted(Exception):
  """Raised after the state was saved because the job is being preempted."""


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the first step."""
  mesh: Any
  rules: Any
  model: nn.Module
  task: tasks.Task
  tx: Any
  lr_fn: Any
  total_steps: int
  state_shardings: Any
  abstract_state: Any
  example: dict


def example_batch(input_config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """One preprocessed example with a leading batch dim of 1, to learn shapes and dtypes."""
  source = sources.get_source(input_config.data)
  if len(source) == 0:
    raise ValueError(f"config.input.data: dataset {input_config.data.name!r} split "
                     f"{input_config.data.split!r} is empty")
  example = pp_ops.get_preprocess_fn(input_config.pp)(source[0], np.random.default_rng(0))
  return {k: np.asarray(v)[None] for k, v in example.items()}


def total_steps_of(config: ml_collections.ConfigDict) -> int:
  if config.total_steps > 0:
    return int(config.total_steps)
  n = pipeline.num_examples(config.input.data)
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

  def init_params(rng):
    variables = model.init({"params": rng, "dropout": rng}, *task.init_inputs(example))
    return variables["params"]

  rng = jax.random.PRNGKey(config.seed)
  boxed = jax.eval_shape(init_params, rng)
  params_sh = sharding.param_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  tx, lr_fn = optim.make_optimizer(config, abstract_params, total_steps)
  repl = sharding.replicated(mesh)
  state_sh = {
      "params": params_sh,
      "opt_state": sharding.opt_state_shardings(tx, abstract_params, params_sh, mesh),
      "step": repl,
      "rng": repl,
  }

  def init_state(rng):
    params = nn.unbox(init_params(rng))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng}

  abstract = jax.eval_shape(init_state, rng)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
  setup = Setup(mesh, rules, model, task, tx, lr_fn, total_steps, state_sh, abstract, example)
  setup.init_state = jax.jit(init_state, out_shardings=state_sh)  # type: ignore[attr-defined]
  return setup


def make_train_step(setup: Setup, grad_accum_steps: int):
  """The jitted step: grads (accumulated over micro-batches), optimizer update, scalar metrics."""
  task, tx, lr_fn = setup.task, setup.tx, setup.lr_fn
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)

  def step_fn(state, batch):
    params, step = state["params"], state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    if grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(params, batch, rng)
    else:
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
      _, aux_shape = jax.eval_shape(task.loss, params, jax.tree.map(lambda x: x[0], micro), rng)
      zeros_a = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
      (grads, loss, aux), _ = jax.lax.scan(
          body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a), (jnp.arange(grad_accum_steps), micro))
      scale = 1.0 / grad_accum_steps
      grads = jax.tree.map(lambda g: g * scale, grads)
      loss = loss * scale
      aux = jax.tree.map(lambda a: a * scale, aux)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = jax.tree.map(jnp.add, params, updates)
    out_metrics = {"loss": loss, "grad_norm": optim.global_norm(grads), "lr": lr_fn(step),
                   "param_norm": optim.global_norm(new_params), **aux}
    new_state = {"params": new_params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}
    return new_state, out_metrics

  repl = sharding.replicated(setup.mesh)
  batch_sh = {k: sharding.batch_sharding(setup.mesh, v.ndim) for k, v in setup.example.items()}
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, repl), donate_argnums=(0,))


def _restore_or_init(setup: Setup, config, ckpt: checkpoint.Checkpointer | None, train_iter):
  """Resumes from the newest complete checkpoint, else initialises (and loads model_init)."""
  latest = ckpt.latest_step() if ckpt else None
  if latest is not None:
    log.info("Resuming from %s step %d", ckpt.directory, latest)
    return ckpt.restore(latest, setup.abstract_state, train_iter), latest
  state = setup.init_state(jax.random.PRNGKey(config.seed))
  if config.model_init:
    host_params = jax.device_get(state["params"])
    # Optional loader switches (e.g. upcycle=True for MoE) pass through as given.
    extra = {k: v for k, v in config.model_load.items() if k not in ("subtree", "allow_mismatch")}
    params, report = pretrained.load_pretrained(
        host_params, config.model_init, subtree=config.model_load.subtree or None,
        allow_mismatch=config.model_load.allow_mismatch, **extra)
    log.info("Loaded %s:\n%s", config.model_init, report)
    if jax.process_index() == 0:
      print(f"model_init {config.model_init}:\n{report}", flush=True)
    params = jax.device_put(params, setup.state_shardings["params"])
    # Optimizer state was built for the random init; rebuild it for the loaded weights.
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(params)
    state = {**state, "params": params, "opt_state": opt_state}
  return state, 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics and evaluation results."""
  is_main = jax.process_index() == 0
  setup = build(config)
  mesh, total_steps = setup.mesh, setup.total_steps
  if workdir and is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_iter = pipeline.make_train_iterator(
      config.input.data, config.input.pp, global_batch_size=config.input.batch_size,
      seed=config.seed, num_workers=config.input.num_workers, prefetch_buffer_size=config.input.prefetch)
  ckpt = None
  if workdir and config.ckpt_steps > 0:
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_interval_steps=config.ckpt_steps,
        max_to_keep=config.keep_ckpts or None, keep_period=config.keep_ckpt_steps or None,
        async_save=config.async_checkpoint)
    checkpoint.install_sigterm_handler()
  state, start_step = _restore_or_init(setup, config, ckpt, train_iter)

  evals = evaluators.get_evaluators(config, task=setup.task, mesh=mesh,
                                    default_batch_size=config.input.batch_size, total_steps=total_steps)
  writer = metrics.MetricWriter(workdir, enabled=is_main and bool(workdir))
  if start_step:
    writer.truncate_after(start_step)
  fwd_flops = flops.model_forward_flops(setup.model, setup.example)
  if config.mfu_peak_flops > 0:
    peak, peak_desc = float(config.mfu_peak_flops), "config.mfu_peak_flops"
  else:
    peak, peak_desc = flops.default_peak_flops(jax.devices()[0])
  if is_main:
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es); {total_steps} steps of batch {config.input.batch_size}; "
          f"MFU peak {peak:.3g} FLOP/s per device ({peak_desc})", flush=True)

  train_step = make_train_step(setup, config.grad_accum_steps)
  step_flops = flops.train_flops_per_step(fwd_flops, config.input.batch_size) if fwd_flops else None
  throughput = metrics.Throughput(total_steps, jax.device_count(), flops_per_step=step_flops,
                                  peak_flops_per_device=peak)
  progress = metrics.Progress(total_steps, initial_step=start_step, enabled=is_main and config.progress,
                              every=config.log_training_steps)
  last: dict[str, float] = {}
  if start_step >= total_steps and is_main:
    print(f"{workdir} already holds the final step {start_step} of {total_steps}; nothing to do",
          flush=True)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      throughput.tick(start_step, 0)
      for step in range(start_step + 1, total_steps + 1):
        local = next(train_iter)
        state, step_metrics = train_step(state, sharding.global_batch(local, mesh))
        if step % config.log_training_steps == 0 or step == total_steps:
          last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          last.update(throughput.tick(step, config.input.batch_size))
          writer.write(step, last)
          progress.update(step, last)
          if not math.isfinite(last["loss"]):
            raise FloatingPointError(
                f"loss is {last['loss']} at step {step}; stopping (metrics written; the last "
                f"complete checkpoint is step {ckpt.latest_step() if ckpt else None})")
        with throughput.pause():
          for ev in evals:
            if ev.should_run(step):
              results = ev.run(state["params"])
              writer.write(step, results)
              last.update(results)
              progress.update(step, results)
          if ckpt:
            ckpt.save(step, state, train_iter, force=step == total_steps)
            _inject_fault(step)
            if ckpt.reached_preemption(step):
              ckpt.save(step, state, train_iter, force=True)
              ckpt.wait_until_finished()
              raise Preempted(f"preempted at step {step}: checkpoint saved in {ckpt.directory}")
  finally:
    progress.close()
    writer.close()
    if ckpt:
      ckpt.wait_until_finished()
      ckpt.close()
  return last


# ----------------------------------------------------------------------------- command line


def maybe_initialize_distributed(args: argparse.Namespace) -> None:
  """Joins a multi-process job when flags or the environment (TPU pod, SLURM) ask for it."""
  if args.coordinator_address:
    jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)
  elif os.environ.get("BVL_DISTRIBUTED") == "1" or "SLURM_JOB_ID" in os.environ and int(
      os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()  # auto-detects TPU pod / SLURM settings


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="python -m big_vision_lite.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  parser.add_argument("--workdir", default="", help="checkpoints, metrics and logs go here; "
                      "an existing workdir is resumed")
  parser.add_argument("--coordinator_address", default="", help="host:port of process 0 (multi-process)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
    overrides.append(item)
  return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  # grain's worker processes read absl flags; we take no absl flags of our own.
  absl_flags.FLAGS.mark_as_parsed()
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    config = config_lib.load_config(args.config)
    config = config_lib.apply_overrides(config, overrides)
    maybe_initialize_distributed(args)  # before anything asks JAX about devices
    config_lib.validate(config, jax.device_count(), jax.process_count())
  except (config_lib.ConfigError, sharding.MeshError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    result = train_and_evaluate(config, args.workdir or None)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    return PREEMPTED_EXIT_CODE
  except (config_lib.ConfigError, sharding.MeshError, checkpoint.CheckpointError, UnknownNameError,
          FileNotFoundError, FloatingPointError) as e:
    # Expected failure modes get one line; anything else keeps its traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps(result, default=float), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
