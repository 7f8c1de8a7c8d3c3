"""Shared helpers for the fault-injection suite: a tiny ViT run through the CLI or in-process.

The runs are tiny (ViT width 16, depth 1, 32 px, batch 16, 12 steps, no evals)
so the whole suite stays within a few minutes on 2 shared cores. Subprocess
runs share a persistent XLA compilation cache, so only the first one compiles.
"""

import json
import os
import subprocess
import time

import pytest

from helpers import ROOT, cpu_env, trainer_cmd  # noqa: F401 (cpu_env: for the tests)

from big_vision_lite import config as config_lib

TINY = "configs/vit_shapes.py:res=32,width=16,depth=1,heads=2,patch=8,batch=16,steps=12,workers=0"
COMMON = [
    "--config.evals={}", "--config.log_training_steps=1", "--config.progress=False",
    "--config.schedule.warmup_steps=2", "--config.ckpt_steps=2", "--config.input.num_workers=0",
    "--config.mfu_peak_flops=1e12",  # skips the matmul probe
    "--config.profile.num_steps=0",  # the shipped configs trace steps 10..12
]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def cli_cmd(workdir, *extra, fault=None) -> list:
  """The trainer's command line on the tiny config (through tests/fault_entry.py given `fault`)."""
  return [*trainer_cmd(fault), "--config", TINY, "--workdir", str(workdir), *COMMON, *extra]


@pytest.fixture
def run_cli(compile_cache):
  """run_cli(workdir, *overrides, fault=None, env=None) -> CompletedProcess of the trainer."""
  def run(workdir, *extra, fault=None, devices=2, env=None):
    full_env = dict(cpu_env(devices, compile_cache), **(env or {}))
    return subprocess.run(cli_cmd(workdir, *extra, fault=fault), env=full_env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
  return run


@pytest.fixture
def start_cli(compile_cache):
  """start_cli(workdir, *overrides, fault=None) -> Popen of the trainer in its own process group."""
  def start(workdir, *extra, fault=None):
    return subprocess.Popen(cli_cmd(workdir, *extra, fault=fault), env=cpu_env(2, compile_cache),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
  return start


def children(pid: int) -> list[int]:
  """Pids of the live child processes of `pid` (from /proc)."""
  out = []
  for d in os.listdir("/proc"):
    try:
      with open(f"/proc/{d}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if d.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
      out.append(int(d))
  return sorted(out)


def input_workers(pid: int) -> list[int]:
  """Pids of the trainer's grain worker processes (spawned children; not the resource tracker)."""
  out = []
  for child in children(pid):
    try:
      with open(f"/proc/{child}/cmdline", "rb") as f:
        cmd = f.read()
    except OSError:
      continue
    if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
      out.append(child)
  return out


def wait_for_step(workdir, step: int, proc, timeout_s: float = 120) -> None:
  """Blocks until metrics.jsonl has a row of `step` (or the process ended)."""
  deadline = time.monotonic() + timeout_s
  path = os.path.join(workdir, "metrics.jsonl")
  while time.monotonic() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(json.loads(l).get("step", 0) >= step for l in open(path) if l.strip()):
      return
    time.sleep(0.1)
  raise AssertionError(f"step {step} not reached in {timeout_s} s (returncode {proc.poll()})")


def tiny_config(*extra):
  """The same tiny config, in-process (for tests that call train functions directly)."""
  config = config_lib.load_config(os.path.join(ROOT, TINY))
  return config_lib.apply_overrides(config, [*COMMON, *extra])


def steps_on_disk(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A finished in-process 8-step run with checkpoints at steps 4 and 8, and its config."""
  from big_vision_lite import run  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("ref"))
  config = tiny_config("--config.total_steps=8", "--config.ckpt_steps=4", "--config.log_training_steps=4")
  run.train_and_evaluate(config, workdir)
  assert steps_on_disk(workdir)[-2:] == [4, 8]
  return workdir, config
