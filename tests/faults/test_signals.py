"""SIGTERM/SIGINT at start-up and mid-run, and input workers that die: one line, a checkpoint
where there is state, exit 75 (SIGTERM) or 130 (SIGINT), never a hang."""

import os
import signal
import subprocess
import time

from conftest import input_workers, steps_on_disk, wait_for_step

from big_vision_lite import train

SLOW = "slow@1"  # 0.5 s per step, so a signal sent after step N lands while training


def _finish(proc, timeout_s=120):
  try:
    out, err = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    raise AssertionError(f"the trainer hung: still running {timeout_s} s after the signal") from None
  return proc.returncode, out, err


def test_sigterm_during_start_up_exits_75_with_one_line(start_cli, tmp_path):
  proc = start_cli(tmp_path)
  time.sleep(0.5)  # still importing: no state, nothing to save
  proc.send_signal(signal.SIGTERM)
  code, _, err = _finish(proc)
  assert code == train.PREEMPTED_EXIT_CODE, err[-2000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("SIGTERM received before training started: nothing to save; "
                                                 "exiting 75 (run the same command again: python -m "), lines


def test_sigint_mid_run_saves_and_exits_130_with_the_resume_command(start_cli, tmp_path):
  proc = start_cli(tmp_path, "--config.ckpt_steps=100", fault=SLOW)
  wait_for_step(tmp_path, 3, proc)
  os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
  code, _, err = _finish(proc)
  assert code == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("interrupted (SIGINT) at step "), last
  step = int(last.split("at step ")[1].split(":")[0])
  assert steps_on_disk(tmp_path)[-1] == step >= 3  # ckpt_steps=100: the interrupt's own save
  assert "resume with: python -m big_vision_lite.train --config configs/vit_shapes.py" in last
  assert f"--workdir {tmp_path}" in last


def test_dead_input_worker_raises_within_seconds(start_cli, tmp_path):
  proc = start_cli(tmp_path, "--config.input.num_workers=2", fault=SLOW)
  wait_for_step(tmp_path, 2, proc)
  workers = input_workers(proc.pid)
  assert len(workers) == 2, workers
  os.kill(workers[-1], signal.SIGKILL)
  start = time.monotonic()
  code, _, err = _finish(proc, timeout_s=60)
  assert code == 1 and "Traceback" not in err, err[-3000:]
  # (Python's resource tracker may add its own warning about the dead worker's shared memory.)
  errors = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: input worker ") and errors[0].endswith(
      "exited unexpectedly (signal SIGKILL)"), err[-3000:]
  assert time.monotonic() - start < 30


def test_group_sigterm_with_input_workers_saves_and_exits_75(start_cli, tmp_path):
  proc = start_cli(tmp_path, "--config.input.num_workers=2", "--config.ckpt_steps=100", fault=SLOW)
  wait_for_step(tmp_path, 2, proc)
  os.killpg(proc.pid, signal.SIGTERM)
  code, _, err = _finish(proc, timeout_s=60)
  assert code == train.PREEMPTED_EXIT_CODE, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  ours = [l for l in err.splitlines() if "resource_tracker" not in l]  # Python's tracker: shm warnings
  assert ours[-1].startswith("preempted at step "), err[-3000:]
  step = int(ours[-1].split("at step ")[1].split(":")[0])
  assert steps_on_disk(tmp_path)[-1] == step >= 2


def test_sigterm_while_a_finished_run_shuts_down_exits_0(start_cli, tmp_path):
  # Python's finalization puts back the default action of handled signals: a SIGTERM in the
  # seconds a finished run takes to shut down (input workers, JAX) used to kill it with -15.
  proc = start_cli(tmp_path, "--config.input.num_workers=2")
  for line in proc.stdout:
    if line.startswith("{"):  # the result: the run is complete, its last checkpoint written
      break
  sent = 0
  while proc.poll() is None and sent < 2000:
    try:
      proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
      break
    sent += 1
    time.sleep(0.002)
  code, _, err = _finish(proc)
  assert code == 0, (sent, err[-3000:])
  assert sent > 0 and "Traceback" not in err, (sent, err[-3000:])
