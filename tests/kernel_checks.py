"""Shared checks for the XLA:CPU kernels: a scanned, rematerialised Encoder on one CPU device
(in a subprocess, since this test process has 8 devices) runs the kernel where its config key
names it, and XLA where the key says `xla` or no compiler can build it, with the same gradients."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("attention_impl", "norm_impl")

_MODEL_CODE = """
import json, os
import jax, jax.numpy as jnp, ml_collections, numpy as np
from big_vision_lite import platform
from big_vision_lite.platform.cpu import {module} as kernel
from big_vision_lite.models import common
platform.configure(ml_collections.ConfigDict(dict(model=json.loads(os.environ["MODEL"]))),
                   verbose=False)
# Scanned and rematerialised layers: the custom VJP inside nn.scan and nn.remat.
m = common.Encoder(depth=2, num_heads=2, scan=True, remat_policy="nothing_saveable")
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 32)), jnp.float32)
params = m.init(jax.random.key(0), x)
f = lambda p: jnp.sum(m.apply(p, x)[0] ** 2)
hlo = jax.jit(jax.grad(f)).lower(params).as_text()
print(json.dumps(["KERNEL" if kernel._BWD in hlo else "XLA", kernel.unavailable_reason(),
                  sorted({{d["impl"] + ": " + d["why"] for d in platform.decisions().values()}})]))
g = jax.grad(f)(params)
np.save(os.environ["GRADS"], np.concatenate([np.ravel(t) for t in jax.tree.leaves(g)]))
"""


def run_one_device(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600)


def check_model_uses_kernel_and_falls_back(tmp_path, module: str, key: str, what: str) -> None:
  """Runs the Encoder with config.model.<key>='cpu_kernel', with 'xla', and with 'cpu_kernel'
  but no compiler; the other key stays 'xla', so the runs differ in this one alone."""
  others = {k: "xla" for k in KEYS if k != key}
  models = {"kernel": {**others, key: "cpu_kernel"}, "xla": {**others, key: "xla"},
            "no_cxx": {**others, key: "cpu_kernel"}}
  envs = {"kernel": {}, "xla": {},
          "no_cxx": {"CXX": "/nonexistent/c++", "PATH": "/nonexistent",
                     "BVL_CACHE_DIR": str(tmp_path / "empty_cache")}}
  runs = {n: run_one_device(_MODEL_CODE.format(module=module),
                            {**envs[n], "MODEL": json.dumps(models[n]),
                             "GRADS": str(tmp_path / f"{n}.npy")})
          for n in envs}
  for name, r in runs.items():
    assert r.returncode == 0, (name, r.stderr[-2000:])
  out = {n: json.loads(r.stdout.splitlines()[-1]) for n, r in runs.items()}
  assert out["kernel"][:2] == ["KERNEL", None]
  assert "cpu_kernel: configured" in out["kernel"][2]
  assert out["xla"][0] == "XLA" and "xla: configured" in out["xla"][2]
  assert out["no_cxx"][0] == "XLA" and out["no_cxx"][1].startswith("unavailable: no C++ compiler")
  assert any(w.startswith("xla: cpu_kernel does not support") for w in out["no_cxx"][2])
  assert f"CPU {what} kernel unavailable" in runs["no_cxx"].stderr

  grads = {n: np.load(tmp_path / f"{n}.npy") for n in envs}
  # The kernel and XLA sum in different orders: float32 rounding of a sum over the width
  # (32 here) and the tokens (9), relative to the gradient's scale.
  eps = np.finfo(np.float32).eps
  scale = np.abs(grads["xla"]).max()
  np.testing.assert_allclose(grads["kernel"], grads["xla"], rtol=0, atol=64 * 32 * eps * scale)
  np.testing.assert_array_equal(grads["no_cxx"], grads["xla"])
