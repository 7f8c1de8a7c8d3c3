"""End-to-end SigLIP on the tiny built-in dataset: the loss falls, evaluators report, LiT freezes the image tower."""

import json
import os

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from big_vision_lite import build, config as config_lib, models, pretrained, run, sharding

DATA = dict(name="bvl_shapes/tiny", split="train")
VAL = dict(name="bvl_shapes/tiny", split="validation")
IMG_PP = "decode|resize(16)|value_range(-1, 1)"
TOK = "tokenize(16, key='caption', key_result='labels')"
VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(8, 8), pool_type="gap",
           posemb="sincos2d")


def _config(steps=40, **over):
  c = config_lib.ConfigDict()
  c.total_steps = steps
  c.input = dict(data=DATA, batch_size=32, pp=f"{IMG_PP}|{TOK}|keep('image', 'labels')")
  c.model_name = "two_towers"
  c.model = dict(image=VIT, text=dict(width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=48,
                                      pool_type="mean"), out_dim=32)
  c.task = dict(name="contrastive", loss="sigmoid")
  c.lr = 3e-3
  c.schedule = dict(warmup_steps=5, decay_type="cosine")
  c.log_training_steps = 5
  c.ckpt_steps = steps
  c.async_checkpoint = False
  c.progress = False
  c.evals = {}
  for k, v in over.items():
    c[k] = v
  return config_lib.merge_onto_defaults(c)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow  # ~1 min: a SigLIP training run with every evaluator
def test_siglip_learns_and_evaluators_report(tmp_path):
  evals = dict(
      zs=dict(type="zero_shot", data=VAL, pp=f"{IMG_PP}|keep('image', 'label')",
              pp_txt="tokenize(16, key='texts')", templates=["a {}", "a small red {}"], batch_size=64),
      ret=dict(type="retrieval", data=VAL, pp=f"{IMG_PP}|{TOK}|keep('image', 'labels')", batch_size=64),
      probe=dict(type="linear_probe", train_data=DATA, train_pp=f"{IMG_PP}|keep('image', 'label')",
                 data=VAL, pp=f"{IMG_PP}|keep('image', 'label')", num_classes=8, shots=[1, 5],
                 batch_size=64))
  result = run.train_and_evaluate(_config(evals=evals), str(tmp_path))
  losses = _losses(tmp_path)
  assert losses[-1] < 0.8 * losses[0], losses
  assert result["zs/examples"] == 128 and 0.0 <= result["zs/accuracy"] <= 1.0
  # Retrieval over 128 captions: chance recall@k is ~k/128; 40 tiny steps must beat it clearly.
  assert result["ret/i2t@1"] > 2 / 128 and result["ret/t2i@1"] > 2 / 128, result
  assert result["ret/i2t@5"] > 2 * 5 / 128 and result["ret/t2i@5"] > 2 * 5 / 128, result
  assert result["ret/i2t@10"] >= result["ret/i2t@5"] >= result["ret/i2t@1"]
  assert {"probe/1shot", "probe/5shot"} <= set(result)


@pytest.mark.slow  # ~1 min: a ViT run, then LiT on its checkpoint
def test_lit_loads_vit_into_img_and_keeps_it_frozen(tmp_path):
  # A plain ViT classifier checkpoint (big_vision .npz layout) to lock as the image tower.
  vit = models.get_model("vit", num_classes=10, **VIT)
  vit_params = nn.unbox(vit.init(jax.random.PRNGKey(7), np.zeros((1, 16, 16, 3)))["params"])
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(vit_params, sep="/").items()}
  npz = tmp_path / "vit.npz"
  np.savez(npz, **flat)
  workdir = tmp_path / "lit"
  config = _config(steps=10, frozen=["img/.*"], model_init=str(npz),
                   model_load=dict(target_prefix="img", allow_mismatch=True))
  run.train_and_evaluate(config, str(workdir))
  after = pretrained.read_params(str(workdir))
  for name, value in flat.items():
    if name.startswith("head/"):  # 10 classes vs out_dim 32: kept at init (and frozen)
      continue
    np.testing.assert_array_equal(after[f"img/{name}"], value, err_msg=name)
  # The text tower, t and b did train.
  init = nn.unbox(build.build(config).init_state(jax.random.PRNGKey(0))["params"])
  assert not np.array_equal(after["txt/Embed_0/embedding"], np.asarray(init["txt"]["Embed_0"]["embedding"]))
  assert not np.array_equal(after["t"], np.asarray(init["t"]))


def test_b16_recipe_builds():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config(os.path.join(root, "configs", "siglip_b16.py:spm=/x.model,files=/d/*.tar"))
  example = {"image": np.zeros((1, 224, 224, 3), np.float32), "labels": np.zeros((1, 64), np.int32)}
  setup = build.build(config, mesh=sharding.make_mesh(config.mesh), example=example)
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))
  assert 200e6 < n < 206e6, n  # B/16 towers, 32k vocab, image MAP head, text head: 203.2M (SigLIP B/16: ~203M)
