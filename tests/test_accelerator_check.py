"""benchmarks/accelerator_check.py runs at toy size on CPU, as the GPU host would run it: in a
process where ml_collections, grain and tensorflow(-datasets) cannot be imported."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("ml_collections", "grain", "tensorflow_datasets", "tensorflow")
# Runs the script with an import hook hiding the packages the GPU host does not have, as absent
# packages look: `importlib.util.find_spec` answers None (torch.compile probes tensorflow so), an
# import raises ModuleNotFoundError.
WRAPPER = f"""
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] not in {BLOCKED!r}:
      return None
    frame = sys._getframe(1)
    while frame is not None:
      if frame.f_code.co_filename.endswith("importlib.util>") and frame.f_code.co_name == "find_spec":
        return None
      frame = frame.f_back
    raise ModuleNotFoundError("not on the GPU host: " + name, name=name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(tmp_path, *args):
  path = tmp_path / "check.json"
  out = subprocess.run(
      [sys.executable, "-c", WRAPPER, "benchmarks/accelerator_check.py", "--toy", "--json", str(path),
       *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return out, (json.loads(path.read_text()) if path.exists() else None)


def test_the_wrapper_blocks_what_the_gpu_host_lacks(tmp_path):
  probe = tmp_path / "probe.py"
  probe.write_text("import big_vision_lite.config\n")
  r = subprocess.run([sys.executable, "-c", WRAPPER, str(probe)], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0 and "not on the GPU host: ml_collections" in r.stderr


def test_vit_rows_at_toy_size_without_ml_collections_grain_or_tfds(tmp_path):
  out, result = _run(tmp_path, "--only", "vit,cudnn")
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["name"]: r for r in result["rows"]}
  assert len(rows) == 2
  for r in rows.values():
    assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["memory_bytes"] > 0, r
  # No GPU here: the cuDNN row says it ran the XLA math, and why.
  assert "cuDNN not taken (no CUDA GPU)" in rows["ViT-mu/8 cudnn attention"]["note"]
  assert "| run | step ms | images/s | MFU |" in out.stdout


@pytest.mark.slow  # every row, the timm one too: a few minutes of compiles on a CPU
@pytest.mark.extended  # the benchmark at toy size
def test_every_row_at_toy_size(tmp_path):
  out, result = _run(tmp_path)
  rows = result["rows"]
  assert [r["name"].split(" ")[0] for r in rows] == ["ViT-mu/8", "ViT-mu/8", "SigLIP", "CapPa",
                                                     "MoE-ViT", "timm"], rows
  # Whether timm imports the way the benchmark imports it, asked in a fresh process: this one may
  # hold a timm another test imported.
  probe = subprocess.run([sys.executable, "-c", "from big_vision_lite.convert import torch_env; "
                          "torch_env.setup(); import timm"], cwd=ROOT, capture_output=True)
  timm_ok = probe.returncode == 0
  for r in rows if timm_ok else rows[:-1]:
    assert r["step_s"] and r["step_s"] > 0, r
  if not timm_ok:
    assert rows[-1]["note"].startswith("skipped: timm does not import"), rows[-1]
  assert out.returncode == 0, out.stderr[-3000:]
