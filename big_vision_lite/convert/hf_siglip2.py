"""transformers `Siglip2VisionModel` / `Siglip2Model` <-> our NaFlex image tower
(models/naflex_vit.py) / a two_towers model with it: the conversion tables, the HF configs and
runners for parity checks.

The layouts coincide: the dense patch stem is HF's `patch_embedding` Linear on the same
(dy, dx, channel)-flattened patches, the (G, G, D) posemb grid is HF's (G*G, D)
`position_embedding` (both resized per image by antialiased bilinear weights), the blocks and
the MAP head are SigLIP's (hf_siglip.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from big_vision_lite.convert import tables, towers
from big_vision_lite.convert.hf_siglip import (HIDDEN_ACT, _block, hf_text_config, scale_bias,
                                               text_table)
from big_vision_lite.convert.tables import ConversionError, Table, UnsupportedExport
from big_vision_lite.convert.vit import ENC


def vision_spec(flat: Mapping[str, np.ndarray], num_heads: int, norm_eps: float = 1e-6,
                in_chans: int = 3) -> dict[str, int]:
  """The tower's sizes read from its params (num_heads is not in the shapes)."""
  flat = tables.unscan(flat)
  if "MAPHead_0/probe" not in flat or "head/kernel" in flat or "pre_logits/kernel" in flat:
    raise UnsupportedExport("Siglip2VisionModel ends at its MAP head: the tower needs "
                          "pool_type='map' and no head or pre_logits (out_dim=(None, D))")
  n_in, width = flat["embedding/kernel"].shape
  patch = math.isqrt(n_in // in_chans)
  if patch * patch * in_chans != n_in:
    raise ConversionError(f"embedding kernel {flat['embedding/kernel'].shape}: not square "
                          f"{in_chans}-channel patches")
  g, gw, _ = flat["pos_embedding"].shape
  if g != gw:
    raise ConversionError(f"pos_embedding grid {g}x{gw}: Siglip2 stores a square grid")
  depth = tables.num_layers(flat)
  mlp = flat[f"{ENC}_0/MlpBlock_0/Dense_0/kernel"].shape[1]
  return dict(width=width, depth=depth, mlp_dim=mlp, num_heads=num_heads, patch=patch,
              grid=g, norm_eps=norm_eps, in_chans=in_chans)


def hf_vision_config(spec: Mapping[str, int]) -> dict[str, Any]:
  """Siglip2VisionConfig kwargs reproducing the tower (GELU tanh form, our LayerNorm eps)."""
  return dict(hidden_size=spec["width"], intermediate_size=spec["mlp_dim"],
              num_hidden_layers=spec["depth"], num_attention_heads=spec["num_heads"],
              num_channels=spec["in_chans"], patch_size=spec["patch"],
              num_patches=spec["grid"] ** 2, hidden_act=HIDDEN_ACT,
              layer_norm_eps=spec["norm_eps"], vision_use_head=True)


def vision_table(spec: Mapping[str, int]) -> Table:
  """Rules for the unscanned tower params <-> Siglip2VisionModel state dict keys."""
  g, heads = spec["grid"], spec["num_heads"]
  v: Table = tables.dense("embedding", "embeddings.patch_embedding")
  v.append(tables.reshaped("pos_embedding", "embeddings.position_embedding.weight",
                           lambda s: (g, g, s[-1]), lambda s: (s[0] * s[1], s[2])))
  for i in range(spec["depth"]):
    v += _block(f"{ENC}_{i}", f"encoder.layers.{i}", heads)
  v += tables.layer_norm("Transformer/encoder_norm", "post_layernorm")
  att = "MAPHead_0/MultiHeadDotProductAttention_0"
  v.append(tables.same("MAPHead_0/probe", "head.probe"))
  v += tables.fused_heads_proj([f"{att}/query", f"{att}/key", f"{att}/value"],
                               "head.attention.in_proj_weight", "head.attention.in_proj_bias",
                               heads)
  v += tables.attn_out(f"{att}/out", "head.attention.out_proj", heads)
  v += tables.layer_norm("MAPHead_0/LayerNorm_0", "head.layernorm")
  v += tables.dense("MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1")
  v += tables.dense("MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2")
  return v


def export_vision(flat: Mapping[str, np.ndarray], spec: Mapping[str, int], out: str | None = None):
  """The Siglip2VisionModel holding the tower's weights (saved to `out` if given)."""
  from big_vision_lite.convert import torch_env
  torch = torch_env.setup()
  import transformers
  model = transformers.Siglip2VisionModel(
      transformers.Siglip2VisionConfig(**hf_vision_config(spec))).eval()
  expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  sd = tables.apply(vision_table(spec), tables.unscan(flat), "to_theirs",
                    what="transformers Siglip2 export", expect=expect)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  if out:
    model.save_pretrained(out)
  return model


def run_vision(model, patches: np.ndarray, mask: np.ndarray, shapes: np.ndarray
               ) -> dict[str, np.ndarray]:
  """Siglip2VisionModel on ops_naflex's arrays: pooled output and last hidden state."""
  import torch
  with torch.no_grad():
    o = model(pixel_values=torch.from_numpy(np.asarray(patches, np.float32)),
              pixel_attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
              spatial_shapes=torch.from_numpy(np.asarray(shapes, np.int64)))
  return dict(pooled=o.pooler_output.float().numpy(), encoded=o.last_hidden_state.float().numpy())


def model_table(vspec: Mapping[str, int], txt: towers.TextSpec, has_bias: bool) -> Table:
  """Rules for a two_towers model with a NaFlex `img` (out_dim=(None, D)) <-> Siglip2Model."""
  return (tables.prefixed(vision_table(vspec), "img/", "vision_model.")
          + tables.prefixed(text_table(txt), "txt/", "text_model.") + scale_bias(has_bias))


def export_model(flat: Mapping[str, np.ndarray], vspec: Mapping[str, int], txt: towers.TextSpec,
                 has_bias: bool, out: str | None = None, tok: Mapping[str, int] | None = None):
  """The Siglip2Model holding both towers, `t` and `b` (saved to `out` if given). Params other
  than the towers' (a LocCa `decoder/`, dropped after training) are left out."""
  from big_vision_lite.convert import torch_env
  torch = torch_env.setup()
  import transformers
  cfg = transformers.Siglip2Config(text_config=hf_text_config(txt, tok),
                                   vision_config=hf_vision_config(vspec))
  model = transformers.Siglip2Model(cfg).eval()
  expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  kept = {k: v for k, v in tables.unscan(flat).items() if not k.startswith("decoder/")}
  sd = tables.apply(model_table(vspec, txt, has_bias), kept, "to_theirs",
                    what="transformers Siglip2 export", expect=expect)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  if out:
    model.save_pretrained(out)
  return model


def run_model(model, patches: np.ndarray, mask: np.ndarray, shapes: np.ndarray,
              texts: np.ndarray) -> dict[str, np.ndarray]:
  """Siglip2Model on ops_naflex's arrays and token ids: both embeddings and the logits."""
  import torch
  with torch.no_grad():
    o = model(input_ids=torch.from_numpy(np.asarray(texts, np.int64)),
              pixel_values=torch.from_numpy(np.asarray(patches, np.float32)),
              pixel_attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
              spatial_shapes=torch.from_numpy(np.asarray(shapes, np.int64)))
  return dict(zimg=o.image_embeds.float().numpy(), ztxt=o.text_embeds.float().numpy(),
              logits=o.logits_per_image.float().numpy())


# ----------------------------------------------------------------------------
# The export folder of a run: model, tokenizer and Siglip2 processor files.

_NAFLEX = re.compile(r"naflex_patches\(\s*(\d+)\s*,\s*(\d+)")


def max_num_patches_from_config(config: Mapping[str, Any]) -> int | None:
  """The patch budget of the run's `naflex_patches(P, N)` op (input, else an eval), or None."""
  pps = [(config.get("input") or {}).get("pp") or ""]
  pps += [e.get("pp") or "" for e in (config.get("evals") or {}).values() if isinstance(e, dict)]
  for pp in pps:
    if (m := _NAFLEX.search(pp)):
      return int(m.group(2))
  return None


def write_image_processor(out: str, patch: int, max_num_patches: int):
  """Siglip2ImageProcessor settings of our `value_range(-1, 1)|naflex_patches(P, N)`."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import transformers
  proc = transformers.Siglip2ImageProcessor(
      patch_size=patch, max_num_patches=max_num_patches, do_resize=True, resample=2,  # bilinear
      do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
      image_std=[0.5] * 3)
  proc.save_pretrained(out)
  return proc


def export(flat: Mapping[str, np.ndarray], vspec: Mapping[str, int], txt: towers.TextSpec,
           has_bias: bool, out: str, *, max_num_patches: int,
           tokenizer: tuple[str, int] | None = None, eos: str = "yes"
           ) -> tuple[dict[str, Any], list[str]]:
  """Writes a `Siglip2Model.from_pretrained(out)` folder with its Siglip2Processor files
  (tokenizer as hf_siglip writes it); returns (HF config dict, notes)."""
  from big_vision_lite.convert import hf_siglip
  os.makedirs(out, exist_ok=True)
  tok_ids, hf_tok, notes = hf_siglip.tokenizer_files(out, txt.max_len, tokenizer, eos)
  model = export_model(flat, vspec, txt, has_bias, out=out, tok=tok_ids)
  proc = write_image_processor(out, vspec["patch"], max_num_patches)
  if hf_tok is not None:
    import transformers
    transformers.Siglip2Processor(image_processor=proc, tokenizer=hf_tok).save_pretrained(out)
    cls = _tokenizer_class(out)
    notes.append(f"tokenizer: load it with transformers.{cls}.from_pretrained(OUT) and the "
                 f"processor as Siglip2Processor(Siglip2ImageProcessor.from_pretrained(OUT), that "
                 "tokenizer): AutoTokenizer and Siglip2Processor.from_pretrained give a siglip2 "
                 "folder transformers' Gemma Siglip2Tokenizer whatever its files name")
    notes.append(f"Siglip2Processor: call it with "
                 f"{processor_kwargs(vspec['patch'], max_num_patches, txt.max_len)} (its class "
                 "defaults, patch_size=16, max_num_patches=256, max_length=64, win over the saved "
                 "files; Siglip2ImageProcessor.from_pretrained alone reads them)")
  return model.config.to_dict(), notes


def load(out: str):
  """The exported model, loaded the way a user would (offline)."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import transformers
  return transformers.Siglip2Model.from_pretrained(out).eval()


def fixed_patches(patch: int, max_num_patches: int, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Our NaFlex arrays (value_range(-1, 1)|naflex_patches) of random images of three aspect
  ratios (square, wide, very tall: posembs resampled both ways, padded rows; none one patch
  wide, see exact_size_images)."""
  rng = np.random.default_rng(seed)
  return naflex_arrays([rng.integers(0, 256, hw + (3,), dtype=np.uint8)
                        for hw in [(48, 48), (30, 70), (200, 40)]], patch, max_num_patches)


def naflex_arrays(images_uint8: list, patch: int, max_num_patches: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(patches, mask, spatial shapes) of `value_range(-1, 1)|naflex_patches(P, N)` on images."""
  from big_vision_lite.data.ops import get_preprocess_fn
  pp = get_preprocess_fn(f"value_range(-1, 1)|naflex_patches({patch}, {max_num_patches})")
  rows = [pp({"image": im}) for im in images_uint8]
  return tuple(np.stack([r[k] for r in rows]) for k in ("image", "image_mask", "image_shape"))


def exact_size_images(patch: int, max_num_patches: int, n: int = 3, seed: int = 0) -> list:
  """uint8 images that fill the budget exactly in whole patches (a x b, a * b = N): both
  our op and Siglip2ImageProcessor keep their size, so only the rest of the pipeline shows.

  None is one patch wide: torch's antialiased bilinear F.interpolate (CPU, torch 2.13) returns
  the first row's mean everywhere when it widens the height and shrinks the width to 1, so
  Siglip2's posembs are wrong for such images (ours are the resize's)."""
  divs = [a for a in range(1, max_num_patches + 1) if max_num_patches % a == 0
          and (max_num_patches // a >= 2 or max_num_patches == 1)]
  picks = [divs[len(divs) // 2], divs[0], divs[-1]][:n]
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (a * patch, max_num_patches // a * patch, 3), dtype=np.uint8)
          for a in picks]


def processor_kwargs(patch: int, max_num_patches: int, max_len: int) -> str:
  """The Siglip2Processor call arguments a run needs, as users type them."""
  return (f"patch_size={patch}, max_num_patches={max_num_patches}, padding='max_length', "
          f"max_length={max_len}")


def _tokenizer_class(out: str) -> str:
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    return json.load(f)["tokenizer_class"]


def load_processor(out: str):
  """The export's Siglip2Processor with the run's tokenizer, as the export's note says to build
  it (transformers' AutoTokenizer would load the folder's tokenizer as its Gemma
  Siglip2Tokenizer: it does so for every model_type siglip2)."""
  import transformers
  tok = getattr(transformers, _tokenizer_class(out)).from_pretrained(out)
  return transformers.Siglip2Processor(
      image_processor=transformers.Siglip2ImageProcessor.from_pretrained(out), tokenizer=tok)


def run_processor(model, out: str, texts: list[str], images_uint8: list, patch: int,
                  max_num_patches: int, max_len: int) -> dict[str, np.ndarray]:
  """model(**processor(text, images, patch_size=P, max_num_patches=N, padding="max_length",
  max_length=L)) with the processor of `load_processor`."""
  import torch
  proc = load_processor(out)
  inputs = proc(text=texts, images=list(images_uint8), patch_size=patch,
                max_num_patches=max_num_patches, padding="max_length", max_length=max_len,
                truncation=True, return_tensors="pt")
  with torch.no_grad():
    o = model(**inputs)
  return dict(zimg=o.image_embeds.float().numpy(), ztxt=o.text_embeds.float().numpy(),
              logits=o.logits_per_image.float().numpy())
