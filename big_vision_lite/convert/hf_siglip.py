"""transformers `SiglipModel` <-> our two towers: the conversion table, the HF config, the export
folder (weights, config, tokenizer and image-processor files) and a runner for parity checks.

HF's SigLIP fixes two choices our two towers leave open: the vision tower ends at
its MAP head (no projection), the text tower pools the last token then projects.
Anything else fails naming the config key to change.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Mapping

import numpy as np

from big_vision_lite import storage
from big_vision_lite.convert import tables, towers
from big_vision_lite.convert.tables import ConversionError, Table, UnsupportedExport
from big_vision_lite.convert.vit import ENC
from big_vision_lite.models.common import posemb_sincos_2d

# Flax nn.gelu is the tanh approximation.
HIDDEN_ACT = "gelu_pytorch_tanh"


def check_supported(spec: towers.TowersSpec) -> None:
  """Raises naming the config key when HF's SiglipModel cannot express our model."""
  img, txt = spec.img, spec.txt
  if img.pool_type != "map":
    raise UnsupportedExport(f"model.image.pool_type={img.pool_type!r}: transformers' SiglipVisionModel "
                          "pools with its MAP head only (use 'map', or export with --to open_clip)")
  if img.num_classes:
    raise UnsupportedExport(f"model.out_dim: the image tower has a projection head (img/head, {img.num_classes} "
                          "dims) but transformers' SiglipVisionModel ends at the MAP head; train with "
                          "model.out_dim=(None, D) as big_vision's SigLIP does, or export with --to open_clip")
  if img.rep_size:
    raise UnsupportedExport("model.image.rep_size: pre_logits has no transformers SiglipVisionModel equivalent")
  if img.grid[0] != img.grid[1] or img.patch[0] != img.patch[1]:
    raise UnsupportedExport(f"image size {img.image_size} / patch {img.patch}: transformers' Siglip needs "
                          "square images and patches")
  if txt.pool_type != "last":
    raise UnsupportedExport(f"model.text.pool_type={txt.pool_type!r}: transformers' SiglipTextModel pools the "
                          "last token (use 'last')")


def hf_text_config(txt: towers.TextSpec, tok: Mapping[str, int] | None = None) -> dict[str, Any]:
  """(Siglip|Siglip2)TextConfig kwargs of our text tower."""
  tok = dict(tok or {})
  return dict(
      vocab_size=txt.vocab_size, hidden_size=txt.width, intermediate_size=txt.mlp_dim,
      num_hidden_layers=txt.depth, num_attention_heads=txt.num_heads, max_position_embeddings=txt.max_len,
      projection_size=txt.num_classes or txt.width, hidden_act=HIDDEN_ACT, layer_norm_eps=txt.norm_eps,
      pad_token_id=tok.get("pad", 0), eos_token_id=tok.get("eos", 1), bos_token_id=tok.get("bos", None))


def hf_config(spec: towers.TowersSpec, tok: Mapping[str, int] | None = None) -> dict[str, Any]:
  """SiglipConfig kwargs reproducing our forward pass (GELU tanh form, our LayerNorm eps)."""
  img, txt = spec.img, spec.txt
  return dict(
      text_config=hf_text_config(txt, tok),
      vision_config=dict(
          hidden_size=img.width, intermediate_size=img.mlp_dim, num_hidden_layers=img.depth,
          num_attention_heads=img.num_heads, num_channels=img.in_chans, image_size=img.image_size[0],
          patch_size=img.patch[0], hidden_act=HIDDEN_ACT, layer_norm_eps=img.norm_eps, vision_use_head=True))


def _block(o: str, t: str, heads: int) -> Table:
  att = f"{o}/MultiHeadDotProductAttention_0"
  r = tables.layer_norm(f"{o}/LayerNorm_0", f"{t}.layer_norm1")
  for n, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    r += tables.heads_proj(f"{att}/{n}", f"{t}.self_attn.{hf}", heads)
  r += tables.attn_out(f"{att}/out", f"{t}.self_attn.out_proj", heads)
  r += tables.layer_norm(f"{o}/LayerNorm_1", f"{t}.layer_norm2")
  r += tables.dense(f"{o}/MlpBlock_0/Dense_0", f"{t}.mlp.fc1")
  r += tables.dense(f"{o}/MlpBlock_0/Dense_1", f"{t}.mlp.fc2")
  return r


def table(spec: towers.TowersSpec) -> Table:
  """Rules for unscanned two-tower params (img/, txt/, t, b) <-> SiglipModel state dict keys."""
  check_supported(spec)
  img, txt = spec.img, spec.txt
  v: Table = tables.conv("embedding", "embeddings.patch_embedding")
  if img.posemb == "learn":
    v.append(tables.reshaped("pos_embedding", "embeddings.position_embedding.weight",
                             lambda s: (1, *s), lambda s: s[1:]))
  else:  # Fixed on our side: exported as the table it computes.
    pe = np.asarray(posemb_sincos_2d(*img.grid, img.width))[0]
    v.append(tables.constant("embeddings.position_embedding.weight", pe, "sincos2d posemb"))
  for i in range(img.depth):
    v += _block(f"{ENC}_{i}", f"encoder.layers.{i}", img.num_heads)
  v += tables.layer_norm("Transformer/encoder_norm", "post_layernorm")
  att = "MAPHead_0/MultiHeadDotProductAttention_0"
  v.append(tables.same("MAPHead_0/probe", "head.probe"))
  v += tables.fused_heads_proj([f"{att}/query", f"{att}/key", f"{att}/value"], "head.attention.in_proj_weight",
                               "head.attention.in_proj_bias", img.num_heads)
  v += tables.attn_out(f"{att}/out", "head.attention.out_proj", img.num_heads)
  v += tables.layer_norm("MAPHead_0/LayerNorm_0", "head.layernorm")
  v += tables.dense("MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1")
  v += tables.dense("MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2")

  return (tables.prefixed(v, "img/", "vision_model.")
          + tables.prefixed(text_table(txt), "txt/", "text_model.") + scale_bias(spec.has_bias))


def text_table(txt: towers.TextSpec) -> Table:
  """Rules for the text tower's unscanned params <-> (Siglip|Siglip2)TextModel's keys."""
  t: Table = [tables.same("Embed_0/embedding", "embeddings.token_embedding.weight"),
              tables.reshaped("pos_embedding", "embeddings.position_embedding.weight",
                              lambda s: (1, *s), lambda s: s[1:])]
  for i in range(txt.depth):
    t += _block(f"{towers.TXT_ENC}_{i}", f"encoder.layers.{i}", txt.num_heads)
  t += tables.layer_norm("Encoder_0/encoder_norm", "final_layer_norm")
  if txt.num_classes:
    t += tables.dense("head", "head")
  else:  # HF always projects: an identity head gives our pooled width.
    t += [tables.constant("head.weight", np.eye(txt.width, dtype=np.float32), "identity (no txt/head)"),
          tables.constant("head.bias", np.zeros(txt.width, np.float32), "identity (no txt/head)")]
  return t


def scale_bias(has_bias: bool) -> Table:
  """`t` and `b` <-> logit_scale and logit_bias (t is already a log, as logit_scale)."""
  return [tables.same("t", "logit_scale"),
          tables.same("b", "logit_bias") if has_bias
          else tables.constant("logit_bias", np.zeros(1, np.float32), "zero bias (run without b)")]


def create_model(spec: towers.TowersSpec, tok: Mapping[str, int] | None = None):
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import transformers
  cfg = transformers.SiglipConfig(**hf_config(spec, tok))
  return transformers.SiglipModel(cfg).eval()


def to_state_dict(flat: Mapping[str, np.ndarray], spec: towers.TowersSpec, expect: Mapping | None = None,
                  what: str = "transformers export") -> dict[str, np.ndarray]:
  return tables.apply(table(spec), tables.unscan(flat), "to_theirs", what=what, expect=expect)


def from_state_dict(sd: Mapping[str, Any], spec: towers.TowersSpec, *, scan: bool = False,
                    what: str = "transformers import") -> dict[str, np.ndarray]:
  sd = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
  flat = tables.apply(table(spec), sd, "to_ours", what=what)
  return tables.scan(flat) if scan else flat


# ----------------------------------------------------------------------------
# Tokenizer / processor files.

_TOKENIZE = re.compile(r"tokenize\(\s*(\d+)\s*,\s*model\s*=\s*(['\"])(.*?)\2")


def tokenizer_from_config(config: Mapping[str, Any]) -> tuple[str, int] | None:
  """(tokenizer model, max_len) of the run's text `tokenize(...)` op, or None."""
  pps = [(config.get("input") or {}).get("pp") or ""]
  for e in (config.get("evals") or {}).values():
    if isinstance(e, dict):
      pps += [e.get("pp") or "", e.get("pp_txt") or ""]
  for pp in pps:
    if (m := _TOKENIZE.search(pp)):
      return m.group(3), int(m.group(1))
  return None


def tokenize_eos_from_config(config: Mapping[str, Any]) -> str:
  """The `eos=` of the run's text tokenize op (the op's default 'yes' when not given)."""
  pps = [(config.get("input") or {}).get("pp") or ""]
  pps += [e.get(k) or "" for e in (config.get("evals") or {}).values() if isinstance(e, dict)
          for k in ("pp", "pp_txt")]
  for pp in pps:
    if (m := re.search(r"tokenize\([^)]*\beos\s*=\s*['\"](\w+)['\"]", pp)):
      return m.group(1)
    if "tokenize(" in pp:
      return "yes"
  return "yes"


# Verify captions: words of the bvl_shapes vocabulary, short enough for any text length >= 6.
VERIFY_TEXTS = ("a small red circle", "a blue square", "a green triangle")


def write_tokenizer(out: str, model: str, max_len: int) -> tuple[dict[str, int], list[str]]:
  """Writes HF tokenizer files for our tokenizer `model`; returns (special ids, notes for the user).

  Word-level vocab (bvl_shapes, *.txt): a `tokenizers` WordLevel tokenizer that
  lower-cases, splits on non-alphanumerics, appends <eos> and pads with <pad> to
  max_len: the same ids as our `tokenize(max_len, eos='sticky')`. A sentencepiece
  .model: copied as spiece.model for SiglipTokenizer (which lower-cases and strips
  punctuation by default: texts differing only in those may tokenize differently).
  """
  from big_vision_lite.data import tokenizers as our_tok
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import transformers
  tok = our_tok.get_tokenizer(model)
  notes = []
  if isinstance(tok, our_tok.WordTokenizer):
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    t = Tokenizer(WordLevel(tok.ids, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Split(Regex("[^a-z0-9]+"), behavior="removed")
    t.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", tok.eos_id)])
    # No attention_mask: our text tower attends to padding (as big_vision's), and
    # SiglipTextModel would mask it; transformers' own SigLIP conversion does the same.
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", model_max_length=max_len,
        model_input_names=["input_ids"])
    fast.save_pretrained(out)
    hf_tok = fast
    notes.append(f"tokenizer: word-level (tokenizer.json), call with padding='max_length', max_length={max_len}; "
                 "texts longer than max_len keep their <eos> (our eos='sticky')")
  else:
    if storage.is_remote(model):
      storage.copy(model, os.path.join(out, "spiece.model"))
    else:
      shutil.copyfile(os.path.expanduser(model), os.path.join(out, "spiece.model"))
    st = transformers.SiglipTokenizer(
        vocab_file=os.path.join(out, "spiece.model"), model_max_length=max_len,
        eos_token=tok.sp.id_to_piece(tok.eos_id), pad_token=tok.sp.id_to_piece(tok.pad_id),
        unk_token=tok.sp.id_to_piece(tok.sp.unk_id()), model_input_names=["input_ids"])
    st.save_pretrained(out)
    hf_tok = st
    notes.append("tokenizer: spiece.model for SiglipTokenizer (lower-cases and strips punctuation by default, "
                 f"our tokenize op does not); call with padding='max_length', max_length={max_len}")
  return dict(pad=tok.pad_id, eos=tok.eos_id), notes, hf_tok


def write_image_processor(out: str, size: tuple[int, int]):
  """SiglipImageProcessor settings of our `resize(S)|value_range(-1, 1)`."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import transformers
  proc = transformers.SiglipImageProcessor(
      do_resize=True, size=dict(height=size[0], width=size[1]), resample=2,  # PIL bilinear
      do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
  proc.save_pretrained(out)
  return proc


def tokenizer_files(out: str, max_len: int, tokenizer: tuple[str, int] | None, eos: str = "yes"):
  """Writes the run's tokenizer to `out` (if any); returns (special ids or None, HF tokenizer or
  None, notes for the user)."""
  if tokenizer is None:
    return None, None, ["tokenizer: none found in the run config (no tokenize(...) op): no tokenizer "
                        "files written"]
  if tokenizer[1] != max_len:
    raise ConversionError(f"tokenize max_len {tokenizer[1]} != text pos_embedding length {max_len}")
  tok_ids, notes, hf_tok = write_tokenizer(out, *tokenizer)
  if eos != "sticky":
    notes.append(f"captions over {tokenizer[1] - 1} tokens: the run's tokenize(eos={eos!r}) cut them "
                 "without an end token; the exported tokenizer ends them in its eos token (shorter "
                 "captions tokenize the same)")
  return tok_ids, hf_tok, notes


# ----------------------------------------------------------------------------

def export(flat: Mapping[str, np.ndarray], spec: towers.TowersSpec, out: str,
           tokenizer: tuple[str, int] | None = None, eos: str = "yes") -> tuple[dict[str, Any], list[str]]:
  """Writes a `SiglipModel.from_pretrained(out)` folder; returns (HF config dict, notes)."""
  import torch
  check_supported(spec)
  os.makedirs(out, exist_ok=True)
  tok_ids, hf_tok, notes = tokenizer_files(out, spec.txt.max_len, tokenizer, eos)
  import transformers
  model = create_model(spec, tok_ids)
  expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  sd = to_state_dict(flat, spec, expect=expect)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  model.save_pretrained(out)
  proc = write_image_processor(out, spec.img.image_size)
  if hf_tok is not None:  # what users load: SiglipProcessor.from_pretrained(out)
    transformers.SiglipProcessor(image_processor=proc, tokenizer=hf_tok).save_pretrained(out)
  return model.config.to_dict(), notes


def run_processor(model, out: str, texts: list[str], images_uint8: np.ndarray) -> dict[str, np.ndarray]:
  """The call every transformers user makes: model(**processor(..., padding="max_length"))."""
  import torch
  import transformers
  proc = transformers.SiglipProcessor.from_pretrained(out)
  inputs = proc(text=texts, images=list(images_uint8), padding="max_length", return_tensors="pt")
  with torch.no_grad():
    o = model(**inputs)
  return dict(zimg=o.image_embeds.float().numpy(), ztxt=o.text_embeds.float().numpy(),
              logits=o.logits_per_image.float().numpy())


def load(out: str):
  """The exported model, loaded the way a user would (offline)."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import transformers
  return transformers.SiglipModel.from_pretrained(out).eval()


def run_torch(model, images_nhwc: np.ndarray, texts: np.ndarray) -> dict[str, np.ndarray]:
  import torch
  with torch.no_grad():
    o = model(input_ids=torch.from_numpy(texts.astype(np.int64)),
              pixel_values=torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
  return dict(zimg=o.image_embeds.float().numpy(), ztxt=o.text_embeds.float().numpy(),
              logits=o.logits_per_image.float().numpy())
