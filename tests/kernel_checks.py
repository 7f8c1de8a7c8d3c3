"""Shared checks for the XLA:CPU kernels: a scanned, rematerialised Encoder on one CPU device
(in a subprocess, since this test process has 8 devices) runs the kernel, its opt-out and a
missing compiler fall back to XLA with the same gradients."""

import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_ENV_VARS = ("BVL_CPU_ATTENTION", "BVL_CPU_LAYER_NORM")

_MODEL_CODE = """
import os
import jax, jax.numpy as jnp, numpy as np
from big_vision_lite.kernels import {module} as kernel
from big_vision_lite.models import common
# Scanned and rematerialised layers: the custom VJP inside nn.scan and nn.remat.
m = common.Encoder(depth=2, num_heads=2, scan=True, remat_policy="nothing_saveable")
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 32)), jnp.float32)
params = m.init(jax.random.key(0), x)
f = lambda p: jnp.sum(m.apply(p, x)[0] ** 2)
hlo = jax.jit(jax.grad(f)).lower(params).as_text()
print("KERNEL" if kernel._BWD in hlo else "XLA", kernel.unavailable_reason())
g = jax.grad(f)(params)
np.save(os.environ["GRADS"], np.concatenate([np.ravel(t) for t in jax.tree.leaves(g)]))
"""


def run_one_device(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600)


def check_model_uses_kernel_and_falls_back(tmp_path, module: str, env_var: str,
                                           what: str) -> None:
  """Runs the Encoder with kernel `module` on, with `env_var`=0, and with no compiler; the
  other kernels stay off, so the runs differ in this one alone."""
  others = {v: "0" for v in KERNEL_ENV_VARS if v != env_var}
  envs = {
      "kernel": others,
      "off": {**others, env_var: "0"},
      "no_cxx": {**others, "CXX": "/nonexistent/c++", "PATH": "/nonexistent",
                 "BVL_CACHE_DIR": str(tmp_path / "empty_cache")},
  }
  code = _MODEL_CODE.format(module=module)
  runs = {n: run_one_device(code, {**e, "GRADS": str(tmp_path / f"{n}.npy")})
          for n, e in envs.items()}
  for name, r in runs.items():
    assert r.returncode == 0, (name, r.stderr[-2000:])
  assert runs["kernel"].stdout.startswith("KERNEL None")
  assert runs["off"].stdout.startswith(f"XLA disabled by {env_var}")
  assert runs["no_cxx"].stdout.startswith("XLA unavailable: no C++ compiler found")
  assert f"CPU {what} kernel unavailable" in runs["no_cxx"].stderr

  grads = {n: np.load(tmp_path / f"{n}.npy") for n in envs}
  np.testing.assert_allclose(grads["kernel"], grads["off"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(grads["no_cxx"], grads["off"])
