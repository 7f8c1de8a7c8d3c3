"""What a converter must know about a two-tower (SigLIP) model: both towers' specs read from the
params, our model rebuilt in fp32, and its embeddings/logits on fixed inputs.

Params layout (models/two_towers.py): `img/` a ViT, `txt/` a text transformer
(models/text.py), `t` the log-temperature, `b` the bias (absent for CLIP-style runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from big_vision_lite.convert import tables
from big_vision_lite.convert import vit as cv
from big_vision_lite.convert.tables import ConversionError

TXT_ENC = "Encoder_0/encoderblock"


@dataclasses.dataclass(frozen=True)
class TextSpec:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  vocab_size: int
  max_len: int  # the learned posemb length: texts are always padded to it
  pool_type: str  # last | first | mean | map
  num_classes: int  # 0: no head
  norm_eps: float = 1e-6

  def model_kwargs(self) -> dict[str, Any]:
    return dict(width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                vocab_size=self.vocab_size, pool_type=self.pool_type, num_classes=self.num_classes or None,
                norm_eps=self.norm_eps, dtype_mm="float32", scan=False)


@dataclasses.dataclass(frozen=True)
class TowersSpec:
  img: cv.VitSpec
  txt: TextSpec
  has_bias: bool  # `b` param (SigLIP) or not (CLIP-style softmax runs)

  def model_kwargs(self) -> dict[str, Any]:
    """Kwargs for our `two_towers(...)` that give exactly this model (fp32, unscanned)."""
    img = {k: v for k, v in self.img.model_kwargs().items() if k != "num_classes"}
    txt = {k: v for k, v in self.txt.model_kwargs().items() if k != "num_classes"}
    return dict(image=img, text=txt, out_dim=(self.img.num_classes or None, self.txt.num_classes or None),
                bias_init=-10.0 if self.has_bias else None)


def text_spec_from_params(flat: Mapping[str, np.ndarray], *, pool_type: str | None = None,
                          norm_eps: float = 1e-6, what: str = "txt") -> TextSpec:
  """Reads a TextSpec from flat text-tower params (scanned or not), relative to the tower root.

  `pool_type` None: MAPHead_0 -> map, else "last" (big_vision's text default).
  """
  flat = tables.unscan(flat)

  def get(k: str) -> np.ndarray:
    if k not in flat:
      raise ConversionError(f"{what}: no {k!r}; not a text transformer (keys: {sorted(flat)[:8]} ...)")
    return np.asarray(flat[k])

  vocab, width = get("Embed_0/embedding").shape
  depth = tables.num_layers(flat, "Encoder_0/")
  if depth == 0:
    raise ConversionError(f"{what}: no {TXT_ENC}_0 or scanned {TXT_ENC} params")
  heads = get(f"{TXT_ENC}_0/MultiHeadDotProductAttention_0/query/kernel").shape[1]
  mlp_dim = get(f"{TXT_ENC}_0/MlpBlock_0/Dense_0/kernel").shape[1]
  guess = "map" if "MAPHead_0/probe" in flat else "last"
  pool_type = pool_type or guess
  if (pool_type == "map") != (guess == "map"):
    raise ConversionError(f"{what}: pool_type {pool_type!r} does not match the params (they look like {guess!r})")
  num_classes = get("head/kernel").shape[1] if "head/kernel" in flat else 0
  return TextSpec(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, vocab_size=vocab,
                  max_len=get("pos_embedding").shape[1], pool_type=pool_type, num_classes=num_classes,
                  norm_eps=norm_eps)


def split(flat: Mapping[str, np.ndarray], what: str = "params") -> tuple[dict, dict, dict]:
  """(img/ params, txt/ params, the rest) with the tower prefixes stripped."""
  img = {k[4:]: v for k, v in flat.items() if k.startswith("img/")}
  txt = {k[4:]: v for k, v in flat.items() if k.startswith("txt/")}
  rest = {k: v for k, v in flat.items() if not k.startswith(("img/", "txt/"))}
  if not img or not txt:
    raise ConversionError(f"{what}: not a two-tower model (needs img/ and txt/ params; top-level: "
                          f"{sorted({k.split('/')[0] for k in flat})})")
  return img, txt, rest


def spec_from_params(flat: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any] | None = None, *,
                     image_size: int | None = None, what: str = "params") -> TowersSpec:
  """Both towers' specs; `model_cfg` (config.model of a two_towers run) supplies what params cannot tell."""
  model_cfg = dict(model_cfg or {})
  icfg, tcfg = dict(model_cfg.get("image") or {}), dict(model_cfg.get("text") or {})
  img, txt, rest = split(flat, what)
  if "t" not in rest:
    raise ConversionError(f"{what}: no 't' (log-temperature) param")
  ispec = cv.spec_from_params(img, pool_type=icfg.get("pool_type"), norm_eps=icfg.get("norm_eps", 1e-6),
                              image_size=image_size, what=f"{what}/img")
  tspec = text_spec_from_params(txt, pool_type=tcfg.get("pool_type"), norm_eps=tcfg.get("norm_eps", 1e-6),
                                what=f"{what}/txt")
  return TowersSpec(img=ispec, txt=tspec, has_bias="b" in rest)


def build_ours(spec: TowersSpec, model_cfg: Mapping[str, Any] | None = None, scan: bool = False):
  """Our TwoTowers in fp32: from the run's config.model when given (its own scan etc.), else from spec."""
  from big_vision_lite.models import two_towers
  fp32 = dict(dtype_mm="float32", remat_policy="none", dropout=0.0)
  if model_cfg:
    kw = dict(model_cfg)
    kw["image"] = {**dict(kw.get("image") or {}), **fp32}
    kw["text"] = {**dict(kw.get("text") or {}), **fp32}
    return two_towers.two_towers(**kw)
  kw = spec.model_kwargs()
  kw["image"]["scan"] = kw["text"]["scan"] = scan
  return two_towers.two_towers(**kw)


def fixed_inputs(spec: TowersSpec, batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Fixed images in [-1, 1] and token ids (varied lengths, eos then pad 0) for parity checks."""
  images = cv.fixed_images(spec.img, batch=batch, seed=seed)
  return images, fixed_texts(spec.txt, batch=batch, seed=seed)


def fixed_texts(txt: TextSpec, batch: int = 3, seed: int = 0) -> np.ndarray:
  """Fixed token ids (varied lengths, eos then pad 0) for parity checks."""
  rng = np.random.default_rng(seed + 1)
  L, V = txt.max_len, txt.vocab_size
  texts = np.zeros((batch, L), np.int32)
  for i in range(batch):
    n = 1 + (i * 5) % L  # short and full-length texts
    texts[i, :n] = rng.integers(min(3, V - 1), V, n)
  return texts


def run_ours(flat: Mapping[str, np.ndarray], model, images: np.ndarray | tuple,
             texts: np.ndarray) -> dict[str, np.ndarray]:
  """{'zimg', 'ztxt' (L2-normalised), 'logits' (images x texts)} of our model.

  `images`: NHWC, or a NaFlex tower's (patches, mask, spatial shapes) as ops_naflex writes them.
  """
  import jax
  import jax.numpy as jnp
  params = tables.nest({k: tables.to_f32(v) for k, v in flat.items()})

  def fwd(p, x, t):
    zi, zt, out = model.apply({"params": p}, x, t)
    logits = out["t"] * zi @ zt.T + out.get("b", jnp.zeros(()))
    return dict(zimg=zi, ztxt=zt, logits=logits)

  images = (tuple(np.asarray(x) for x in images) if isinstance(images, tuple)
            else images.astype(np.float32))
  res = jax.jit(fwd)(params, images, texts.astype(np.int32))
  return {k: np.asarray(v, np.float32) for k, v in res.items()}


def max_diff(ours: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray], lib: str) -> dict[str, float]:
  """Per-output max |ours - theirs|; shape mismatches raise."""
  out = {}
  for k in ("zimg", "ztxt", "logits"):
    if ours[k].shape != theirs[k].shape:
      raise ConversionError(f"parity: {k} shapes differ, ours {ours[k].shape} vs {lib} {theirs[k].shape}")
    out[k] = float(np.max(np.abs(ours[k] - theirs[k])))
  return out
