"""End to end through `python -m big_vision_lite.train`: errors, learning, kill/resume, preemption.

Runs that must be stopped from outside use subprocesses (2 fake CPU devices
each); a fault `kill@N` / `term@N` (tests/fault_entry.py) makes the trainer signal
itself right after step N's checkpoint save was issued, so the stop point is exact.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
from helpers import assert_bitwise_equal, final_params, metric_rows

from big_vision_lite import build, config as config_lib, pretrained, restore, run, train
from big_vision_lite.tools import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/vit_shapes.py:res=16,width=32,depth=2,heads=2,patch=8,batch=16,steps=10"
COMMON = [
    "--config.evals.val.data.split=validation[:64]", "--config.evals.val.batch_size=32",
    "--config.evals.val.log_steps=0", "--config.log_training_steps=1", "--config.progress=False",
    "--config.schedule.warmup_steps=2", "--config.ckpt_steps=3", "--config.input.num_workers=0",
    "--config.profile.num_steps=0",  # the shipped configs trace steps 10..12
]


def run_cli(workdir, *extra, fault=None, devices=2):
  return helpers.run_cli(TINY, COMMON, workdir, *extra, fault=fault, devices=devices)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  r = run_cli(workdir)
  assert r.returncode == 0, r.stderr[-3000:]
  # The implementations chosen (config.model.attention_impl / norm_impl, platform.cpu_dots:
  # 'auto' here) are printed and recorded in the workdir beside config.json.
  with open(os.path.join(workdir, "platform.json")) as f:
    chosen = json.load(f)["decisions"]
  assert chosen["cpu dots"]["impl"] in ("eigen", "ynnpack")
  attn = [d for w, d in chosen.items() if w.startswith("attention")]
  assert attn and all(d["requested"] == "auto" for d in attn)
  for what, d in chosen.items():
    assert f"platform: {what}: {d['impl']} ({d['why']})" in r.stdout
  # After the first step: the compiled step's memory per device, from XLA's analysis.
  mem = re.search(r"^train step memory per device \(XLA's analysis\): arguments ([\d.]+) MiB, "
                  r"temporaries ([\d.]+) MiB, outputs ([\d.]+) MiB \(([\d.]+) MiB of them in "
                  r"donated arguments\)$", r.stdout, re.M)
  assert mem and all(float(x) > 0 for x in mem.groups()), r.stdout
  return str(workdir)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args,match", [
    (["--config.totl_steps=3"], "did you mean 'total_steps'"),
    (["--config.total_steps=ten"], "config.total_steps: expected int"),
    (["--config.input.batch_size=12"], "config.input.batch_size: 12"),
    (["--config.model.attention_impl=flash"], "config.model.attention_impl: must be one of"),
    (["--config.model.attention_impl=cudnn"], "config.model.attention_impl: 'cudnn' runs on GPU"),
    (["--config.model.norm_impl=splash"], "config.model.norm_impl: must be one of"),
    (["--config.platform.cpu_dots=mkl"], "config.platform.cpu_dots: must be one of"),
])
def test_cli_config_errors_are_one_line(args, match, capsys):
  code = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", "", *args])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert match in err and len(err.splitlines()) == 1, err


def test_cli_missing_imagenet_data_dir(capsys):
  code = train.main(["--config", os.path.join(ROOT, "configs/vit_i1k.py")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "config.input.data.data_dir: required for tfds dataset 'imagenet2012'" in err


# ----------------------------------------------------------------------------- learning


def test_short_run_learns(tmp_path):
  """120 steps on 8 devices learn the dataset's colour label (chance 1/8); metrics and plot are written.

  Colour is the attribute a few steps can learn; the slow test below checks the
  README command reaches >= 0.90 on the shape label.
  """
  pp = "decode|resize(32)|value_range(-1, 1)|onehot(8, key='color', key_result='labels')|keep('image', 'labels')"
  config = config_lib.load_config(os.path.join(ROOT, "configs/vit_shapes.py:res=32,patch=8,width=64,"
                                               "depth=2,heads=4,batch=64,steps=120"))
  config = config_lib.apply_overrides(config, [
      "--config.evals.val.data.split=validation[:500]", "--config.evals.val.log_steps=0",
      "--config.progress=False", "--config.ckpt_steps=0", "--config.log_training_steps=20",
      "--config.input.num_workers=0", "--config.schedule.warmup_steps=20",
      "--config.profile.num_steps=0", f"--config.input.pp={pp}", f"--config.evals.val.pp={pp}"])
  result = run.train_and_evaluate(config, str(tmp_path))
  assert result["val/examples"] == 500  # 2 batches of 256, the last one padded
  assert result["val/prec@1"] > 0.9, result
  rows = metric_rows(tmp_path)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 0.3, losses
  assert any("images_per_s" in r and "mfu" in r for r in rows)
  assert os.listdir(tmp_path / "tb")
  assert plot.main([str(tmp_path)]) == 0
  with open(tmp_path / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- resume


def test_sigkill_during_async_save_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  # Killed right after the step-6 save was issued: that checkpoint may be half written.
  r = run_cli(tmp_path, fault="kill@6")
  assert r.returncode == -9, r.stderr[-2000:]
  r = run_cli(tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert_bitwise_equal(final_params(tmp_path), final_params(uninterrupted))
  steps = [row["step"] for row in metric_rows(tmp_path) if "loss" in row]
  assert steps == sorted(set(steps)) and steps[-1] == 10  # no duplicated steps from the killed run
  want = [row for row in metric_rows(uninterrupted) if row["step"] == 10 and "loss" in row][0]
  got = [row for row in metric_rows(tmp_path) if row["step"] == 10 and "loss" in row][0]
  assert got["loss"] == want["loss"]


def test_sigterm_saves_current_step_and_exits_75(uninterrupted, tmp_path):
  r = run_cli(tmp_path, "--config.ckpt_steps=100", fault="term@4")
  assert r.returncode == train.PREEMPTED_EXIT_CODE, r.stderr[-2000:]
  assert "preempted at step 4" in r.stderr
  assert os.path.exists(tmp_path / "checkpoints" / "4" / "commit_success.txt")
  r = run_cli(tmp_path, "--config.ckpt_steps=100")
  assert r.returncode == 0, r.stderr[-3000:]
  assert_bitwise_equal(final_params(tmp_path), final_params(uninterrupted))


def test_half_written_checkpoint_is_never_resumed(uninterrupted, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(uninterrupted, workdir)
  ckpts = workdir / "checkpoints"
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [6, 9, 10]
  os.remove(ckpts / "10" / "commit_success.txt")  # as if killed before the commit
  r = run_cli(workdir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert any(d.startswith("10.incomplete") for d in os.listdir(ckpts))  # kept aside, not used
  # It resumed from step 9 (so step 10 was recomputed), and got the same result.
  assert_bitwise_equal(final_params(workdir), final_params(uninterrupted))


@pytest.mark.slow  # over a minute on 2 cores: CI's slow stage runs it
def test_resume_onto_another_mesh(uninterrupted, tmp_path):
  r = run_cli(tmp_path, "--config.mesh.data=2", fault="term@5")
  assert r.returncode == train.PREEMPTED_EXIT_CODE, r.stderr[-2000:]
  r = run_cli(tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
              devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  got, want = final_params(tmp_path), final_params(uninterrupted)
  for k in want:  # other reduction order: equal to float tolerance, not bitwise
    if k.endswith("key/bias"):
      # Its true gradient is 0 (a key bias shifts all of a query's logits alike), so Adam's
      # normalised update turns rounding noise of either mesh into ~lr-sized steps.
      continue
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_readme_quick_start_reaches_90_percent(tmp_path):
  """The README's training command, unchanged: validation prec@1 >= 0.90."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "big_vision_lite.train", "--config", "configs/vit_shapes.py",
                      "--workdir", str(tmp_path), "--config.progress=False"],
                     env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["val/prec@1"] >= 0.90, result


def test_model_init_loads_and_resamples_posemb(tmp_path, capsys):
  """A run at 16 px initialises a 32 px run: everything loads, pos_embedding is resampled 2x2 -> 4x4."""
  def cfg(res, steps, extra):
    c = config_lib.load_config(os.path.join(ROOT, f"configs/vit_shapes.py:res={res},width=32,depth=2,"
                                            f"heads=2,patch=8,batch=16,steps={steps}"))
    return config_lib.apply_overrides(c, [
        "--config.model.posemb=learn", "--config.evals.val.data.split=validation[:32]",
        "--config.evals.val.batch_size=32", "--config.progress=False", "--config.schedule.warmup_steps=1",
        "--config.input.num_workers=0", *extra])
  run.train_and_evaluate(cfg(16, 3, ["--config.ckpt_steps=3"]), str(tmp_path / "a"))
  source = pretrained.read_params(str(tmp_path / "a" / "checkpoints"))
  assert source["pos_embedding"].shape == (1, 4, 32)
  config = cfg(32, 2, [f"--config.model_init={tmp_path / 'a'}", "--config.ckpt_steps=0", "--config.lr=0.0"])
  setup = build.build(config)
  state, start = restore.restore_or_init(setup, config, None, None)
  out = capsys.readouterr().out
  assert start == 0 and "resampled: 1" in out and "pos_embedding" in out and "missing" not in out
  params = jax.device_get(state["params"])
  assert params["pos_embedding"].shape == (1, 16, 32)
  np.testing.assert_array_equal(params["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"],
                                source["Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"])
  # The mean of a bilinear upsampling stays close to the source grid's mean.
  np.testing.assert_allclose(params["pos_embedding"].mean(), source["pos_embedding"].mean(), atol=0.05)


def test_label_depth_mismatch_is_named_before_compile(capsys):
  code = train.main(["--config", os.path.join(ROOT, TINY), "--config.model.num_classes=10", *COMMON,
                     "--config.ckpt_steps=0"])
  err = capsys.readouterr().err
  assert code == 2  # a config error, found once the first example shows the labels' depth
  assert "config.model.num_classes gives 10 logits but the labels from config.input.pp have depth 8" in err


def test_resume_with_grain_worker_processes_is_bitwise_identical(tmp_path):
  """With input worker processes the iterator state is restored too; no orphaned workers remain."""
  ref = tmp_path / "ref"
  r = run_cli(ref, "--config.input.num_workers=1", "--config.total_steps=8")
  assert r.returncode == 0, r.stderr[-3000:]
  killed = tmp_path / "killed"
  r = run_cli(killed, "--config.input.num_workers=1", "--config.total_steps=8", fault="kill@4")
  assert r.returncode == -9, r.stderr[-2000:]
  r = run_cli(killed, "--config.input.num_workers=1", "--config.total_steps=8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert_bitwise_equal(final_params(killed), final_params(ref))
  leftover = subprocess.run(["pgrep", "-f", str(killed)], capture_output=True, text=True).stdout.split()
  assert not leftover, f"processes still running for {killed}: {leftover}"
