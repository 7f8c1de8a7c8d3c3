"""Precision policy: bf16 compute (config.model.dtype_mm) over fp32 master params, and the
optimizer's first moment in bf16 (config.optax.mu_dtype), set from the command line, recorded
in config.json, and still training."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import config as config_lib, models, pretrained, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/vit_shapes.py:res=32,patch=8,width=32,depth=1,heads=2,batch=32,steps=12,workers=0"
POLICY = ["--config.model.dtype_mm=bfloat16", "--config.optax.mu_dtype=bfloat16"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bf16")
  cmd = [sys.executable, "-m", "big_vision_lite.train", "--config", SPEC, "--workdir", str(workdir),
         "--config.log_training_steps=1", "--config.progress=False", "--config.lr=0.01",
         "--config.schedule.warmup_steps=1", "--config.ckpt_steps=12", "--config.evals={}",
         *POLICY]
  out = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_policy_is_recorded_in_config_json(bf16_run):
  saved = json.loads((bf16_run / "config.json").read_text())
  assert saved["model"]["dtype_mm"] == "bfloat16" and saved["optax"]["mu_dtype"] == "bfloat16"


def test_master_params_stay_fp32_and_adam_mu_is_bf16(bf16_run):
  params = pretrained.read_params(os.path.join(bf16_run, "checkpoints"))
  assert params and all(np.asarray(v).dtype == np.float32 for v in params.values()), {
      k: np.asarray(v).dtype for k, v in params.items()}
  # The state the trainer builds from the recorded config: mu in bf16, nu and params fp32.
  config = config_lib.load_config(SPEC)
  config = config_lib.apply_overrides(config, POLICY + ["--config.schedule.warmup_steps=1"])
  setup = train.build(config)
  leaves = jax.tree_util.tree_leaves_with_path(setup.abstract_state["opt_state"])
  mu = [x.dtype for p, x in leaves if "mu" in jax.tree_util.keystr(p)]
  nu = [x.dtype for p, x in leaves if "nu" in jax.tree_util.keystr(p)]
  assert mu and set(mu) == {jnp.dtype(jnp.bfloat16)}, mu
  assert nu and set(nu) == {jnp.dtype(jnp.float32)}, nu
  assert {x.dtype for x in jax.tree.leaves(setup.abstract_state["params"])} == {jnp.dtype(jnp.float32)}


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_matmuls_run_in_bf16_and_the_residual_stream_in_fp32():
  model = models.get_model("vit", width=32, depth=1, num_heads=2, patch_size=(8, 8), num_classes=8,
                           pool_type="gap", posemb="sincos2d", dtype_mm="bfloat16")
  image = jnp.zeros((2, 32, 32, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), image)
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, image))(params)
  dots = [[(str(v.aval.dtype), v.aval.shape) for v in e.invars] for e in _eqns(jaxpr.jaxpr)
          if e.primitive.name == "dot_general"]
  # Patch embedding, q/k/v/out projections, the two attention matmuls, the MLP's two: all bf16;
  # only the classifier head (flax nn.Dense, as big_vision; on the pooled and the per-patch
  # features) stays fp32.
  bf16 = [d for d in dots if [t for t, _ in d] == ["bfloat16", "bfloat16"]]
  rest = [d for d in dots if d not in bf16]
  assert len(bf16) == 1 + 4 + 2 + 2, dots
  assert rest and all(d[1] == ("float32", (32, 8)) for d in rest), rest
  _, out = model.apply(params, image)
  assert out["encoded"].dtype == jnp.float32  # LayerNorm output; residual adds promote to fp32


def _overfit_losses(policy, steps=25):
  """Losses of the trainer's own step memorising one fixed batch of 32 random 8-class labels."""
  config = config_lib.load_config(SPEC)
  config = config_lib.apply_overrides(config, policy + [
      "--config.schedule.warmup_steps=1", "--config.lr=0.003", "--config.total_steps=25"])
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32),
           "labels": np.eye(8, dtype=np.float32)[rng.integers(0, 8, 32)]}
  setup = train.build(config, example={k: v[:1] for k, v in batch.items()})
  step = train.make_train_step(setup, 1)
  state = setup.init_state(jax.random.PRNGKey(0))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses


def test_bf16_policy_still_learns_like_fp32():
  bf16, fp32 = _overfit_losses(POLICY), _overfit_losses([])
  assert all(np.isfinite(bf16)), bf16
  # Memorising 32 labels: from ln 8 = 2.08 well down, and about as far as the fp32 run.
  assert bf16[-1] < bf16[0] - 0.5, bf16
  assert abs(bf16[-1] - fp32[-1]) < 0.25 * (fp32[0] - fp32[-1]), (bf16, fp32)
