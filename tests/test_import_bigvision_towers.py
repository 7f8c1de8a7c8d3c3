"""Import of big_vision SigLIP two-tower checkpoints (.npz and tensorstore, scanned or unrolled, bf16) as
model_init: the loaded model reproduces the source's embeddings and logits; unknown keys fail naming them."""

import flax
import jax
import ml_dtypes
import numpy as np
import pytest

from bigvision_npz import import_with_cli

from big_vision_lite import pretrained
from big_vision_lite.checkpoint import flatten_with_names
from big_vision_lite.convert import ConversionError, bigvision, tables, towers
from big_vision_lite.convert.__main__ import main
from big_vision_lite.models import two_towers

ts = pytest.importorskip("tensorstore")

L = 8
KW = dict(image=dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4, pool_type="map"),
          text=dict(width=32, depth=2, num_heads=4, mlp_dim=64, vocab_size=40, pool_type="last"),
          out_dim=(None, 32))
X = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
T = np.random.default_rng(1).integers(0, 40, (3, L)).astype(np.int32)


def init(model, seed):
  return flax.linen.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), X, T)["params"])


def apply(model, params):
  zi, zt, out = jax.jit(lambda p: model.apply({"params": p}, X, T))(params)
  return np.asarray(out["t"] * zi @ zt.T + out["b"])


@pytest.fixture(scope="module")
def source():
  """Random two-tower params (bf16-exact values) and their logits (the reference)."""
  model = two_towers.two_towers(**KW)
  rng = np.random.default_rng(2)
  flat = {k: (0.3 * rng.standard_normal(np.shape(v))).astype(ml_dtypes.bfloat16).astype(np.float32)
          for k, v in flatten_with_names(init(model, 0)).items()}
  flat["t"], flat["b"] = np.array([np.log(10.0)], np.float32), np.array([-10.0], np.float32)
  return flat, apply(model, tables.nest(flat))


def write_tensorstore(prefix, flat, step=1000):
  """big_vision's save_checkpoint_ts layout: <prefix>-<step:09d>/params~a~b zarr arrays + <prefix>-LAST."""
  step_dir = f"{prefix}-{step:09d}"
  for k, v in {**{f"params/{k}": v for k, v in flat.items()}, "opt/mu/x": np.zeros(2, np.float32)}.items():
    # The text tower as bf16, as a bf16 training run writes it.
    v = v.astype(ml_dtypes.bfloat16) if k.startswith("params/txt/") else v
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": f"{step_dir}/{k.replace('/', '~')}"}},
                  create=True, dtype=ts.bfloat16 if v.dtype == ml_dtypes.bfloat16 else ts.float32,
                  shape=v.shape).result()
    arr.write(v).result()
  with open(f"{prefix}-LAST", "w") as f:
    f.write(f"{step:09d}")


@pytest.mark.parametrize("fmt,src_scan,tgt_scan,verify", [("ts", True, False, True), ("npz", False, True, False)])
def test_two_towers_round_trip_as_model_init(tmp_path, source, fmt, src_scan, tgt_scan, verify):
  flat, ref = source
  src = tables.scan(flat) if src_scan else flat
  if fmt == "ts":
    path = str(tmp_path / "checkpoint.bv")
    write_tensorstore(path, src)
  else:
    path = str(tmp_path / "bv.npz")
    np.savez(path, **{f"params/{k}": v for k, v in src.items()})
  out = tmp_path / "init.npz"
  assert main(["--from", "bigvision", "--in", path, "--out", str(out),
               "--scan" if tgt_scan else "--no-scan", "--verify" if verify else "--no-verify"]) == 0
  model = two_towers.two_towers(**{**KW, "image": {**KW["image"], "scan": tgt_scan},
                                   "text": {**KW["text"], "scan": tgt_scan}})
  loaded, report = pretrained.load_pretrained(init(model, 7), str(out))  # what config.model_init does
  assert not report.missing and not report.unexpected and not report.mismatched
  np.testing.assert_allclose(apply(model, loaded), ref, atol=1e-4, rtol=0)


def test_tensorstore_vit_and_errors(tmp_path, source):
  flat, _ = source
  img = {k[4:]: v for k, v in flat.items() if k.startswith("img/")}
  write_tensorstore(str(tmp_path / "vit"), img)
  read = bigvision.read_checkpoint(str(tmp_path / "vit"))  # the prefix: follows vit-LAST
  assert set(read) == set(img)  # params only, opt/ ignored
  converted, spec, _ = bigvision.import_vit(read)
  assert spec.pool_type == "map" and spec.depth == 2
  np.testing.assert_array_equal(converted["MAPHead_0/probe"], img["MAPHead_0/probe"])
  with pytest.raises(ConversionError, match="unmapped.*txt/Encoder_0/encoderblock_0/adapter/kernel"):
    bigvision.import_two_towers({**flat, "txt/Encoder_0/encoderblock_0/adapter/kernel": np.zeros((2, 2))})
  with pytest.raises(ConversionError, match="nothing: neither a .npz file nor a big_vision tensorstore"):
    bigvision.read_checkpoint(str(tmp_path / "nothing"))
  spec2 = towers.spec_from_params(flat)
  assert spec2.txt.max_len == L and spec2.txt.pool_type == "last" and spec2.has_bias


@pytest.mark.slow  # ~1 min: import, then train from it
def test_sincos2d_image_tower_imports_with_image_size(tmp_path):
  """SigLIP with a sincos2d image tower: --image_size gives the grid; the import equals the .npz as model_init."""
  kw = {**KW, "image": {**KW["image"], "posemb": "sincos2d"}}
  model = two_towers.two_towers(**kw)
  flat = {k: np.asarray(v) for k, v in flatten_with_names(init(model, 0)).items()}
  flat["t"], flat["b"] = np.array([np.log(10.0)], np.float32), np.array([-10.0], np.float32)
  imported, direct = import_with_cli(tmp_path, flat, init(model, 7), "--image_size", "16")
  np.testing.assert_allclose(apply(model, imported), apply(model, direct), rtol=1e-6, atol=0)
  np.testing.assert_allclose(apply(model, imported), apply(model, tables.nest(flat)), rtol=1e-6, atol=0)
