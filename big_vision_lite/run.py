"""One training run: builds its parts, restores or initialises the state, runs the loop with its hooks."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections

from big_vision_lite import checkpoint, evaluators, flops, metrics, sharding, signals, storage
from big_vision_lite.build import build
from big_vision_lite.data import pipeline, worker_watch
from big_vision_lite.hooks import Hook, checkpoint as ckpt_hooks, evaluation, every_n
from big_vision_lite.hooks import loss_guard as guard_hooks, memory, profiler
from big_vision_lite.hooks.metrics import RunLog, TrainMetrics
from big_vision_lite.loop import Loop
from big_vision_lite.restore import restore_or_init
from big_vision_lite.train_step import make_train_step
from big_vision_lite.workdir import check_workdir

log = logging.getLogger("big_vision_lite")


def _print_start(config, setup, peak: float, peak_desc: str) -> None:
  mesh = setup.mesh
  print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es); {setup.total_steps} steps of batch "
        f"{config.input.batch_size}; MFU peak {peak:.3g} FLOP/s per device ({peak_desc})",
        flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None,
                       overwrite: bool = False, hooks: Sequence[Hook] = ()) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics and evaluation results.

  `overwrite`: start afresh in a workdir holding another run (see workdir.check_workdir).
  `hooks`: more periodic work, run after the built-in hooks and before the preemption check.
  """
  is_main = jax.process_index() == 0
  # Model, shapes and step count first: a problem they show is reported before the workdir is written.
  setup = build(config)
  if workdir:
    check_workdir(config, workdir, overwrite=overwrite)
  elif is_main:
    print("warning: no --workdir: nothing (checkpoints, metrics, config.json) is saved",
          file=sys.stderr, flush=True)
  total_steps = setup.total_steps

  train_iter = pipeline.make_train_iterator(
      config.input.data, config.input.pp, global_batch_size=config.input.batch_size,
      seed=config.seed, num_workers=config.input.num_workers, prefetch_buffer_size=config.input.prefetch,
      bad_examples=config.input.bad_examples, max_bad_fraction=config.input.max_bad_fraction)
  ckpt = None
  if workdir and config.ckpt_steps > 0:
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_interval_steps=config.ckpt_steps,
        max_to_keep=config.keep_ckpts or None, keep_period=config.keep_ckpt_steps or None,
        async_save=config.async_checkpoint)
    if not signals.installed():
      checkpoint.install_sigterm_handler()
  state, start_step = restore_or_init(setup, config, ckpt, train_iter)
  if ckpt:
    signals.saving_from_now()

  evals = evaluators.get_evaluators(config, task=setup.task, mesh=setup.mesh, workdir=workdir,
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
    _print_start(config, setup, peak, peak_desc)

  train_step = make_train_step(setup, config.grad_accum_steps)
  step_flops = flops.train_flops_per_step(fwd_flops, config.input.batch_size) if fwd_flops else None
  throughput = metrics.Throughput(total_steps, jax.device_count(), flops_per_step=step_flops,
                                  peak_flops_per_device=peak)
  progress = metrics.Progress(total_steps, initial_step=start_step, enabled=is_main and config.progress,
                              every=config.log_training_steps)
  run_log = RunLog(writer, progress)
  if start_step >= total_steps and is_main:
    print(f"{workdir} already holds the final step {start_step} of {total_steps}; nothing to do",
          flush=True)

  loop = Loop(train_step, total_steps)
  if is_main:
    loop.add_hook(memory.StepMemory(train_step), every=lambda s: s == start_step + 1)
  loop.add_hook(TrainMetrics(run_log, throughput, train_iter, global_batch_size=config.input.batch_size,
                             bad_policy=config.input.bad_examples,
                             max_bad_fraction=config.input.max_bad_fraction),
                every=config.log_training_steps)
  guard_due = every_n(config.log_training_steps)
  loop.add_hook(guard_hooks.LossGuardReport(
      nan_policy=config.nan_policy, max_consecutive_skips=config.get("max_consecutive_skips", 0),
      ckpt=ckpt, log=run_log, initial_state=state, is_main=is_main),
      every=lambda s: guard_due(s, total_steps) or bool(ckpt and s % config.ckpt_steps == 0))
  for ev in evals:
    loop.add_hook(evaluation.hook(ev, run_log, throughput))
  if ckpt:
    loop.add_hook(ckpt_hooks.SaveCheckpoint(ckpt, train_iter, run_log, throughput))
  if workdir and is_main and config.profile.num_steps > 0:
    loop.add_hook(profiler.Profile(storage.join(workdir, "profile"), config.profile.start_step,
                                   config.profile.num_steps, first_step=start_step))
  for hook in hooks:
    loop.add_hook(hook)
  if ckpt:
    loop.add_hook(ckpt_hooks.StopOnPreemption(ckpt, train_iter))

  def next_batch(step: int, state: Any) -> Any:
    try:
      local = worker_watch.next_batch(train_iter)
    except worker_watch.InputWorkerDied as e:
      if ckpt and signals.received():  # the group's signal reached a worker still starting up
        ckpt_hooks.save_and_stop(ckpt, step - 1, state, train_iter, note=f" ({e})")
      raise
    return sharding.global_batch(local, setup.mesh)

  failure = None
  try:
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      throughput.tick(start_step, 0)
      loop.run(state, start_step, next_batch)
  except BaseException as e:
    failure = e
    raise
  finally:
    worker_watch.stop()
    try:
      _shut_down(progress, writer, ckpt, failure)
    finally:
      # After the checkpointer's last save (which reads the iterator's state), before any exit:
      # see pipeline.close_iterator. A failure to close is no reason to hide the run's own outcome.
      try:
        pipeline.close_iterator(train_iter)
      except Exception as e:  # noqa: BLE001
        log.info("also failed while stopping the input workers: %s: %s", type(e).__name__, e)
  return run_log.last


def _shut_down(progress, writer, ckpt: checkpoint.Checkpointer | None,
               failure: BaseException | None) -> None:
  """Closes the writers and finishes the checkpointer's saves, each even if another fails.

  While `failure` propagates, their own errors are logged, not raised, so that it stays the
  one reported; an OSError of the run's (a full disk under metrics.jsonl) is re-raised naming
  the newest intact checkpoint. Without a failure the first of their errors is raised.
  """
  closers = [progress.close, writer.close] + ([ckpt.wait_until_finished, ckpt.close] if ckpt else [])
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001 - reported below, or logged behind `failure`.
      if failure is None and first is None:
        first = e
      else:
        log.info("also failed while stopping: %s: %s", type(e).__name__, e)
  if first is not None:
    raise first
  if isinstance(failure, OSError) and ckpt:
    raise OSError(f"{failure}; {ckpt.intact_report()}") from failure
