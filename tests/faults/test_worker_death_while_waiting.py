"""Input workers that die while the trainer waits for a batch: issue 24 item 4's hang.

Guards two promises where test_signals.py cannot see them (there the trainer is slowed, so it
finds batches buffered and never blocks on the workers; its group-SIGTERM test passes without
the fix). Here the input workers are stopped (SIGSTOP) until the trainer has used up the
prefetched batches and waits in next(train_iter) on grain's queue, as an input-bound run does:
- a group SIGTERM (what SLURM sends) still ends in a checkpoint and exit 75: the workers leave
  the signal to the trainer instead of dying of it and leaving the trainer blocked forever;
- a worker SIGKILLed then makes the trainer exit 1 with one line naming the dead worker,
  instead of waiting forever.
A hang fails the test at the subprocess timeout instead of hanging the suite.
"""

import json
import os
import signal
import subprocess
import time

from conftest import input_workers, steps_on_disk, wait_for_step

from big_vision_lite import train

# Many steps, no periodic checkpoint after the first; no slow@ fault: input-bound like a real run.
LONG = ("--config.input.num_workers=2", "--config.total_steps=100000", "--config.ckpt_steps=100000")


def _finish(proc, timeout_s=90):
  try:
    out, err = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    raise AssertionError(f"the trainer hung: still running {timeout_s} s after the fault; "
                         f"stderr ends: {err[-1500:]}") from None
  return proc.returncode, out, err


def _rows(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return sum(1 for line in f if line.strip() and "step" in json.loads(line))


def _stop_workers_until_trainer_waits(workdir, proc) -> list[int]:
  """SIGSTOPs the input workers; returns once no step was logged for 3 s (prefetch used up)."""
  wait_for_step(workdir, 2, proc)
  workers = input_workers(proc.pid)
  assert len(workers) == 2, workers
  for pid in workers:
    os.kill(pid, signal.SIGSTOP)
  rows, still_since = _rows(workdir), time.monotonic()
  while time.monotonic() - still_since < 3:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)
    if (now := _rows(workdir)) != rows:
      rows, still_since = now, time.monotonic()
  return workers


def _resume(pids) -> None:
  for pid in pids:
    try:
      os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # a worker that died of the signal
      pass


def test_group_sigterm_while_trainer_waits_for_input_saves_and_exits_75(start_cli, tmp_path):
  proc = start_cli(tmp_path, *LONG)
  workers = _stop_workers_until_trainer_waits(tmp_path, proc)
  os.killpg(proc.pid, signal.SIGTERM)
  time.sleep(1)  # the signal reaches every process of the group before the workers run again
  _resume(workers)
  code, _, err = _finish(proc)
  assert code == train.PREEMPTED_EXIT_CODE, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  # (Python's resource tracker may warn about the workers' shared memory.)
  ours = [l for l in err.splitlines() if "resource_tracker" not in l]
  assert ours[-1].startswith("preempted at step "), err[-3000:]
  step = int(ours[-1].split("at step ")[1].split(":")[0])
  assert steps_on_disk(tmp_path)[-1] == step >= 2, err[-3000:]


def test_worker_killed_while_trainer_waits_for_input_exits_1_with_one_line(start_cli, tmp_path):
  proc = start_cli(tmp_path, *LONG)
  workers = _stop_workers_until_trainer_waits(tmp_path, proc)
  os.kill(workers[-1], signal.SIGKILL)
  _resume(workers[:-1])
  code, _, err = _finish(proc)
  assert code == 1 and "Traceback" not in err, err[-3000:]
  # (Python's resource tracker may add its own warning about the dead worker's shared memory.)
  errors = [l for l in err.splitlines() if l.startswith("error: ")]
  expected = f"error: input worker 1 (pid {workers[-1]}) exited unexpectedly (signal SIGKILL)"
  assert errors == [expected], err[-3000:]
