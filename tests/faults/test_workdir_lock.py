"""Two trainers on one workdir: the second is refused with one line naming the holder (exit 2);
the lock goes with its holder, kill -9 included; a lease (object stores) goes stale."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli_cmd, cpu_env

from big_vision_lite import workdir_lock


def test_second_trainer_on_a_workdir_is_refused(run_cli, compile_cache, tmp_path):
  work = tmp_path / "w"
  first = subprocess.Popen(cli_cmd(work, fault="slow@1"), env=cpu_env(2, compile_cache), cwd=ROOT,
                           stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while not (work / "metrics.jsonl").exists() and time.time() < deadline:
      time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    second = run_cli(work)
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid} on host" in lines[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr
  finally:
    out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  assert not (work / workdir_lock.LOCK_NAME).read_text()  # released at exit
  again = run_cli(work)
  assert again.returncode == 0 and "already holds the final step" in again.stdout, again.stderr[-2000:]


def test_kill_9_holder_does_not_block_the_next(tmp_path):
  code = ("import sys, time; from big_vision_lite import workdir_lock\n"
          "with workdir_lock.hold(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)\n")
  holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid} on host"):
    with workdir_lock.hold(tmp_path):
      pass
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold(tmp_path):
    pass


def test_lease_refuses_while_fresh_and_is_taken_over_when_stale(tmp_path):
  path = tmp_path / workdir_lock.LOCK_NAME
  with workdir_lock.hold(tmp_path, lease=True, heartbeat_s=0.2, stale_s=5):
    first = json.loads(path.read_text())
    assert first["pid"] == os.getpid()
    time.sleep(0.6)
    assert json.loads(path.read_text())["heartbeat"] > first["heartbeat"]  # the thread refreshes it
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getpid()} on host"):
      with workdir_lock.hold(tmp_path, lease=True, heartbeat_s=0.2, stale_s=5):
        pass
  assert not path.exists()  # released
  # A holder killed with -9 leaves its lease: stale after stale_s, then taken over.
  path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 10}))
  with workdir_lock.hold(tmp_path, lease=True, heartbeat_s=0.2, stale_s=5):
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_lease_of_a_dead_process_here_is_free_at_once(tmp_path):
  """A lease naming an exited pid of this pid namespace (a kill -9 on this machine) is taken over
  without waiting stale_s; the same pid from another namespace still counts as fresh."""
  path = tmp_path / workdir_lock.LOCK_NAME
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  here = {"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}
  path.write_text(json.dumps(dict(here, pidns="another-boot:1")))
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {dead.pid}"):
    with workdir_lock.hold(tmp_path, lease=True, heartbeat_s=0.2, stale_s=60):
      pass
  path.write_text(json.dumps(dict(here, pidns=workdir_lock._pid_namespace())))
  with workdir_lock.hold(tmp_path, lease=True, heartbeat_s=0.2, stale_s=60):
    assert json.loads(path.read_text())["pid"] == os.getpid()
