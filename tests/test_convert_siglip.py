"""Export of two-tower (SigLIP) runs: transformers SiglipModel (+ tokenizer/processor files) and open_clip
load offline and match our embeddings and logits within 1e-4; timm export of the image tower; loud errors."""

import json
import os

import flax
import jax
import numpy as np
import pytest

pytest.importorskip("torch")
from big_vision_lite.convert import torch_env  # noqa: E402

torch_env.setup()  # Before timm/open_clip: declares the torchvision ops its CUDA wheel cannot load.
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from big_vision_lite.checkpoint import Checkpointer, flatten_with_names  # noqa: E402
from big_vision_lite.convert import ConversionError, hf_siglip, open_clip_siglip, tables, towers  # noqa: E402
from big_vision_lite.convert.__main__ import main  # noqa: E402
from big_vision_lite.data import ops_text  # noqa: E402
from big_vision_lite.models import two_towers  # noqa: E402

L = 8
# HF-compatible: MAP image tower without projection, last-token text tower with one (big_vision SigLIP).
MODEL = dict(image=dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4, pool_type="map",
                        posemb="sincos2d"),
             text=dict(width=32, depth=2, num_heads=4, mlp_dim=64, vocab_size=48, pool_type="last", scan=True),
             out_dim=[None, 32])


def random_params(model_kw, seed=0, scale=0.3):
  model = two_towers.two_towers(**model_kw)
  p = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
                                       np.zeros((1, L), np.int32))["params"])
  rng = np.random.default_rng(seed)
  flat = {k: (scale * rng.standard_normal(np.shape(v))).astype(np.float32)
          for k, v in flatten_with_names(p).items()}
  flat["t"], flat["b"] = np.array([np.log(10.0)], np.float32), np.array([-10.0], np.float32)
  return flat


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A two_towers workdir: config.json + one checkpoint of random params (scanned text tower)."""
  workdir = tmp_path_factory.mktemp("siglip")
  flat = random_params(MODEL)
  with Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1) as ckpt:
    ckpt.save(3, {"params": tables.nest(flat), "step": np.int32(3)}, force=True)
    ckpt.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(dict(
      model_name="two_towers", model=MODEL,
      input=dict(pp=f"decode|resize(16)|value_range(-1, 1)|tokenize({L}, model='bvl_shapes', key='caption', "
                 "key_result='labels')"))))
  return workdir, flat


def test_cli_to_transformers_loads_offline_and_matches(run, tmp_path, capsys):
  workdir, flat = run
  out = tmp_path / "hf"
  assert main(["--workdir", str(workdir), "--to", "transformers", "--out", str(out)]) == 0
  assert "verify: max |ours - transformers|" in capsys.readouterr().out
  import transformers
  assert os.environ["HF_HUB_OFFLINE"] == "1"
  model = transformers.SiglipModel.from_pretrained(str(out)).eval()
  assert model.config.vision_config.hidden_act == "gelu_pytorch_tanh"
  assert model.config.text_config.layer_norm_eps == 1e-6
  spec = towers.spec_from_params(flat, MODEL, image_size=16)
  images, texts = towers.fixed_inputs(spec)
  ours = towers.run_ours(flat, towers.build_ours(spec, MODEL), images, texts)
  theirs = hf_siglip.run_torch(model, images, texts)
  assert np.abs(ours["logits"]).max() > 1.0  # a real signal
  for k in ours:
    np.testing.assert_allclose(theirs[k], ours[k], atol=1e-4, rtol=0, err_msg=k)
  # Tokenizer and image processor files: same ids as our tokenize op (eos sticky), our preprocessing.
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  for text in ("a small red circle on a grey background", "a b c d e f g h i j"):
    want = ops_text.tokenize_text(text, L, "bvl_shapes", eos="sticky")
    got = tok(text, padding="max_length", max_length=L, truncation=True)["input_ids"]
    assert got == want.tolist(), text
  proc = transformers.SiglipImageProcessor.from_pretrained(str(out))
  assert (proc.size["height"], proc.size["width"]) == (16, 16) and list(proc.image_mean) == [0.5] * 3
  # Same table backwards: HF state dict -> our params, exactly.
  back = hf_siglip.from_state_dict(model.state_dict(), spec)
  for k, v in tables.unscan(flat).items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_open_clip_export_matches(tmp_path):
  # Image projection head (open_clip's timm_proj='linear') and no SigLIP bias: the other code paths.
  kw = dict(MODEL, out_dim=32, bias_init=None)
  flat = random_params(kw, seed=1)
  del flat["b"]
  spec = towers.spec_from_params(flat, kw, image_size=16)
  assert spec.img.num_classes == 32 and not spec.has_bias
  out = str(tmp_path / "oc")
  open_clip_siglip.export(flat, spec, out, tokenizer=("bvl_shapes", L))
  import open_clip
  model = open_clip.create_model("local-dir:" + out).eval()  # the documented one-liner; strict load
  images, texts = towers.fixed_inputs(spec)
  ours = towers.run_ours(flat, towers.build_ours(spec, kw), images, texts)
  theirs = open_clip_siglip.run_torch(model, images, texts)
  for k in ours:
    np.testing.assert_allclose(theirs[k], ours[k], atol=1e-4, rtol=0, err_msg=k)
  tok = open_clip.get_tokenizer("local-dir:" + out)
  np.testing.assert_array_equal(tok(["a red circle"]).numpy()[0],
                                ops_text.tokenize_text("a red circle", L, "bvl_shapes", eos="sticky"))


def test_cli_timm_exports_the_image_tower(run, tmp_path):
  workdir, _ = run
  assert main(["--workdir", str(workdir), "--to", "timm", "--tower", "img", "--out", str(tmp_path / "t")]) == 0
  cfg = json.loads((tmp_path / "t" / "config.json").read_text())
  assert cfg["model_args"]["global_pool"] == "map" and cfg["model_args"]["img_size"] == [16, 16]


def test_unsupported_and_unknown_keys_are_named(run):
  _, flat = run
  spec = towers.spec_from_params(flat, MODEL, image_size=16)
  with pytest.raises(ConversionError, match="unmapped.*txt/Encoder_0/extra"):
    hf_siglip.to_state_dict({**flat, "txt/Encoder_0/extra": np.zeros(2)}, spec)
  with pytest.raises(ConversionError, match="model.text.pool_type='map'"):
    hf_siglip.check_supported(towers.spec_from_params(
        {**flat, "txt/MAPHead_0/probe": np.zeros((1, 1, 32))}, image_size=16))
  with pytest.raises(ConversionError, match="model.out_dim"):
    hf_siglip.check_supported(towers.spec_from_params(
        {**flat, "img/head/kernel": np.zeros((32, 32)), "img/head/bias": np.zeros(32)}, image_size=16))
  with pytest.raises(ConversionError, match="model.text.pool_type='mean'"):
    open_clip_siglip.check_supported(towers.spec_from_params(flat, dict(text=dict(pool_type="mean")),
                                                             image_size=16))
  with pytest.raises(ConversionError, match="two-tower"):
    from big_vision_lite.convert import pipeline
    pipeline.export_towers(dict(model_name="vit"), flat, "unused", to="transformers")


def test_processor_call_as_users_make_it_matches(run, tmp_path, capsys):
  """model(**processor(text, images, padding="max_length")) on the export equals our logits."""
  workdir, flat = run
  out = str(tmp_path / "hf")
  assert main(["--workdir", str(workdir), "--to", "transformers", "--out", out]) == 0
  log = capsys.readouterr().out
  assert "processor/logits" in log and "eos='yes'" in log  # verify used the processor; eos noted
  import PIL.Image
  import transformers
  proc = transformers.SiglipProcessor.from_pretrained(out)
  model = transformers.SiglipModel.from_pretrained(out).eval()
  texts = ["a small red circle", "a grey triangle"]  # within L with their eos
  pixels = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  inputs = proc(text=texts, images=[PIL.Image.fromarray(p) for p in pixels], padding="max_length",
                return_tensors="pt")
  assert "attention_mask" not in inputs  # our text tower attends to padding, as big_vision's
  import torch
  with torch.no_grad():
    theirs = model(**inputs).logits_per_image.numpy()
  spec = towers.spec_from_params(flat, MODEL, image_size=16)
  ids = np.stack([ops_text.tokenize_text(t, L, "bvl_shapes") for t in texts])
  ours = towers.run_ours(flat, towers.build_ours(spec, MODEL), pixels.astype(np.float32) / 127.5 - 1, ids)
  assert np.abs(ours["logits"]).max() > 1.0
  np.testing.assert_allclose(theirs, ours["logits"], atol=1e-4, rtol=0)


def test_timm_transform_reproduces_the_runs_resize_on_a_non_square_image(run, tmp_path):
  """The run's pp squashes (resize(16)): timm's own eval transform must too, not resize + crop."""
  import PIL.Image
  import timm
  from big_vision_lite.data import ops_image
  workdir, _ = run
  out = tmp_path / "t"
  assert main(["--workdir", str(workdir), "--to", "timm", "--tower", "img", "--out", str(out)]) == 0
  model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
  transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
  image = np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # wide
  theirs = transform(PIL.Image.fromarray(image)).numpy().transpose(1, 2, 0)
  ours = ops_image.resize_array(image, (16, 16), PIL.Image.Resampling.BILINEAR).astype(np.float32) / 127.5 - 1
  # Same PIL resize on both sides; only the float scaling differs (a few fp32 ulps of 1).
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=4 * np.finfo(np.float32).eps)
