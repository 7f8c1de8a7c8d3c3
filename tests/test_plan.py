"""`python -m big_vision_lite.plan`: AOT compile of the real train step for a topology, the memory
and FLOPs it reports, and one-line errors before any compile."""

import json
import os

import pytest

from big_vision_lite import flops, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/vit_shapes.py:res=32,width=16,depth=1,heads=2,patch=8,batch=16,steps=200")


def _main(capsys, *args):
  code = plan.main(["--config", TINY, *args])
  out = capsys.readouterr()
  return code, out.out, out.err.strip()


def test_cpu_plan_reports_memory_and_flops(capsys, tmp_path):
  path = str(tmp_path / "plan.json")
  code, out, err = _main(capsys, "--topology", "cpu:8", "--json", path)
  assert code == 0, err
  p = json.load(open(path))
  assert p["devices"] == 8 and p["hosts"] == 1 and p["mesh"]["data"] == 8
  assert p["example"].startswith("first example of bvl_shapes")
  # The state (params + 2 Adam moments, f32) is an argument and, donated, aliased to the output.
  params_bytes = 4 * p["params"]
  assert 3 * params_bytes <= p["argument_bytes"] < 3 * params_bytes + 64 * 1024
  assert p["alias_bytes"] >= 3 * params_bytes
  assert p["total_bytes"] == (p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"]
                              + p["temp_bytes"] + p["code_bytes"])
  # XLA's per-device FLOPs are at least the analytic matmul count split over 8 devices, and
  # not wildly more (elementwise ops, optimizer).
  analytic = flops.train_flops_per_step(
      flops.vit_forward_flops(32, 8, 16, 1, mlp_dim=64, num_classes=8), 16)
  assert p["model_flops_per_step"] == pytest.approx(analytic)
  assert analytic / 8 <= p["xla_flops_per_device"] < 4 * analytic / 8
  assert p["step_time_lower_bound_s"] == pytest.approx(p["xla_flops_per_device"] / p["peak_flops"])
  assert "memory per device" in out and "step time >=" in out


def test_does_not_fit_is_one_line_exit_2(capsys):
  code, out, err = _main(capsys, "--topology", "cpu:8", "--memory_gib", "0.0001")
  assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: does not fit"), err


@pytest.mark.parametrize("args,match", [
    (["--topology", "v9z:2x2"], "unknown TPU generation 'v9z'"),
    (["--topology", "v5e:2x2x2"], "v5e topologies have 2 dimensions"),
    (["--topology", "tpu-16"], "expected GEN:AxB"),
    (["--topology", "cpu:8", "--config.mesh.data=3"], "config.mesh"),
    (["--topology", "cpu:8", "--config.input.batch_size=12"], "config.input.batch_size: 12"),
    (["--topology", "cpu:64"], "has 8 CPU devices"),
    (["--topology", "cpu:8", "--config.model.attention_impl=splash"], "is a TPU kernel"),
    (["--topology", "cpu:8", "--config.model.attention_impl=flash"], "config.model.attention_impl: must be one of"),
])
def test_bad_input_is_one_line_before_compile(capsys, monkeypatch, args, match):
  def no_compile(*a, **k):
    raise AssertionError("must fail before building the train step")
  monkeypatch.setattr(plan, "example_for", no_compile)
  code, out, err = _main(capsys, *args)
  assert code == 2 and match in err and len(err.splitlines()) == 1, err


def test_tpu_plan_on_a_small_topology(capsys, tmp_path):
  pytest.importorskip("libtpu")
  path = str(tmp_path / "plan.json")
  code, out, err = _main(capsys, "--topology", "v5e:2x2", "--json", path)
  assert code == 0, err
  p = json.load(open(path))
  assert p["devices"] == 4 and p["device_kind"] == "TPU v5e" and p["mesh"]["data"] == 4
  assert p["capacity_bytes"] == 16 * 1024**3 and p["peak_flops"] == 197e12
  assert 0 < p["total_bytes"] < p["capacity_bytes"]
  assert p["xla_flops_per_device"] >= p["model_flops_per_step"] / 4
  assert p["memory_bound_s"] == pytest.approx(p["hbm_bytes_per_device"] / 819e9)
  assert p["step_time_lower_bound_s"] == max(p["compute_bound_s"], p["memory_bound_s"])


@pytest.mark.parametrize("topology,devices,kind", [("v5e:2x2", 4, "TPU v5e"), ("v5p:2x2x1", 4, "TPU v5p")])
def test_tpu_plan_with_splash_attention_against_xla(capsys, tmp_path, topology, devices, kind):
  """config.model.attention_impl=splash compiles the Pallas kernel into the step (forward and
  backward) and reports the same step's memory with the XLA attention beside it."""
  pytest.importorskip("libtpu")
  path = str(tmp_path / "plan.json")
  code, out, err = _main(capsys, "--topology", topology, "--config.model.attention_impl=splash",
                         "--json", path)
  assert code == 0, err
  p = json.load(open(path))
  assert p["devices"] == devices and p["device_kind"] == kind and p["attention_impl"] == "splash"
  # One encoder block: the forward kernel and the backward's dq and dkv kernels at least.
  assert p["tpu_custom_calls"] >= 2, p["tpu_custom_calls"]
  xla = p["xla_attention"]
  assert 0 < xla["total_bytes"] < p["capacity_bytes"] and xla["argument_bytes"] == p["argument_bytes"]
  assert "with the XLA attention" in out
  # The plain plan traces the XLA math: no Pallas call, no second compile.
  code, out, err = _main(capsys, "--topology", topology, "--json", path)
  p = json.load(open(path))
  assert code == 0 and p["tpu_custom_calls"] == 0 and p["xla_attention"] is None, err


# V-MoE B/16 compiled for 256 chips (minutes); skipped without libtpu, so it runs in CI's
# libtpu stage ("tpu" in its name) and costs the default suite nothing.
def test_vmoe_recipe_shards_its_experts_on_a_tpu_pod(tmp_path, capsys):
  pytest.importorskip("libtpu")
  path = str(tmp_path / "plan.json")
  cfg = os.path.join(ROOT, "configs/vmoe_i1k.py")
  assert plan.main(["--config", cfg, "--topology", "v5e:16x16", "--json", path]) == 0
  p = json.load(open(path))
  assert p["mesh"]["expert"] == 8 and p["mesh"]["data"] == 32
  # Replicated, params + 2 Adam moments in f32 would be 12 bytes per parameter on every chip.
  replicated = 12 * p["params"]
  assert p["argument_bytes"] < 0.4 * replicated, (p["argument_bytes"], replicated)
