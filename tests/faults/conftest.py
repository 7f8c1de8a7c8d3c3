"""Shared helpers for the fault-injection suite: a tiny ViT run through the CLI or in-process.

The runs are tiny (ViT width 16, depth 1, 32 px, batch 16, 12 steps, no evals)
so the whole suite stays within a few minutes on 2 shared cores. Subprocess
runs share a persistent XLA compilation cache, so only the first one compiles.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from big_vision_lite import config as config_lib, pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "configs/vit_shapes.py:res=32,width=16,depth=1,heads=2,patch=8,batch=16,steps=12,workers=0"
COMMON = [
    "--config.evals={}", "--config.log_training_steps=1", "--config.progress=False",
    "--config.schedule.warmup_steps=2", "--config.ckpt_steps=2", "--config.input.num_workers=0",
    "--config.mfu_peak_flops=1e12",  # skips the matmul probe
]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture
def run_cli(compile_cache):
  """run_cli(workdir, *overrides, fault=None, env=None) -> CompletedProcess of `python -m big_vision_lite.train`."""
  def run(workdir, *extra, fault=None, devices=2, env=None):
    env = dict(os.environ, **(env or {}), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=compile_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("BVL_FAULT", None)
    if fault:
      env["BVL_FAULT"] = fault
    cmd = [sys.executable, "-m", "big_vision_lite.train", "--config", TINY, "--workdir", str(workdir),
           *COMMON, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  return run


def tiny_config(*extra):
  """The same tiny config, in-process (for tests that call train functions directly)."""
  config = config_lib.load_config(os.path.join(ROOT, TINY))
  return config_lib.apply_overrides(config, [*COMMON, *extra])


def final_params(workdir, step=None):
  path = os.path.join(workdir, "checkpoints")
  return pretrained.read_params(path if step is None else os.path.join(path, str(step)))


def assert_bitwise_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.array_equal(a[k], b[k]), f"{k} differs"


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def steps_on_disk(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
