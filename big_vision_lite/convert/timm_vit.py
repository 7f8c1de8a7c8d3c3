"""timm `VisionTransformer` <-> our ViT: the conversion table, model args, export and import.

The export is a timm hub-style folder (config.json + model.safetensors), so
`timm.create_model("local-dir:<folder>", pretrained=True)` rebuilds it offline.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from big_vision_lite.convert import tables
from big_vision_lite.convert.tables import ConversionError, Table
from big_vision_lite.convert.vit import ENC, VitSpec
from big_vision_lite.models.common import posemb_sincos_2d

# Any registered ViT entrypoint: every architectural arg is overridden by model_args.
ARCHITECTURE = "vit_base_patch16_224"
TIMM_POOL = {"gap": "avg", "tok": "token", "map": "map", "none": ""}
# Flax nn.gelu is the tanh approximation; timm's default nn.GELU is exact erf.
ACT_LAYER = "gelu_tanh"
# Our pipelines use value_range(-1, 1) = (x/255 - 0.5) / 0.5.
MEAN = STD = (0.5, 0.5, 0.5)


def mlp_ratio(width: int, mlp_dim: int) -> float:
  """A ratio whose int(width * ratio) is exactly mlp_dim (timm truncates; 4304/1152 would not)."""
  r = mlp_dim / width
  if int(width * r) != mlp_dim:
    r = (mlp_dim + 0.5) / width
  assert int(width * r) == mlp_dim, (width, mlp_dim)
  return r


def _check_supported(spec: VitSpec) -> None:
  if spec.rep_size:
    raise ConversionError("rep_size (pre_logits dense + tanh) has no timm VisionTransformer equivalent")
  if abs(spec.norm_eps - 1e-6) > 1e-12:
    raise ConversionError(f"norm_eps {spec.norm_eps}: timm's ViT LayerNorm is fixed at 1e-6 in exported args")


def model_args(spec: VitSpec) -> dict[str, Any]:
  """timm VisionTransformer kwargs reproducing our forward pass exactly."""
  _check_supported(spec)
  return dict(
      img_size=list(spec.image_size), patch_size=list(spec.patch), in_chans=spec.in_chans,
      embed_dim=spec.width, depth=spec.depth, num_heads=spec.num_heads,
      mlp_ratio=mlp_ratio(spec.width, spec.mlp_dim), num_classes=spec.num_classes,
      global_pool=TIMM_POOL[spec.pool_type], class_token=spec.pool_type == "tok",
      # We add the posemb to patches only, then prepend the class token (big_vision).
      no_embed_class=True,
      # Our encoder_norm runs on all tokens before pooling: timm's `norm`, not `fc_norm`.
      fc_norm=False, final_norm=True, qkv_bias=True, act_layer=ACT_LAYER)


def table(spec: VitSpec) -> Table:
  """Rules for unscanned ViT params relative to the ViT root (prefix them for towers)."""
  h = spec.num_heads
  t: Table = tables.conv("embedding", "patch_embed.proj")
  if spec.posemb == "learn":
    t.append(tables.same("pos_embedding", "pos_embed"))
  else:  # Fixed on our side: exported as the tensor it computes.
    t.append(tables.constant("pos_embed", posemb_sincos_2d(*spec.grid, spec.width), "sincos2d posemb"))
  if spec.pool_type == "tok":
    t.append(tables.same("cls", "cls_token"))
  for i in range(spec.depth):
    o, b = f"{ENC}_{i}", f"blocks.{i}"
    att = f"{o}/MultiHeadDotProductAttention_0"
    t += tables.layer_norm(f"{o}/LayerNorm_0", f"{b}.norm1")
    t += tables.fused_heads_proj([f"{att}/query", f"{att}/key", f"{att}/value"],
                                 f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias", h)
    t += tables.attn_out(f"{att}/out", f"{b}.attn.proj", h)
    t += tables.layer_norm(f"{o}/LayerNorm_1", f"{b}.norm2")
    t += tables.dense(f"{o}/MlpBlock_0/Dense_0", f"{b}.mlp.fc1")
    t += tables.dense(f"{o}/MlpBlock_0/Dense_1", f"{b}.mlp.fc2")
  t += tables.layer_norm("Transformer/encoder_norm", "norm")
  if spec.pool_type == "map":
    att = "MAPHead_0/MultiHeadDotProductAttention_0"
    t.append(tables.same("MAPHead_0/probe", "attn_pool.latent"))
    t += tables.heads_proj(f"{att}/query", "attn_pool.q", h)
    t += tables.fused_heads_proj([f"{att}/key", f"{att}/value"], "attn_pool.kv.weight",
                                 "attn_pool.kv.bias", h)
    t += tables.attn_out(f"{att}/out", "attn_pool.proj", h)
    t += tables.layer_norm("MAPHead_0/LayerNorm_0", "attn_pool.norm")
    t += tables.dense("MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
    t += tables.dense("MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
  if spec.num_classes:
    t += tables.dense("head", "head")
  return t


def hub_config(spec: VitSpec, crop_mode: str = "squash", crop_pct: float = 1.0) -> dict[str, Any]:
  """timm's hub config.json (what `local-dir:` reads); crop_mode/pct as the run's eval resize."""
  args = model_args(spec)
  return dict(
      architecture=ARCHITECTURE, num_classes=spec.num_classes, num_features=spec.width,
      global_pool=args["global_pool"], model_args=args,
      pretrained_cfg=dict(
          input_size=[spec.in_chans, *spec.image_size], fixed_input_size=True,
          interpolation="bilinear", crop_pct=crop_pct, crop_mode=crop_mode, mean=list(MEAN), std=list(STD),
          num_classes=spec.num_classes, first_conv="patch_embed.proj", classifier="head"))


def create_model(spec: VitSpec):
  """An uninitialised-weights timm VisionTransformer with our architecture."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import timm
  return timm.create_model(ARCHITECTURE, pretrained=False, **model_args(spec)).eval()


def to_state_dict(flat: Mapping[str, np.ndarray], spec: VitSpec, expect: Mapping | None = None,
                  what: str = "timm export") -> dict[str, np.ndarray]:
  """Our flat ViT params (scanned or not; bf16 ok) -> timm state dict of fp32 numpy arrays."""
  return tables.apply(table(spec), tables.unscan(flat), "to_theirs", what=what, expect=expect)


def from_state_dict(sd: Mapping[str, Any], spec: VitSpec, *, scan: bool = False,
                    what: str = "timm import") -> dict[str, np.ndarray]:
  """timm state dict (torch tensors or numpy) -> our flat ViT params (fp32)."""
  sd = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
  flat = tables.apply(table(spec), sd, "to_ours", what=what)
  return tables.scan(flat) if scan else flat


def export(flat: Mapping[str, np.ndarray], spec: VitSpec, out_dir: str, crop_mode: str = "squash",
           crop_pct: float = 1.0) -> dict[str, Any]:
  """Writes <out_dir>/model.safetensors and config.json; returns the hub config."""
  import torch
  from safetensors.torch import save_file
  model = create_model(spec)
  expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  sd = to_state_dict(flat, spec, expect=expect)
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, os.path.join(out_dir, "model.safetensors"))
  cfg = hub_config(spec, crop_mode, crop_pct)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  return cfg


def load(out_dir: str):
  """The exported model, loaded the way a user would (strict, offline)."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import timm
  return timm.create_model(f"local-dir:{os.path.abspath(out_dir)}", pretrained=True).eval()


def run_torch(model, images_nhwc: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
  return out.float().numpy()
