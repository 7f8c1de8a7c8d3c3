"""SigLIP 2 runs (two_towers_decoder, configs/siglip2_shapes.py) exported by the CLI: a fixed-res
ViT tower loads as transformers' SiglipModel, a NaFlex tower as Siglip2Model (with Siglip2Processor
files); both match our model's embeddings and logits within 1e-4 without the decoder and the
self-distillation params; what a target cannot express exits 2 with one line."""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

pytest.importorskip("torch")
from big_vision_lite.convert import torch_env  # noqa: E402

torch_env.setup()
pytest.importorskip("transformers")

from helpers import ROOT, cpu_env  # noqa: E402

from big_vision_lite import config as config_lib  # noqa: E402
from big_vision_lite.checkpoint import Checkpointer, flatten_with_names  # noqa: E402
from big_vision_lite.convert import hf_siglip2, tables  # noqa: E402
from big_vision_lite.convert.__main__ import main  # noqa: E402
from big_vision_lite.data import ops_text  # noqa: E402
from big_vision_lite.models import get_model  # noqa: E402

RECIPE = "configs/siglip2_shapes.py"
TINY = "res=16,width=32,depth=1,dec_depth=1,heads=2,patch=8,batch=8,workers=0,prototypes=16"
L = 20  # the recipe's text length
PATCH, BUDGET = 8, 16
DROPPED = ("decoder", "distill_global", "distill_patch", "distill_mask_token")


def recipe_config(args: str, naflex: bool = False) -> dict:
  """The shipped recipe's config as the trainer saves it; `naflex`: its tower and pp swapped
  for the NaFlex ones (as configs/siglip2_b16_naflex.py does for B/16)."""
  config = config_lib.load_config(os.path.join(ROOT, f"{RECIPE}:{TINY},{args}"))
  config = json.loads(config.to_json_best_effort())
  if naflex:
    model = config["model"]
    model["image_model"] = "naflex_vit"
    model["image"].pop("posemb")
    model["image"]["posemb_grid"] = 2
    pp = config["input"]["pp"]
    assert "resize(16)|value_range(-1, 1)" in pp
    config["input"]["pp"] = pp.replace("resize(16)|value_range(-1, 1)",
                                       f"value_range(-1, 1)|naflex_patches({PATCH}, {BUDGET})")
  return config


def naflex_batch(images):
  return hf_siglip2.naflex_arrays(images, PATCH, BUDGET)


def init_params(config: dict, image, seed: int = 0):
  """The run's model and random params (every weight, biases too, off its init)."""
  model = get_model(config["model_name"], **config["model"])
  texts = np.zeros((1, L), np.int32)
  params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(seed), image, texts,
                                            {"cap": texts})["params"])
  rng = np.random.default_rng(seed)
  flat = {k: (np.asarray(v) + 0.1 * rng.standard_normal(np.shape(v))).astype(np.float32)
          for k, v in flatten_with_names(params).items()}
  flat["t"], flat["b"] = np.array([np.log(10.0)], np.float32), np.array([-10.0], np.float32)
  return model, flat


def write_run(workdir, config: dict, flat: dict) -> None:
  with Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1) as ckpt:
    ckpt.save(2, {"params": tables.nest(flat), "step": np.int32(2)}, force=True)
    ckpt.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(config))


def ours(model, flat, image, texts):
  """The training model itself (decoder and heads in its params): embeddings and logits."""
  zimg, ztxt, out = model.apply({"params": tables.nest(flat)}, image, texts)
  return dict(zimg=np.asarray(zimg), ztxt=np.asarray(ztxt),
              logits=np.asarray(out["t"] * zimg @ ztxt.T + out["b"]))


def assert_close(theirs, want):
  assert np.abs(want["logits"]).max() > 1.0  # a real signal
  for k, v in want.items():
    # fp32 through a few layers: 1e-4 relative to the output's scale (the converters' bound).
    np.testing.assert_allclose(theirs[k], v, rtol=0, atol=1e-4 * max(np.abs(v).max(), 1.0),
                               err_msg=k)


def texts_of(n: int) -> np.ndarray:
  return np.random.default_rng(1).integers(3, 48, (n, L)).astype(np.int32)


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
  """The recipe's fixed-res model with self-distillation heads (sd_start < 1), random params."""
  config = recipe_config("steps=10,sd_start=0.5")
  assert config["model"].get("distill") and config["model_name"] == "two_towers_decoder"
  model, flat = init_params(config, np.zeros((1, 16, 16, 3), np.float32))
  assert {k.split("/")[0] for k in flat} >= set(DROPPED)
  workdir = tmp_path_factory.mktemp("siglip2")
  write_run(workdir, config, flat)
  return workdir, model, flat


@pytest.fixture(scope="module")
def naflex_run(tmp_path_factory):
  config = recipe_config("steps=10,sd_start=1", naflex=True)
  rng = np.random.default_rng(0)
  model, flat = init_params(config, naflex_batch([rng.integers(0, 256, (16, 16, 3), np.uint8)]))
  workdir = tmp_path_factory.mktemp("siglip2_naflex")
  write_run(workdir, config, flat)
  return workdir, model, flat


def test_fixed_res_run_exports_as_siglip_model(fixed_run, tmp_path, capsys):
  workdir, model, flat = fixed_run
  out = str(tmp_path / "hf")
  assert main(["--workdir", str(workdir), "--to", "transformers", "--out", out]) == 0
  log = capsys.readouterr().out
  left = [line for line in log.splitlines() if line.startswith("left out")]
  assert len(left) == 1 and all(f"{k} (" in left[0] for k in DROPPED), log
  assert "processor/logits" in log
  import transformers
  assert os.environ["HF_HUB_OFFLINE"] == "1"
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "siglip"
  hf = transformers.SiglipModel.from_pretrained(out).eval()
  images = np.random.default_rng(2).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  texts = texts_of(3)
  import torch
  with torch.no_grad():
    o = hf(input_ids=torch.from_numpy(texts.astype(np.int64)),
           pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  assert_close(dict(zimg=o.image_embeds.numpy(), ztxt=o.text_embeds.numpy(),
                    logits=o.logits_per_image.numpy()), ours(model, flat, images, texts))
  proc = transformers.SiglipProcessor.from_pretrained(out)
  assert (proc.image_processor.size["height"], proc.image_processor.size["width"]) == (16, 16)


def test_naflex_run_exports_as_siglip2_model(naflex_run, tmp_path, capsys):
  workdir, model, flat = naflex_run
  out = str(tmp_path / "hf")
  assert main(["--workdir", str(workdir), "--to", "transformers", "--out", out]) == 0
  log = capsys.readouterr().out
  assert "left out (training only, not part of the inference model): decoder (" in log
  assert "Siglip2Model.from_pretrained" in log and "processor/logits" in log
  import torch
  import transformers
  hf = transformers.Siglip2Model.from_pretrained(out).eval()
  # The same patches, mask and spatial shapes to both: square, wide, tall (posembs resampled
  # up and down, padded rows). Not one patch wide: hf_siglip2.exact_size_images says why.
  rng = np.random.default_rng(3)
  batch = naflex_batch([rng.integers(0, 256, hw + (3,), np.uint8)
                        for hw in [(16, 16), (30, 70), (100, 30)]])
  assert batch[2].tolist() == [[4, 4], [3, 5], [7, 2]]
  texts = texts_of(3)
  assert_close(hf_siglip2.run_model(hf, *batch, texts), ours(model, flat, batch, texts))

  # The processor files, called as users do, on images it keeps at their size (4x4, 2x8 patches).
  image_proc = transformers.AutoImageProcessor.from_pretrained(out)
  assert (image_proc.patch_size, image_proc.max_num_patches) == (PATCH, BUDGET)
  # Siglip2Processor's class defaults (patch 16, 256 patches, 64 tokens) win over its files:
  # the export's note gives the call.
  call = f"call it with patch_size={PATCH}, max_num_patches={BUDGET}, padding='max_length', " \
         f"max_length={L}"
  assert call in log
  # AutoTokenizer gives any siglip2 folder transformers' Gemma tokenizer: the note says so.
  assert "load it with transformers.TokenizersBackend.from_pretrained(OUT)" in log
  tok = transformers.TokenizersBackend.from_pretrained(out)
  proc = transformers.Siglip2Processor(image_processor=image_proc, tokenizer=tok)
  images = [rng.integers(0, 256, hw + (3,), np.uint8) for hw in [(32, 32), (16, 64)]]
  captions = ["a small red circle", "a blue square"]
  inputs = proc(text=captions, images=images, patch_size=PATCH, max_num_patches=BUDGET,
                padding="max_length", max_length=L, return_tensors="pt")
  with torch.no_grad():
    o = hf(**inputs)
  ids = np.stack([ops_text.tokenize_text(t, L, "bvl_shapes") for t in captions])
  assert_close(dict(zimg=o.image_embeds.numpy(), ztxt=o.text_embeds.numpy(),
                    logits=o.logits_per_image.numpy()),
               ours(model, flat, naflex_batch(images), ids))


@pytest.mark.parametrize("to", ["open_clip", "timm"])
def test_naflex_to_other_targets_is_refused_in_one_line(naflex_run, tmp_path, capsys, to):
  workdir, _, _ = naflex_run
  assert main(["--workdir", str(workdir), "--to", to, "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"error: --to {to}: model.image_model='naflex_vit' (SigLIP 2 NaFlex) has no "
                 f"{to} model; export it with --to transformers (Siglip2Model)")


def test_unknown_image_tower_is_refused(fixed_run, tmp_path, capsys):
  workdir, _, flat = fixed_run
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["image_model"] = "resnet"
  other = tmp_path / "run"
  other.mkdir()
  write_run(other, config, flat)
  assert main(["--workdir", str(other), "--to", "transformers", "--out", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: model.image_model='resnet': --to transformers exports a 'vit' or 'naflex_vit' "
      "image tower")


def test_a_siglip_run_with_the_trainers_platform_keys_exports(fixed_run, tmp_path):
  """config.json as the trainer writes it holds config.model.attention_impl / norm_impl (the
  platform layer's); the parity check's model must not get them."""
  workdir, _, flat = fixed_run
  config = json.loads((workdir / "config.json").read_text())
  config["model_name"] = "two_towers"
  config["model"] = {k: v for k, v in config["model"].items()
                     if k in ("image", "text", "out_dim", "temperature_init", "bias_init")}
  config["model"].update(attention_impl="auto", norm_impl="auto")
  run = tmp_path / "run"
  run.mkdir()
  write_run(run, config, {k: v for k, v in flat.items() if k.split("/")[0] not in DROPPED})
  assert main(["--workdir", str(run), "--to", "transformers", "--out", str(tmp_path / "o")]) == 0


@pytest.mark.slow
def test_trained_recipe_run_exports_through_the_cli(tmp_path):
  """The user's path end to end: train the shipped recipe a few steps (self-distillation phase
  on), then `python -m big_vision_lite.convert --to transformers` in a subprocess, parity on."""
  workdir, out = tmp_path / "run", tmp_path / "hf"
  train = subprocess.run(
      [sys.executable, "-m", "big_vision_lite.train", "--config",
       f"{RECIPE}:{TINY},steps=2,local_crops=2,sd_start=0.5", "--workdir", str(workdir),
       "--config.evals={}", "--config.progress=False", "--config.schedule.warmup_steps=1",
       "--config.ckpt_steps=2", "--config.input.num_workers=0", "--config.mfu_peak_flops=1e12",
       "--config.profile.num_steps=0"],
      env=cpu_env(1), capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert train.returncode == 0, train.stderr[-2000:]
  r = subprocess.run([sys.executable, "-m", "big_vision_lite.convert", "--workdir", str(workdir),
                      "--to", "transformers", "--out", str(out)],
                     env=cpu_env(1), capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "left out (training only" in r.stdout and "distill_patch (" in r.stdout
  assert "verify: max |ours - transformers|" in r.stdout
  import transformers
  model = transformers.SiglipModel.from_pretrained(str(out))
  assert model.config.text_config.max_position_embeddings == L
