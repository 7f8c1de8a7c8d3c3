"""Helpers shared by the trainer tests: run the CLI (with faults through tests/fault_entry.py),
read a workdir's params and metrics, compare params bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from big_vision_lite import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_ENTRY = os.path.join(ROOT, "tests", "fault_entry.py")


def trainer_cmd(fault: str | None = None) -> list[str]:
  """`python -m big_vision_lite.train`, or the test entry point that injects `fault` into it."""
  if fault:
    return [sys.executable, FAULT_ENTRY, fault]
  return [sys.executable, "-m", "big_vision_lite.train"]


def cpu_env(devices: int = 2, compile_cache: str | None = None, **extra: str) -> dict:
  """The environment of a CPU trainer subprocess with `devices` fake devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  if compile_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def run_cli(config: str, common: list[str], workdir, *extra: str, fault: str | None = None,
            devices: int = 2, compile_cache: str | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs the trainer on `config` in `workdir` with `common` + `extra` overrides."""
  cmd = [*trainer_cmd(fault), "--config", config, "--workdir", str(workdir), *common, *extra]
  return subprocess.run(cmd, env=dict(cpu_env(devices, compile_cache), **(env or {})),
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def final_params(workdir, step: int | None = None) -> dict:
  """The params of the newest checkpoint (or of `step`), flat name -> array."""
  path = os.path.join(workdir, "checkpoints")
  return pretrained.read_params(path if step is None else os.path.join(path, str(step)))


def assert_bitwise_equal(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.array_equal(a[k], b[k]), f"{k} differs"


def metric_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
