"""End-to-end conversions: workdir checkpoint -> target folder (+ parity check), file -> model_init .npz."""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from big_vision_lite import storage
from big_vision_lite.convert import bigvision, tables, timm_vit, towers
from big_vision_lite.convert import vit as cv
from big_vision_lite.convert.tables import ConversionError, UnsupportedExport

TARGETS = ("timm", "transformers", "open_clip")
ATOL = 1e-4  # What the transformers converters assert in fp32.
# Top-level params of a SigLIP 2 run (two_towers_decoder) that only training uses: the LocCa
# decoder, the self-distillation heads and masked prediction's mask token.
TRAINING_ONLY = ("decoder", "distill_global", "distill_patch", "distill_mask_token")
# TwoTowers' fields: what of a two_towers_decoder config.model the inference model takes.
TOWER_FIELDS = ("image", "text", "image_model", "text_model", "out_dim", "temperature_init",
                "bias_init")


def read_run(workdir: str, step: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(the run's config.json as a dict, flat params of `step` or the latest complete step)."""
  from big_vision_lite import pretrained
  cfg_path = storage.join(workdir, "config.json")
  if not storage.exists(cfg_path):
    raise ConversionError(f"{cfg_path} does not exist (the trainer writes it): is {workdir} a workdir?")
  config = json.loads(storage.read_text(cfg_path))
  path = workdir if step is None else storage.join(workdir, "checkpoints", str(step))
  if step is not None and not storage.isdir(path):
    have = sorted(storage.listdir(storage.join(workdir, "checkpoints"))) if storage.isdir(
        storage.join(workdir, "checkpoints")) else []
    raise ConversionError(f"no checkpoint for step {step}: {path} does not exist (have: {have})")
  return config, pretrained.read_params(path)


def image_size_from_pp(config: Mapping[str, Any]) -> int | None:
  """The last fixed size a preprocessing string resizes/crops to, e.g. 'resize(32)' -> 32."""
  pps = [config.get("input", {}).get("pp") or ""]
  pps += [e.get("pp") or "" for e in (config.get("evals") or {}).values() if isinstance(e, dict)]
  for pp in pps:
    sizes = re.findall(r"(?:resize|central_crop|random_crop|inception_crop|resize_small)\((\d+)", pp)
    if sizes:
      return int(sizes[-1])
  return None


def eval_crop_from_pp(config: Mapping[str, Any]) -> tuple[str, float]:
  """timm (crop_mode, crop_pct) of the run's eval resize: `resize(S)` squashes, `resize_small|central_crop` crops."""
  pps = [e.get("pp") or "" for e in (config.get("evals") or {}).values() if isinstance(e, dict)]
  for pp in pps + [config.get("input", {}).get("pp") or ""]:
    small = re.search(r"resize_small\((\d+)", pp)
    crop = re.search(r"central_crop\((\d+)", pp)
    if small and crop:
      return "center", int(crop.group(1)) / int(small.group(1))
    if re.search(r"(?:^|\|)resize\(", pp):
      return "squash", 1.0
  return "squash", 1.0


def vit_subtree(config: Mapping[str, Any], flat: Mapping[str, np.ndarray],
                subtree: str | None) -> tuple[str, dict[str, Any], Any]:
  """(key prefix of the ViT, its model kwargs from the config, our full module or None).

  The full module is returned only when the whole model is the ViT, so the
  parity check runs the configured model itself (scan, variant and all).
  """
  from big_vision_lite import models
  name, kw = config.get("model_name", "vit"), dict(config.get("model") or {})
  if subtree is None:
    subtree = "" if name == "vit" else "img"
  if not subtree:
    if name != "vit":
      raise ConversionError(f"model {name!r} is not a ViT: pass --subtree (e.g. img)")
    # Parity in fp32 and without remat: the export is fp32.
    module = models.get_model(name, **{**kw, "dtype_mm": "float32", "remat_policy": "none", "dropout": 0.0})
    return "", kw, module
  prefix = subtree.rstrip("/") + "/"
  if not any(k.startswith(prefix) for k in flat):
    raise ConversionError(f"no params under {subtree!r} (top-level: {sorted({k.split('/')[0] for k in flat})})")
  # Tower kwargs: config.model.<subtree> or config.model.image (two-tower convention).
  tower = kw.get(subtree) or kw.get("image") or {}
  return prefix, dict(tower) if isinstance(tower, dict) else {}, None


def export_run(workdir: str, out: str, *, to: str = "timm", step: int | None = None,
               subtree: str | None = None, image_size: int | None = None, verify: bool = True,
               atol: float = ATOL, log=print) -> dict[str, Any]:
  """Exports a run's checkpoint to `to`; returns {'out', 'max_abs_diff' (if verified), ...}."""
  if to not in TARGETS:
    raise ConversionError(f"unknown target {to!r} (this build supports: {', '.join(TARGETS)})")
  try:
    config, flat = read_run(workdir, step)
  except storage.StorageError as e:
    raise ConversionError(str(e)) from None
  # A remote --out (gs://...): written and verified in a local staging folder, uploaded only
  # when everything passed. A local --out is written in place, as before.
  with _staged(out) as local:
    result = _export_run(config, flat, workdir, local, to=to, subtree=subtree, image_size=image_size,
                         verify=verify, atol=atol, log=log, location=None if local == out else out)
  if local != out:
    result["out"] = out
    log(f"uploaded to {out}")
    if to == "open_clip":
      log(f"note: open_clip_config.json names the vision trunk local-dir:{out.rstrip('/')}/timm: after "
          "downloading the folder to D, set vision_cfg.timm_model_name to local-dir:D/timm")
  return result


@contextlib.contextmanager
def _staged(out: str):
  if not storage.is_remote(out):
    yield out
    return
  try:
    with storage.local_dir(out) as local:
      yield local
  except storage.StorageError as e:
    raise ConversionError(f"cannot upload the export: {e}") from None


def _export_run(config, flat, workdir: str, out: str, *, to: str, subtree: str | None,
                image_size: int | None, verify: bool, atol: float, log,
                location: str | None = None) -> dict[str, Any]:
  if to in ("transformers", "open_clip"):
    return export_towers(config, flat, out, to=to, image_size=image_size, verify=verify, atol=atol,
                         log=log, what=workdir, location=location)
  if (config.get("model") or {}).get("image_model") == "naflex_vit" and (subtree or "img") == "img":
    raise UnsupportedExport("--to timm: model.image_model='naflex_vit' (SigLIP 2 NaFlex) has no timm "
                            "model; export it with --to transformers (Siglip2Model)")
  prefix, kw, module = vit_subtree(config, flat, subtree)
  sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if not prefix and (others := sorted(set(flat) - set(sub))):
    raise ConversionError(f"unmapped keys: {tables._fmt(others)}")
  spec = cv.spec_from_params(sub, pool_type=kw.get("pool_type"), norm_eps=kw.get("norm_eps", 1e-6),
                             image_size=image_size or (None if "pos_embedding" in tables.unscan(sub)
                                                       else image_size_from_pp(config)),
                             what=f"{workdir}{'/' + prefix if prefix else ''}")
  cfg = timm_vit.export(sub, spec, out, *eval_crop_from_pp(config))
  log(f"wrote {out}/model.safetensors and config.json (timm {cfg['architecture']} with "
      f"{json.dumps(cfg['model_args'])})")
  result: dict[str, Any] = dict(out=out, spec=spec, hub_config=cfg)
  if verify:
    result["max_abs_diff"] = diff = verify_timm(sub, spec, out, module=module)
    log(f"verify: max |ours - timm| = {diff:.3g} (limit {atol:g})")
    if not diff <= atol:
      raise ConversionError(f"parity check failed: max abs diff {diff:.3g} > {atol:g}")
  return result


def inference_model(config: Mapping[str, Any], flat: Mapping[str, np.ndarray], *, to: str,
                    log=print) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(the two towers' params, their TwoTowers kwargs) of a two_towers or SigLIP 2
  (two_towers_decoder) run; for the latter, says in one line which training-only params are
  left out."""
  from big_vision_lite.models import PLATFORM_KEYS
  name = config.get("model_name")
  # The trainer records the platform layer's choices in config.model; no module takes them.
  model_cfg = {k: v for k, v in dict(config.get("model") or {}).items() if k not in PLATFORM_KEYS}
  if name == "two_towers":
    return dict(flat), model_cfg
  if name != "two_towers_decoder":
    raise UnsupportedExport(f"--to {to} exports two-tower runs (SigLIP: two_towers, SigLIP 2: "
                            f"two_towers_decoder); model_name is {name!r} (use --to timm)")
  kept, dropped = {}, {}
  for k, v in flat.items():
    top = k.split("/")[0]
    if top in TRAINING_ONLY:
      dropped[top] = dropped.get(top, 0) + int(np.size(v))
    else:
      kept[k] = v
  if dropped:
    log("left out (training only, not part of the inference model): "
        + ", ".join(f"{k} ({n:,} params)" for k, n in dropped.items()))
  return kept, {k: v for k, v in model_cfg.items() if k in TOWER_FIELDS}


def export_towers(config: Mapping[str, Any], flat: Mapping[str, np.ndarray], out: str, *, to: str,
                  image_size: int | None = None, verify: bool = True, atol: float = ATOL, log=print,
                  what: str = "run", location: str | None = None) -> dict[str, Any]:
  """A two_towers (or SigLIP 2) run's params -> a transformers SiglipModel / Siglip2Model or
  open_clip folder (+ parity check).

  SigLIP 2 with a fixed-resolution ViT is a plain SigLIP model (transformers loads
  google/siglip2-*-patch16-256 as SiglipModel); its NaFlex tower is Siglip2Model.
  `location`: where `out`, a staging folder, is uploaded to; the files name it, not `out`.
  """
  from big_vision_lite.convert import hf_siglip, open_clip_siglip
  flat, model_cfg = inference_model(config, flat, to=to, log=log)
  image_model = model_cfg.get("image_model", "vit")
  if image_model == "naflex_vit":
    if to != "transformers":
      raise UnsupportedExport(f"--to {to}: model.image_model='naflex_vit' (SigLIP 2 NaFlex) has no "
                              f"{to} model; export it with --to transformers (Siglip2Model)")
    return export_naflex(config, flat, model_cfg, out, verify=verify, atol=atol, log=log,
                         what=what, location=location)
  if image_model != "vit":
    raise UnsupportedExport(f"model.image_model={image_model!r}: --to {to} exports a 'vit' or "
                            "'naflex_vit' image tower")
  learned = "img/pos_embedding" in tables.unscan(flat)
  spec = towers.spec_from_params(flat, model_cfg, what=what,
                                 image_size=image_size or (None if learned else image_size_from_pp(config)))
  tok = hf_siglip.tokenizer_from_config(config)
  lib = hf_siglip if to == "transformers" else open_clip_siglip
  eos = hf_siglip.tokenize_eos_from_config(config)
  _, notes = (lib.export(flat, spec, out, tokenizer=tok, eos=eos) if to == "transformers"
              else lib.export(flat, spec, out, tokenizer=tok, location=location))
  load = ('transformers.SiglipModel.from_pretrained(OUT)' if to == "transformers"
          else 'open_clip.create_model_and_transforms("local-dir:OUT")')
  log(f"wrote {location or out} ({to}; load with {load}): image {spec.img.image_size} patch {spec.img.patch} "
      f"width {spec.img.width}, text len {spec.txt.max_len} vocab {spec.txt.vocab_size}")
  for n in notes:
    log(f"note: {n}")
  result: dict[str, Any] = dict(out=out, spec=spec)
  if verify:
    images, texts = towers.fixed_inputs(spec)
    ours = towers.run_ours(flat, towers.build_ours(spec, model_cfg), images, texts)
    theirs = lib.load(out)
    diffs = towers.max_diff(ours, lib.run_torch(theirs, images, texts), to)
    if to == "transformers" and tok is not None:
      diffs.update(_verify_processor(flat, spec, model_cfg, theirs, out, tok, eos))
    _check_parity(result, diffs, to, atol, log)
  if to == "open_clip" and location:
    open_clip_siglip.relocate(out, location)  # after the check, which loads the staged folder
  return result


def export_naflex(config: Mapping[str, Any], flat: Mapping[str, np.ndarray],
                  model_cfg: Mapping[str, Any], out: str, *, verify: bool = True,
                  atol: float = ATOL, log=print, what: str = "run",
                  location: str | None = None) -> dict[str, Any]:
  """Two towers with a NaFlex image tower -> a transformers Siglip2Model folder with its
  Siglip2Processor files (+ parity check on our NaFlex arrays and through the processor)."""
  from big_vision_lite.convert import hf_siglip, hf_siglip2
  icfg, tcfg = dict(model_cfg.get("image") or {}), dict(model_cfg.get("text") or {})
  img, txt_p, rest = towers.split(flat, what)
  if "t" not in rest:
    raise ConversionError(f"{what}: no 't' (log-temperature) param")
  if icfg.get("pool_type", "map") != "map":
    raise UnsupportedExport(f"model.image.pool_type={icfg['pool_type']!r}: transformers' "
                            "Siglip2VisionModel pools with its MAP head only (use 'map')")
  query = tables.unscan(img).get(f"{cv.ENC}_0/MultiHeadDotProductAttention_0/query/kernel")
  if query is None:
    raise ConversionError(f"{what}/img: no {cv.ENC}_0 attention params: not a NaFlex ViT")
  vspec = hf_siglip2.vision_spec(img, num_heads=int(query.shape[1]),
                                 norm_eps=icfg.get("norm_eps", 1e-6))
  txt = towers.text_spec_from_params(txt_p, pool_type=tcfg.get("pool_type"),
                                     norm_eps=tcfg.get("norm_eps", 1e-6), what=f"{what}/txt")
  if txt.pool_type != "last":
    raise UnsupportedExport(f"model.text.pool_type={txt.pool_type!r}: transformers' "
                            "Siglip2TextModel pools the last token (use 'last')")
  budget = hf_siglip2.max_num_patches_from_config(config)
  if budget is None:
    raise UnsupportedExport("no naflex_patches(P, N) op in the run's input.pp: the export cannot "
                            "tell Siglip2ImageProcessor's max_num_patches")
  tok, eos = hf_siglip.tokenizer_from_config(config), hf_siglip.tokenize_eos_from_config(config)
  _, notes = hf_siglip2.export(flat, vspec, txt, "b" in rest, out, max_num_patches=budget,
                               tokenizer=tok, eos=eos)
  log(f"wrote {location or out} (transformers; load with transformers.Siglip2Model."
      f"from_pretrained(OUT)): NaFlex patch {vspec['patch']} budget {budget} posemb grid "
      f"{vspec['grid']} width {vspec['width']}, text len {txt.max_len} vocab {txt.vocab_size}")
  for n in notes:
    log(f"note: {n}")
  result: dict[str, Any] = dict(out=out, vision_spec=vspec, text_spec=txt)
  if verify:
    model = hf_siglip2.load(out)
    ours_model = towers.build_ours(None, model_cfg)
    patches, texts = hf_siglip2.fixed_patches(vspec["patch"], budget), towers.fixed_texts(txt)
    diffs = towers.max_diff(towers.run_ours(flat, ours_model, patches, texts),
                            hf_siglip2.run_model(model, *patches, texts), "transformers")
    if tok is not None:  # the processor as users call it, on images it keeps at their size
      from big_vision_lite.data import ops_text
      images = hf_siglip2.exact_size_images(vspec["patch"], budget, n=len(hf_siglip.VERIFY_TEXTS))
      ids = np.stack([ops_text.tokenize_text(t, tok[1], tok[0], eos=eos)
                      for t in hf_siglip.VERIFY_TEXTS])
      ours = towers.run_ours(flat, ours_model, hf_siglip2.naflex_arrays(images, vspec["patch"], budget),
                             ids)
      theirs = hf_siglip2.run_processor(model, out, list(hf_siglip.VERIFY_TEXTS), images,
                                         vspec["patch"], budget, tok[1])
      diffs.update({f"processor/{k}": v for k, v in
                    towers.max_diff(ours, theirs, "transformers processor").items()})
    _check_parity(result, diffs, "transformers", atol, log)
  return result


def verify_timm(flat: Mapping[str, np.ndarray], spec: cv.VitSpec, out: str, module: Any = None) -> float:
  """Runs ours and the exported timm model (loaded from `out`) on fixed inputs; max abs diff."""
  images = cv.fixed_images(spec)
  ours = cv.run_ours(flat, spec, images, model=module)
  theirs = timm_vit.run_torch(timm_vit.load(out), images)
  if ours.shape != theirs.shape:
    raise ConversionError(f"parity: output shapes differ, ours {ours.shape} vs timm {theirs.shape}")
  return float(np.max(np.abs(ours - theirs)))


def import_file(src: str, out: str, *, kind: str = "bigvision", scan: bool | None = None,
                subtree: str = "", pool_type: str | None = None, image_size: int | None = None,
                verify: bool = True, log=print) -> dict[str, Any]:
  """A big_vision .npz (or a timm export folder) -> `out` .npz loadable as config.model_init.

  `image_size` is needed for a sincos2d posemb, whose grid the params do not hold.
  """
  if kind not in ("bigvision", "timm"):
    raise ConversionError(f"unknown import kind {kind!r} (bigvision, timm)")
  try:
    # timm folders are read by safetensors and timm from a local path: a remote one is downloaded.
    with (storage.local_copy(src) if kind == "timm" else contextlib.nullcontext(src)) as local_src:
      return _import_file(local_src, out, kind=kind, scan=scan, subtree=subtree, pool_type=pool_type,
                          image_size=image_size, verify=verify, log=log)
  except storage.StorageError as e:
    raise ConversionError(str(e)) from None


def _import_file(src: str, out: str, *, kind: str, scan: bool | None, subtree: str, pool_type: str | None,
                 image_size: int | None, verify: bool, log) -> dict[str, Any]:
  prefix = subtree.rstrip("/") + "/" if subtree else ""
  if kind == "bigvision":
    flat = bigvision.read_checkpoint(src)
    if not prefix and bigvision.is_two_towers(flat):
      return _import_two_towers(flat, src, out, scan=scan, pool_type=pool_type, image_size=image_size,
                                verify=verify, log=log)
    converted, spec, notes = bigvision.import_vit(flat, prefix=prefix, pool_type=pool_type, scan=scan,
                                                  image_size=image_size, what=src)
    source = {k[len(prefix):]: v for k, v in bigvision.fix_legacy_names(
        tables.unscan({k[len(prefix):]: v for k, v in flat.items()}))[0].items()}
  elif kind == "timm":
    spec, converted = _import_timm_dir(src, scan=scan)
    notes, source = [], None
    converted = {prefix + k: v for k, v in converted.items()}
  else:
    raise ConversionError(f"unknown import kind {kind!r} (bigvision, timm)")
  for n in notes:
    log(f"renamed: {n}")
  bigvision.save_npz(converted, out)
  log(f"wrote {out}: {len(converted)} arrays, ViT width {spec.width} depth {spec.depth} "
      f"heads {spec.num_heads} pool {spec.pool_type} posemb {spec.posemb}, "
      f"{'scanned' if tables.is_scanned(converted) else 'unrolled'} layers")
  result: dict[str, Any] = dict(out=out, spec=spec)
  if verify:
    sub = {k[len(prefix):]: v for k, v in converted.items()}
    images = cv.fixed_images(spec)
    # Our model with the imported params vs the source model (timm, or our
    # unrolled ViT on the original big_vision arrays).
    from big_vision_lite.models import vit as vit_lib
    model = vit_lib.vit(**{**spec.model_kwargs(), "scan": tables.is_scanned(sub)})
    ours = cv.run_ours(sub, spec, images, model=model)
    ref = (timm_vit.run_torch(timm_vit.load(src), images) if kind == "timm"
           else cv.run_ours(source, spec, images))
    result["max_abs_diff"] = diff = float(np.max(np.abs(ours - ref)))
    log(f"verify: max |imported - source| = {diff:.3g} (limit {ATOL:g})")
    if not diff <= ATOL:
      raise ConversionError(f"parity check failed: max abs diff {diff:.3g} > {ATOL:g}")
  return result


def _verify_processor(flat, spec, model_cfg, model, out: str, tok: tuple[str, int], eos: str) -> dict[str, float]:
  """The exported SiglipProcessor + model, called as users do, vs ours on the same captions and images."""
  from big_vision_lite.convert import hf_siglip
  from big_vision_lite.data import ops_text
  h, w = spec.img.image_size
  # Images at the model size (the processor's resize is then the identity) in uint8, as users pass.
  pixels = np.random.default_rng(0).integers(0, 256, (len(hf_siglip.VERIFY_TEXTS), h, w, 3), dtype=np.uint8)
  ids = np.stack([ops_text.tokenize_text(t, tok[1], tok[0], eos=eos) for t in hf_siglip.VERIFY_TEXTS])
  ours = towers.run_ours(flat, towers.build_ours(spec, model_cfg), pixels.astype(np.float32) / 127.5 - 1, ids)
  theirs = hf_siglip.run_processor(model, out, list(hf_siglip.VERIFY_TEXTS), pixels)
  return {f"processor/{k}": v for k, v in towers.max_diff(ours, theirs, "transformers processor").items()}


def _import_two_towers(flat: Mapping[str, np.ndarray], src: str, out: str, *, scan: bool | None,
                       pool_type: str | None, verify: bool, image_size: int | None = None,
                       log=print) -> dict[str, Any]:
  converted, spec, notes = bigvision.import_two_towers(flat, scan=scan, text_pool_type=pool_type,
                                                       image_size=image_size, what=src)
  for n in notes:
    log(f"renamed: {n}")
  bigvision.save_npz(converted, out)
  kw = spec.model_kwargs()
  log(f"wrote {out}: {len(converted)} arrays, two towers ({'scanned' if tables.is_scanned(converted) else 'unrolled'}"
      f" layers); config.model for it: {json.dumps(kw)}")
  result: dict[str, Any] = dict(out=out, spec=spec, model_kwargs=kw)
  if verify:
    # Our model with the imported params (target layout) vs the source arrays in an unrolled model.
    source, _, _ = bigvision.import_two_towers(flat, scan=False, text_pool_type=pool_type,
                                               image_size=image_size, what=src)
    images, texts = towers.fixed_inputs(spec)
    ours = towers.run_ours(converted, towers.build_ours(spec, scan=tables.is_scanned(converted)), images, texts)
    ref = towers.run_ours(source, towers.build_ours(spec), images, texts)
    result["max_abs_diff"] = diff = max(towers.max_diff(ours, ref, "source").values())
    log(f"verify: max |imported - source| = {diff:.3g} (limit {ATOL:g})")
    if not diff <= ATOL:
      raise ConversionError(f"parity check failed: max abs diff {diff:.3g} > {ATOL:g}")
  return result


def _import_timm_dir(path: str, scan: bool | None) -> tuple[cv.VitSpec, dict[str, np.ndarray]]:
  from safetensors.numpy import load_file
  with open(os.path.join(path, "config.json")) as f:
    args = json.load(f)["model_args"]
  pool = {v: k for k, v in timm_vit.TIMM_POOL.items()}[args["global_pool"]]
  sd = load_file(os.path.join(path, "model.safetensors"))
  posemb = "learn"
  mlp_dim = int(args["embed_dim"] * args["mlp_ratio"])
  patch = tuple(args["patch_size"]) if isinstance(args["patch_size"], list) else (args["patch_size"],) * 2
  img = tuple(args["img_size"]) if isinstance(args["img_size"], list) else (args["img_size"],) * 2
  spec = cv.VitSpec(width=args["embed_dim"], depth=args["depth"], num_heads=args["num_heads"],
                    mlp_dim=mlp_dim, patch=patch, in_chans=args.get("in_chans", 3),
                    grid=(img[0] // patch[0], img[1] // patch[1]), pool_type=pool, posemb=posemb,
                    num_classes=args.get("num_classes", 0), rep_size=0)
  return spec, timm_vit.from_state_dict(sd, spec, scan=bool(scan), what=f"{path}")


def _check_parity(result: dict, diffs: dict[str, float], to: str, atol: float, log) -> None:
  """Records the parity check's differences in `result`, logs them, raises past `atol`."""
  result["diffs"] = diffs
  result["max_abs_diff"] = diff = max(diffs.values())
  log(f"verify: max |ours - {to}| = {diff:.3g} (limit {atol:g}; "
      + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()) + ")")
  if not diff <= atol:
    raise ConversionError(f"parity check failed: max abs diff {diff:.3g} > {atol:g}")
