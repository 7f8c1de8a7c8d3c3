"""Config loading, `path:arg` parsing, overrides and every validation error."""

import os

import pytest

from big_vision_lite import config as config_lib
from big_vision_lite.config import ConfigDict, ConfigError

ROOT = os.path.dirname(os.path.dirname(__file__))
SHAPES = os.path.join(ROOT, "configs", "vit_shapes.py")
I1K = os.path.join(ROOT, "configs", "vit_i1k.py")


def test_parse_arg_types():
  args = config_lib.parse_arg("variant=B/16,res=384,lr=0.5,flag,name=x", variant="S/16", res=224,
                              lr=1.0, flag=False, name="")
  assert args.variant == "B/16" and args.res == 384 and args.lr == 0.5 and args.flag is True
  assert isinstance(args.res, int) and isinstance(args.lr, float) and args.name == "x"


def test_parse_arg_defaults_and_errors():
  assert config_lib.parse_arg(None, res=224).res == 224
  with pytest.raises(ConfigError, match="'rez'.*did you mean 'res'"):
    config_lib.parse_arg("rez=3", res=224)
  with pytest.raises(ConfigError, match="config arg res: expected int, got 'big'"):
    config_lib.parse_arg("res=big", res=224)


def test_load_i1k_with_args_and_override():
  c = config_lib.load_config(f"{I1K}:variant=B/16,res=224,data_dir=/tmp")
  assert c.model.variant == "B/16" and c.input.data.data_dir == "/tmp"
  c = config_lib.apply_overrides(c, ["--config.total_steps=100", "--config.lr=0.01",
                                     "--config.input.batch_size=64", "--config.model.pool_type=map"])
  assert c.total_steps == 100 and c.lr == 0.01 and c.input.batch_size == 64
  assert c.model.pool_type == "map"
  assert c.schedule.warmup_steps == 10_000  # the recipe's value survives the merge


@pytest.mark.parametrize("override,match", [
    ("--config.totl_steps=3", r"unknown config key 'config.totl_steps' \(did you mean 'total_steps'\?\)"),
    ("--config.total_steps=abc", "config.total_steps: expected int, got 'abc'"),
    ("--config.input.batch_sise=3", "unknown config key 'config.input.batch_sise'"),
    ("--config.nope.x=3", "unknown config key 'config.nope'"),
    ("config.lr", "expected --config.key=value"),
])
def test_override_errors(override, match):
  c = config_lib.load_config(SHAPES)
  with pytest.raises(ConfigError, match=match):
    config_lib.apply_overrides(c, [override])


def test_unknown_and_mistyped_keys_in_config_file():
  user = ConfigDict(dict(totl_steps=3))
  with pytest.raises(ConfigError, match="did you mean 'total_steps'"):
    config_lib.merge_onto_defaults(user)
  with pytest.raises(ConfigError, match="config.total_steps: expected int"):
    config_lib.merge_onto_defaults(ConfigDict(dict(total_steps="10")))
  with pytest.raises(ConfigError, match="config.input.batch_size: expected int"):
    config_lib.merge_onto_defaults(ConfigDict(dict(input=dict(batch_size=1.5))))


def test_missing_config_file():
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.load_config("configs/nope.py")


def test_validate_batch_not_divisible():
  c = config_lib.load_config(SHAPES)
  c.input.batch_size = 12
  with pytest.raises(ConfigError, match=r"config.input.batch_size: 12 .* not divisible by the 8 batch-parallel"):
    config_lib.validate(c, num_devices=8)
  c.mesh.tensor = 2  # now only 4 devices are batch-parallel: 12 divides
  config_lib.validate(c, num_devices=8)


def test_validate_grad_accum_divisibility():
  c = config_lib.load_config(SHAPES)
  c.input.batch_size, c.grad_accum_steps = 32, 8  # 4 per micro-step on 8 devices
  with pytest.raises(ConfigError, match="per micro-step 4"):
    config_lib.validate(c, num_devices=8)


def test_validate_missing_data_dir():
  c = config_lib.load_config(I1K)
  with pytest.raises(ConfigError, match=r"config.input.data.data_dir: required for tfds dataset 'imagenet2012'"):
    config_lib.validate(c, num_devices=8)
  c = config_lib.load_config(f"{I1K}:data_dir=/does/not/exist")
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.validate(c, num_devices=8)


def test_validate_mesh_errors():
  from big_vision_lite.sharding import MeshError
  c = config_lib.load_config(SHAPES)
  c.mesh.tensor = 3
  with pytest.raises(MeshError, match="8 devices are not divisible"):
    config_lib.validate(c, num_devices=8)
  c.mesh.tensor, c.mesh.data, c.mesh.fsdp = 2, 2, 1  # 4 != 8
  with pytest.raises(MeshError, match="needs 4 devices, but 8"):
    config_lib.validate(c, num_devices=8)


def test_validate_total_steps_required():
  c = config_lib.load_config(SHAPES)
  c.total_steps = 0
  with pytest.raises(ConfigError, match="config.total_steps"):
    config_lib.validate(c, num_devices=1)
