"""Export of our ViT to timm: strict load in timm, outputs within 1e-4, loud key errors, CLI on a
sharded bf16 checkpoint of a chosen step."""

import json

import flax
import jax
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")
from big_vision_lite.convert import torch_env  # noqa: E402

torch_env.setup()  # Before timm: declares the torchvision ops its CUDA wheel cannot load.
pytest.importorskip("timm")
pytest.importorskip("safetensors")

from big_vision_lite.checkpoint import Checkpointer, flatten_with_names  # noqa: E402
from big_vision_lite.convert import ConversionError, tables, timm_vit  # noqa: E402
from big_vision_lite.convert import vit as cv  # noqa: E402
from big_vision_lite.convert.__main__ import main  # noqa: E402
from big_vision_lite.models import vit as vit_lib  # noqa: E402

KW = dict(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=4, head_zeroinit=False)


def random_params(model, seed=0, size=16, scale=0.3):
  """Init shapes, then random values everywhere (zero inits would hide transposition bugs)."""
  x = np.zeros((1, size, size, 3), np.float32)
  p = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), x)["params"])
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.standard_normal(np.shape(v))).astype(np.float32)
          for k, v in flatten_with_names(p).items()}


@pytest.mark.parametrize("pool,posemb,scan,classes", [
    ("gap", "sincos2d", False, 5),
    pytest.param("map", "learn", False, 0, marks=pytest.mark.slow),
    pytest.param("tok", "learn", True, 5, marks=pytest.mark.slow),
    pytest.param("none", "learn", False, 3, marks=pytest.mark.slow)])
def test_export_loads_in_timm_and_matches(tmp_path, pool, posemb, scan, classes):
  model = vit_lib.vit(**KW, pool_type=pool, posemb=posemb, scan=scan, num_classes=classes)
  flat = random_params(model)
  spec = cv.spec_from_params(flat, pool_type=pool, image_size=16)
  timm_vit.export(flat, spec, str(tmp_path))
  tm = timm_vit.load(str(tmp_path))  # timm.create_model("local-dir:...", pretrained=True): strict.
  images = cv.fixed_images(spec)
  ours = cv.run_ours(flat, spec, images, model=model)
  theirs = timm_vit.run_torch(tm, images)
  assert ours.shape == theirs.shape
  assert np.abs(ours).max() > 0.1  # a real signal, not zeros
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # Same table backwards: timm -> ours gives the exact params back, in the source layout.
  back = timm_vit.from_state_dict(tm.state_dict(), spec, scan=scan)
  assert set(back) == set(flat)
  for k in flat:
    np.testing.assert_array_equal(back[k], flat[k], err_msg=k)


def test_gelu_form_matters(tmp_path):
  # Exact-erf GELU (timm's default) must be measurably off: the tanh form is what makes parity.
  model = vit_lib.vit(**KW, pool_type="none", num_classes=0)  # per-token outputs: no averaging
  flat = random_params(model, scale=1.0)
  spec = cv.spec_from_params(flat, pool_type="none", image_size=16)
  assert timm_vit.model_args(spec)["act_layer"] == "gelu_tanh"
  import timm
  import torch
  args = {**timm_vit.model_args(spec), "act_layer": "gelu"}
  tm = timm.create_model(timm_vit.ARCHITECTURE, **args).eval()
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in timm_vit.to_state_dict(flat, spec).items()})
  images = cv.fixed_images(spec)
  diff = np.abs(timm_vit.run_torch(tm, images) - cv.run_ours(flat, spec, images, model=model)).max()
  assert diff > 1e-4


def test_unknown_and_missing_keys_are_named():
  model = vit_lib.vit(**KW, pool_type="gap", num_classes=5)
  flat = random_params(model)
  spec = cv.spec_from_params(flat, image_size=16)
  with pytest.raises(ConversionError, match="unmapped.*Transformer/extra/kernel"):
    timm_vit.to_state_dict({**flat, "Transformer/extra/kernel": np.zeros(3)}, spec)
  short = dict(flat)
  del short["head/bias"]
  with pytest.raises(ConversionError, match="source lacks: head/bias"):
    timm_vit.to_state_dict(short, spec)
  sd = timm_vit.to_state_dict(flat, spec)
  with pytest.raises(ConversionError, match="unmapped.*blocks.0.ls1.gamma"):
    timm_vit.from_state_dict({**sd, "blocks.0.ls1.gamma": np.zeros(32)}, spec)
  with pytest.raises(ConversionError, match="rep_size"):
    timm_vit.model_args(cv.spec_from_params({**flat, "pre_logits/kernel": np.zeros((32, 32)),
                                             "pre_logits/bias": np.zeros(32)}, image_size=16))


def test_mlp_ratio_is_exact_for_so400m():
  assert int(1152 * timm_vit.mlp_ratio(1152, 4304)) == 4304
  assert timm_vit.mlp_ratio(384, 1536) == 4.0


def test_cli_exports_chosen_step_of_sharded_bf16_checkpoint(tmp_path, capsys):
  cfg = dict(KW, pool_type="gap", posemb="sincos2d", num_classes=5, scan=True)
  model = vit_lib.vit(**cfg)
  mesh = jax.make_mesh((1, 8, 1, 1), ("data", "fsdp", "tensor", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  workdir = tmp_path / "run"
  with Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1) as ckpt:
    for step, seed in ((1, 1), (2, 2)):
      flat = random_params(model, seed=seed)
      # Step 1 trained in bf16, sharded over 8 devices on the embed (width 32) axis when it divides.
      dtype = ml_dtypes.bfloat16 if step == 1 else np.float32
      def put(v):
        spec = [None] * v.ndim
        if v.ndim and v.shape[-1] % 8 == 0:
          spec[-1] = "fsdp"
        return jax.device_put(v.astype(dtype), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
      params = tables.nest({k: put(v) for k, v in flat.items()})
      ckpt.save(step, {"params": params, "step": np.int32(step)}, force=True)
      ckpt.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(dict(
      model_name="vit", model={k: v for k, v in cfg.items()},
      input=dict(pp="decode|resize(16)|value_range(-1, 1)"))))
  out = tmp_path / "out"
  assert main(["--workdir", str(workdir), "--step", "1", "--to", "timm", "--out", str(out)]) == 0
  log = capsys.readouterr().out
  assert "verify: max |ours - timm|" in log
  assert json.loads((out / "config.json").read_text())["model_args"]["img_size"] == [16, 16]
  # The export holds step 1's (bf16-rounded) weights, not step 2's.
  from safetensors.numpy import load_file
  sd = load_file(str(out / "model.safetensors"))
  want = random_params(model, seed=1)["head/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(sd["head.weight"], want.T)
  assert sd["head.weight"].dtype == np.float32
  # A missing step is a one-line error naming it.
  assert main(["--workdir", str(workdir), "--step", "7", "--to", "timm", "--out", str(out)]) == 1
  assert "step 7" in capsys.readouterr().err
