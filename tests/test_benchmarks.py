"""benchmarks/: the scripts run end to end at toy sizes and print what their docstrings promise
(settings, both sides' step times, ratios). Numbers are not checked: tests never assert times."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MALLOC_LINE = (r"glibc keeps freed memory: (yes \(GLIBC_TUNABLES\)|no \(--malloc default\)); "
               r"large blocks cached: (yes|no)")

# Stands in for a big_vision checkout (tests download nothing): its models/vit.py interface.
FAKE_BIG_VISION_VIT = """
import flax.linen as nn
import jax.numpy as jnp

class Model(nn.Module):
  num_classes: int
  variant: str
  pool_type: str
  posemb: str

  @nn.compact
  def __call__(self, x, train=False):
    logits = nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
    return logits, {"logits": logits}
"""


def run(script: str, *args: str) -> str:
  # One CPU device (the default outside this test process), as a user runs the benchmarks.
  env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "XLA_FLAGS": "",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  # Every script says which CPU its numbers come from (bench_setup.cpu_line).
  assert re.search(rf"^CPU: .+, {os.cpu_count()} cores", r.stdout, re.M), r.stdout
  return r.stdout


@pytest.mark.slow  # over a minute on 2 cores
@pytest.mark.extended
def test_vs_pytorch_prints_settings_times_and_ratios(tmp_path):
  if importlib.util.find_spec("timm") is None:  # not imported here: torch_env sets torch up
    pytest.skip("timm is not installed (the [torch] extra)")
  (tmp_path / "big_vision" / "models").mkdir(parents=True)
  for init in ("big_vision/__init__.py", "big_vision/models/__init__.py"):
    (tmp_path / init).write_text("")
  (tmp_path / "big_vision" / "models" / "vit.py").write_text(FAKE_BIG_VISION_VIT)
  out = run("vs_pytorch.py", "--variant", "Ti", "--res", "32", "--batch", "2", "--infer_batch",
            "2", "--steps", "2", "--block", "2", "--malloc", "keep", "--big_vision", str(tmp_path),
            "--vs_xla")
  # The platform layer's choices come first (printed as the model is traced), then the header.
  lines = out.splitlines()
  head = next(i for i, line in enumerate(lines) if line.startswith("ViT-Ti/16 at 32px, 1000 classes, fp32"))
  assert all(line.startswith("platform: ") for line in lines[:head]) and head >= 3, out
  assert lines[head + 1].startswith("CPU: ")
  assert "torch threads" in out and "GLIBC_TUNABLES=" in out
  # --malloc keep: the script restarted itself once in launch/cpu.sh's environment.
  assert re.search(MALLOC_LINE + "$", out, re.M) and "keeps freed memory: yes" in out, out
  assert "our config: {'attention_impl': 'auto', 'norm_impl': 'auto', 'cpu_dots': 'auto'}" in out
  assert re.search(r"^platform: attention q float32\[2,5,3,64\] .*: (cpu_kernel|xla) \(", out, re.M)
  assert re.search(r"^platform: layer_norm x float32\[2,5,192\]: (cpu_kernel|xla) \(", out, re.M)
  machine = re.findall(r"^machine (before|after): 2048\^2 fp32 matmul: jax (\d+) GFLOP/s, "
                       r"torch (\d+) GFLOP/s; memory copy (\d+\.\d) GB/s", out, re.M)
  assert [m[0] for m in machine] == ["before", "after"], out
  assert all(float(x) > 0 for m in machine for x in m[1:])
  assert "train step (fwd+bwd+AdamW), batch 2" in out and "forward only, batch 2" in out
  # Per side and mode, 2 rounds of 2 steps: "a, b | c, d".
  assert "ours_xla config: {'attention_impl': 'xla', 'norm_impl': 'xla', 'cpu_dots': 'ynnpack'}" in out
  rounds = re.findall(r"^  (ours|torch|big_vision|ours_xla) +wall s by round: (.*)$", out, re.M)
  assert [side for side, _ in rounds] == ["ours", "torch", "big_vision", "ours_xla"] * 2
  for _, times in rounds:
    assert len(re.findall(r"\d+\.\d+", times)) == 4
  rates = re.findall(r"^    (ours|torch|big_vision|ours_xla) +\d+\.\d+ img/s .*;  (\d+) GFLOP/s = "
                     r"(\d+)% of its matmul probe$", out, re.M)
  assert len(rates) == 16 and all(int(g) >= 0 and int(p) >= 0 for _, g, p in rates), out
  ratios = re.findall(r"ratio ours/torch = (\d+\.\d+) by wall time, (\d+\.\d+) by CPU time", out)
  assert len(ratios) == 4 and all(float(w) > 0 and float(c) > 0 for w, c in ratios)
  assert len(re.findall(r"ratio ours/big_vision = \d+\.\d+ by wall time", out)) == 4
  assert len(re.findall(r"ratio ours/ours_xla = \d+\.\d+ by wall time", out)) == 4
  rows = re.findall(r"^row: ViT-Ti/16 (train|infer) img/s ours [\d.]+, torch [\d.]+, "
                    r"big_vision [\d.]+, ours_xla [\d.]+; ours/torch [\d.]+; ours/big_vision [\d.]+; "
                    r"ours/ours_xla [\d.]+; CPU: .+$",
                    out, re.M)
  assert rows == ["train", "infer"], out
  mem = re.search(r"^peak resident memory (\d+\.\d+) GiB(; block cache: (\d+) blocks mapped, "
                  r"(\d+) reused, \d+ unmapped, peak live \d+\.\d+ GiB, \d+ waits for a free "
                  r"\(\d+ served\))?$", out, re.M)
  assert mem and float(mem[1]) > 0, out
  if "large blocks cached: yes" in out:
    assert int(mem[3]) > 0 and int(mem[4]) > 0, out  # the steps reused their blocks


def _assert_printed_ratio(ratio: float, a: float, b: float, half_ulp: float = 0.005) -> None:
  """`ratio` (printed to 2 decimals) is a/b of the unrounded times that printed as `a` and `b`
  (2 decimals each): within the range a/b spans over the rounding of all three."""
  lo = (a - half_ulp) / (b + half_ulp) - half_ulp
  hi = (a + half_ulp) / max(b - half_ulp, 1e-12) + half_ulp
  assert lo <= ratio <= hi, (ratio, a, b)


def test_layer_grads_pieces_print_all_timings():
  out = run("layer_grads.py", "--variant", "Ti", "--rounds", "1", "--no-step")
  assert re.search(r"cores; " + MALLOC_LINE + "$", out, re.M), out
  rows = re.findall(r"^  bias grad, width +\d+, round 0: +"
                    r"(\d+\.\d+) / +(\d+\.\d+) +\((\d+\.\d+)x\)$", out, re.M)
  assert len(rows) == 2, out
  for xla, ours, ratio in rows:
    assert float(xla) > 0 and float(ours) > 0
    _assert_printed_ratio(float(ratio), float(xla), float(ours))
  ln = re.findall(r"^  round 0: +(\d+\.\d+) / +(\d+\.\d+) / +(\d+\.\d+) +"
                  r"\((\d+\.\d+)x, (\d+\.\d+)x\)$", out, re.M)
  assert len(ln) == 1, out
  flax, xla, ours, r1, r2 = map(float, ln[0])
  assert min(flax, xla, ours) > 0
  _assert_printed_ratio(r1, flax, ours)
  _assert_printed_ratio(r2, xla, ours)


@pytest.mark.slow  # ~40 s: 17 compiles
@pytest.mark.extended
def test_scaling_prints_one_row_per_setting_with_the_trainers_settings():
  out = run("scaling.py", "--steps", "1", "--batch", "4", "--res", "32", "--depth", "1")
  assert re.search(MALLOC_LINE + r"; compiler_options (None|\{.*\})",
                   out), out
  rows = re.findall(r"^\| (.+?) +\| +(\d+\.\d+) \| +(\d+\.\d+) \| +(\d+\.\d+) \| +(\d+\.\d+) \| "
                    r"+(\d+\.\d+) \|$", out, re.M)
  labels = [r[0] for r in rows]
  assert labels[:3] == ["batch 2", "batch 4", "batch 8"], out
  assert "depth 2 scan" in labels and "remat nothing_saveable + scan" in labels, labels
  for _, compile_s, step_ms, ips, _, args_mib in rows:
    assert float(compile_s) > 0 and float(step_ms) > 0 and float(args_mib) > 0
  # The parameter memory of the depth sweep grows with depth (the rows are real measurements).
  args_by_label = {r[0]: float(r[5]) for r in rows}
  assert args_by_label["depth 0 unrolled"] < args_by_label["depth 1 unrolled"] < args_by_label["depth 2 unrolled"]


@pytest.mark.slow  # ~30 s: two ViT-S/16 train steps compiled
@pytest.mark.extended
def test_moe_vs_dense_prints_both_steps_and_the_ratio():
  out = run("moe_vs_dense.py", "--res", "32", "--batch", "2", "--steps", "1")
  assert re.search(r"1 timed steps each; " + MALLOC_LINE + "$", out, re.M), out
  steps = dict(re.findall(r"^  (dense ViT-S/16|MoE-ViT-S/16 E=8 k=2 every 2nd) +step (\d+\.\d+) s",
                          out, re.M))
  assert len(steps) == 2, out
  ratio = float(re.search(r"step-time ratio MoE/dense = (\d+\.\d+)", out).group(1))
  assert ratio == pytest.approx(float(steps["MoE-ViT-S/16 E=8 k=2 every 2nd"])
                                / float(steps["dense ViT-S/16"]), rel=0.02)


@pytest.mark.slow  # ~20 s
@pytest.mark.extended
def test_openvision2_vs_ov1_prints_both_steps_and_ratios():
  out = run("openvision2_vs_ov1.py", "--steps", "1", "--batch", "4", "--depth", "1",
            "--text_depth", "1", "--width", "64")
  assert re.search(r"\]; " + MALLOC_LINE + "; batch 4", out), out
  assert re.search(r"OpenVision 1 \(2x SigLIP \+ caption\): +\d+\.\d ms/step", out), out
  assert re.search(r"OpenVision 2 \(caption, keep 0\.35\): +\d+\.\d ms/step", out), out
  assert re.search(r"step-time ratio OV1/OV2: \d+\.\d+x", out), out


@pytest.mark.slow  # over a minute on 2 cores: CI's bench stage runs it, with its tf.data side
@pytest.mark.extended
def test_input_pipeline_prints_each_side_per_core_and_the_ratios():
  out = run("input_pipeline.py", "--toy")
  cores = sorted({1, min(2, os.cpu_count()), os.cpu_count()})
  try:
    import tensorflow  # noqa: F401  (only in the [bench] extra's own venv)
    tf = r"\d+\.\d +\d+\.\d"
  except ImportError:
    tf = "skipped"
  for n in cores:
    assert re.search(rf"^train +{n} +\d+\.\d +\d+\.\d +{tf} .*\d+\.\d+x$", out, re.M), out
    assert re.search(rf"^siglip +{n} +\d+\.\d +\d+\.\d", out, re.M), out
