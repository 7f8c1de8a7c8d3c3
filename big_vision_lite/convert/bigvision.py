"""Import of big_vision checkpoints (ViT or SigLIP two towers; .npz or tensorstore; scanned or
unrolled layers) into our layout.

Our parameter names are big_vision's, so the table is the identity on the keys
our model has; what the import adds is legacy-name fixes, (un)scanning to the
target layout, fp32, and a loud error for any key our model would not use.
The result is a flat .npz that `config.model_init` loads.
"""

from __future__ import annotations

import io
import re
from typing import Any, Mapping

import numpy as np

from big_vision_lite import storage
from big_vision_lite.convert import tables
from big_vision_lite.convert.tables import ConversionError, Table
from big_vision_lite.convert.vit import VitSpec, spec_from_params

# Names in checkpoints from google-research/vision_transformer and early big_vision.
_LEGACY = [
    (re.compile(r"^(.*encoderblock(?:_\d+)?)/MlpBlock_3/"), r"\1/MlpBlock_0/"),
    (re.compile(r"^(.*encoderblock(?:_\d+)?)/LayerNorm_2/"), r"\1/LayerNorm_1/"),
    (re.compile(r"^(.*encoderblock(?:_\d+)?)/MultiHeadDotProductAttention_1/"),
     r"\1/MultiHeadDotProductAttention_0/"),
    (re.compile(r"^Transformer/posembed_input/pos_embedding$"), "pos_embedding"),
    (re.compile(r"^Transformer/pos_embedding$"), "pos_embedding"),
    (re.compile(r"^(probe|MultiHeadDotProductAttention_0/.*|MlpBlock_0/.*|LayerNorm_0/.*)$"),
     r"MAPHead_0/\1"),
]


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Flat {'a/b': array} of a big_vision .npz ('params/' prefix stripped, 'opt/' ignored)."""
  try:
    with storage.open_file(path, "rb") as f, np.load(f, allow_pickle=False) as z:
      flat = {k: np.asarray(z[k]) for k in z.files}
  except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types.
    raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}") from e
  if any(k.startswith("params/") for k in flat):
    flat = {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
  return flat


def fix_legacy_names(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames old-style keys (see _LEGACY) and folds a cls posemb entry into `cls`."""
  out, renamed = {}, []
  for k, v in flat.items():
    new = k
    for pat, repl in _LEGACY:
      new = pat.sub(repl, new)
    if new != k:
      renamed.append(f"{k} -> {new}")
    if new in out:
      raise ConversionError(f"two keys map to {new} after legacy renames")
    out[new] = v
  pe = out.get("pos_embedding")
  # Old ViTs added the posemb after prepending cls: N = side^2 + 1. Ours adds it
  # to patches only, so the cls entry folds into the cls token.
  if pe is not None and pe.ndim == 3 and (n := pe.shape[1]) > 1 and int(np.sqrt(n - 1)) ** 2 == n - 1:
    out["pos_embedding"] = pe[:, 1:]
    if "cls" in out:
      out["cls"] = tables.to_f32(out["cls"]) + tables.to_f32(pe[:, :1])
    renamed.append("pos_embedding: folded the cls entry into cls")
  return out, renamed


def vit_shapes(spec: VitSpec) -> dict[str, tuple[int, ...]]:
  """{key: shape} of our unrolled ViT params for `spec` (abstract init, no compute)."""
  import flax
  import jax
  from big_vision_lite.checkpoint import flatten_with_names
  from big_vision_lite.models import vit as vit_lib
  model = vit_lib.vit(**spec.model_kwargs())
  x = jax.ShapeDtypeStruct((1, *spec.image_size, spec.in_chans), np.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros(x.shape)))
  params = flax.linen.meta.unbox(abstract["params"])
  return {k: tuple(v.shape) for k, v in flatten_with_names(params).items()}


def vit_table(spec: VitSpec) -> Table:
  """big_vision ViT -> ours: identity over exactly the keys our ViT has."""
  return [tables.same(k, k) for k in vit_shapes(spec)]


def import_vit(flat: Mapping[str, np.ndarray], *, prefix: str = "", pool_type: str | None = None,
               scan: bool | None = None, image_size: int | None = None,
               what: str = "big_vision import") -> tuple[dict[str, np.ndarray], VitSpec, list[str]]:
  """big_vision ViT params (a tree root, or the `prefix` subtree) -> (our flat fp32 params, spec, notes).

  `scan` None keeps the source layout; True/False gives scanned/unrolled layers.
  `image_size` is required for sincos2d posembs (no grid in the params).
  Every key must belong to the ViT: anything else raises ConversionError.
  """
  src_scanned = tables.is_scanned(flat)
  sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  rest = sorted(k for k in flat if not k.startswith(prefix))
  if rest:
    raise ConversionError(f"{what}: keys outside the ViT {prefix or 'root'!r}: {tables._fmt(rest)}")
  sub, notes = fix_legacy_names(tables.unscan(sub))
  spec = spec_from_params(sub, pool_type=pool_type, image_size=image_size, what=what)
  shapes = vit_shapes(spec)
  out = tables.apply(vit_table(spec), sub, "to_ours", what=what, expect=shapes)
  if scan if scan is not None else src_scanned:
    out = tables.scan(out)
  return {prefix + k: v for k, v in out.items()}, spec, notes


def save_npz(flat: Mapping[str, Any], path: str) -> None:
  arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  if storage.is_remote(path):  # zip in memory, then one upload (object stores cannot seek back)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with storage.open_file(path, "wb") as f:
      f.write(buf.getvalue())
    return
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """A big_vision .npz file or tensorstore checkpoint (step folder or prefix with -LAST) -> flat params."""
  from big_vision_lite.convert import tensorstore_ckpt
  if storage.exists(path) and not storage.isdir(path):
    return read_npz(path)
  if tensorstore_ckpt.is_checkpoint(path):
    return tensorstore_ckpt.read(path)
  raise ConversionError(f"{path}: neither a .npz file nor a big_vision tensorstore checkpoint")


def is_two_towers(flat: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith("img/") for k in flat) and any(k.startswith("txt/") for k in flat)


def towers_shapes(spec) -> dict[str, tuple[int, ...]]:
  """{key: shape} of our unrolled two-tower params for a towers.TowersSpec (abstract init)."""
  import flax
  import jax
  from big_vision_lite.checkpoint import flatten_with_names
  from big_vision_lite.convert import towers
  model = towers.build_ours(spec)
  x = jax.numpy.zeros((1, *spec.img.image_size, spec.img.in_chans))
  t = jax.numpy.zeros((1, spec.txt.max_len), jax.numpy.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))
  params = flax.linen.meta.unbox(abstract["params"])
  return {k: tuple(v.shape) for k, v in flatten_with_names(params).items()}


def import_two_towers(flat: Mapping[str, np.ndarray], *, scan: bool | None = None,
                      image_pool_type: str | None = None, text_pool_type: str | None = None,
                      image_size: int | None = None, what: str = "big_vision import"
                      ) -> tuple[dict[str, np.ndarray], Any, list[str]]:
  """big_vision SigLIP/LiT two-tower params (img/, txt/, t, b) -> (our flat fp32 params, TowersSpec, notes).

  The text tower keeps big_vision's text_transformer names (ours are the same);
  the image tower gets the ViT legacy-name fixes. Unknown keys raise ConversionError.
  """
  from big_vision_lite.convert import towers
  src_scanned = tables.is_scanned(flat)
  img, txt, rest = towers.split(tables.unscan(flat), what)
  img, notes = fix_legacy_names(img)
  unrolled = {**{f"img/{k}": v for k, v in img.items()}, **{f"txt/{k}": v for k, v in txt.items()}, **rest}
  spec = towers.spec_from_params(unrolled, dict(image=dict(pool_type=image_pool_type) if image_pool_type else {},
                                                text=dict(pool_type=text_pool_type) if text_pool_type else {}),
                                 image_size=image_size, what=what)
  shapes = towers_shapes(spec)
  out = tables.apply([tables.same(k, k) for k in shapes], unrolled, "to_ours", what=what, expect=shapes)
  if scan if scan is not None else src_scanned:
    out = tables.scan(out)
  return out, spec, [f"img/{n}" for n in notes]
