"""Mesh construction, and sharded training steps equal the single-device step.

Another mesh sums the same terms in another order (per-device partial sums, all-reduces), so the
results differ by rounding only. The tolerances come from the computation: an Adam update moves
an element by at most lr (bias-corrected m / sqrt(v) is at most 1 in size), so over the steps run
a parameter moves at most sum(lr_t); a sharding bug moves it by a good part of that, reordering
by far less. Parameters may differ by 1% of that largest move; losses by a relative 256 fp32 eps.
"""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_vision_lite import build, config as config_lib, sharding, train_step

SHAPES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "vit_shapes.py")


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape(dict(data=-1, fsdp=2, tensor=1, expert=1), 8) == dict(
      data=4, fsdp=2, tensor=1, expert=1)
  with pytest.raises(sharding.MeshError, match="only one axis may be -1"):
    sharding.resolve_mesh_shape(dict(data=-1, fsdp=-1), 8)
  with pytest.raises(sharding.MeshError, match="unknown axis 'model'"):
    sharding.resolve_mesh_shape(dict(model=2), 8)


def test_mesh_axes_are_auto():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, expert=1))
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2, expert=1)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _tiny_config(**mesh):
  c = config_lib.load_config(f"{SHAPES}:res=16,width=32,depth=2,heads=4,patch=4,batch=16")
  c.mesh = config_lib.ConfigDict({**dict(data=1, fsdp=1, tensor=1, expert=1), **mesh})
  c.total_steps = 10
  c.schedule.warmup_steps = 2
  return c


def _run(config, devices, steps=3):
  rng = np.random.default_rng(0)
  example = {"image": np.zeros((1, 16, 16, 3), np.float32), "labels": np.zeros((1, 8), np.float32)}
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = build.build(config, mesh=mesh, example=example)
  step_fn = train_step.make_train_step(setup, config.grad_accum_steps)
  state = setup.init_state(jax.random.PRNGKey(0))
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for _ in range(steps):
      batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
               "labels": np.eye(8, dtype=np.float32)[rng.integers(0, 8, 16)]}
      state, m = step_fn(state, sharding.global_batch(batch, mesh))
      losses.append(float(m["loss"]))
  return losses, jax.device_get(state["params"]), state


def _param_atol(config, steps=3):
  """1% of the largest distance any parameter can move in `steps` Adam steps (see the module doc)."""
  from big_vision_lite import schedules
  schedule = schedules.make_schedule(config, config.total_steps)
  return 0.01 * config.lr * sum(float(schedule(t)) for t in range(steps))


LOSS_RTOL = 256 * float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def reference():
  return _run(_tiny_config(), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(data=8), dict(fsdp=8), dict(data=2, tensor=4),
                                  dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "fsdp8", "data2_tensor4", "data2_fsdp2_tensor2"])
def test_sharded_equals_single_device(reference, mesh):
  ref_losses, ref_params, _ = reference
  config = _tiny_config(**mesh)
  losses, params, state = _run(config, jax.devices())
  atol = _param_atol(config)
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, atol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=0), params, ref_params)
  kernel = state["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  spec = kernel.sharding.spec
  if mesh.get("fsdp", 1) > 1:
    assert "fsdp" in str(spec), spec  # parameters really are split, not replicated
  if mesh.get("tensor", 1) > 1:
    assert "tensor" in str(spec), spec


def test_grad_accumulation_equals_full_batch(reference):
  ref_losses, ref_params, _ = reference
  c = _tiny_config(data=2)
  c.grad_accum_steps = 4
  losses, params, _ = _run(c, jax.devices()[:2])
  atol = _param_atol(c)
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, atol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=0), params, ref_params)


def test_opt_state_follows_param_sharding():
  c = _tiny_config(fsdp=8)
  example = {"image": np.zeros((1, 16, 16, 3), np.float32), "labels": np.zeros((1, 8), np.float32)}
  setup = build.build(c, mesh=sharding.make_mesh(c.mesh), example=example)
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings["opt_state"])]
  assert any("fsdp" in str(s) for s in specs)
  assert P() in specs  # step counters stay replicated


def test_frozen_params_train_sharded_and_stay_bit_identical():
  c = _tiny_config(fsdp=4, data=2)
  c.frozen = ["Transformer/encoderblock_0/.*"]
  example = {"image": np.zeros((1, 16, 16, 3), np.float32), "labels": np.zeros((1, 8), np.float32)}
  mesh = sharding.make_mesh(c.mesh)
  setup = build.build(c, mesh=mesh, example=example)
  step_fn = train_step.make_train_step(setup, 1)
  state = setup.init_state(jax.random.PRNGKey(0))
  before = jax.device_get(state["params"])
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for _ in range(3):
      batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
               "labels": np.eye(8, dtype=np.float32)[rng.integers(0, 8, 16)]}
      state, _ = step_fn(state, sharding.global_batch(batch, mesh))
  after = jax.device_get(state["params"])
  frozen, trained = before["Transformer"]["encoderblock_0"], before["Transformer"]["encoderblock_1"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after["Transformer"]["encoderblock_0"], frozen)
  assert not np.array_equal(after["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"],
                            trained["MlpBlock_0"]["Dense_0"]["kernel"])
