"""Orbax checkpointing for the trainer: async saves of the train state plus the
grain data iterator, retention, preemption, and restore onto any mesh.

Layout of a workdir (what orbax 0.12.8 writes; `Checkpointer` reads nothing else):

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

import errno
import json
import logging as py_logging
import os
import signal
import sys
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

STATE_ITEM = "state"
DATA_ITEM = "data"
DIGEST_ITEM = "digest"
COMMIT_FILE = "commit_success.txt"
INCOMPLETE_SUFFIX = ".incomplete-"


class CheckpointError(Exception):
  """A checkpoint is missing, incomplete, corrupt or incompatible with the target."""


# ----------------------------------------------------------------------------
# Completeness of a step folder.

def step_dir_problem(step_dir: epath.PathLike) -> str | None:
  """Returns why `step_dir` is not a complete checkpoint, or None if it is.

  Rule (orbax 0.12.8): it finalizes a step by writing `commit_success.txt` in it
  (into the tmp dir before the atomic rename on local disks, in place on GCS),
  so a step folder without it was interrupted mid-save or copied partially.
  We also require the state item's metadata to parse, and every item named in
  `_CHECKPOINT_METADATA` to exist, which catches hand-made partial copies.
  """
  step_dir = epath.Path(step_dir)
  if not step_dir.is_dir():
    return "not a directory"
  try:
    committed = _exists(step_dir / COMMIT_FILE)
  except OSError as e:  # e.g. permission denied: not the same as an interrupted save
    return f"cannot check {step_dir / COMMIT_FILE}: {type(e).__name__}: {e}"
  if not committed:
    return f"no {COMMIT_FILE} (save was interrupted or never finalized)"
  state_md = step_dir / STATE_ITEM / "_METADATA"
  try:
    if "tree_metadata" not in json.loads(state_md.read_text()):
      return f"{state_md} has no tree_metadata"
  except (OSError, ValueError) as e:
    return f"unreadable {state_md}: {type(e).__name__}: {e}"
  try:
    items = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()).get("item_handlers") or {}
  except (OSError, ValueError) as e:
    return f"unreadable {step_dir / '_CHECKPOINT_METADATA'}: {type(e).__name__}: {e}"
  for item in items:
    if not (step_dir / item).is_dir():
      return f"item folder {item!r} is missing"
  return None


def _exists(path: epath.Path) -> bool:
  """Whether `path` exists; unlike Path.exists(), an error other than "not found" is raised."""
  try:
    path.stat()
  except FileNotFoundError:
    return False
  return True


def scan_steps(directory: epath.PathLike) -> tuple[list[int], dict[int, str]]:
  """Returns (complete steps ascending, {incomplete step: reason}) under `directory`.

  Only plain-integer folder names are steps; orbax's in-flight
  `*.orbax-checkpoint-tmp-*` folders and our `*.incomplete-*` ones are not.
  """
  directory = epath.Path(directory)
  complete, incomplete = [], {}
  if not directory.is_dir():
    return complete, incomplete
  for p in directory.iterdir():
    if not p.name.isdigit() or not p.is_dir():
      continue
    problem = step_dir_problem(p)
    if problem is None:
      complete.append(int(p.name))
    else:
      incomplete[int(p.name)] = problem
  return sorted(complete), incomplete


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


# ----------------------------------------------------------------------------
# Tree helpers.

def _key_str(k: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: tuple[Any, ...]) -> str:
  """'params/Transformer/encoderblock_0/...' for a jax tree path."""
  return "/".join(_key_str(k) for k in path)


def flatten_with_names(tree: Any, is_leaf=None) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(p): v for p, v in leaves}


def short_error(e: BaseException, limit: int = 300) -> str:
  """One line for an orbax/tensorstore error: the innermost cause, without the spec dump.

  A longer first line is cut at `limit`, but an OS error's text (an errno's strerror such as
  "No space left on device") found anywhere in the chain is kept.
  """
  chain, seen = [e], {id(e)}
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
    chain.append(nxt)
    seen.add(id(nxt))
  inner = chain[-1]
  text = (str(inner).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
  if len(text) > limit:
    text = text[:limit] + " ..."
  everything = " ".join(str(x) for x in chain)
  causes = [os.strerror(n) for n in sorted(errno.errorcode) if os.strerror(n) in everything]
  causes = [c for c in causes if c not in text and not any(c in o and c != o for o in causes)]
  return f"{type(inner).__name__}: {text}" + (f" ({'; '.join(causes)})" if causes else "")


# ----------------------------------------------------------------------------

class _DropOrbaxTracebacks(py_logging.Filter):
  """Drops the tracebacks orbax's background threads log: the error comes back as a CheckpointError."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (record.levelno >= py_logging.ERROR and record.exc_info
                and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_FILTER = _DropOrbaxTracebacks()


def _from_a_save(exc: BaseException | None) -> bool:
  """Whether `exc` is a failed tensorstore/orbax write (its text or frames name them)."""
  if exc is None:
    return False
  if "tensorstore" in str(exc) or "OCDBT" in str(exc):
    return True
  tb = exc.__traceback__
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _DropUnretrievedSaveErrors(py_logging.Filter):
  """Drops asyncio's "exception was never retrieved" for the other writes of a failed save.

  When one array write of an async save fails (a full disk), orbax raises that one; the
  sibling writes that failed alike are collected later and asyncio logs each, with its
  tensorstore spec, as the interpreter exits. The save's error is reported once, as a
  CheckpointError.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (_from_a_save(exc) or f"{os.sep}orbax{os.sep}" in record.getMessage())


_ASYNCIO_FILTER = _DropUnretrievedSaveErrors()


def _is_closed_loop_callback(unraisable: Any) -> bool:
  """tensorstore completing a write of a failed save after orbax closed that save's event loop."""
  exc = unraisable.exc_value
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    return False
  tb, files = exc.__traceback__, []
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return bool(files) and all(f"{os.sep}asyncio{os.sep}" in f for f in files)


def _quiet_failed_saves() -> None:
  """Keeps a failed background save to its one CheckpointError (installed once per process).

  Besides orbax's own logged tracebacks (_DropOrbaxTracebacks) a save that hits a full disk
  makes two more kinds of noise: asyncio's unretrieved-exception logs (_DropUnretrievedSaveErrors)
  and tensorstore's callbacks into the closed loop, which Python reports as unraisable
  "RuntimeError: Event loop is closed" tracebacks. Other unraisable errors go to the
  previous hook unchanged.
  """
  py_logging.getLogger("absl").addFilter(_ORBAX_FILTER)
  py_logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)
  if getattr(sys.unraisablehook, "_bvl_quiet_saves", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)
  hook._bvl_quiet_saves = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook



class Checkpointer:
  """An orbax CheckpointManager over items ("state", "data", "digest") with safety checks."""

  def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True):
    # orbax refuses relative local paths; leave URLs (gs://...) alone.
    self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    self._warned: set[str] = set()
    # Orbax logs through absl's logger; its failed saves are re-raised by save() or wait.
    _quiet_failed_saves()
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
    abstract_state = _drop_names(abstract_state, set(absent)) if absent else abstract_state
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
    return _with_zeros(restored[STATE_ITEM], full_abstract, set(absent))

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


# ----------------------------------------------------------------------------

def read_state_metadata(state_dir: epath.PathLike) -> dict[str, Any]:
  """{'params/a/b': ArrayMetadata(shape, dtype, ...)} for a saved state item."""
  state_dir = epath.Path(state_dir)
  try:
    # The handler (unlike StandardCheckpointer) raises on an unreadable OCDBT
    # index instead of logging and returning an empty tree.
    md = ocp.StandardCheckpointHandler().metadata(state_dir)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read checkpoint metadata in {state_dir}: {short_error(e)}") from e
  tree = getattr(md, "tree", md)
  return flatten_with_names(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def _drop_names(tree: Any, names: set[str], prefix: str = "") -> Any:
  """`tree` (nested dicts) without the leaves named in `names`, nor dicts left empty by that."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if name in names:
      continue
    sub = _drop_names(v, names, name + "/")
    if not (isinstance(sub, dict) and not sub and isinstance(v, dict) and v):
      out[k] = sub
  return out


def _with_zeros(restored: Any, abstract: Any, names: set[str], prefix: str = "") -> Any:
  """`restored` with each leaf of `abstract` named in `names` added as zeros on its sharding."""
  if not isinstance(abstract, dict):
    if prefix.rstrip("/") in names:
      return jax.device_put(np.zeros(abstract.shape, abstract.dtype), abstract.sharding)
    return restored
  have = restored if isinstance(restored, dict) else {}
  return {k: _with_zeros(have.get(k), v, names, f"{prefix}{k}/") for k, v in abstract.items()}


def check_compatible(state_dir: epath.PathLike, abstract_state: Any) -> None:
  """Raises CheckpointError listing missing/unexpected arrays and shape mismatches."""
  saved = read_state_metadata(state_dir)
  wanted = flatten_with_names(abstract_state)
  problems = []
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  if missing:
    problems.append(f"missing arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  if unexpected:
    problems.append(f"unexpected arrays {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
  for name in sorted(set(saved) & set(wanted)):
    s, w = tuple(saved[name].shape), tuple(wanted[name].shape)
    if s != w:
      problems.append(f"shape mismatch for {name}: checkpoint {s} vs target {w}")
  if problems:
    raise CheckpointError(
        f"checkpoint {state_dir} does not match the target state: " + "; ".join(problems[:8]))
