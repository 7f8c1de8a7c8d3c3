"""The one training loop. Nothing here is model- or objective-specific: tasks decide the loss.

    python -m big_vision_lite.train --config configs/vit_shapes.py --workdir runs/vit \
        [--config.total_steps=100 ...]
"""

from __future__ import annotations

import sys


def _restart_command_line() -> int | None:
  """Restarts this program once with the block cache preloaded (block_cache.py), where it
  applies; 2 after printing a bad BVL_BLOCK_CACHE_* setting, else None."""
  from big_vision_lite import block_cache  # pylint: disable=import-outside-toplevel (light: no JAX)
  try:
    block_cache.restart(sys.orig_argv[1:])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return None


_restart_checked = False
if __name__ == "__main__":
  # First of all, so a SIGTERM/SIGINT during start-up is not lost (main() installs it again).
  from big_vision_lite import signals as _early_signals
  _early_signals.install(sys.argv[1:])
  # Before the imports below: they take ~1 s, which a restart in main() would pay twice.
  if (_code := _restart_command_line()) is not None:
    sys.exit(_code)
  _restart_checked = True
elif __name__ == "__mp_main__":  # a spawned input worker imports this module: signals are the trainer's
  from big_vision_lite import signals as _early_signals
  _early_signals.ignore_in_worker()

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Sequence

from absl import flags as absl_flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_vision_lite import checkpoint, config as config_lib, config_check, flops, metrics, optim
from big_vision_lite import pretrained, schedules, sharding, signals, storage
from big_vision_lite import (block_cache, distributed, evaluators, files, host_memory, models, tasks,
                             workdir_lock, xla_options)
from big_vision_lite.data import ops as pp_ops, pipeline, sources, worker_watch
from big_vision_lite.data.errors import BadInputError
from big_vision_lite.platform.gpu import xla_flags
from big_vision_lite.registry import UnknownNameError

log = logging.getLogger("big_vision_lite")

# Exit status after a preemption (SIGTERM) was handled by saving a checkpoint:
# EX_TEMPFAIL from sysexits.h, "try again later", so launchers can tell it from a failure.
PREEMPTED_EXIT_CODE = 75


_FAULT_KINDS = ("kill", "term", "nan", "spike", "slow")
# slow@N: seconds slept after each step from N on, like a real step's length, so the
# multi-process preemption test does not finish before JAX's sync point is agreed.
_SLOW_STEP_S = 0.5


def _faults() -> list[tuple[str, int]]:
  """Parses the test hook BVL_FAULT="kind@N[,kind@N...]" (kinds: kill, term, nan, spike, slow)."""
  out = []
  for item in os.environ.get("BVL_FAULT", "").split(","):
    if item.strip():
      kind, _, at = item.strip().partition("@")
      if kind not in _FAULT_KINDS or not at.isdigit():
        raise ValueError(f"BVL_FAULT: cannot read {item!r}; expected kind@step with kind in {_FAULT_KINDS}")
      out.append((kind, int(at)))
  return out


def _inject_fault(step: int) -> None:
  """Test hook: kill@N / term@N send SIGKILL / SIGTERM to this process after step N.

  Called right after step N's checkpoint save was issued, so a kill can land
  while an async write is still in flight; slow@N sleeps after every step from N
  on. (nan@N / spike@N are applied inside the train step, see make_train_step.)
  Never set in normal runs.
  """
  for kind, at in _faults():
    if at == step and kind in ("kill", "term"):
      os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind])
    if kind == "slow" and step >= at:
      time.sleep(_SLOW_STEP_S)


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
  # Loss guard: {"window", "k", "min_steps", "std_floor"} of config.spike_skip (window 0 = no spike rule).
  guard: dict = dataclasses.field(default_factory=lambda: dict(window=0, k=6.0, min_steps=20, std_floor=0.1))


def init_guard(window: int) -> dict:
  """Loss-guard part of the train state: the last `window` accepted losses and skip counters.

  It lives in the state (so in every checkpoint) so a resumed run judges spikes
  on exactly the history an uninterrupted run would have.
  """
  return {"losses": jnp.zeros((max(1, window),), jnp.float32), "count": jnp.zeros((), jnp.int32),
          "nonfinite": jnp.zeros((), jnp.int32), "spikes": jnp.zeros((), jnp.int32),
          "first_nonfinite": jnp.zeros((), jnp.int32), "in_a_row": jnp.zeros((), jnp.int32),
          "most_in_a_row": jnp.zeros((), jnp.int32)}


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
  pp = pp_ops.get_preprocess_fn(input_config.pp)
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
    raise BadInputError(f"config.input.pp fails on each of the first {min(len(source), 100)} records; "
                        f"{first_error}")
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
  repl = sharding.replicated(mesh)
  guard = dict(config.get("spike_skip", None) or dict(window=0, k=6.0, min_steps=20))
  guard["window"] = int(guard["window"])
  guard.setdefault("std_floor", 0.1)
  state_sh = {
      "params": params_sh,
      "opt_state": sharding.opt_state_shardings(tx, abstract_params, params_sh, mesh),
      "step": repl,
      "rng": repl,
      "guard": jax.tree.map(lambda _: repl, init_guard(guard["window"])),
  }

  def init_state(rng):
    params = nn.unbox(init_params(rng))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng,
            "guard": init_guard(guard["window"])}

  abstract = jax.eval_shape(init_state, rng)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
  setup = Setup(mesh, rules, model, task, tx, lr_fn, total_steps, state_sh, abstract, example, guard)
  setup.init_state = jax.jit(init_state, out_shardings=state_sh)  # type: ignore[attr-defined]
  return setup


def make_train_step(setup: Setup, grad_accum_steps: int):
  """The jitted step: grads (accumulated over micro-batches), optimizer update, scalar metrics."""
  task, tx, lr_fn = setup.task, setup.tx, setup.lr_fn
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  poison = _poison_fn(_faults())

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
    if poison is not None:
      factor = poison(step + 1)
      loss = loss * factor
      grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
    grad_norm = optim.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = jax.tree.map(jnp.add, params, updates)
    # Updated params are checked too: a finite loss and gradient can still give inf/NaN params (lr=1e38).
    ok, guard = _loss_guard(state["guard"], loss, grad_norm, step, params_finite=optim.all_finite(new_params),
                            **setup.guard)
    # A dropped update leaves params and optimizer state bit-for-bit as they were.
    new_params = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_params, params)
    opt_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), opt_state, state["opt_state"])
    out_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(step),
                   "param_norm": optim.global_norm(new_params), "skipped_nonfinite": guard["nonfinite"],
                   "skipped_spikes": guard["spikes"], **aux}
    new_state = {"params": new_params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"],
                 "guard": guard}
    return new_state, out_metrics

  repl = sharding.replicated(setup.mesh)
  batch_sh = {k: sharding.batch_sharding(setup.mesh, v.ndim) for k, v in setup.example.items()}
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, repl), donate_argnums=(0,),
                 compiler_options=xla_options.compiler_options())


def _poison_fn(faults: list[tuple[str, int]]):
  """Test hook (BVL_FAULT nan@N / spike@N): step -> factor for loss and grads (NaN, 100 or 1)."""
  nan_at = [at for kind, at in faults if kind == "nan"]
  spike_at = [at for kind, at in faults if kind == "spike"]
  if not nan_at and not spike_at:
    return None

  def factor(step):
    f = jnp.where(jnp.isin(step, jnp.array(nan_at or [-1])), jnp.nan, 1.0)
    return f * jnp.where(jnp.isin(step, jnp.array(spike_at or [-1])), 100.0, 1.0)
  return factor


def _loss_guard(guard: dict, loss, grad_norm, step, *, params_finite=True, window: int, k: float,
                min_steps: int, std_floor: float = 0.0):
  """(ok, new guard): ok is False for a non-finite loss/gradient/new params or a loss spike.

  Spike: loss > mean + k * max(std, std_floor * |mean|) over the last `window`
  accepted losses (population std), once at least `min_steps` losses were
  accepted; window=0 disables it. The floor keeps a nearly flat window from
  calling ordinary noise a spike. Only accepted losses enter the history;
  `in_a_row` / `most_in_a_row` count consecutive skipped updates.
  """
  loss = loss.astype(jnp.float32)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
  hist, count = guard["losses"], guard["count"]
  if window > 0:
    n = jnp.minimum(count, window)
    valid = jnp.arange(window) < n
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, hist, 0.0)) / nf
    std = jnp.sqrt(jnp.sum(jnp.where(valid, (hist - mean) ** 2, 0.0)) / nf)
    std = jnp.maximum(std, std_floor * jnp.abs(mean))
    spike = finite & (count >= min_steps) & (loss > mean + k * std)
    slot = count % window
    ok = finite & ~spike
    hist = hist.at[slot].set(jnp.where(ok, loss, hist[slot]))
  else:
    spike = jnp.zeros((), bool)
    ok = finite
  first = guard["first_nonfinite"]
  in_a_row = jnp.where(ok, 0, guard["in_a_row"] + 1)
  return ok, {
      "losses": hist, "count": count + ok.astype(jnp.int32),
      "nonfinite": guard["nonfinite"] + (~finite).astype(jnp.int32),
      "spikes": guard["spikes"] + spike.astype(jnp.int32),
      "first_nonfinite": jnp.where((first == 0) & ~finite, step + 1, first),
      "in_a_row": in_a_row, "most_in_a_row": jnp.maximum(guard["most_in_a_row"], in_a_row),
  }


def _restore_or_init(setup: Setup, config, ckpt: checkpoint.Checkpointer | None, train_iter):
  """Resumes from the newest usable checkpoint, else initialises (and loads model_init).

  A checkpoint that fails to restore (truncated or garbled files, missing
  arrays, another model's) is reported, moved aside and the previous one tried.
  If checkpoints exist but none is usable this refuses to start from scratch.
  """
  if ckpt:
    for step in reversed(ckpt.all_steps()):
      try:
        # Another process count wrote it: no iterator file for us; the data order is global, so seek.
        same_layout = distributed.has_data_state(ckpt.step_path(step))
        state = ckpt.restore(step, setup.abstract_state, train_iter if same_layout else None)
        if not same_layout:
          distributed.seek(train_iter, step)
      except checkpoint.CheckpointError as e:
        moved = ckpt.set_aside(step, str(e))
        if jax.process_index() == 0:
          print(f"warning: {e}; moved aside to {moved}, trying the previous checkpoint", file=sys.stderr,
                flush=True)
        continue
      if jax.process_index() == 0:
        print(f"resumed from step {step} (checkpoint {ckpt.step_path(step)})", flush=True)
      return state, step
    unusable = sorted(p.name for p in ckpt.directory.iterdir() if ".unusable-" in p.name) \
        if ckpt.directory.is_dir() else []  # an object store has no empty folders
    if unusable:
      raise checkpoint.CheckpointError(
          f"no usable checkpoint in {ckpt.directory} (set aside: {', '.join(unusable)}); refusing to "
          f"train from scratch over it: remove them or pass --overwrite")
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


def check_workdir(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> None:
  """Writes config.json into `workdir`, refusing a config that differs from the run it holds.

  Resuming is for the same run: only config_lib.RESUMABLE_CHANGES may differ
  unless config.allow_config_change. `overwrite` moves the previous run's files
  into `<workdir>/overwritten-<unix time>/` (nothing is deleted) and starts afresh.
  """
  path = storage.join(workdir, "config.json")
  ckpt_dir = storage.join(workdir, "checkpoints")
  has_run = storage.isdir(ckpt_dir) and bool(storage.listdir(ckpt_dir))
  is_main = jax.process_index() == 0
  if overwrite:
    old = [n for n in ("checkpoints", "metrics.jsonl", "tb", "config.json")
           if storage.exists(storage.join(workdir, n))]
    if old and is_main:
      backup = storage.join(workdir, f"overwritten-{int(time.time())}")
      storage.makedirs(backup, exist_ok=False)
      for n in old:
        storage.rename(storage.join(workdir, n), storage.join(backup, n))
      print(f"--overwrite: moved the previous run's {', '.join(old)} to {backup}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("big_vision_lite_overwrite")
  elif has_run and storage.exists(path) and not config.allow_config_change:
    saved = json.loads(storage.read_text(path))
    changes = config_lib.config_changes(saved, json.loads(config.to_json_best_effort()))
    if changes:
      raise config_lib.ConfigError(
          f"workdir {workdir} holds checkpoints of a run with another config ({len(changes)} change(s): "
          f"{'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''}); use the same config, "
          f"--config.allow_config_change=True to resume anyway, or --overwrite to start over")
  if is_main:
    storage.makedirs(workdir)
    # The other processes read this file above at the same time; rewritten in place
    # they could read it truncated, as an empty (unparseable) config.
    files.write_atomic(path, config.to_json_best_effort(indent=2))


def _guard_status(state) -> tuple[int, int, int, int]:
  """(non-finite skips, spike skips, first non-finite step, longest run of consecutive skips)."""
  keys = ("nonfinite", "spikes", "first_nonfinite", "most_in_a_row")
  g = jax.device_get({k: state["guard"][k] for k in keys})
  return tuple(int(g[k]) for k in keys)  # type: ignore[return-value]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None,
                       overwrite: bool = False) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics and evaluation results.

  `overwrite`: start afresh in a workdir holding another run (see check_workdir).
  """
  is_main = jax.process_index() == 0
  # Model, shapes and step count first: a problem they show is reported before the workdir is written.
  setup = build(config)
  if workdir:
    check_workdir(config, workdir, overwrite=overwrite)
  elif is_main:
    print("warning: no --workdir: nothing (checkpoints, metrics, config.json) is saved", file=sys.stderr,
          flush=True)
  mesh, total_steps = setup.mesh, setup.total_steps

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
  state, start_step = _restore_or_init(setup, config, ckpt, train_iter)
  if ckpt:
    signals.saving_from_now()

  evals = evaluators.get_evaluators(config, task=setup.task, mesh=mesh,
                                    default_batch_size=config.input.batch_size, total_steps=total_steps)
  for ev in evals:
    ev.workdir = workdir  # evaluators that write files (caption_samples) put them here
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
    if host_memory.kept_freed_memory():
      print("host memory: glibc keeps what XLA:CPU frees (one malloc arena, no trimming; "
            "BVL_KEEP_HEAP=0 turns this off)", flush=True)
      print(block_cache.describe(), flush=True)
    elif hint := host_memory.hint(jax.default_backend()):
      print(f"note: {hint}", file=sys.stderr, flush=True)

  train_step = make_train_step(setup, config.grad_accum_steps)
  step_flops = flops.train_flops_per_step(fwd_flops, config.input.batch_size) if fwd_flops else None
  throughput = metrics.Throughput(total_steps, jax.device_count(), flops_per_step=step_flops,
                                  peak_flops_per_device=peak)
  progress = metrics.Progress(total_steps, initial_step=start_step, enabled=is_main and config.progress,
                              every=config.log_training_steps)
  last: dict[str, float] = {}
  reported = _guard_status(state)[:2]
  if start_step >= total_steps and is_main:
    print(f"{workdir} already holds the final step {start_step} of {total_steps}; nothing to do",
          flush=True)
  failure = None
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      throughput.tick(start_step, 0)
      for step in range(start_step + 1, total_steps + 1):
        try:
          local = worker_watch.next_batch(train_iter)
        except worker_watch.InputWorkerDied as e:
          if ckpt and signals.received():  # the group's signal reached a worker still starting up
            ckpt.save(step - 1, state, train_iter, force=True)
            ckpt.wait_until_finished()
            raise Preempted(f"{signals.reason()} at step {step - 1}: checkpoint saved in {ckpt.directory} "
                            f"({e})") from None
          raise
        batch = sharding.global_batch(local, mesh)
        state, step_metrics = train_step(state, batch)
        if step == start_step + 1 and is_main:
          report_step_memory(train_step, state, batch)
        if step % config.log_training_steps == 0 or step == total_steps:
          last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          bad = skipped_bad_examples(train_iter, step, config.input.batch_size)
          if bad is not None:
            last["skipped_bad_examples"] = float(bad)
          last.update(throughput.tick(step, config.input.batch_size))
          writer.write(step, last)
          progress.update(step, last)
          if bad is not None and config.input.bad_examples == "skip":
            check_bad_fraction(bad, step * config.input.batch_size + bad,
                               config.input.max_bad_fraction, step)
        if (step % config.log_training_steps == 0 or step == total_steps
            or ckpt and step % config.ckpt_steps == 0):
          # Before any save: under nan_policy='stop' no checkpoint is written after a bad step.
          reported = _check_guard(config, step, _guard_status(state), reported, ckpt, writer,
                                  step_metrics, is_main)
        with throughput.pause():
          for ev in evals:
            if ev.should_run(step):
              results = ev.run(state["params"])
              writer.write(step, results)
              last.update(results)
              progress.report_eval(step, results)
          if ckpt:
            if ckpt.save(step, state, train_iter, force=step == total_steps):
              writer.sync()  # gs://: the rows up to a checkpoint outlive a kill, like the checkpoint
            _inject_fault(step)
            if ckpt.reached_preemption(step):
              ckpt.save(step, state, train_iter, force=True)
              ckpt.wait_until_finished()
              raise Preempted(f"{signals.reason()} at step {step}: checkpoint saved in {ckpt.directory}")
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
  if is_main and (counters := block_cache.counters()):
    print(f"host memory: {counters}", flush=True)
  return last


def _shut_down(progress, writer, ckpt: checkpoint.Checkpointer | None, failure: BaseException | None) -> None:
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


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report_step_memory(train_step: Any, state: Any, batch: Any) -> None:
  """Prints the compiled train step's memory per device, from XLA's memory analysis.

  Called after the first step, when the executable is compiled and cached (lowering again costs
  nothing). On a CPU run whose heap is kept (host_memory), also warns where the heap's growth
  by more blocks of temporaries may not fit in the memory left.
  """
  try:
    stats = train_step.lower(state, batch).compile().memory_analysis()
  except Exception as e:  # noqa: BLE001 - the analysis is optional; some backends lack it.
    log.info("no memory analysis of the train step: %s", e)
    return
  if stats is None:
    return
  print(f"train step memory per device (XLA's analysis): arguments "
        f"{_size(stats.argument_size_in_bytes)}, temporaries {_size(stats.temp_size_in_bytes)}, "
        f"outputs {_size(stats.output_size_in_bytes)} ({_size(stats.alias_size_in_bytes)} of them "
        f"in donated arguments)", flush=True)
  if host_memory.kept_freed_memory() and jax.default_backend() == "cpu":
    temp = stats.temp_size_in_bytes * len(jax.local_devices())
    if note := host_memory.growth_note(temp, host_memory.available_bytes(), block_cache.active()):
      print(f"note: {note}", file=sys.stderr, flush=True)


def skipped_bad_examples(train_iter: Any, step: int, global_batch_size: int) -> int | None:
  """Bad training examples skipped by all processes up to `step` (config.input.bad_examples).

  Exact and deterministic, and it survives resumes: it comes from the input iterators' state
  (pipeline.records_read), not from counters in the input workers. Every process must call it
  at the same steps (one all-gather where there are several). None where the iterator's
  state does not tell.
  """
  read = pipeline.records_read(train_iter)
  if read is None:
    return None
  bad = read - step * (global_batch_size // jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    bad = int(np.sum(multihost_utils.process_allgather(np.asarray(bad, np.int32))))
  return bad


def check_bad_fraction(bad: int, read: int, max_fraction: float, step: int) -> None:
  """Stops the run once more than `max_fraction` of all records read so far were bad.

  The input workers' own check (pipeline.Preprocess) stops as soon as one of them passes the
  fraction, but each counts only what it read since it started. This one counts every worker
  and process since step 0, resumes included, at each logged step; like the workers' it judges
  over at least pipeline.MIN_EXAMPLES_FOR_FRACTION records.
  """
  if bad > max_fraction * max(read, pipeline.MIN_EXAMPLES_FOR_FRACTION):
    raise BadInputError(
        f"too many bad examples: {bad} of the {read} records read by step {step} were bad, over "
        f"all input processes since step 0 (more than config.input.max_bad_fraction="
        f"{max_fraction:g}); the warnings above name them")


def _check_guard(config, step: int, status: tuple[int, int, int, int], reported: tuple[int, int], ckpt,
                 writer, step_metrics, is_main: bool) -> tuple[int, int]:
  """Stops on a non-finite loss under nan_policy='stop' or past config.max_consecutive_skips;
  logs new skipped updates otherwise."""
  nonfinite, spikes, first, in_a_row = status
  limit = config.get("max_consecutive_skips", 0)
  if limit and in_a_row > limit:
    writer.write(step, {k: float(v) for k, v in jax.device_get(step_metrics).items()})
    if ckpt:
      ckpt.wait_until_finished()
    raise FloatingPointError(
        f"{in_a_row} updates in a row were skipped by step {step} (more than "
        f"config.max_consecutive_skips={limit}; {nonfinite} non-finite, {spikes} spike(s) in all); "
        f"the last complete checkpoint is step {ckpt.latest_step() if ckpt else None}, saved before "
        f"or between skips so its parameters are finite (lower config.lr?)")
  if nonfinite and config.nan_policy == "stop":
    writer.write(step, {k: float(v) for k, v in jax.device_get(step_metrics).items()})
    if ckpt:
      ckpt.wait_until_finished()  # so "last complete checkpoint" counts a save still in flight
    raise FloatingPointError(
        f"loss, gradient or updated params not finite at step {first} (nan_policy='stop'); stopped at step {step}; "
        f"metrics written; the last complete checkpoint is step {ckpt.latest_step() if ckpt else None} "
        f"(set config.nan_policy='skip' to drop such updates)")
  if (nonfinite, spikes) != tuple(reported):
    msg = (f"step {step}: skipped {nonfinite + spikes} update(s) so far ({nonfinite} with a non-finite "
           f"loss, {spikes} loss spike(s)); params and optimizer state left unchanged for them")
    log.warning(msg)
    if is_main:
      print(f"warning: {msg}", file=sys.stderr, flush=True)
  return nonfinite, spikes


# ----------------------------------------------------------------------------- command line


def maybe_initialize_distributed(args: argparse.Namespace) -> None:
  """Joins a multi-process job when flags or the environment (TPU pod, SLURM) ask for it."""
  distributed.maybe_initialize(args.coordinator_address, args.num_processes, args.process_id)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="python -m big_vision_lite.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  parser.add_argument("--workdir", default="", help="checkpoints, metrics and logs go here; "
                      "an existing workdir is resumed")
  parser.add_argument("--overwrite", action="store_true", help="start afresh in a workdir that holds "
                      "another run (its files are moved to <workdir>/overwritten-<time>/, not deleted)")
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
  """The command line: exit 0 done, 75 preempted (SIGTERM), 130 interrupted (SIGINT), 2 config, 1 failure."""
  # First: a signal during start-up (before any state exists) exits at once with one line.
  signals.install(sys.argv[1:] if argv is None else argv)
  try:
    return _main(argv)
  finally:
    if argv is not None:  # an in-process caller gets its handlers back; the CLI keeps ours to the end
      signals.uninstall()


def _main(argv: Sequence[str] | None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  # As the command line does above, for a program that calls main() itself; a caller that
  # passes argv keeps its process as it is.
  if argv is None and not _restart_checked and (code := _restart_command_line()) is not None:
    return code
  # Before JAX starts: XLA's threads pick their malloc arenas on their first allocation.
  host_memory.keep_freed_memory()
  # grain's worker processes read absl flags; we take no absl flags of our own.
  absl_flags.FLAGS.mark_as_parsed()
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    config = config_lib.load_config(args.config)
    config = config_lib.apply_overrides(config, overrides)
    # XLA reads XLA_FLAGS when its backend starts: the config's preset goes in first.
    if note := xla_flags.apply(config):
      print(note, file=sys.stderr)
    maybe_initialize_distributed(args)  # before anything asks JAX about devices
    config_lib.validate(config, jax.device_count(), jax.process_count())
    # Before any dataset is read or built, the workdir written or a step compiled.
    config_check.check_components(config)
    if config.total_steps > 0:
      schedules.make_schedule(config, int(config.total_steps))
  except (config_lib.ConfigError, sharding.MeshError, UnknownNameError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    # One run per workdir; process 0 holds it for the job.
    with workdir_lock.hold(args.workdir if jax.process_index() == 0 else None):
      result = train_and_evaluate(config, args.workdir or None, overwrite=args.overwrite)
  except workdir_lock.WorkdirBusy as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"{e}; resume with: {signals.resume_command()}", file=sys.stderr)
    return signals.exit_code()
  except (config_lib.ConfigError, sharding.MeshError) as e:
    # Found only once the data is read (an epoch count's step count, the first example's shapes).
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (checkpoint.CheckpointError, UnknownNameError, BadInputError, OSError, FloatingPointError,
          worker_watch.InputWorkerDied) as e:
    # Expected failure modes get one line; anything else keeps its traceback. (grain appends
    # a note about its traceback filtering to errors raised in the input pipeline.)
    print(f"error: {str(e).split(chr(10) + '----------')[0]}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps(result, default=float), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
