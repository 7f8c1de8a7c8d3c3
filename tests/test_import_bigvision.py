"""Import of big_vision ViT .npz checkpoints (scanned or unrolled, legacy names) as model_init:
the loaded model reproduces the source model's outputs; unknown keys fail loudly."""

import flax
import jax
import numpy as np
import pytest

from bigvision_npz import import_with_cli

from big_vision_lite import pretrained
from big_vision_lite.checkpoint import flatten_with_names
from big_vision_lite.convert import ConversionError, bigvision, tables
from big_vision_lite.convert.__main__ import main
from big_vision_lite.models import vit as vit_lib

KW = dict(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=4, num_classes=5, head_zeroinit=False)
X = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def init(model, seed):
  return flax.linen.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), X)["params"])


def apply(model, params):
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, X)[0])(params))


@pytest.fixture(scope="module")
def source():
  """A map-pooled ViT with random params, and its outputs (the reference)."""
  model = vit_lib.vit(**KW, pool_type="map")
  params = init(model, 0)
  flat = {k: np.asarray(v) for k, v in flatten_with_names(params).items()}
  flat["head/kernel"] = np.random.default_rng(1).normal(size=flat["head/kernel"].shape).astype(np.float32)
  return flat, apply(model, tables.nest(flat))


@pytest.mark.parametrize("src_scan,tgt_scan,verify", [
    (True, False, True),
    pytest.param(False, True, False, marks=pytest.mark.slow),
    pytest.param(False, False, True, marks=pytest.mark.slow),
    pytest.param(True, True, True, marks=pytest.mark.slow)])
def test_npz_round_trip_as_model_init(tmp_path, source, src_scan, tgt_scan, verify):
  flat, ref = source
  src = tables.scan(flat) if src_scan else flat
  # big_vision's own layout: params/ beside opt/ state.
  np.savez(tmp_path / "bv.npz", **{f"params/{k}": v for k, v in src.items()}, **{"opt/mu": np.zeros(3)})
  out = tmp_path / "init.npz"
  scan_flag = "--scan" if tgt_scan else "--no-scan"
  assert main(["--from", "bigvision", "--in", str(tmp_path / "bv.npz"), "--out", str(out), scan_flag,
               "--verify" if verify else "--no-verify"]) == 0
  model = vit_lib.vit(**KW, pool_type="map", scan=tgt_scan)
  loaded, report = pretrained.load_pretrained(init(model, 7), str(out))  # what config.model_init does
  assert not report.missing and not report.unexpected and not report.mismatched
  np.testing.assert_allclose(apply(model, loaded), ref, atol=1e-5, rtol=0)


def test_legacy_names_and_cls_posemb_are_fixed():
  model = vit_lib.vit(**KW, pool_type="tok")
  flat = {k: np.asarray(v) for k, v in flatten_with_names(init(model, 0)).items()}
  flat["cls"] = np.full_like(flat["cls"], 0.5)
  ref = apply(model, tables.nest(flat))
  # vision_transformer-style names; posemb with a (zero) cls entry, added to cls on import.
  old = {}
  for k, v in flat.items():
    k = k.replace("MlpBlock_0", "MlpBlock_3").replace("LayerNorm_1", "LayerNorm_2")
    if k == "pos_embedding":
      k, v = "Transformer/posembed_input/pos_embedding", np.concatenate([np.zeros_like(v[:, :1]), v], 1)
    old[k] = v
  new, spec, notes = bigvision.import_vit(old)
  assert spec.pool_type == "tok" and len(notes) > 4
  assert set(new) == set(flat)
  np.testing.assert_allclose(apply(model, tables.nest(new)), ref, atol=1e-6)


def test_unknown_key_and_foreign_tree_fail_naming_the_key(tmp_path, source, capsys):
  flat, _ = source
  with pytest.raises(ConversionError, match="unmapped.*Transformer/encoderblock_0/adapter/kernel"):
    bigvision.import_vit({**flat, "Transformer/encoderblock_0/adapter/kernel": np.zeros((2, 2))})
  np.savez(tmp_path / "bad.npz", **{f"params/{k}": v for k, v in flat.items()}, **{"params/t": np.zeros(1)})
  assert main(["--from", "bigvision", "--in", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o.npz")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "unmapped" in err and "): t" in err
  with pytest.raises(ConversionError, match="keys outside the ViT 'img/'.*txt/x"):
    bigvision.import_vit({**{f"img/{k}": v for k, v in flat.items()}, "txt/x": np.zeros(1)}, prefix="img/")
  # The img tower of a two-tower checkpoint alone imports fine under its prefix.
  out, spec, _ = bigvision.import_vit({f"img/{k}": v for k, v in flat.items()}, prefix="img/")
  assert spec.pool_type == "map" and all(k.startswith("img/") for k in out)


def test_sincos2d_vit_imports_with_image_size(tmp_path):
  """A sincos2d ViT has no grid in its params: --image_size supplies it; the import equals the .npz as model_init."""
  model = vit_lib.vit(**KW, pool_type="gap", posemb="sincos2d")
  flat = {k: np.asarray(v) for k, v in flatten_with_names(init(model, 0)).items()}
  flat["head/kernel"] = np.random.default_rng(1).normal(size=flat["head/kernel"].shape).astype(np.float32)
  imported, direct = import_with_cli(tmp_path, flat, init(model, 7), "--image_size", "16")
  ref = apply(model, tables.nest(flat))
  # Same arrays in the same model: equal up to fp32 rounding of the same ops.
  np.testing.assert_allclose(apply(model, imported), apply(model, direct), rtol=1e-6, atol=0)
  np.testing.assert_allclose(apply(model, imported), ref, rtol=1e-6, atol=0)
