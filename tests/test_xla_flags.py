"""config.platform.xla_flags_preset: every preset is a set of flags this jaxlib's XLA accepts (XLA
aborts at start-up on an unknown one), and the trainer puts the config's preset into XLA_FLAGS
before JAX starts, keeping the user's own flags."""

import json
import os
import subprocess
import sys

import pytest

from big_vision_lite import config as config_lib
from big_vision_lite.platform.gpu import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_backend(flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                         XLA_FLAGS=flags))


@pytest.mark.parametrize("preset", sorted(xla_flags.PRESETS))
def test_every_preset_is_accepted_by_xla(preset):
  # XLA parses every flag (GPU ones too) when any backend starts, and refuses unknown names.
  r = _start_backend(xla_flags.merged(preset))
  assert r.returncode == 0, r.stderr[-1000:]


def test_the_check_catches_an_unknown_flag():
  r = _start_backend("--xla_gpu_graph_level=0")  # a MaxText flag gone from current XLA
  assert r.returncode != 0 and "Unknown flag" in r.stderr


def test_presets_are_gpu_only_and_well_formed():
  for name, flags in xla_flags.PRESETS.items():
    names = [f.split("=", 1)[0] for f in flags]
    assert len(set(names)) == len(names), name
    # A GPU preset must not change what a CPU or TPU run computes.
    assert all(f.startswith("--xla_gpu_") and "=" in f for f in flags), name


def test_merged_keeps_the_users_flags_last_and_unduplicated():
  user = "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/d"
  out = xla_flags.merged("gpu_default", user).split()
  assert out[-2:] == user.split()
  assert sum(f.startswith("--xla_gpu_enable_triton_gemm=") for f in out) == 1
  assert xla_flags.merged("none", user) == user
  with pytest.raises(ValueError, match="xla_flags_preset='x'"):
    xla_flags.merged("x")
  with pytest.raises(config_lib.ConfigError, match="xla_flags_preset='x'"):
    xla_flags.preset_name({"platform": {"xla_flags_preset": "x"}})


def test_apply_sets_the_environment_before_the_backend_starts(monkeypatch):
  config = config_lib.defaults()
  assert config.platform.xla_flags_preset == "gpu_default"
  env = {"XLA_FLAGS": "--mine"}
  monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
  assert xla_flags.apply(config, env) is None
  assert env["XLA_FLAGS"] == " ".join([*xla_flags.GPU_DEFAULT, "--mine"])
  env = {}
  xla_flags.apply({"platform": {"xla_flags_preset": "none"}}, env)
  assert "XLA_FLAGS" not in env


MINE = "--xla_gpu_enable_triton_gemm=true"  # the user's own choice of a flag the preset sets


def test_trainer_records_the_preset_and_starts_with_it(tmp_path):
  """The CLI a user runs: the preset lands in config.json, the backend starts with its flags."""
  workdir = tmp_path / "run"
  spec = "configs/vit_shapes.py:res=16,width=16,depth=1,heads=2,patch=8,batch=8,steps=1,workers=0"
  probe = (
      "import os, sys, runpy; import big_vision_lite.train as t\n"
      "orig = t.maybe_initialize_distributed\n"
      "def spy(args):\n"
      "  print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''), file=sys.stderr, flush=True)\n"
      "  orig(args)\n"
      "t.maybe_initialize_distributed = spy\n"
      "sys.exit(t.main(sys.argv[1:]))\n")
  out = subprocess.run(
      [sys.executable, "-c", probe, "--config", spec, "--workdir", str(workdir),
       "--config.mfu_peak_flops=1e12"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=MINE))
  # XLA parsed them when the backend started: an unknown flag would have stopped the run.
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stderr.splitlines() if l.startswith("XLA_FLAGS="))
  preset = [f for f in xla_flags.GPU_DEFAULT if not f.startswith("--xla_gpu_enable_triton_gemm=")]
  assert line.split("=", 1)[1].split() == [*preset, MINE]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["platform"]["xla_flags_preset"] == "gpu_default"
