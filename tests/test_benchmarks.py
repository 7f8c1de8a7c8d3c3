"""benchmarks/: the scripts run end to end at toy sizes and print what their docstrings promise
(settings, both sides' step times, ratios). Numbers are not checked: tests never assert times."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str) -> str:
  # One CPU device (the default outside this test process), as a user runs the benchmarks.
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_vs_pytorch_prints_settings_times_and_ratios():
  if importlib.util.find_spec("timm") is None:  # not imported here: torch_env sets torch up
    pytest.skip("timm is not installed (the [torch] extra)")
  out = run("vs_pytorch.py", "--variant", "Ti", "--res", "32", "--batch", "2", "--infer_batch",
            "2", "--steps", "2", "--block", "2")
  assert out.startswith("ViT-Ti/16 at 32px, 1000 classes, fp32")
  assert "torch threads" in out and "GLIBC_TUNABLES=" in out
  # --malloc keep, the default, applies before JAX starts (where glibc is the libc).
  assert re.search(r"glibc keeps freed memory: (yes$|no \(not glibc\))", out, re.M)
  assert re.search(r"our attention: (CPU kernel|XLA)", out)
  assert re.search(r"our LayerNorm: (CPU kernel|XLA)", out)
  assert "train step (fwd+bwd+AdamW), batch 2" in out and "forward only, batch 2" in out
  # Per side and mode, 2 rounds of 2 steps: "a, b | c, d".
  rounds = re.findall(r"^  (ours|torch) +wall s by round: (.*)$", out, re.M)
  assert [side for side, _ in rounds] == ["ours", "torch"] * 2
  for _, times in rounds:
    assert len(re.findall(r"\d+\.\d+", times)) == 4
  ratios = re.findall(r"ratio ours/torch = (\d+\.\d+) by wall time, (\d+\.\d+) by CPU time", out)
  assert len(ratios) == 4 and all(float(w) > 0 and float(c) > 0 for w, c in ratios)


def test_layer_grads_pieces_print_all_timings():
  out = run("layer_grads.py", "--variant", "Ti", "--rounds", "1", "--no-step")
  rows = re.findall(r"^  bias grad, width +\d+, round 0: +"
                    r"(\d+\.\d+) / +(\d+\.\d+) +\((\d+\.\d+)x\)$", out, re.M)
  assert len(rows) == 2, out
  for xla, ours, ratio in rows:
    assert float(xla) > 0 and float(ours) > 0
    assert float(ratio) == pytest.approx(float(xla) / float(ours), rel=0.05)
  ln = re.findall(r"^  round 0: +(\d+\.\d+) / +(\d+\.\d+) / +(\d+\.\d+) +"
                  r"\((\d+\.\d+)x, (\d+\.\d+)x\)$", out, re.M)
  assert len(ln) == 1, out
  flax, xla, ours, r1, r2 = map(float, ln[0])
  assert min(flax, xla, ours) > 0
  assert r1 == pytest.approx(flax / ours, rel=0.05) and r2 == pytest.approx(xla / ours, rel=0.05)
