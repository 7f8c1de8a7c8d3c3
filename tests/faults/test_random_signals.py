"""Signals at random moments: SIGKILL and SIGTERM to the trainer or its whole process group (with 2
input workers), then the same command again, until the run completes: the final parameters are
bitwise those of an uninterrupted run, every run ends within a bounded time, no worker is left."""

import os
import random
import signal
import subprocess
import time

import pytest

from conftest import input_workers
from helpers import assert_bitwise_equal, final_params, metric_rows

from big_vision_lite import train

WORKERS = ["--config.input.num_workers=2", "--config.total_steps=24"]
SLOW = "slow@1"  # 0.5 s a step: training takes most of a run, so most signals land mid-run
KINDS = [("SIGKILL", "pid"), ("SIGTERM", "pid"), ("SIGKILL", "group"), ("SIGTERM", "group")]
OK_CODES = {"SIGKILL": (-9, 0), "SIGTERM": (train.PREEMPTED_EXIT_CODE, 0)}


def _signalled_runs(start_cli, work, rng, n_signals, span_s):
  log = []
  for i in range(n_signals + 6):  # after the signalled runs, unsignalled ones until done
    proc = start_cli(work, *WORKERS, fault=SLOW)
    kind = KINDS[rng.randrange(len(KINDS))] if i < n_signals else None
    if kind:
      delay = rng.uniform(0.2, 0.7 * span_s)
      time.sleep(delay)
      sig = getattr(signal, kind[0])
      workers = input_workers(proc.pid)
      try:
        os.killpg(proc.pid, sig) if kind[1] == "group" else proc.send_signal(sig)
      except ProcessLookupError:
        pass
    try:
      _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      raise AssertionError(f"hung after {kind} at {delay:.2f} s; runs so far {log}") from None
    log.append((kind, round(delay, 2) if kind else None, proc.returncode))
    print("run", log[-1])
    if kind is None:
      assert proc.returncode == 0, (log, err[-3000:])
      return log
    assert proc.returncode in OK_CODES[kind[0]], (log, err[-3000:])
    assert "Traceback" not in err, (log, err[-3000:])
    time.sleep(1.0)  # workers of a SIGKILLed trainer exit once they see it gone (0.2 s poll)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and _alive(w)], (log, workers)
    if proc.returncode == 0:
      return log
  raise AssertionError(f"never completed: {log}")


def _alive(pid: int) -> bool:
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _check(start_cli, run_cli, tmp_path, n_signals, seed):
  ref = tmp_path / "ref"
  t0 = time.monotonic()
  r = run_cli(ref, *WORKERS, fault=SLOW)
  assert r.returncode == 0, r.stderr[-3000:]
  span = time.monotonic() - t0  # signals land anywhere from start-up to the last step
  log = _signalled_runs(start_cli, tmp_path / "work", random.Random(seed), n_signals, span)
  assert_bitwise_equal(final_params(tmp_path / "work"), final_params(ref))
  rows = {row["step"]: row["loss"] for row in metric_rows(tmp_path / "work") if "loss" in row}
  want = {row["step"]: row["loss"] for row in metric_rows(ref) if "loss" in row}
  assert rows == want, (seed, log)


@pytest.mark.slow  # over a minute on 2 cores: CI's slow stage runs it
def test_random_signals_then_resume_bitwise(start_cli, run_cli, tmp_path):
  _check(start_cli, run_cli, tmp_path, 3, seed=int(os.environ.get("BVL_SIGNAL_SEED", "0")))


@pytest.mark.slow
@pytest.mark.extended  # two more draws of the check above
@pytest.mark.parametrize("seed", range(1, 3))
def test_random_signals_then_resume_bitwise_more(start_cli, run_cli, tmp_path, seed):
  _check(start_cli, run_cli, tmp_path, 5, seed)
