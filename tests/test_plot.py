"""The curve plotter: reads metrics.jsonl (later lines win), writes a PNG, clear errors."""

import json
import subprocess
import sys

import pytest

from big_vision_lite.tools import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(path, rows, tail=""):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    f.write(tail)


def _fake_run(workdir):
  rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3 * min(1, s / 10)} for s in range(1, 41)]
  rows += [{"step": s, "val_acc": 0.1 + 0.02 * s} for s in (10, 20, 30, 40)]
  rows += [{"step": 20, "loss": 9.0}]  # a resumed run rewrote step 20
  rows += [{"step": 41, "loss": "NaN", "hist": [1, 2]}]
  _write(workdir / "metrics.jsonl", rows, tail='{"step": 42, "lo')  # half-written line


def test_read_metrics_later_lines_win(tmp_path):
  _fake_run(tmp_path)
  series = plot.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert sorted(series) == ["learning_rate", "loss", "val_acc"]
  loss = dict(series["loss"])
  assert loss[20] == 9.0 and loss[19] == pytest.approx(2.0 / 19)
  assert str(loss[41]) == "nan"
  assert [s for s, _ in series["val_acc"]] == [10, 20, 30, 40]


def test_main_writes_png(tmp_path, capsys):
  _fake_run(tmp_path)
  assert plot.main([str(tmp_path)]) == 0
  out = tmp_path / "curves.png"
  assert capsys.readouterr().out.strip() == str(out)
  data = out.read_bytes()
  assert data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_keys_and_out(tmp_path, capsys):
  _fake_run(tmp_path)
  out = tmp_path / "figs" / "loss.png"
  assert plot.main([str(tmp_path), "--out", str(out), "--keys", "loss,val_acc"]) == 0
  assert out.read_bytes()[:8] == PNG_SIGNATURE
  assert plot.main([str(tmp_path), "--keys", "loss,acc"]) == 2
  err = capsys.readouterr().err
  assert "unknown metric(s) acc" in err and "val_acc" in err


def test_missing_file_is_one_line_exit_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "big_vision_lite.tools.plot", str(tmp_path / "nope")],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0
  assert "no metrics file at" in proc.stderr and "nope" in proc.stderr
