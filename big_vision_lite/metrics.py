"""What a run reports: JSON-lines metrics, TensorBoard scalars, progress and throughput.

`metrics.jsonl` is strict JSON (one object per line): non-finite floats are
written as the strings "NaN", "Infinity" and "-Infinity" so jq, pandas or a
browser can read the file; `float()` turns them back into floats.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, TextIO

import numpy as np

from big_vision_lite import files, flops as flops_lib, storage
from big_vision_lite.mirror import Mirror

METRICS_FILE = "metrics.jsonl"


def _json_number(x: float) -> float | str:
  if math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "Infinity" if x > 0 else "-Infinity"
  return x


def to_json_value(key: str, value: Any) -> Any:
  """A metric value as something strict JSON can hold (numbers, lists, strings)."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str):
    return value
  arr = np.asarray(value)  # numpy, jax arrays and Python numbers alike
  if arr.dtype.kind not in "biuf":
    try:  # bfloat16 and other ml_dtypes floats have kind "V"
      arr = arr.astype(np.float64)
    except (TypeError, ValueError):
      raise TypeError(f"metric {key!r} has non-numeric type {type(value).__name__}") from None
  if arr.size == 1:
    arr = arr.reshape(())
  return _jsonable(arr.tolist())


def _jsonable(x: Any) -> Any:
  if isinstance(x, list):
    return [_jsonable(v) for v in x]
  return _json_number(x) if isinstance(x, float) else x


class MetricWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb/`).

  Only the main process should write: pass enabled=False elsewhere and every
  method does nothing. workdir None also disables writing. A remote workdir
  (gs://) is written through a local mirror (see big_vision_lite.mirror),
  uploaded at most every `sync_s` seconds and at close.
  """

  def __init__(self, workdir: str | None, *, enabled: bool = True, sync_s: float = 30.0):
    self.enabled = enabled and workdir is not None
    self.workdir = workdir
    self._mirror: Mirror | None = None
    if self.enabled and storage.is_remote(workdir):
      self._mirror = Mirror(workdir, interval_s=sync_s)
      self._mirror.pull(METRICS_FILE)
    self._dir = self._mirror.local if self._mirror else workdir
    self.path = os.path.join(self._dir, METRICS_FILE) if workdir else None
    self._file: TextIO | None = None
    self._tb = None
    self._purge_step: int | None = None
    if self.enabled:
      os.makedirs(self._dir, exist_ok=True)

  def _tb_writer(self):
    # Opened lazily so truncate_after() can still pass purge_step: TensorBoard
    # then hides the killed run's events after the resume point.
    if self._tb is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(self._dir, "tb"),
                               purge_step=self._purge_step)
    return self._tb

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends {"step": step, **metrics} as one line and logs scalars to TensorBoard."""
    if not self.enabled:
      return
    step = int(step)
    row: dict[str, Any] = {"step": step}
    for key, value in metrics.items():
      if key == "step":
        raise ValueError("metric name 'step' is reserved for the step number")
      row[key] = to_json_value(key, value)
    if self._file is None:
      self._file = open(self.path, "a")
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    self._file.flush()
    tb = self._tb_writer()
    for key, value in metrics.items():
      if isinstance(value, str):
        continue
      arr = np.asarray(value).astype(np.float64)  # already validated by to_json_value
      if arr.size == 1:
        tb.add_scalar(key, float(arr.reshape(())), step)
      elif arr.size > 1:
        tb.add_histogram(key, arr.ravel(), step)
    tb.flush()
    if self._mirror:
      self._mirror.push()

  def sync(self) -> None:
    """Uploads the staged files now (gs:// workdir), e.g. when a checkpoint of this step starts.

    A run killed later resumes from that checkpoint and keeps the rows up to it; without this,
    up to `sync_s` of them would be lost from the remote copy for good.
    """
    if self._mirror:
      self._mirror.push(force=True)

  def truncate_after(self, step: int) -> None:
    """Drops lines with a step > `step` (and unreadable ones), for a resumed run.

    A run killed after its last checkpoint left metrics for steps it will redo;
    without this, the file would hold those steps twice.
    """
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
      self._file = None
    self._purge_step = int(step) + 1
    if self._tb is not None:  # reopen so purge_step applies
      self._tb.close()
      self._tb = None
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          row = json.loads(line)
          keep = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
          keep = False  # e.g. a half-written last line from the kill
        if keep:
          kept.append(line if line.endswith("\n") else line + "\n")
    files.write_atomic(self.path, "".join(kept))  # a second kill leaves one whole file

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._mirror is not None:
      self._mirror.close()
      self._mirror = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Throughput:
  """Step time, images/s (total and per device), ETA and optionally MFU.

  Call `tick(step, num_images)` after steps, with `num_images` the global batch
  size (images per step); ticks may be every step or every N steps. The first
  `warmup_ticks` ticks only start the clock, because the steps before them
  include compilation. Time spent inside `with throughput.pause():` (eval,
  checkpointing) is not counted.
  """

  def __init__(self, total_steps: int, num_devices: int, *, warmup_ticks: int = 1,
               flops_per_step: float | None = None,
               peak_flops_per_device: float | None = None,
               time_fn: Callable[[], float] = time.perf_counter):
    self.total_steps = int(total_steps)
    self.num_devices = max(int(num_devices), 1)
    self.warmup_ticks = max(int(warmup_ticks), 1)
    self.flops_per_step = flops_per_step
    self.peak_flops_per_device = peak_flops_per_device
    self._time = time_fn
    self._ticks = 0
    self._last_step: int | None = None
    self._last_time = 0.0
    self._paused = 0.0
    self._measured_s = 0.0  # all measured intervals, for a steadier ETA
    self._measured_steps = 0

  @contextlib.contextmanager
  def pause(self) -> Iterator[None]:
    t0 = self._time()
    try:
      yield
    finally:
      self._paused += self._time() - t0

  def tick(self, step: int, num_images: int) -> dict[str, float]:
    """Metrics for the steps since the last tick; {} while warming up."""
    now = self._time()
    step = int(step)
    self._ticks += 1
    last_step, last_time, paused = self._last_step, self._last_time, self._paused
    self._last_step, self._last_time, self._paused = step, now, 0.0
    if self._ticks <= self.warmup_ticks or last_step is None or step <= last_step:
      return {}
    steps = step - last_step
    dt = max(now - last_time - paused, 1e-12)
    step_time = dt / steps
    self._measured_s += dt
    self._measured_steps += steps
    avg_step_time = self._measured_s / self._measured_steps
    images_per_s = num_images / step_time
    out = {
      "step_time_s": step_time,
      "images_per_s": images_per_s,
      "images_per_s_per_device": images_per_s / self.num_devices,
      "eta_s": max(self.total_steps - step, 0) * avg_step_time,
    }
    if self.flops_per_step and self.peak_flops_per_device:
      out["mfu"] = flops_lib.mfu(self.flops_per_step, step_time, self.num_devices,
                                 self.peak_flops_per_device)
    return out


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


def _fmt_value(v: Any) -> str:
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.4g}"
  return str(v)


def format_line(step: int, total_steps: int, postfix: Mapping[str, Any]) -> str:
  """One readable log line, most important first, e.g.

  step 100/1000 loss 1.234 | 1234 img/s (617/device) | 12.3 ms/step | MFU 3.1% | ETA 0:01:23 | lr 0.001 ...

  Known keys (Throughput's plus "mfu" as a fraction) get units; any other key follows as
  "key value", except counters (skipped_*) that are still zero: a terminal's bar has room
  for the front of the line only.
  """
  p = dict(postfix)
  head = f"step {step}/{total_steps}"
  if "loss" in p:
    head += f" loss {float(p.pop('loss')):.4g}"
  known = ("images_per_s", "images_per_s_per_device", "step_time_s", "mfu", "eta_s")
  rest = {k: p.pop(k) for k in known if k in p}
  parts = [head]
  if "images_per_s" in rest:
    s = f"{float(rest['images_per_s']):.0f} img/s"
    if "images_per_s_per_device" in rest:
      s += f" ({float(rest['images_per_s_per_device']):.0f}/device)"
    parts.append(s)
  if "step_time_s" in rest:
    parts.append(f"{1000 * float(rest['step_time_s']):.1f} ms/step")
  if "mfu" in rest:
    parts.append(f"MFU {100 * float(rest['mfu']):.1f}%")
  if "eta_s" in rest:
    parts.append(f"ETA {format_eta(float(rest['eta_s']))}")
  others = [f"{k} {_fmt_value(v)}" for k, v in p.items()
            if not (k.startswith("skipped_") and _is_zero(v))]
  if others:
    parts.append(" ".join(others))
  return " | ".join(parts)


def _is_zero(v: Any) -> bool:
  try:
    return float(v) == 0.0
  except (TypeError, ValueError):
    return False


def format_eval_line(step: int, total_steps: int, results: Mapping[str, Any]) -> str:
  """The line an evaluation prints when it finishes, e.g. `eval step 300/1200 val/prec@1 0.497`."""
  return f"eval step {step}/{total_steps} " + " ".join(f"{k} {_fmt_value(v)}" for k, v in results.items())


class Progress:
  """A tqdm bar on a terminal; a plain `format_line` every `every` steps in log files.

  Disabled (does nothing) when enabled=False, e.g. on non-main processes.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True,
               every: int = 100, stream: TextIO | None = None, is_tty: bool | None = None):
    self.total_steps = int(total_steps)
    self.enabled = enabled
    self.every = max(int(every), 1)
    self.stream = stream or sys.stderr
    if is_tty is None:
      is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.is_tty = is_tty
    self._last_printed: int | None = None
    self._postfix: dict[str, Any] = {}
    self._bar = None
    if enabled and is_tty:
      from tqdm import tqdm
      # tqdm's own rate/ETA would count compile time; ours (from Throughput) do not.
      self._bar = tqdm(total=self.total_steps, initial=int(initial_step), file=self.stream,
                       dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}")

  def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
    if not self.enabled:
      return
    step = int(step)
    if postfix:
      self._postfix.update(postfix)  # keep the last throughput between log steps
    if self._bar is not None:
      self._bar.n = step
      line = format_line(step, self.total_steps, self._postfix)
      self._bar.set_postfix_str(line.split(" ", 2)[2] if line.count(" ") >= 2 else "",
                                refresh=False)
      self._bar.refresh()
      return
    due = (self._last_printed is None or step - self._last_printed >= self.every
           or step >= self.total_steps)
    if due and step != self._last_printed:
      print(format_line(step, self.total_steps, self._postfix), file=self.stream, flush=True)
      self._last_printed = step

  def report_eval(self, step: int, results: Mapping[str, Any]) -> None:
    """Prints an evaluation's results on their own line as soon as it finishes."""
    if not self.enabled or not results:
      return
    line = format_eval_line(int(step), self.total_steps, results)
    if self._bar is not None:
      self._bar.write(line, file=self.stream)
    else:
      print(line, file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
