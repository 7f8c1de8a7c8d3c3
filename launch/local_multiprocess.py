"""Runs the trainer as N processes on one machine, joined by jax.distributed on localhost: the
code path of a TPU pod or a GPU cluster, on fake CPU devices.

    python launch/local_multiprocess.py N [--devices_per_process 4] -- --config ... --workdir ...

Each process gets JAX_NUM_CPU_DEVICES devices and --coordinator_address localhost:<free port>
--num_processes N --process_id i, and GLIBC_TUNABLES=glibc.malloc.hugetlb=1 added where it works
(big_vision_lite/platform/cpu/memory.py; BVL_HUGEPAGES=0 leaves the environment as is). Process 0
prints as usual; the others' lines are prefixed "[pI]". If one process fails, the others get
BVL_PEER_GRACE_S seconds (default 30) to stop by themselves (JAX's heartbeat timeout does
that), then are killed, with a one-line reason.
SIGTERM/SIGINT to this launcher go to every process (preemption: they save and exit 75).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from big_vision_lite.platform.cpu import memory as host_memory

PREEMPTED = 75


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
  stream.close()


def start(num_processes: int, trainer_args: Sequence[str], *, devices_per_process: int = 4,
          port: int | None = None, env: Mapping[str, str] | None = None,
          env_per_process: Sequence[Mapping[str, str]] | None = None,
          cwd: str | None = None,
          program_per_process: Sequence[Sequence[str]] | None = None) -> list[subprocess.Popen]:
  """Starts the N trainer processes (stdout/stderr piped, text) and returns them.

  `program_per_process`: the command each process runs in place of
  `python -m big_vision_lite.train` (the trainer's arguments follow it).
  """
  port = port or free_port()
  procs = []
  for i in range(num_processes):
    # Huge pages for glibc's large allocations: ~10% faster CPU steps (big_vision_lite/platform/cpu/memory.py).
    penv = host_memory.with_hugepages(os.environ if env is None else env)
    penv.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process))
    penv.pop("XLA_FLAGS", None)  # a device-count flag there would override ours
    if env_per_process:
      penv.update(env_per_process[i])
    program = (program_per_process[i] if program_per_process
               else [sys.executable, "-m", "big_vision_lite.train"])
    cmd = [*program, *trainer_args]
    if num_processes > 1:  # one process: a plain run, no coordinator to wait for
      cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
              f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, env=penv, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True))
  return procs


def wait(procs: Sequence[subprocess.Popen], *, grace_s: float = 30.0,
         timeout_s: float | None = None) -> tuple[list[int], str]:
  """Waits for all processes; returns (exit codes, reason) where reason is "" if nothing went wrong.

  A failed process starts a grace period for the others; past it (or past
  `timeout_s` overall) the survivors are SIGKILLed and get code -9.
  """
  t0, failed_at, reason = time.monotonic(), None, ""
  while any(p.poll() is None for p in procs):
    now = time.monotonic()
    codes = [p.poll() for p in procs]
    if failed_at is None:
      bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, PREEMPTED)]
      if bad:
        failed_at = now
        reason = f"process {bad[0][0]} exited with code {bad[0][1]}"
    deadline_hit = failed_at is not None and now - failed_at > grace_s
    overall_hit = timeout_s is not None and now - t0 > timeout_s
    if deadline_hit or overall_hit:
      alive = [i for i, p in enumerate(procs) if p.poll() is None]
      why = (f"{reason}; processes {alive} still running after {grace_s:.0f} s"
             if deadline_hit else f"timed out after {timeout_s:.0f} s; processes {alive} running")
      for i in alive:
        try:
          os.killpg(procs[i].pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      for p in procs:
        p.wait()
      return [p.returncode for p in procs], f"{why}: killed them"
    time.sleep(0.2)
  return [p.returncode for p in procs], reason


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("num_processes", type=int)
  parser.add_argument("--devices_per_process", type=int,
                      default=int(os.environ.get("BVL_DEVICES_PER_PROCESS", "4")))
  parser.add_argument("--port", type=int, default=0)
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    ours, trainer = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  else:
    ours, trainer = argv[:1], argv[1:]
  args = parser.parse_args(ours)
  if args.num_processes < 1:
    print(f"error: number of processes must be >= 1, got {args.num_processes}", file=sys.stderr)
    return 2
  procs = start(args.num_processes, trainer, devices_per_process=args.devices_per_process,
                port=args.port or None)
  pumps = []
  for i, p in enumerate(procs):
    prefix = "" if i == 0 else f"[p{i}] "
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, prefix, out), daemon=True)
      t.start()
      pumps.append(t)

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes, reason = wait(procs, grace_s=float(os.environ.get("BVL_PEER_GRACE_S", "30")))
  for t in pumps:
    t.join(timeout=5)
  if reason:
    print(f"error: {reason}", file=sys.stderr)
  if all(c == 0 for c in codes):
    return 0
  if all(c in (0, PREEMPTED) for c in codes):
    return PREEMPTED
  return next(c for c in codes if c not in (0, PREEMPTED)) or 1


if __name__ == "__main__":
  sys.exit(main())
