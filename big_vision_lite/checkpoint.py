"""Orbax checkpointing for the trainer: async saves of the train state plus the
grain data iterator, retention, preemption, and restore onto any mesh.

Layout of a workdir (what orbax 0.12.8 writes; `Checkpointer` reads nothing else; the names
and the checks of it are in checkpoint_layout.py):

  <dir>/<step>/                      one folder per step, a plain integer name
    commit_success.txt               written by orbax when the step is finalized
    _CHECKPOINT_METADATA             JSON: item handlers, init/commit timestamps
    state/_METADATA ...              the train state (StandardSave, OCDBT/zarr)
    data/process_<i>-of-<n>.json     the grain iterator state (optional)
    digest/metadata                  JSON: each array's digest and each process's iterator
                                     state digest (digest.py), checked after a restore
  <dir>/<step>.orbax-checkpoint-tmp-<ts>/   a save in flight (renamed when done)

The training loop is expected to:
  ckpt = Checkpointer(workdir, save_interval_steps=...)
  install_sigterm_handler()                 # single-process preemption support
  state = ckpt.restore(None, abstract_state, data_iter) if ckpt.latest_step() ...
  for step ...:
    ckpt.save(step, state, data_iter)
    if ckpt.reached_preemption(step):
      ckpt.save(step, state, data_iter, force=True); ckpt.wait_until_finished(); break
  ckpt.close()
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from big_vision_lite import digest
# CheckpointError, the item names and flatten_with_names are used through this module too.
from big_vision_lite.checkpoint_layout import (
    DATA_ITEM, DIGEST_ITEM, STATE_ITEM, CheckpointError, check_compatible, drop_names,
    flatten_with_names, read_state_metadata, scan_steps, step_dir_problem, with_zeros)
from big_vision_lite.save_errors import quiet_failed_saves, short_error

INCOMPLETE_SUFFIX = ".incomplete-"


# ----------------------------------------------------------------------------
# SIGTERM fallback for preemption when jax.distributed is not initialized.

_SIGTERM = threading.Event()


def install_sigterm_handler() -> Any:
  """Makes SIGTERM set a flag that `Checkpointer.reached_preemption` reports.

  The trainer calls this once at start-up, so that a preempted single-process
  job saves and exits cleanly instead of dying mid-step. With several processes
  JAX's preemption service (jax.distributed) owns SIGTERM and this does nothing.
  Returns the previous handler (for tests that want to put it back).
  """
  if jax.process_count() > 1:
    logging.info("Multi-process run: preemption comes from jax.distributed; no SIGTERM handler.")
    return signal.getsignal(signal.SIGTERM)
  previous = signal.getsignal(signal.SIGTERM)

  def handler(signum, frame):
    logging.warning("SIGTERM received: will save a checkpoint and stop at the next step.")
    _SIGTERM.set()
    # Chain a Python-level handler someone else installed, but never SIG_DFL,
    # which would kill us before we can save.
    if callable(previous):
      previous(signum, frame)

  signal.signal(signal.SIGTERM, handler)
  return previous


def sigterm_received() -> bool:
  return _SIGTERM.is_set()


class Checkpointer:
  """An orbax CheckpointManager over items ("state", "data", "digest") with safety checks."""

  def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True):
    # orbax refuses relative local paths; leave URLs (gs://...) alone.
    self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    self._warned: set[str] = set()
    # Orbax logs through absl's logger; its failed saves are re-raised by save() or wait.
    quiet_failed_saves()
    self._set_aside_incomplete()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            create=True,
        ),
        item_names=(STATE_ITEM, DATA_ITEM, DIGEST_ITEM),
    )

  def _set_aside_incomplete(self) -> None:
    """Renames incomplete step folders to `<step>.incomplete-<unix time>`.

    Left in place, orbax counts them as steps: it would refuse to save that step
    again ("already exists"), skip saves below it, and let them take a
    max_to_keep slot. Renaming keeps the bytes for inspection. Process 0 renames;
    the others wait at a barrier so every process then sees the same steps.
    """
    _, incomplete = scan_steps(self.directory)
    if incomplete and jax.process_index() == 0:
      for step, why in sorted(incomplete.items()):
        src = self.directory / str(step)
        dst = self.directory / f"{step}{INCOMPLETE_SUFFIX}{int(time.time())}"
        logging.warning("Incomplete checkpoint %s (%s): moved aside to %s, not used.", src, why, dst)
        src.rename(dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("big_vision_lite_checkpointer_set_aside")

  # -- queries ---------------------------------------------------------------

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Complete checkpoint steps, ascending. Incomplete ones are logged once, skipped."""
    complete, incomplete = scan_steps(self.directory)
    for step, why in incomplete.items():
      path = str(self.step_path(step))
      if path not in self._warned:
        self._warned.add(path)
        logging.warning("Skipping incomplete checkpoint %s: %s", path, why)
    return complete

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -- save ------------------------------------------------------------------

  def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and `data_iter`; returns whether one started.

    Respects save_interval_steps unless `force`. Saving a step that already has
    a checkpoint is a no-op returning False (e.g. a forced final save right after
    the periodic one).
    """
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists in %s; not saving again.", step, self.directory)
      return False
    try:
      if not force and not self._manager.should_save(step):
        return False  # before the digests, which cost a pass over the state
      record = {"arrays": digest.array_digests(flatten_with_names(state))}
      args = {STATE_ITEM: ocp.args.StandardSave(state)}
      if data_iter is not None:
        args[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
        record["data"] = _data_digests(data_iter)
      args[DIGEST_ITEM] = ocp.args.JsonSave(record)
      # Also re-raises the error of a previous async save that failed in the background.
      return bool(self._manager.save(step, args=ocp.args.Composite(**args), force=force))
    except Exception as e:  # noqa: BLE001 - disk full, permissions, tensorstore errors.
      raise self._save_error(step, e) from e

  def intact_report(self) -> str:
    """'newest complete checkpoint (left intact): step N in <path>', for an error message."""
    complete, _ = scan_steps(self.directory)
    previous = f"step {complete[-1]} in {self.step_path(complete[-1])}" if complete else "none"
    return f"newest complete checkpoint (left intact): {previous}"

  def _save_error(self, step: int | None, e: BaseException) -> CheckpointError:
    # The failed save's abandoned coroutines would each warn when collected.
    warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)
    what = "a checkpoint" if step is None else f"checkpoint step {step}"
    return CheckpointError(f"saving {what} in {self.directory} failed: {short_error(e)}; "
                           f"{self.intact_report()}")

  def set_aside(self, step: int, why: str, tag: str = "unusable") -> epath.Path:
    """Renames step folder `step` to `<step>.<tag>-<unix time>` (kept for inspection, never used).

    For a checkpoint that looked complete but failed to restore: left in place it
    would stay the "latest" step and block saving that step again.
    """
    src = self.step_path(step)
    dst = self.directory / f"{step}.{tag}-{int(time.time())}"
    if jax.process_index() == 0:
      logging.warning("Checkpoint %s is not usable (%s): moved aside to %s.", src, why, dst)
      src.rename(dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"big_vision_lite_set_aside_{step}")
    self._manager.reload()
    return dst

  # -- restore ---------------------------------------------------------------

  def restore(self, step: int | None, abstract_state: Any, data_iter: Any = None, *,
              zero_if_missing: tuple[str, ...] = ()) -> Any:
    """Restores the state onto `abstract_state`'s shardings; sets `data_iter` in place.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with NamedShardings,
    on any mesh (it need not be the one the checkpoint was saved from). Values
    are cast to the requested dtypes. `step=None` means the latest complete one.
    `zero_if_missing`: array names, or prefixes ending in "/", that a checkpoint written
    before they were part of the state may lack; they start at zero, and `self.zero_filled`
    lists them after the restore (empty when the checkpoint had everything).
    """
    self.zero_filled: list[str] = []
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no complete checkpoint in {self.directory}")
    step_dir = self.step_path(step)
    problem = step_dir_problem(step_dir)
    if problem is not None:
      raise CheckpointError(f"checkpoint {step_dir} is not usable: {problem}")
    absent = []
    if zero_if_missing:
      saved = read_state_metadata(step_dir / STATE_ITEM)
      absent = [n for n in flatten_with_names(abstract_state) if n not in saved
                and any(n == z or (z.endswith("/") and n.startswith(z)) for z in zero_if_missing)]
    full_abstract = abstract_state
    abstract_state = drop_names(abstract_state, set(absent)) if absent else abstract_state
    check_compatible(step_dir / STATE_ITEM, abstract_state)
    args = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      if not (step_dir / DATA_ITEM).is_dir():
        raise CheckpointError(f"checkpoint {step_dir} has no data iterator state ({DATA_ITEM}/ is missing)")
      args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
    record = self._read_digests(step_dir)
    if record is not None and data_iter is not None:
      _check_data_digest(step_dir, record)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types.
      raise CheckpointError(f"cannot restore checkpoint {step_dir}: {short_error(e)}") from e
    if record is not None:
      _check_array_digests(step_dir, record, restored[STATE_ITEM])
    if not absent:
      return restored[STATE_ITEM]
    self.zero_filled = absent
    return with_zeros(restored[STATE_ITEM], full_abstract, set(absent))

  def _read_digests(self, step_dir: epath.Path) -> dict[str, Any] | None:
    """The step's digest record; None (with a warning) for a step saved before there were digests."""
    path = step_dir / DIGEST_ITEM / "metadata"
    try:
      if not (step_dir / DIGEST_ITEM).is_dir():
        logging.warning("Checkpoint %s has no digests (saved by an older version): not verified.", step_dir)
        return None
      record = json.loads(path.read_text())
      if not isinstance(record.get("arrays"), dict):
        raise ValueError("no 'arrays' entry")
      return record
    except (OSError, ValueError, AttributeError) as e:
      raise CheckpointError(f"checkpoint {step_dir}: unreadable digests {path}: "
                            f"{type(e).__name__}: {e}") from e

  # -- preemption and lifetime ----------------------------------------------

  def reached_preemption(self, step: int) -> bool:
    """True once the job should save and stop (all processes agree on `step`).

    Uses orbax/JAX's preemption sync point when jax.distributed is initialized;
    in a single process it is the flag set by `install_sigterm_handler()`.
    """
    if self._manager.reached_preemption(step):
      return True
    return jax.process_count() == 1 and _SIGTERM.is_set()

  def wait_until_finished(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the background write failed (disk full, ...).
      raise self._save_error(None, e) from e

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(None, e) from e

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Digests (digest.py): written with every step, checked by every restore.

def _data_digests(data_iter: Any) -> list[str]:
  """Every process's iterator state digest, in process order (one all-gather where there are several)."""
  state = data_iter.get_state()
  mine = digest.data_state_digest(state if isinstance(state, (bytes, str)) else json.dumps(state))
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = np.frombuffer(bytes.fromhex(mine), np.uint8)
  return [bytes(row).hex() for row in np.asarray(multihost_utils.process_allgather(raw))]


def _check_data_digest(step_dir: epath.Path, record: dict[str, Any]) -> None:
  """Raises CheckpointError unless this process's iterator file matches its digest."""
  expected = record.get("data")
  path = epath.Path(step_dir) / DATA_ITEM / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if not isinstance(expected, list) or len(expected) != jax.process_count():
    raise CheckpointError(f"checkpoint {step_dir}: no digest for the data iterator state {path}")
  try:
    got = digest.data_state_digest(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {step_dir}: unreadable data iterator state {path}: "
                          f"{type(e).__name__}: {e}") from e
  if got != expected[jax.process_index()]:
    raise CheckpointError(f"checkpoint {step_dir}: data iterator state {path} does not match its "
                          f"digest (corrupt)")


def _check_array_digests(step_dir: epath.Path, record: dict[str, Any], state: Any) -> None:
  """Raises CheckpointError naming the arrays whose restored values do not match their digest.

  An array restored into another dtype than it was saved with cannot be compared; it is skipped.
  """
  named = flatten_with_names(state)
  saved_dtypes = {k: str(v.dtype) for k, v in read_state_metadata(epath.Path(step_dir) / STATE_ITEM).items()}
  comparable = {k: v for k, v in named.items() if saved_dtypes.get(k) == str(v.dtype)}
  expected = record["arrays"]
  got = digest.array_digests(comparable)
  bad = sorted(k for k in comparable if expected.get(k) != got[k])
  if bad:
    raise CheckpointError(f"checkpoint {step_dir}: {len(bad)} array(s) do not match their digest "
                          f"(corrupt data): {bad[:3]}{' ...' if len(bad) > 3 else ''}")
