"""config.profile: the shipped configs trace steps 10..12 into <workdir>/profile (TensorBoard's
xplane.pb and Perfetto's trace), and a traced run trains bit for bit as an untraced one."""

import glob
import gzip
import json
import os

import pytest

from helpers import ROOT, assert_bitwise_equal, final_params

from big_vision_lite import config as config_lib, train
from big_vision_lite.hooks import StepInfo, profiler

TINY = "configs/vit_shapes.py:res=32,width=16,depth=1,heads=2,patch=8,batch=16,steps=12,workers=0"
COMMON = ["--config.evals={}", "--config.log_training_steps=4", "--config.progress=False",
          "--config.ckpt_steps=12", "--config.mfu_peak_flops=1e12",
          "--config.schedule.warmup_steps=2"]


def _train(workdir, *extra):
  code = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", str(workdir), *COMMON, *extra])
  assert code == 0


@pytest.mark.slow  # ~1 min: two 12-step runs of the shipped config
def test_shipped_config_traces_steps_10_to_12_and_trains_the_same(tmp_path, capsys):
  assert dict(config_lib.load_config(os.path.join(ROOT, TINY)).profile) == dict(start_step=10, num_steps=3)
  _train(tmp_path / "traced")
  assert "profile of steps 10..12 written to" in capsys.readouterr().out
  runs = glob.glob(str(tmp_path / "traced" / "profile" / "plugins" / "profile" / "*"))
  assert len(runs) == 1, runs
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))  # TensorBoard's profile plugin / xprof
  with gzip.open(os.path.join(runs[0], "perfetto_trace.json.gz")) as f:
    trace = json.load(f)  # ui.perfetto.dev opens it
  assert trace["traceEvents"]
  _train(tmp_path / "plain", "--config.profile.num_steps=0")
  assert not os.path.exists(tmp_path / "plain" / "profile")
  assert_bitwise_equal(final_params(tmp_path / "traced"), final_params(tmp_path / "plain"))


class _FakeProfiler:
  def __init__(self):
    self.calls = []

  def start_trace(self, directory, create_perfetto_trace):
    self.calls.append(("start", directory, create_perfetto_trace))

  def stop_trace(self):
    self.calls.append(("stop",))


def _steps(hook, steps):
  for s in steps:
    hook(StepInfo(s, 20, state={}, metrics={}))
  hook.close()


def test_hook_starts_after_the_step_before_and_stops_after_the_last(monkeypatch):
  fake = _FakeProfiler()
  monkeypatch.setattr(profiler.jax, "profiler", fake)
  hook = profiler.Profile("/w/profile", start_step=5, num_steps=2, first_step=0)
  calls = []
  for s in range(1, 10):
    hook(StepInfo(s, 20, state={}, metrics={}))
    calls.append(len(fake.calls))
  # Started after step 4 (so step 5 is the first traced), stopped after step 6.
  assert calls == [0, 0, 0, 1, 1, 2, 2, 2, 2] and fake.calls[0] == ("start", "/w/profile", True)
  # At the run's first step: started before the loop. Resumed past it, or 0 steps: never.
  fake.calls.clear()
  _steps(profiler.Profile("/w", start_step=1, num_steps=1, first_step=0), [1, 2])
  assert [c[0] for c in fake.calls] == ["start", "stop"]
  fake.calls.clear()
  _steps(profiler.Profile("/w", start_step=5, num_steps=2, first_step=5), range(6, 10))
  _steps(profiler.Profile("/w", start_step=5, num_steps=0, first_step=0), range(1, 10))
  assert not fake.calls
  # A run that ends (or fails) inside the traced steps still stops the trace.
  _steps(profiler.Profile("/w", start_step=5, num_steps=10, first_step=0), range(1, 8))
  assert [c[0] for c in fake.calls] == ["start", "stop"]
