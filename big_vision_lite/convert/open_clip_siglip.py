"""open_clip `CustomTextCLIP` (timm vision tower + TextTransformer, as open_clip's `ViT-B-16-SigLIP`)
<-> our two towers: the conversion table, the model config, the export folder and a parity runner.

The folder holds open_clip_config.json (model_cfg + preprocess_cfg),
open_clip_model.safetensors, `timm/config.json` (the vision trunk's architecture,
which open_clip's TimmModel reads through timm's `local-dir:` names) and, when the
run has a tokenizer, HF tokenizer files that `open_clip.get_tokenizer` reads. Load:
`open_clip.create_model_and_transforms("local-dir:OUT")`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from big_vision_lite.convert import tables, timm_vit, towers
from big_vision_lite.convert.tables import ConversionError, Table
from big_vision_lite.convert.vit import ENC  # noqa: F401  (documented layout)

OC_POOL = {"last": "last", "first": "first"}  # TextTransformer has no mean or MAP pooling.
WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"


def check_supported(spec: towers.TowersSpec) -> None:
  if spec.txt.pool_type not in OC_POOL:
    raise ConversionError(f"model.text.pool_type={spec.txt.pool_type!r}: open_clip's TextTransformer pools "
                          f"one of {sorted(OC_POOL)} (no mean or MAP pooling)")
  if spec.img.rep_size:
    raise ConversionError("model.image.rep_size: pre_logits has no open_clip/timm equivalent")
  out_i = spec.img.num_classes or spec.img.width
  out_t = spec.txt.num_classes or spec.txt.width
  if out_i != out_t:
    raise ConversionError(f"model.out_dim: image embedding {out_i} != text embedding {out_t}")


def _trunk_spec(spec: towers.TowersSpec):
  import dataclasses
  return dataclasses.replace(spec.img, num_classes=0)  # the img head is open_clip's visual.head.proj


def model_cfg(spec: towers.TowersSpec, timm_dir: str, tok: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """open_clip model config reproducing our forward pass (tanh GELU, our LayerNorm eps, no causal mask)."""
  check_supported(spec)
  img, txt = spec.img, spec.txt
  tok = dict(tok or {})
  text_cfg = dict(
      context_length=txt.max_len, vocab_size=txt.vocab_size, width=txt.width, heads=txt.num_heads,
      layers=txt.depth, mlp_ratio=timm_vit.mlp_ratio(txt.width, txt.mlp_dim), no_causal_mask=True,
      pool_type=OC_POOL[txt.pool_type], proj_type="linear" if txt.num_classes else "none", proj_bias=True,
      pad_id=tok.get("pad", 0), eos_id=tok.get("eos", 1),
      act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": txt.norm_eps})
  if tok.get("hf_tokenizer_name"):
    text_cfg["hf_tokenizer_name"] = tok["hf_tokenizer_name"]
  vision_cfg = dict(
      image_size=list(img.image_size), timm_model_name=f"local-dir:{os.path.abspath(timm_dir)}",
      timm_model_pretrained=False, timm_pool=timm_vit.TIMM_POOL[img.pool_type],
      timm_proj="linear" if img.num_classes else "none", timm_proj_bias=True)
  return dict(embed_dim=txt.num_classes or txt.width, custom_text=True, quick_gelu=False,
              init_logit_bias=-10.0 if spec.has_bias else None, vision_cfg=vision_cfg, text_cfg=text_cfg)


def _block(o: str, t: str, heads: int) -> Table:
  att = f"{o}/MultiHeadDotProductAttention_0"
  r = tables.layer_norm(f"{o}/LayerNorm_0", f"{t}.ln_1")
  r += tables.fused_heads_proj([f"{att}/query", f"{att}/key", f"{att}/value"], f"{t}.attn.in_proj_weight",
                               f"{t}.attn.in_proj_bias", heads)
  r += tables.attn_out(f"{att}/out", f"{t}.attn.out_proj", heads)
  r += tables.layer_norm(f"{o}/LayerNorm_1", f"{t}.ln_2")
  r += tables.dense(f"{o}/MlpBlock_0/Dense_0", f"{t}.mlp.c_fc")
  r += tables.dense(f"{o}/MlpBlock_0/Dense_1", f"{t}.mlp.c_proj")
  return r


def table(spec: towers.TowersSpec) -> Table:
  """Rules for unscanned two-tower params <-> CustomTextCLIP state dict keys."""
  check_supported(spec)
  txt = spec.txt
  v = tables.prefixed(timm_vit.table(_trunk_spec(spec)), "img/", "visual.trunk.")
  if spec.img.num_classes:
    v += tables.dense("img/head", "visual.head.proj")
  t: Table = [tables.same("Embed_0/embedding", "token_embedding.weight"),
              tables.reshaped("pos_embedding", "positional_embedding", lambda s: (1, *s), lambda s: s[1:])]
  for i in range(txt.depth):
    t += _block(f"{towers.TXT_ENC}_{i}", f"transformer.resblocks.{i}", txt.num_heads)
  t += tables.layer_norm("Encoder_0/encoder_norm", "ln_final")
  if txt.num_classes:
    t += tables.dense("head", "text_projection")
  scalar = lambda k_o, k_t: tables.reshaped(k_o, k_t, lambda s: (1,), lambda s: ())  # (1,) <-> ()
  rest = [scalar("t", "logit_scale")] + ([scalar("b", "logit_bias")] if spec.has_bias else [])
  return v + tables.prefixed(t, "txt/", "text.") + rest


def to_state_dict(flat: Mapping[str, np.ndarray], spec: towers.TowersSpec, expect: Mapping | None = None,
                  what: str = "open_clip export") -> dict[str, np.ndarray]:
  return tables.apply(table(spec), tables.unscan(flat), "to_theirs", what=what, expect=expect)


def from_state_dict(sd: Mapping[str, Any], spec: towers.TowersSpec, *, scan: bool = False,
                    what: str = "open_clip import") -> dict[str, np.ndarray]:
  sd = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
  flat = tables.apply(table(spec), sd, "to_ours", what=what)
  return tables.scan(flat) if scan else flat


def export(flat: Mapping[str, np.ndarray], spec: towers.TowersSpec, out: str,
           tokenizer: tuple[str, int] | None = None,
           location: str | None = None) -> tuple[dict[str, Any], list[str]]:
  """Writes the open_clip folder; returns (model_cfg, notes).

  `location`: where the folder will live when `out` is a staging copy (a gs:// export): the notes
  name it; `relocate(out, location)` then points the config there.
  """
  import torch
  from safetensors.torch import save_file
  check_supported(spec)
  out = os.path.abspath(out)
  timm_dir = os.path.join(out, "timm")
  os.makedirs(timm_dir, exist_ok=True)
  with open(os.path.join(timm_dir, "config.json"), "w") as f:
    json.dump(timm_vit.hub_config(_trunk_spec(spec)), f, indent=2)
  where = f"{location.rstrip('/')}/timm" if location else timm_dir
  notes = [f"the vision trunk is named by absolute path (vision_cfg.timm_model_name = local-dir:{where}): "
           "after moving the folder, edit that entry"]
  tok: dict[str, Any] = {}
  if tokenizer is not None:
    from big_vision_lite.convert import hf_siglip
    if tokenizer[1] != spec.txt.max_len:
      raise ConversionError(f"tokenize max_len {tokenizer[1]} != text pos_embedding length {spec.txt.max_len}")
    ids, n, _ = hf_siglip.write_tokenizer(out, *tokenizer)
    tok = dict(ids, hf_tokenizer_name=out)
    notes += n
  cfg = model_cfg(spec, timm_dir, tok)
  preprocess = dict(size=list(spec.img.image_size), mode="RGB", mean=[0.5] * 3, std=[0.5] * 3,
                    interpolation="bilinear", resize_mode="squash")
  with open(os.path.join(out, CONFIG), "w") as f:
    json.dump(dict(model_cfg=cfg, preprocess_cfg=preprocess), f, indent=2)
  if os.path.exists(os.path.join(out, WEIGHTS)):
    os.remove(os.path.join(out, WEIGHTS))  # The architecture-only model below must not read stale weights.
  model = create_model(out)
  expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  sd = to_state_dict(flat, spec, expect=expect)
  save_file({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, os.path.join(out, WEIGHTS))
  return cfg, notes


def relocate(out: str, location: str) -> dict[str, Any]:
  """Points the folder `out`'s config at `location` (where it is copied to); returns the config.

  open_clip names the vision trunk (`local-dir:<folder>/timm`) and the tokenizer by absolute
  path: a staged export would otherwise record its temporary folder.
  """
  path = os.path.join(out, CONFIG)
  with open(path) as f:
    cfg = json.load(f)
  location = location.rstrip("/")
  cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = f"local-dir:{location}/timm"
  if cfg["model_cfg"]["text_cfg"].get("hf_tokenizer_name"):
    cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = location
  with open(path, "w") as f:
    json.dump(cfg, f, indent=2)
  return cfg


def create_model(out: str):
  """open_clip.create_model("local-dir:OUT"): strict load of the weights file when present; eval mode."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import open_clip
  return open_clip.create_model(f"local-dir:{os.path.abspath(out)}").eval()


def load(out: str):
  """The exported model, loaded the way a user would (offline, strict)."""
  return create_model(out)


def run_torch(model, images_nhwc: np.ndarray, texts: np.ndarray) -> dict[str, np.ndarray]:
  import torch
  with torch.no_grad():
    zi = model.encode_image(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))),
                            normalize=True)
    zt = model.encode_text(torch.from_numpy(texts.astype(np.int64)), normalize=True)
    logits = model.logit_scale.exp() * zi @ zt.T
    if model.logit_bias is not None:
      logits = logits + model.logit_bias
  return dict(zimg=zi.float().numpy(), ztxt=zt.float().numpy(), logits=logits.float().numpy())
