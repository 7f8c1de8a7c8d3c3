"""MetricWriter files, Throughput arithmetic with a fake clock, Progress log lines."""

import glob
import io
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import metrics


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_writer_json_lines_and_tensorboard(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  w.write(1, {"loss": np.float32(2.5), "lr": jnp.asarray(1e-3), "count": np.int32(7)})
  # Flushed per write: readable before close.
  assert _lines(tmp_path) == [{"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3), "count": 7}]
  w.write(2, {"loss": float("nan"), "gn": np.inf, "neg": -np.inf, "bf": jnp.bfloat16(0.5),
              "hist": np.array([1.0, 2.0, 3.0])})
  w.close()
  rows = _lines(tmp_path)
  assert rows[1] == {"step": 2, "loss": "NaN", "gn": "Infinity", "neg": "-Infinity", "bf": 0.5,
                     "hist": [1.0, 2.0, 3.0]}
  assert math.isnan(float(rows[1]["loss"])) and float(rows[1]["gn"]) == math.inf
  # Strict JSON: no bare NaN/Infinity tokens.
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
  events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0
  with open(events[0], "rb") as f:
    assert b"loss" in f.read()


def test_writer_rejects_bad_values(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  with pytest.raises(TypeError, match="'bad'"):
    w.write(1, {"bad": object()})
  with pytest.raises(ValueError, match="reserved"):
    w.write(1, {"step": 3})
  w.close()


def test_truncate_after_drops_later_and_broken_lines(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  for s in range(1, 6):
    w.write(s, {"loss": float(s)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # a kill in the middle of a write
  w = metrics.MetricWriter(str(tmp_path))
  w.truncate_after(3)
  assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3]
  w.write(4, {"loss": 40.0})
  w.close()
  assert [(r["step"], r["loss"]) for r in _lines(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                  (4, 40.0)]


def test_truncate_without_file_and_disabled_writer(tmp_path):
  metrics.MetricWriter(str(tmp_path / "fresh")).truncate_after(10)  # no file yet: fine
  off = metrics.MetricWriter(str(tmp_path / "off"), enabled=False)
  off.write(1, {"loss": 1.0})
  off.truncate_after(0)
  off.close()
  assert not (tmp_path / "off").exists()
  metrics.MetricWriter(None).write(1, {"loss": 1.0})


class FakeClock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_throughput_math_with_fake_clock():
  clock = FakeClock()
  tp = metrics.Throughput(total_steps=100, num_devices=4, time_fn=clock)
  clock.t += 30.0  # step 1 includes compilation: only starts the clock
  assert tp.tick(1, num_images=64) == {}
  clock.t += 2.0  # steps 2..5 at 0.5 s each
  out = tp.tick(5, num_images=64)
  assert out["step_time_s"] == pytest.approx(0.5)
  assert out["images_per_s"] == pytest.approx(128.0)
  assert out["images_per_s_per_device"] == pytest.approx(32.0)
  assert out["eta_s"] == pytest.approx(95 * 0.5)
  # Eval time inside pause() is not counted.
  with tp.pause():
    clock.t += 50.0
  clock.t += 5.0  # 5 steps at 1.0 s
  out = tp.tick(10, num_images=64)
  assert out["step_time_s"] == pytest.approx(1.0)
  assert out["images_per_s"] == pytest.approx(64.0)
  # ETA uses the average over all measured steps: 7 s / 9 steps.
  assert out["eta_s"] == pytest.approx(90 * 7.0 / 9)
  assert tp.tick(10, num_images=64) == {}  # no new steps


def test_throughput_mfu():
  clock = FakeClock()
  tp = metrics.Throughput(10, 2, flops_per_step=4e12, peak_flops_per_device=1e12,
                          warmup_ticks=2, time_fn=clock)
  for s in (1, 2):
    clock.t += 10
    assert tp.tick(s, 8) == {}
  clock.t += 4.0
  out = tp.tick(3, 8)
  assert out["mfu"] == pytest.approx(4e12 / (4.0 * 2 * 1e12))


def test_format_line():
  line = metrics.format_line(100, 1000, {
      "loss": 1.23449, "images_per_s": 1234.4, "images_per_s_per_device": 617.2,
      "step_time_s": 0.01234, "mfu": 0.0312, "eta_s": 83.4, "lr": 0.001, "skipped_spikes": 0.0,
      "skipped_nonfinite": 2.0})
  # Most important first; counters that are still zero are left out.
  assert line == ("step 100/1000 loss 1.234 | 1234 img/s (617/device) | "
                  "12.3 ms/step | MFU 3.1% | ETA 0:01:23 | lr 0.001 skipped_nonfinite 2")
  assert metrics.format_line(5, 10, {}) == "step 5/10"
  assert metrics.format_line(5, 10, {"eta_s": 90061.0}).endswith("ETA 1 day, 1:01:01")


def test_progress_non_tty_prints_every_n_steps():
  buf = io.StringIO()
  p = metrics.Progress(total_steps=10, initial_step=0, every=4, stream=buf)
  assert not p.is_tty
  for s in range(1, 11):
    p.update(s, {"loss": float(s)} if s % 2 else None)
  p.close()
  lines = buf.getvalue().splitlines()
  # First update, then every 4 steps, and the last step; postfix persists.
  assert lines == ["step 1/10 loss 1", "step 5/10 loss 5", "step 9/10 loss 9",
                   "step 10/10 loss 9"]


def test_eval_line_prints_when_the_eval_finishes_after_the_train_line_of_its_step():
  # The train line of an eval step prints first; the eval's own line must not be dropped.
  buf = io.StringIO()
  p = metrics.Progress(total_steps=10, every=5, stream=buf)
  p.update(5, {"loss": 1.0})
  p.report_eval(5, {"val/prec@1": 0.5})
  p.update(10, {"loss": 0.5})
  p.report_eval(10, {"val/prec@1": 0.75})
  p.close()
  assert buf.getvalue().splitlines() == ["step 5/10 loss 1", "eval step 5/10 val/prec@1 0.5",
                                         "step 10/10 loss 0.5", "eval step 10/10 val/prec@1 0.75"]


def test_progress_disabled_and_tty(tmp_path):
  buf = io.StringIO()
  p = metrics.Progress(10, enabled=False, stream=buf)
  p.update(3, {"loss": 1.0})
  p.close()
  assert buf.getvalue() == ""
  buf = io.StringIO()
  p = metrics.Progress(10, initial_step=2, stream=buf, is_tty=True)
  p.update(5, {"loss": 0.5, "images_per_s": 100.0})
  p.close()
  out = buf.getvalue()
  assert "5/10" in out and "loss 0.5 | 100 img/s" in out
