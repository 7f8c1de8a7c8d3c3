"""grain input pipelines: an endless, shuffled, checkpointable train iterator and
a padded, masked, exactly-once eval iterable, both sharded per JAX process."""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np

from big_vision_lite.data import sources
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
    except Exception as e:
      raise RuntimeError(f"reading record {index} of {self.source!r} failed: {type(e).__name__}: {e}") from e

  def __repr__(self) -> str:
    # grain checks repr(source) on restore: it must not contain object addresses.
    return f"IndexedSource({self.source!r})"


def _apply(fn: PreprocessFn, index: int, example: dict, rng: np.random.Generator, where: str) -> dict:
  try:
    return fn(example, rng)
  except Exception as e:
    # Skipping bad examples is a policy for later; for now fail loudly, naming the record.
    raise ValueError(f"preprocessing record {index} of {where} failed: {type(e).__name__}: {e}") from e


def _die_with_parent() -> None:
  """In a grain worker: have the kernel SIGKILL this process when the trainer dies.

  Without it a SIGKILLed trainer (OOM killer, preemption) leaves its input
  workers running, holding memory and the trainer's stdout/stderr pipes, which
  also hangs whatever waits for those pipes to close. Linux only.
  """
  if not sys.platform.startswith("linux"):
    return
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() == 1:  # the parent died before prctl took effect
    os._exit(1)  # pylint: disable=protected-access


class Preprocess(grain.transforms.RandomMap):
  """Runs a preprocess fn (from an op string) on an (index, example) pair."""

  def __init__(self, fn: PreprocessFn, where: str):
    self.fn = fn
    self.where = where

  def __setstate__(self, state: dict) -> None:
    # Unpickling happens in grain's worker processes (and in nothing else we run).
    self.__dict__.update(state)
    if multiprocessing.parent_process() is not None:
      _die_with_parent()

  def random_map(self, element: tuple[int, dict], rng: np.random.Generator) -> dict:
    index, example = element
    return _apply(self.fn, index, example, rng, self.where)


def _describe(data_config: ml_collections.ConfigDict) -> str:
  name = data_config.get("name")
  if name == "array_record":
    return f"array_record files {data_config.get('files')!r}"
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
) -> grain.DataLoaderIterator:
  """Endless iterator of per-process batches (dicts of numpy arrays), reshuffled each epoch.

  Supports get_state()/set_state() and orbax via grain.checkpoint.CheckpointSave;
  restoring needs the same source, seed, process layout and num_workers.
  """
  process_index, process_count = _processes(process_index, process_count)
  per_process = _per_process_batch(global_batch_size, process_count, f"{config_key}.batch_size")
  source = sources.get_source(data_config, config_key=config_key)
  n = len(source)
  if n < process_count:
    raise ConfigError(f"{config_key}: {n} examples cannot be split over {process_count} processes")
  sampler = grain.samplers.IndexSampler(
      num_records=n,
      shard_options=grain.sharding.ShardOptions(
          shard_index=process_index, shard_count=process_count, drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=seed,
  )
  loader = grain.DataLoader(
      data_source=IndexedSource(source),
      sampler=sampler,
      operations=[
          Preprocess(_preprocess_fn(preprocess), where=_describe(data_config)),
          grain.transforms.Batch(per_process, drop_remainder=True),
      ],
      worker_count=num_workers,
      read_options=grain.ReadOptions(num_threads=max(1, min(16, prefetch_buffer_size)),
                                     prefetch_buffer_size=prefetch_buffer_size),
  )
  return iter(loader)


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
  source = sources.get_source(data_config, config_key=config_key)
  return EvalIterable(
      source, _preprocess_fn(preprocess), global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count,
      where=_describe(data_config), key=config_key)
