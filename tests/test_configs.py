"""Every shipped config loads, validates and builds its model, optimizer and sharded state layout."""

import glob
import os

import jax
import numpy as np
import pytest

from big_vision_lite import build, config as config_lib, flops, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_header_states_command_and_expected_result(path):
  head = open(path).read().split('"""')[0]
  assert "python -m big_vision_lite.train --config configs/" in head
  assert "Expected" in head


@pytest.mark.parametrize("spec,res,classes", [
    ("vit_i1k.py", 224, 1000),
    ("vit_i1k.py:variant=B/16,res=224", 224, 1000),
    ("vit_i1k.py:variant=Ti/16,res=128", 128, 1000),
    ("vit_shapes.py", 32, 8),
    ("vmoe_i1k.py", 224, 1000),
    ("vmoe_i21k.py", 224, 21843),
])
def test_recipe_builds(spec, res, classes, tmp_path):
  config = config_lib.load_config(os.path.join(ROOT, "configs", spec))
  if config.input.data.name in ("imagenet2012", "imagenet21k"):
    config.input.data.data_dir = str(tmp_path)
    for ev in config.evals.values():
      ev.data.data_dir = str(tmp_path)
  config_lib.validate(config, num_devices=8)
  config.total_steps = 20_000  # imagenet size is unknown without the data
  example = {"image": np.zeros((1, res, res, 3), np.float32),
             "labels": np.zeros((1, classes), np.float32)}
  setup = build.build(config, mesh=sharding.make_mesh(config.mesh), example=example)
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))
  if "variant=B/16" in spec:
    assert 86e6 < n_params < 87.5e6  # ViT-B/16 with a 1000-way head (+ pre-logits)
  elif spec == "vit_i1k.py":
    assert 21.5e6 < n_params < 22.5e6  # ViT-S/16
  elif spec.startswith("vmoe_i1k"):
    # V-MoE B/16, E=8 every 2nd block: 6 MoE MLPs of 8 x 4.7M plus the dense rest (~86.6M).
    assert 280e6 < n_params < 310e6, n_params
  assert flops.model_forward_flops(setup.model, example) > 0


@pytest.mark.parametrize("spec,res,n_range", [
    # B/16 encoder 85.8M + decoder 6 x 9.44M (self, cross, MLP) + 32k embeddings in and out (2 x 24.6M).
    ("cappa_b16.py", 224, (190e6, 194e6)),
    # L/14 encoder 303M + projection 1M + decoder 6 x 12.6M (no cross-attention) + 2 x 32.8M embeddings.
    ("openvision2_l14.py:stage=1,res=84", 84, (440e6, 450e6)),
    ("openvision2_l14.py:stage=2,init=/ckpt/stage1", 224, (440e6, 450e6)),
])
def test_captioning_recipe_builds_at_full_size(spec, res, n_range, tmp_path):
  vocab = tmp_path / "vocab.txt"  # any local tokenizer: the recipes only need its pad/eos ids here
  vocab.write_text("<pad>\n<eos>\n<unk>\nword\n")
  config = config_lib.load_config(os.path.join(ROOT, "configs", f"{spec}{',' if ':' in spec else ':'}"
                                               f"spm={vocab},files=/d/*.tar"))
  config_lib.validate(config, num_devices=8)
  example = {"image": np.zeros((1, res, res, 3), np.float32), "labels": np.zeros((1, 64), np.int32)}
  setup = build.build(config, mesh=sharding.make_mesh(config.mesh), example=example)
  params = setup.abstract_state["params"]
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert n_range[0] < n_params < n_range[1], n_params
  assert config.model.max_len == 64 and "eos='sticky'" in config.input.pp
  if "openvision2" in spec:
    assert config.model.keep_ratio == 0.35
    posemb = params["img"]["pos_embedding"]
    assert posemb.shape[1] == (res // 14) ** 2  # 6x6 at 84 px, 16x16 at 224 px (resampled on load)
    assert config.model_init == ("/ckpt/stage1" if "stage=2" in spec else "")
  else:
    assert config.task.parallel_fraction == 0.75 and config.input.batch_size == 8192
    # big_vision's configs/proj/cappa/pretrain.py: no biases in the decoder blocks (the final
    # LayerNorm and the logits keep theirs), Adafactor, 366,500 steps.
    flat = {"/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(params["decoder"])}
    assert not [p for p in flat if p.startswith("EncDecBlock") and p.endswith("bias")], flat
    assert {"LayerNorm/bias", "LogitsDense/bias", "EncDecBlock0/MLP/Dense_0/kernel"} <= flat, flat
    assert config.optax_name == "adafactor" and config.total_steps == 366_500


@pytest.mark.parametrize("spec", ["siglip_b16.py:files=/d/*.tar", "cappa_b16.py:files=/d/*.tar",
                                  "openvision2_l14.py:stage=1,files=/d/*.tar"])
def test_image_text_recipes_need_a_local_tokenizer(spec):
  with pytest.raises(config_lib.ConfigError, match="config arg spm"):
    config_lib.load_config(os.path.join(ROOT, "configs", spec))


def test_image_text_input_reads_tar_or_tfds():
  from big_vision_lite.recipes import image_text_input
  defaults = dict(data="", files="", data_dir="", split="train", batch=8, text_key="caption",
                  text_len=64, spm="")
  args = config_lib.parse_arg("data=tar,files=/d/*.tar,spm=/m.model", **defaults)
  inp = image_text_input(args, 224)
  assert inp.data.to_dict() == {"name": "tar", "split": "train", "files": "/d/*.tar"}
  assert inp.batch_size == 8 and inp.pp.startswith("decode|resize(224)|") and "flip" not in inp.pp
  assert "tokenize(64, model='/m.model', key='caption'" in inp.pp
  args = config_lib.parse_arg("data=coco_captions,data_dir=/tfds,spm=/m.model", **defaults)
  assert image_text_input(args, 84).data.to_dict() == {"name": "coco_captions", "split": "train",
                                                      "data_dir": "/tfds"}


@pytest.mark.parametrize("recipe", ["siglip2_b16", "siglip2_b16_naflex"])
def test_siglip2_recipe_builds_at_full_size(recipe, tmp_path):
  """The paper's shapes: B/16 towers at 256 image tokens (fixed 16 x 16, or NaFlex in a 256-patch
  budget), text length 64 with a 256k vocabulary, batch 32k for 40B examples, the LocCa decoder."""
  from big_vision_lite import plan
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("<pad>\n<eos>\n<unk>\nword\n")
  config = config_lib.load_config(os.path.join(ROOT, "configs", f"{recipe}.py:spm={vocab},"
                                               f"vocab=256000,files=/d/*.tar"))
  with config.unlocked():
    config.task.tokenizer = "stand-in:256000"  # the task checks the decoder vocabulary against it
  config_lib.validate(config, num_devices=8)
  assert config.input.batch_size == 32768 and config.total_steps == 40_000_000_000 // 32768
  assert config.schedule.warmup_steps == 20_000 and config.model.max_len == 64
  example, where = plan.example_for(config)  # no data here: a synthetic record through the pp
  assert where.startswith("synthetic record")
  setup = build.build(config, mesh=sharding.make_mesh(config.mesh), example=example)
  params = setup.abstract_state["params"]
  count = lambda tree: sum(np.prod(x.shape) for x in jax.tree.leaves(tree))
  # B/16 encoder 85.8M + MAP head 7.1M; text: B encoder 85M + 256k x 768 embeddings (196.6M);
  # decoder: 6 x 9.44M blocks + (256000 + 3 + 1024) x 768 embeddings in and out.
  assert 92e6 < count(params["img"]) < 94e6, count(params["img"])
  assert 281e6 < count(params["txt"]) < 284e6, count(params["txt"])
  assert 450e6 < count(params["decoder"]) < 453e6, count(params["decoder"])
  if recipe.endswith("naflex"):
    assert example["image"].shape == (1, 256, 768) and example["image_shape"].tolist() == [[16, 16]]
    assert params["img"]["pos_embedding"].shape == (16, 16, 768)
    assert params["img"]["embedding"]["kernel"].shape == (768, 768)
  else:
    assert example["image"].shape == (1, 256, 256, 3)
    assert params["img"]["pos_embedding"].shape == (1, 256, 768)
