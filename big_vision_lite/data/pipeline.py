"""grain input pipelines: an endless, shuffled, checkpointable train iterator and
a padded, masked, exactly-once eval iterable, both sharded per JAX process."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import threading
import time
from typing import Any, Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np

from big_vision_lite.data import sources, sources_mixture
from big_vision_lite.data.errors import BadExample, BadInputError
from big_vision_lite.config import ConfigError

PreprocessFn = Callable[[dict, np.random.Generator], dict]
_EVAL_SEED = 0


def _preprocess_fn(preprocess: str | PreprocessFn) -> PreprocessFn:
  if callable(preprocess):
    return preprocess
  from big_vision_lite.data import ops
  return ops.get_preprocess_fn(preprocess)


class IndexedSource:
  """Wraps a source so each element carries its record index, for error messages."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> tuple[int, dict]:
    index = int(index)
    try:
      return index, self.source[index]
    except Exception as e:  # noqa: BLE001 - handed to Preprocess, whose policy decides.
      return index, BadExample(f"reading the record failed: {_describe_error(e)}")

  def __repr__(self) -> str:
    # grain checks repr(source) on restore: it must not contain object addresses.
    return f"IndexedSource({self.source!r})"


def _describe_error(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}"


def _apply(fn: PreprocessFn, index: int, example: dict, rng: np.random.Generator, where: str) -> dict:
  try:
    return fn(example, rng)
  except Exception as e:
    raise BadInputError(f"preprocessing record {index} of {where} failed: {_describe_error(e)}") from e


# Bad examples are judged against at least this many examples read, so one bad
# record early in a run is not already "1 of 1".
MIN_EXAMPLES_FOR_FRACTION = 100
_log = logging.getLogger("big_vision_lite")


# How often an input worker checks that the trainer is still its parent.
_PARENT_POLL_S = 0.2


def _die_with_parent() -> None:
  """In a grain worker: exit at once when the trainer process dies.

  Without it a SIGKILLed trainer (OOM killer, preemption) leaves its input workers
  running, holding memory and the trainer's stdout/stderr pipes, which also hangs
  whatever waits for those pipes to close. A daemon thread polls the parent pid rather
  than prctl(PR_SET_PDEATHSIG): that signal fires when the parent *thread* that started
  the worker ends, and grain starts its workers from a thread pool that close() ends
  first, so the workers were SIGKILLed in the middle of grain's orderly stop, with
  batches in flight whose shared memory then nobody unlinked (Python's resource tracker
  warned of "leaked shared_memory objects" at every exit).
  """
  parent = os.getppid()
  if parent == 1:  # the trainer died before this worker got here
    os._exit(1)  # pylint: disable=protected-access

  def watch() -> None:
    while True:
      time.sleep(_PARENT_POLL_S)
      if os.getppid() != parent:
        os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, name="bvl-parent-watch", daemon=True).start()


class Preprocess(grain.transforms.RandomMap):
  """Runs a preprocess fn (from an op string) on an (index, example) pair.

  A record that fails to read or preprocess is a bad example. With
  bad_examples="skip" it becomes None (dropped by `_is_good` before batching),
  is counted and logged; once more than `max_bad_fraction` of the examples this
  process read were bad (judged over at least MIN_EXAMPLES_FOR_FRACTION), the
  run stops with BadInputError naming the last bad record. Skipping depends only
  on the record, and grain's per-record rng does not depend on what was skipped
  before, so the iterator stays deterministic and checkpointable. Counts are per
  input process (each grain worker keeps its own) and restart at zero on resume; the
  trainer checks the same fraction over all of them, since step 0, at each logged step
  (bad_examples.check_bad_fraction).
  """

  def __init__(self, fn: PreprocessFn, where: str, bad_examples: str = "error",
               max_bad_fraction: float = 0.0):
    if bad_examples not in ("skip", "error"):
      raise ConfigError(f"config.input.bad_examples: must be 'skip' or 'error', got {bad_examples!r}")
    self.fn = fn
    self.where = where
    self.bad_examples = bad_examples
    self.max_bad_fraction = float(max_bad_fraction)
    self._init_counts()

  def _init_counts(self) -> None:
    self.seen = 0
    self.bad = 0
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state.pop("_lock", None)
    return state

  def __setstate__(self, state: dict) -> None:
    # Unpickling happens in grain's worker processes (and in nothing else we run).
    self.__dict__.update(state)
    self._init_counts()
    if multiprocessing.parent_process() is not None:
      _die_with_parent()
      from big_vision_lite import signals  # pylint: disable=import-outside-toplevel
      signals.ignore_in_worker()

  def random_map(self, element: tuple[int, Any], rng: np.random.Generator) -> dict | None:
    index, example = element
    try:
      if isinstance(example, BaseException):
        raise example
      out = self.fn(example, rng)
      error = None
    except Exception as e:  # noqa: BLE001 - any failure of one record is that record's problem.
      out, error = None, e
    with self._lock:
      self.seen += 1
      if error is None:
        return out
      self.bad += 1
      seen, bad = self.seen, self.bad
    what = f"record {index} of {self.where}: {_describe_error(error)}"
    if self.bad_examples == "error":
      raise BadInputError(f"bad example, {what} (config.input.bad_examples='error')") from error
    if bad > self.max_bad_fraction * max(seen, MIN_EXAMPLES_FOR_FRACTION):
      raise BadInputError(
          f"too many bad examples: {bad} of {seen} read (more than config.input.max_bad_fraction="
          f"{self.max_bad_fraction:g}); last: {what}") from error
    if bad <= 10 or bad % 100 == 0:
      _log.warning("skipping bad example %s (%d bad of %d read by this input process)", what, bad, seen)
    return None


def _is_good(element: Any) -> bool:
  return element is not None


class _SkipBad(grain.transforms.Filter):
  def filter(self, element: Any) -> bool:
    return _is_good(element)


def _describe(data_config: ml_collections.ConfigDict) -> str:
  name = data_config.get("name")
  if name == "array_record":
    return f"array_record files {data_config.get('files')!r}"
  if name == sources_mixture.NAME and hasattr(data_config.get("members"), "values"):
    return f"mixture of {', '.join(_describe(m) for m in data_config.members.values())}"
  return f"{name}:{data_config.get('split')}"


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is out of range for process_count {count}")
  return index, count


def _per_process_batch(global_batch_size: int, process_count: int, key: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f"{key}: global batch size {global_batch_size} must be a positive multiple "
                     f"of the number of processes ({process_count})")
  return global_batch_size // process_count


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    preprocess: str | PreprocessFn,
    *,
    global_batch_size: int,
    seed: int,
    num_workers: int = 0,
    prefetch_buffer_size: int = 16,
    process_index: int | None = None,
    process_count: int | None = None,
    config_key: str = "config.input",
    bad_examples: str = "error",
    max_bad_fraction: float = 0.0,
) -> grain.DataLoaderIterator:
  """Endless iterator of per-process batches (dicts of numpy arrays), reshuffled each epoch.

  `bad_examples`="skip" drops records that fail to read or preprocess (see
  `Preprocess`) and stops past `max_bad_fraction`; "error" stops at the first.

  Supports get_state()/set_state() and orbax via grain.checkpoint.CheckpointSave;
  restoring needs the same source, seed, process layout and num_workers.
  """
  process_index, process_count = _processes(process_index, process_count)
  per_process = _per_process_batch(global_batch_size, process_count, f"{config_key}.batch_size")
  source = sources.get_source(data_config, config_key=f"{config_key}.data")
  check_skipped_groups(source, bad_examples, max_bad_fraction, _describe(data_config))
  n = len(source)
  if n < process_count:
    raise ConfigError(f"{config_key}: {n} examples cannot be split over {process_count} processes")
  # Process p reads its rows of every *global* batch of one global shuffle, so the
  # batches do not depend on the process count (see distributed.GlobalBatchSampler).
  from big_vision_lite import distributed  # local: keeps this module importable alone
  sampler = distributed.GlobalBatchSampler(
      n, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count)
  loader = grain.DataLoader(
      data_source=IndexedSource(source),
      sampler=sampler,
      shard_options=grain.sharding.NoSharding(),
      operations=[
          Preprocess(sources_mixture.preprocess_for(source, _preprocess_fn(preprocess)),
                     where=_describe(data_config),
                     bad_examples=bad_examples, max_bad_fraction=max_bad_fraction),
          _SkipBad(),
          grain.transforms.Batch(per_process, drop_remainder=True),
      ],
      worker_count=num_workers,
      read_options=grain.ReadOptions(num_threads=max(1, min(16, prefetch_buffer_size)),
                                     prefetch_buffer_size=prefetch_buffer_size),
  )
  return iter(loader)


def close_iterator(iterator: Any) -> None:
  """Stops a train iterator's input workers now, from the calling (main) thread; idempotent.

  Needed before the interpreter exits: left open, grain 0.2.x closes it from a multiprocessing
  finalizer (exitpriority 1) that runs after those of its own queues (exitpriority 10). On a
  resumed run set_state() has put() on each worker's set-state queue, so that queue's feeder
  thread, told to quit by its finalizer, closes the queue's reader, and grain's close then raises
  "OSError: handle is closed" while draining it (a traceback on stderr from multiprocessing/util.py
  _run_finalizers, then again from each iterator's __del__) and stops before unlinking the shared
  memory of the batches still queued. Racy: it needs the feeder thread to run in between.
  """
  inner = getattr(iterator, "_iterator", iterator)  # grain.DataLoaderIterator has no close() of its own
  close = getattr(inner, "close", None)
  if callable(close):
    close()
  _unlink_shared_memory_now()


def _unlink_shared_memory_now() -> None:
  """Unlinks the batches' shared memory that grain would unlink later or never; idempotent.

  grain 0.2.x frees a received batch's shared memory block from a one-thread pool
  (SharedMemoryArray.enable_async_del). Batches dropped by close() (prefetched, in flight)
  and the last ones the trainer held are queued there just before the interpreter exits,
  whose exit stops that pool's daemon thread first: their blocks stay linked and Python's
  resource tracker warns "There appear to be N leaked shared_memory objects to clean up at
  shutdown". So: wait until the pool has done what is queued (it runs in order), then
  have later drops unlink at once, in the dropping thread.
  """
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  arrays = getattr(shared_memory_array, "SharedMemoryArray", None)
  pool = getattr(arrays, "_del_thread_pool", None)
  if pool is None:
    return
  arrays._del_thread_pool = None  # pylint: disable=protected-access
  arrays._outstanding_del_requests = None  # pylint: disable=protected-access
  pool.apply(lambda: None)  # returns once every unlink queued before it has run
  pool.close()


def check_skipped_groups(source: Any, bad_examples: str, max_bad_fraction: float, where: str) -> None:
  """Counts a source's examples dropped when it was indexed (tar groups lacking a member) as bad.

  "error" stops at the first; "skip" warns once with the count and stops past
  `max_bad_fraction` of all groups (judged over at least MIN_EXAMPLES_FOR_FRACTION).
  """
  skipped = int(getattr(source, "skipped", 0) or 0)
  if not skipped:
    return
  total = len(source) + skipped
  what = f"{skipped} of the {total} example groups of {where} were skipped (first: {source.first_skipped})"
  if bad_examples == "error":
    raise BadInputError(f"bad examples: {what} (config.input.bad_examples='error')")
  if skipped > max_bad_fraction * max(total, MIN_EXAMPLES_FOR_FRACTION):
    raise BadInputError(f"too many bad examples: {what} (more than config.input.max_bad_fraction="
                        f"{max_bad_fraction:g})")
  _log.warning("skipping bad examples: %s", what)


def records_read(iterator: Any) -> int | None:
  """How many records a train iterator has read for the batches it returned: good and bad.

  Read from the iterator's checkpointable state, so it is exact, deterministic and survives a
  resume: the state holds, per input worker, the sampler position of the last record behind a
  returned batch, and worker w of W reads positions w, w + W, w + 2W, ... (grain's
  DataLoader; W = 1 without workers; a worker that has returned nothing sits at w - W). The
  records read minus the examples returned are the bad examples skipped. None where the
  state does not have that form (another iterator, or another grain's format).
  """
  try:
    state = json.loads(iterator.get_state())
    workers = max(1, int(state["worker_count"]))
    last_seen = {int(w): int(last) for w, last in state["last_seen_indices"].items()}
  except (AttributeError, KeyError, TypeError, ValueError):
    return None
  return sum((last - w) // workers + 1 for w, last in last_seen.items())


class _EvalExample:
  """Index -> preprocessed example with `_mask`; indices past the end give zero padding."""

  def __init__(self, source, fn: PreprocessFn, where: str):
    self.source, self.fn, self.where = source, fn, where
    self._template = None

  def load(self, index: int) -> dict:
    rng = np.random.default_rng([_EVAL_SEED, index])  # Same on any batch size or process count.
    return _apply(self.fn, index, self.source[index], rng, self.where)

  def padding(self) -> dict:
    if self._template is None:
      self._template = jax.tree.map(np.zeros_like, self.load(0))
    return self._template

  def __call__(self, index: int) -> dict:
    if index < len(self.source):
      return {**self.load(index), "_mask": np.True_}
    return {**self.padding(), "_mask": np.False_}


class EvalIterable:
  """One full, ordered pass over a source per `iter()`, as per-process batches with `_mask`.

  Every process yields `len(self)` = ceil(N / global_batch_size) batches.
  Process p reads the contiguous example range [p * len * b, (p + 1) * len * b)
  (b = per-process batch) of the padded index space; indices >= N are zero
  padding with `_mask` False, so each example is seen exactly once overall.
  """

  def __init__(self, source, fn: PreprocessFn, *, global_batch_size: int, process_index: int,
               process_count: int, where: str, num_threads: int = 8, key: str = "config.input"):
    self.per_process = _per_process_batch(global_batch_size, process_count, f"{key}.batch_size")
    self.num_examples = len(source)
    self.num_batches = math.ceil(self.num_examples / global_batch_size)
    self.start = process_index * self.num_batches * self.per_process
    self.stop = self.start + self.num_batches * self.per_process
    self.example_fn = _EvalExample(source, fn, where)
    self.num_threads = num_threads

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, Any]]:
    if self.num_batches == 0:
      return iter(())
    ds = (grain.MapDataset.range(self.start, self.stop)
          .map(self.example_fn)
          .batch(self.per_process, drop_remainder=True))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                     prefetch_buffer_size=2 * self.num_threads)))


def make_eval_iterator(
    data_config: ml_collections.ConfigDict,
    preprocess: str | PreprocessFn,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    config_key: str = "config.input",
) -> EvalIterable:
  """Re-iterable eval input: each iter() is one pass in dataset order (see EvalIterable)."""
  process_index, process_count = _processes(process_index, process_count)
  source = sources.get_source(data_config, config_key=f"{config_key}.data")
  return EvalIterable(
      source, _preprocess_fn(preprocess), global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count,
      where=_describe(data_config), key=config_key)
