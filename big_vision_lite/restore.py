"""The train state a run starts from: the newest usable checkpoint, else a fresh init (+ model_init)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import jax
import ml_collections

from big_vision_lite import checkpoint, checkpoint_layout, distributed, pretrained, state_layouts
from big_vision_lite.build import Setup

log = logging.getLogger("big_vision_lite")


def _restore_step(ckpt: checkpoint.Checkpointer, step: int, abstract_state: dict,
                  data_iter: Any) -> tuple[dict, str | None]:
  """(state in the current layout, a note when the checkpoint had an older one or None)."""
  step_dir = ckpt.step_path(step)
  # A task state (tasks/__init__.py) a checkpoint written before the task kept one lacks.
  task_state = (f"{state_layouts.TASK_STATE}/",) if state_layouts.TASK_STATE in abstract_state else ()
  # An incomplete step folder: restore() says why, in its own words.
  if checkpoint_layout.step_dir_problem(step_dir) is not None or not state_layouts.is_old_guard_layout(
      checkpoint_layout.read_state_metadata(step_dir / checkpoint_layout.STATE_ITEM)):
    state = ckpt.restore(step, abstract_state, data_iter, zero_if_missing=task_state)
    return state, _task_state_note(ckpt.zero_filled)
  old = ckpt.restore(step, state_layouts.to_old_guard_layout(abstract_state), data_iter,
                     zero_if_missing=task_state + tuple(f"{state_layouts.OLD_GUARD}/{k}"
                                                        for k in state_layouts.ADDED_LATER))
  note = "has the loss guard's state in a top-level guard/ (an older layout): read into opt_state"
  guard_filled = [n for n in ckpt.zero_filled if not n.startswith(f"{state_layouts.TASK_STATE}/")]
  if guard_filled:
    note += (f"; it predates the loss guard's {', '.join(guard_filled)} (written by an older "
             "version): they start at 0")
  task_note = _task_state_note(ckpt.zero_filled)
  note += f"; {task_note}" if task_note else ""
  return state_layouts.from_old_guard_layout(old, abstract_state), note


def _task_state_note(zero_filled: list[str]) -> str | None:
  if not any(n.startswith(f"{state_layouts.TASK_STATE}/") for n in zero_filled):
    return None
  return (f"has no {state_layouts.TASK_STATE} (written before the task kept one): it starts at 0, "
          "as in a fresh run (a self-distillation teacher is then taken from the student)")


def restore_or_init(setup: Setup, config: ml_collections.ConfigDict,
                    ckpt: checkpoint.Checkpointer | None, train_iter: Any) -> tuple[dict, int]:
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
        state, note = _restore_step(ckpt, step, setup.abstract_state,
                                    train_iter if same_layout else None)
        if not same_layout:
          distributed.seek(train_iter, step)
      except checkpoint.CheckpointError as e:
        moved = ckpt.set_aside(step, str(e))
        if jax.process_index() == 0:
          print(f"warning: {e}; moved aside to {moved}, trying the previous checkpoint",
                file=sys.stderr, flush=True)
        continue
      if jax.process_index() == 0:
        print(f"resumed from step {step} (checkpoint {ckpt.step_path(step)})", flush=True)
        if note:
          print(f"note: checkpoint step {step} {note}", flush=True)
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
