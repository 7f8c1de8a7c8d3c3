"""Every shipped recipe trains end to end as its user launches it: the command line, the recipe's
own step count (epochs where it counts them), preprocessing, evaluators and kind of data source,
at a tiny model size on stand-in data made here (tfds imagenet2012/21k layouts, tar shards with a
sentencepiece model, the built-in data); and every recipe plans for a TPU-sized mesh without data
or tokenizer files."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

import standin_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))

# Short runs: a log line per step (stderr, as in a log file), a checkpoint every 2 steps, no MFU probe, one warmup step
# (the recipes' own warmup is longer than these runs).
COMMON = ["--config.log_training_steps=1", "--config.ckpt_steps=2",
          "--config.mfu_peak_flops=1e12", "--config.schedule.warmup_steps=1",
          "--config.profile.num_steps=0"]  # the recipes trace steps 10..12
TINY_SHAPES = "res=32,width=16,depth=1,heads=2,patch=8,batch=16,steps=3,workers=0"
# recipe -> (config args, extra overrides, expected total steps); {data}, {tars}, {spm} are filled in.
RUNS = {
    # 198 train examples (train[:99%] of 200) x 0.25 epochs / batch 16 -> 4 steps.
    "vit_i1k": ("variant=mu/8,res=32,batch=16,workers=0,epochs=0.25,data_dir={data}", [], 4),
    "vmoe_i1k": ("variant=mu/8,res=32,batch=16,workers=0,epochs=0.25,experts=2,last=1,data_dir={data}", [], 4),
    # full[8:] of 72 -> 64 examples x 0.75 epochs / 16 -> 3 steps.
    "vmoe_i21k": ("variant=mu/8,res=32,batch=16,workers=0,epochs=0.75,experts=2,last=1,minival=8,"
                  "data_dir={data}", [], 3),
    # 2 shards x 24 pairs, one epoch at batch 16 -> 3 steps.
    "siglip_b16": ("variant=mu/8,res=32,batch=16,epochs=1.0,files={tars},spm={spm},vocab=40,text_len=16",
                   ["--config.input.num_workers=0"], 3),
    "cappa_b16": ("variant=mu/8,res=32,batch=16,steps=3,files={tars},spm={spm},vocab=40,text_len=16,dec_depth=1",
                  ["--config.input.num_workers=0"], 3),
    "siglip2_b16": ("variant=mu/8,res=32,batch=16,steps=3,files={tars},spm={spm},vocab=40,text_len=16,"
                    "dec_depth=1,bins=8,region_len=6", ["--config.input.num_workers=0"], 3),
    "siglip2_b16_naflex": ("variant=mu/8,res=32,budget=20,batch=16,steps=3,files={tars},spm={spm},"
                           "vocab=40,text_len=16,dec_depth=1,bins=8,region_len=6",
                           ["--config.input.num_workers=0"], 3),
    "openvision2_l14": ("variant=mu/8,res=32,batch=16,steps=3,files={tars},spm={spm},vocab=40,text_len=16,"
                        "dec_depth=1", ["--config.input.num_workers=0"], 3),
    # A class folder through bvl-make-dataset: 3 x 18 train images, one epoch at batch 16 -> 4 steps.
    "own_folder": ("data={own},res=16,patch=4,epochs=1.0,batch=16,width=16,depth=1,heads=2,warmup=1,"
                   "workers=0", [], 4),
    "vit_shapes": (TINY_SHAPES, [], 3),
    "vmoe_shapes": (TINY_SHAPES + ",experts=2", [], 3),
    "siglip_shapes": (TINY_SHAPES, [], 3),
    "siglip2_shapes": (TINY_SHAPES.replace("depth=1", "depth=1,dec_depth=1"), [], 3),
    "cappa_shapes": (TINY_SHAPES.replace("depth=1", "depth=1,dec_depth=1"), [], 3),
    "openvision2_shapes": (TINY_SHAPES.replace("depth=1", "depth=1,dec_depth=1"), [], 3),
}


def test_every_recipe_has_a_run():
  assert sorted(RUNS) == CONFIGS, "a recipe in configs/ without a smoke run here (or a stale entry)"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
  base = tmp_path_factory.mktemp("standin")
  data = str(base / "tfds")
  standin_data.write_tfds(data, "imagenet2012", {"train": 200, "validation": 16}, 1000, version="5.1.0")
  standin_data.write_tfds(data, "imagenet21k", {"full": 72}, 21843)
  tars = standin_data.write_tar_shards(str(base / "tars"), num_shards=2, per_shard=24)
  spm = standin_data.train_sentencepiece(str(base / "spm.model"))
  folder = standin_data.write_class_folder(str(base / "images"), ("cat", "dog", "fox"), per_class=20)
  own = str(base / "own")
  subprocess.run([sys.executable, "-m", "big_vision_lite.tools.make_dataset", folder, own], check=True,
                 cwd=ROOT, capture_output=True)
  return {"data": data, "tars": tars, "spm": spm, "own": own, "cache": str(base / "xla_cache")}


def _env(cache: str) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_COMPILATION_CACHE_DIR=cache)


# The built-in-data recipes but the quick start's also train in their own tests (test_siglip,
# test_cappa, ...): their runs here are in the extended suite; the real recipes stay in the default one.
EXTENDED_RUNS = {r for r in RUNS if r.endswith("_shapes") and r != "vit_shapes"}
EXTENDED = [pytest.mark.slow, pytest.mark.extended]


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=EXTENDED) if r in EXTENDED_RUNS else r
                                    for r in sorted(RUNS)])
def test_recipe_trains_as_launched(recipe, standin, tmp_path):
  args, extra, steps = RUNS[recipe]
  spec = f"configs/{recipe}.py:{args.format(**standin)}"
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "big_vision_lite.train", "--config", spec, "--workdir", str(workdir),
         *COMMON, *extra]
  out = subprocess.run(cmd, env=_env(standin["cache"]), capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, f"{recipe}: exit {out.returncode}\n{out.stderr[-3000:]}"
  # The recipe's own step count (from epochs where it counts them) and its first logged step.
  assert f" {steps} steps of batch 16" in out.stdout, out.stdout[-2000:]
  assert re.search(rf"^step 1/{steps} loss \d", out.stderr, re.M), out.stderr[-2000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
  config = json.loads((workdir / "config.json").read_text())
  for name in config["evals"]:  # every evaluator of the recipe ran at the last step and logged
    assert any(k.startswith(f"{name}/") for r in rows if r["step"] == steps for k in r), (name, rows[-1])
    assert re.search(rf"^eval step {steps}/{steps} .*{name}/", out.stderr, re.M), out.stderr[-2000:]
  assert os.path.isdir(workdir / "checkpoints" / str(steps))


# Target topologies of the real recipes (the shapes recipes are planned on the local CPU mesh).
PLANS = {"vit_i1k": "v5e:4x4", "vmoe_i1k": "v5e:4x4", "vmoe_i21k": "v5e:16x16", "siglip_b16": "v5e:16x16",
         "cappa_b16": "v5e:16x16", "openvision2_l14": "v5e:16x16",
         # 128 examples a chip as the recipe on v5p:8x8x4 (benchmarks/RESULTS.md), on 8 chips: a
         # shorter compile than the 256-chip one.
         "siglip2_b16": "v5p:2x2x2", "siglip2_b16_naflex": "v5p:2x2x2"}
PLAN_ARGS = {"siglip2_b16": ":batch=1024", "siglip2_b16_naflex": ":batch=1024"}
# vit_i1k's plan also compiles the Pallas splash attention: plan then compiles the step twice,
# with splash and with the XLA attention the recipe runs at 196 tokens, and prints both.
PLAN_FLAGS = {"vit_i1k": ["--config.model.attention_impl=splash"]}


# The SigLIP 2 steps (two B/16 towers and the decoder over a 256k vocabulary) are CI's longest
# compiles (benchmarks/RESULTS.md, CI stages): their plans are in the extended part.
EXTENDED_PLANS = {"siglip2_b16", "siglip2_b16_naflex"}


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=EXTENDED) if r in EXTENDED_PLANS else r
                                    for r in sorted(PLANS)])
def test_recipe_plans_for_its_tpu_topology_without_data_or_tokenizer(recipe, tmp_path):
  """`plan` needs no dataset and no sentencepiece file: only shapes and the vocabulary size."""
  pytest.importorskip("libtpu", reason="TPU topologies compile with libtpu (pip install .[tpu])")
  out = subprocess.run(
      [sys.executable, "-m", "big_vision_lite.plan", "--config", f"configs/{recipe}.py{PLAN_ARGS.get(recipe, '')}",
       "--topology", PLANS[recipe], *PLAN_FLAGS.get(recipe, []), "--json", str(tmp_path / "plan.json")],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert out.returncode in (0, 2), out.stderr[-3000:]
  if out.returncode == 2:  # only "does not fit" may refuse, never missing data or tokenizer
    assert "does not fit" in out.stderr, out.stderr[-2000:]
  p = json.loads((tmp_path / "plan.json").read_text())
  assert p["argument_bytes"] > 0
  if recipe in PLAN_FLAGS:
    _check_splash(p, out)


def _check_splash(p: dict, out: subprocess.CompletedProcess) -> None:
  """The plan compiled splash attention's Pallas calls and reports the XLA attention beside it."""
  assert p["attention_impl"] == "splash" and p["tpu_custom_calls"] > 0
  assert p["xla_attention"]["total_bytes"] > 0 and "with the XLA attention" in out.stdout


# The SigLIP recipe with the Pallas splash attention on a v5p topology, at a batch that fits 8
# chips (vit_i1k's splash plan, on v5e, is its recipe plan above); plan prints both attentions'
# per-chip memory.
SPLASH_PLANS = {"siglip_b16": (":batch=4096", "v5p:2x2x2")}


@pytest.mark.slow  # two compiles of a B/16 two-tower step: CI plans splash on vit_i1k above
@pytest.mark.extended
@pytest.mark.parametrize("recipe", sorted(SPLASH_PLANS))
def test_recipe_plans_with_splash_attention_on_tpu(recipe, tmp_path):
  pytest.importorskip("libtpu", reason="TPU topologies compile with libtpu (pip install .[tpu])")
  arg, topology = SPLASH_PLANS[recipe]
  out = subprocess.run(
      [sys.executable, "-m", "big_vision_lite.plan", "--config", f"configs/{recipe}.py{arg}",
       "--topology", topology, "--config.model.attention_impl=splash",
       "--json", str(tmp_path / "plan.json")],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=1800, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  _check_splash(json.loads((tmp_path / "plan.json").read_text()), out)
