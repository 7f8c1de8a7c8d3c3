"""Multi-process JAX: joining a job (TPU pod, SLURM, explicit coordinator) with bounded timeouts,
which slice of every global batch a process reads, and re-positioning a data iterator by step.

The data order is defined *globally*: position g of the global example sequence
is the same record (and the same preprocessing rng) whatever the number of
processes, and process p of P feeds rows [p*b, (p+1)*b) (b = B/P) of every
global batch of B. So 2 processes x 4 devices train on exactly the batches of
1 process x 8 devices, and a checkpoint can be resumed on another layout.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax

from big_vision_lite import storage

log = logging.getLogger("big_vision_lite")

# Seconds. JAX's defaults (100 s heartbeat, 300 s shutdown) let a job whose peer
# died sit for minutes; these env vars let launchers and tests bound that.
ENV_HEARTBEAT = "BVL_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN = "BVL_SHUTDOWN_TIMEOUT_S"
ENV_INIT = "BVL_INIT_TIMEOUT_S"


def _env_int(name: str, default: int) -> int:
  raw = os.environ.get(name, "")
  try:
    return int(raw) if raw else default
  except ValueError:
    raise ValueError(f"environment variable {name}={raw!r} is not an integer number of seconds") from None


def wants_distributed(coordinator_address: str | None = None) -> bool:
  """Whether this process is one of several: explicit flags, BVL_DISTRIBUTED=1, or a SLURM job step
  with more than one task (TPU pod launchers set BVL_DISTRIBUTED=1, see launch/tpu.sh)."""
  if coordinator_address:
    return True
  if os.environ.get("BVL_DISTRIBUTED") == "1":
    return True
  return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Calls jax.distributed.initialize when the job has several processes; returns whether it did.

  Must run before anything asks JAX about devices. Without a coordinator
  address JAX auto-detects it (Cloud TPU metadata, SLURM variables). A peer
  that stops sending heartbeats for BVL_HEARTBEAT_TIMEOUT_S seconds makes every
  other process fail instead of waiting forever in a collective.
  """
  if not wants_distributed(coordinator_address):
    return False
  kwargs = dict(initialization_timeout=_env_int(ENV_INIT, 300),
                heartbeat_timeout_seconds=_env_int(ENV_HEARTBEAT, 100),
                shutdown_timeout_seconds=_env_int(ENV_SHUTDOWN, 120))
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  log.info("Joined a %d-process job as process %d", jax.process_count(), jax.process_index())
  return True


# ----------------------------------------------------------------------------- data order


class GlobalBatchSampler:
  """A grain sampler giving process p its rows of every global batch of a global shuffle.

  Local index j (what grain's DataLoader counts on this process) is row j % b
  of local batch j // b, i.e. global position (j // b) * B + p * b + j % b of
  one seeded shuffle of all records, reshuffled every epoch. The record's
  preprocessing rng is drawn from the global position, so it does not depend
  on the process count either.
  """

  def __init__(self, num_records: int, *, seed: int, global_batch_size: int, process_index: int,
               process_count: int):
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                       f"{process_count} processes")
    self.num_records = num_records
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.per_process = global_batch_size // process_count
    self._global = grain.samplers.IndexSampler(num_records=num_records, shuffle=True, seed=seed,
                                               num_epochs=None)

  def global_position(self, index: int) -> int:
    batch, row = divmod(int(index), self.per_process)
    return batch * self.global_batch_size + self.process_index * self.per_process + row

  def __len__(self) -> int:
    return 2**62  # endless; grain only needs an upper bound

  def __getitem__(self, index: int):
    meta = self._global[self.global_position(index)]
    return grain.RecordMetadata(index=int(index), record_key=meta.record_key, rng=meta.rng)

  def __repr__(self) -> str:
    # grain compares repr(sampler) on restore, so it names the process layout.
    return (f"GlobalBatchSampler(num_records={self.num_records}, seed={self.seed}, "
            f"global_batch_size={self.global_batch_size}, process={self.process_index}"
            f"/{self.process_count})")


def batch_rows(mesh: jax.sharding.Mesh, global_batch_size: int,
               process_index: int | None = None) -> tuple[int, int]:
  """The contiguous rows [start, stop) of a global batch that `process_index`'s devices hold.

  Raises ValueError when they are not one contiguous block, e.g. when a model
  axis spans hosts so that two processes would need the same rows.
  """
  from big_vision_lite import sharding  # local: sharding imports flax
  process_index = jax.process_index() if process_index is None else process_index
  sh = sharding.batch_sharding(mesh, 1)
  rows = set()
  for dev, idx in sh.devices_indices_map((global_batch_size,)).items():
    if dev.process_index == process_index:
      rows.update(range(*idx[0].indices(global_batch_size)))
  if not rows:
    raise ValueError(f"process {process_index} holds no device of the mesh")
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f"process {process_index}'s devices hold non-contiguous batch rows "
                     f"{sorted(rows)[:8]}...; put model axes (tensor) inside a host")
  return start, stop


def check_batch_layout(mesh: jax.sharding.Mesh, global_batch_size: int, process_count: int) -> None:
  """Checks that process p's devices hold rows [p*b, (p+1)*b) of the batch (what the sampler feeds)."""
  per = global_batch_size // process_count
  for p in range(process_count):
    start, stop = batch_rows(mesh, global_batch_size, p)
    if (start, stop) != (p * per, (p + 1) * per):
      raise ValueError(f"process {p}'s devices hold batch rows [{start}, {stop}), not "
                       f"[{p * per}, {(p + 1) * per}): the mesh's device order does not follow "
                       f"process order along the batch axes (data, fsdp, expert)")


# ----------------------------------------------------------------------------- iterator position


def data_state_file(step_dir: Any, process_index: int | None = None,
                    process_count: int | None = None) -> str:
  """Where grain's checkpoint handler keeps this process's iterator state in a step folder."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  return os.path.join(str(step_dir), "data", f"process_{p}-of-{n}.json")


def has_data_state(step_dir: Any) -> bool:
  """Whether a checkpoint holds iterator state for *this* process layout."""
  return storage.exists(data_state_file(step_dir))


def seek(data_iter: Any, num_batches: int) -> None:
  """Positions a fresh grain DataLoader iterator as if `num_batches` batches had been read.

  Used to resume a checkpoint written with another process count, whose
  per-process iterator files do not apply here. Because the data order is
  global (GlobalBatchSampler), the position is a function of the step alone.
  Mirrors grain 0.2.18's DataLoader state: per worker w of W, the last local
  index it handed out; worker w has produced ceil((m - w) / W) of the m batches.
  """
  state = json.loads(data_iter.get_state())
  workers = int(state["worker_count"])
  batch = _per_process_batch_size(data_iter)
  if workers == 0:
    state["last_seen_indices"] = {"0": num_batches * batch - 1}
    state["last_worker_index"] = -1
  else:
    seen = {}
    for w in range(workers):
      produced = max(0, -(-(num_batches - w) // workers))
      seen[str(w)] = produced * batch * workers + w - workers
    state["last_seen_indices"] = seen
    state["last_worker_index"] = (num_batches - 1) % workers
  data_iter.set_state(json.dumps(state, indent=4).encode())


def _per_process_batch_size(data_iter: Any) -> int:
  """The Batch size of a DataLoader built by pipeline.make_train_iterator."""
  loader = getattr(data_iter, "_data_loader", None)
  sampler = getattr(loader, "_sampler", None)
  if isinstance(sampler, GlobalBatchSampler):
    return sampler.per_process
  for op in getattr(loader, "_operations", ()):
    if isinstance(op, grain.transforms.Batch):
      return int(op.batch_size)
  raise ValueError("cannot find the batch size of this data iterator")
