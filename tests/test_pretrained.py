"""Tests for big_vision_lite.pretrained: partial loading from .npz and from our
checkpoints, posemb resampling against a NumPy bilinear reference."""

import os
import numpy as np

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vision_lite.checkpoint import CheckpointError, Checkpointer
from big_vision_lite.pretrained import LoadReport, _resample_posemb_grid, load_pretrained

AXES = ("data", "fsdp", "tensor", "expert")
DENSE = "Transformer/encoderblock_0/MlpBlock_0/Dense_0"


def bilinear_matrix(n_in, n_out):
  """Half-pixel-centre linear interpolation weights, edges clamped."""
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
    x0 = int(np.floor(x))
    x1 = min(x0 + 1, n_in - 1)
    w[i, x0] += 1 - (x - x0)
    w[i, x1] += x - x0
  return w


def ref_resample(posemb, n_new):
  g_old, g_new = int(np.sqrt(posemb.shape[1])), int(np.sqrt(n_new))
  grid = posemb[0].reshape(g_old, g_old, -1)
  m = bilinear_matrix(g_old, g_new)
  out = np.einsum("ai,bj,ijd->abd", m, m, grid)
  return out.reshape(1, n_new, -1)


@pytest.mark.parametrize("n_old,n_new", [(4, 16), (9, 25), (16, 4)])
def test_resample_posemb_grid_matches_numpy(n_old, n_new):
  x = np.random.RandomState(0).randn(1, n_old, 3).astype(np.float32)
  np.testing.assert_allclose(_resample_posemb_grid(x, n_new), ref_resample(x, n_new), rtol=1e-5, atol=1e-6)


def target_params():
  z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
  return {
      "Transformer": {"encoderblock_0": {"MlpBlock_0": {"Dense_0": {"kernel": z(4, 8), "bias": z(8)}}},
                      "encoder_norm": {"scale": np.ones(4, np.float32)}},
      "pos_embedding": z(1, 16, 4),
      "head": {"kernel": np.full((4, 3), 7, np.float32)},
  }


def test_load_npz_reports_missing_unexpected_and_resampled(tmp_path):
  rs = np.random.RandomState(1)
  ckpt = {
      f"{DENSE}/kernel": rs.randn(4, 8).astype(np.float32),
      f"{DENSE}/bias": rs.randn(8).astype(np.float32),
      "Transformer/encoder_norm/scale": rs.randn(4).astype(np.float32),
      "pos_embedding": rs.randn(1, 4, 4).astype(np.float32),
      "extra/unused": rs.randn(2).astype(np.float32),
  }
  path = tmp_path / "vit.npz"
  np.savez(path, **ckpt)
  params, report = load_pretrained(target_params(), str(path))
  assert isinstance(report, LoadReport)
  np.testing.assert_array_equal(params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"],
                                ckpt[f"{DENSE}/kernel"])
  np.testing.assert_array_equal(params["Transformer"]["encoder_norm"]["scale"], ckpt["Transformer/encoder_norm/scale"])
  np.testing.assert_allclose(params["pos_embedding"], ref_resample(ckpt["pos_embedding"], 16), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(params["head"]["kernel"], np.full((4, 3), 7))  # Kept init.
  assert report.missing == ["head/kernel"]
  assert report.unexpected == ["extra/unused"]
  assert report.reshaped == ["pos_embedding: (1, 4, 4) -> (1, 16, 4)"]
  assert sorted(report.loaded) == sorted([f"{DENSE}/kernel", f"{DENSE}/bias", "Transformer/encoder_norm/scale",
                                          "pos_embedding"])
  assert report.mismatched == []
  text = str(report)
  assert "Loaded 4 params" in text and "head/kernel" in text and "extra/unused" in text


def test_npz_params_prefix_subtree_and_mismatch(tmp_path):
  path = tmp_path / "bv.npz"
  np.savez(path, **{f"params/img/{DENSE}/kernel": np.ones((4, 9), np.float32),
                    f"params/img/{DENSE}/bias": np.ones(8, np.float32),
                    "opt/whatever": np.ones(1, np.float32)})
  with pytest.raises(CheckpointError, match=rf"{DENSE}/kernel: checkpoint \(4, 9\) vs target \(4, 8\)"):
    load_pretrained(target_params(), str(path), subtree="params/img")
  params, report = load_pretrained(target_params(), str(path), subtree="params/img", allow_mismatch=True)
  assert report.loaded == [f"{DENSE}/bias"] and len(report.mismatched) == 1
  np.testing.assert_array_equal(params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"], 0)
  with pytest.raises(CheckpointError, match="nothing under 'nope'"):
    load_pretrained(target_params(), str(path), subtree="nope")
  with pytest.raises(CheckpointError, match="does not exist"):
    load_pretrained(target_params(), str(tmp_path / "missing.npz"))


def test_load_from_our_checkpoint_onto_sharded_target(tmp_path):
  m = jax.make_mesh((2, 4, 1, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rs = np.random.RandomState(2)
  saved = {"img": {"pos_embedding": rs.randn(1, 4, 4).astype(np.float32),
                   "head": {"kernel": rs.randn(4, 3).astype(np.float32)}},
           "txt": {"emb": rs.randn(5, 4).astype(np.float32)}}
  state = {"params": jax.tree.map(lambda x: jax.device_put(x, NamedSharding(m, P())), saved),
           "opt_state": {"mu": jax.device_put(np.ones(3, np.float32), NamedSharding(m, P()))},
           "step": jax.device_put(np.int32(5), NamedSharding(m, P()))}
  c = Checkpointer(str(tmp_path), save_interval_steps=1)
  c.save(5, state)
  c.close()  # Waits for the async save.
  sharding = NamedSharding(m, P("fsdp"))
  target = {"pos_embedding": jax.device_put(np.zeros((1, 16, 4), np.float32), NamedSharding(m, P(None, "fsdp"))),
            "head": {"kernel": jax.device_put(np.zeros((4, 3), np.float32), sharding)},
            "new": np.zeros(2, np.float32)}
  for path in (tmp_path, tmp_path / "5", tmp_path / "5" / "state"):
    params, report = load_pretrained(target, str(path), subtree="img")
    np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), saved["img"]["head"]["kernel"])
    np.testing.assert_allclose(np.asarray(params["pos_embedding"]),
                               ref_resample(saved["img"]["pos_embedding"], 16), rtol=1e-5, atol=1e-6)
    assert params["head"]["kernel"].sharding == sharding
    assert report.missing == ["new"] and report.unexpected == []
    assert len(report.reshaped) == 1
  _, report = load_pretrained(target, str(tmp_path))
  assert "txt/emb" in report.unexpected and "img/head/kernel" in report.unexpected
  # A relative workdir (config.model_init=runs/vit) works too: Orbax itself wants absolute paths.
  here = os.getcwd()
  try:
    os.chdir(tmp_path.parent)
    params, _ = load_pretrained(target, tmp_path.name, subtree="img")
  finally:
    os.chdir(here)
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), saved["img"]["head"]["kernel"])
