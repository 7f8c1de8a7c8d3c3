"""Plots a run's metrics.jsonl into a PNG grid of curves, one subplot per metric.

  python -m big_vision_lite.tools.plot WORKDIR [--out PATH] [--keys loss,val_acc]

Several lines may carry the same step (train and eval metrics are written
separately, a resumed run rewrites steps): for each (step, metric) the later
line wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from big_vision_lite import storage
from big_vision_lite.metrics import METRICS_FILE


class PlotError(Exception):
  """A user-facing problem (missing file, unknown key); main() exits with code 2."""


def _to_float(v) -> float | None:
  # metrics.jsonl writes non-finite values as "NaN"/"Infinity"/"-Infinity".
  if isinstance(v, bool):
    return float(v)
  if isinstance(v, (int, float)):
    return float(v)
  if isinstance(v, str):
    try:
      return float(v)
    except ValueError:
      return None
  return None  # lists (histograms) are not curves


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
  """{metric: [(step, value), ...] sorted by step}, later lines overriding earlier ones."""
  if not storage.exists(path):
    raise PlotError(f"no metrics file at {path}")
  latest: dict[str, dict[int, float]] = {}
  with storage.open_file(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        # A half-written last line from a killed run is expected; skip it quietly.
        continue
      for key, value in row.items():
        x = _to_float(value)
        if key != "step" and x is not None:
          latest.setdefault(key, {})[step] = x
  return {k: sorted(v.items()) for k, v in latest.items()}


def plot(series: dict[str, list[tuple[int, float]]], out: str,
         keys: Sequence[str] | None = None, title: str | None = None) -> str:
  """Writes the curves of `keys` (default: all) to `out` and returns `out`."""
  import matplotlib
  matplotlib.use("Agg")  # no display on servers
  import matplotlib.pyplot as plt

  if keys:
    unknown = [k for k in keys if k not in series]
    if unknown:
      raise PlotError(f"unknown metric(s) {', '.join(unknown)}; "
                      f"available: {', '.join(sorted(series)) or 'none'}")
  else:
    keys = sorted(series, key=lambda k: (k != "loss", k))  # loss first
  if not keys:
    raise PlotError("the metrics file holds no numeric metrics to plot")
  ncols = min(3, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    pts = [(s, v) for s, v in series[key] if math.isfinite(v)]
    steps = [s for s, _ in pts]
    values = [v for _, v in pts]
    ax.plot(steps, values, marker="." if len(pts) < 50 else None, linewidth=1.2)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  if storage.is_remote(out):  # matplotlib writes local files or file objects: render, then upload
    import io
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format=os.path.splitext(out)[1][1:] or "png")
    with storage.open_file(out, "wb") as f:
      f.write(buf.getvalue())
  else:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m big_vision_lite.tools.plot",
      description="Plot WORKDIR/metrics.jsonl into a PNG of curves.")
  parser.add_argument("workdir")
  parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/curves.png)")
  parser.add_argument("--keys", default=None, help="comma-separated metrics (default: all)")
  args = parser.parse_args(argv)
  out = args.out or storage.join(args.workdir, "curves.png")
  keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
  try:
    series = read_metrics(storage.join(args.workdir, METRICS_FILE))
    title = (args.workdir.rstrip("/").rsplit("/", 1)[-1] if storage.is_remote(args.workdir)
             else os.path.basename(os.path.normpath(args.workdir)))
    plot(series, out, keys, title=title)
  except storage.StorageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
