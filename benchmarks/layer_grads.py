"""Bias and LayerNorm gradients: XLA's reductions vs models.common's VJPs and CPU kernel.

    python benchmarks/layer_grads.py [--variant S] [--rounds 3] [--no-step]

Part 1 times the pieces, jitted with the trainer's CPU options, alternating:
the bias gradient of a (32, 197, F) cotangent as XLA's reduce (`jnp.sum` over
batch and length) vs `common.sum_leading` (ones @ g); and one LayerNorm
forward+backward: flax's `nn.LayerNorm`, `common.LayerNorm` on XLA
(`layer_norm_fn`, ones-matmul VJP) and `common.LayerNorm` as the library runs it
(the CPU kernel on one CPU device).

Part 2 (skipped with --no-step) builds the trainer's ViT train step four times
in one process, as in benchmarks/vs_pytorch.py: as the library builds it
("ours"), with LayerNorm on XLA ("xla_ln", the code before the LayerNorm kernel), with
flax's LayerNorm ("flax_ln"), and with flax's LayerNorm plus a plain `y + b`
bias add ("flax_ln_plain_bias", the code before bias gradients became matmuls). It runs them in
blocks of 3 steps, `--rounds` times, and prints the median of each block's
steps after its first, and ratios against "ours".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_setup  # noqa: E402
import vs_pytorch  # noqa: E402  (the benchmark's trainer-built ViT step)

from big_vision_lite import platform  # noqa: E402
from big_vision_lite.models import common  # noqa: E402


def _time_ms(fn: Callable[..., Any], *args: Any, n: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts) * 1e3


def _flax_layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, name=name,
                      scale_init=common.part(nn.initializers.ones, ("embed",)),
                      bias_init=common.part(nn.initializers.zeros, ("embed",)))


def _xla_layer_norm(eps: float, name: str | None = None) -> common.LayerNorm:
  return common.LayerNorm(epsilon=eps, name=name, impl="xla")


def pieces(rounds: int) -> None:
  opts = platform.compiler_options()
  rng = np.random.default_rng(0)
  print("piece (batch 32, 197 tokens), median ms of 20 runs per round: XLA reduce / ours")
  for width in (384, 1536):
    g = jnp.asarray(rng.normal(size=(32, 197, width)), jnp.float32)
    red = jax.jit(lambda g: jnp.sum(g, (0, 1))).lower(g).compile(compiler_options=opts)
    mm = jax.jit(lambda g: common.sum_leading(g, (g.shape[-1],))).lower(g).compile(
        compiler_options=opts)
    np.testing.assert_allclose(red(g), mm(g), rtol=1e-4, atol=1e-3)
    for r in range(rounds):
      a, b = _time_ms(red, g), _time_ms(mm, g)
      print(f"  bias grad, width {width:4d}, round {r}: {a:6.2f} / {b:6.2f}  ({a / b:.2f}x)")
  x = jnp.asarray(rng.normal(size=(32, 197, 384)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(32, 197, 384)), jnp.float32)
  fns = {}
  for name, make in (("flax", _flax_layer_norm), ("xla", _xla_layer_norm),
                     ("ours", common.layer_norm)):
    mod = make(1e-6)
    p = nn.unbox(mod.init(jax.random.PRNGKey(0), x))["params"]
    fns[name] = jax.jit(lambda p, x, dy, mod=mod: jax.vjp(
        lambda p, x: mod.apply({"params": p}, x), p, x)[1](dy)).lower(p, x, dy).compile(
            compiler_options=opts), p
  print("LayerNorm fwd+bwd, width 384, median ms: flax / common.LayerNorm on XLA / ours")
  for r in range(rounds):
    a, b, c = (_time_ms(f, p, x, dy) for f, p in (fns["flax"], fns["xla"], fns["ours"]))
    print(f"  round {r}: {a:6.2f} / {b:6.2f} / {c:6.2f}  ({a / c:.2f}x, {b / c:.2f}x)")


VARIANTS = {
    "ours": {},
    "xla_ln": {"layer_norm": _xla_layer_norm},
    "flax_ln": {"layer_norm": _flax_layer_norm},
    "flax_ln_plain_bias": {"layer_norm": _flax_layer_norm, "add_bias": lambda y, b: y + b},
}


def whole_step(variant: str, rounds: int) -> None:
  original = {k: getattr(common, k) for k in ("layer_norm", "add_bias")}
  steps = {}
  try:
    for name, patch in VARIANTS.items():
      # The modules look these names up when traced, so the patch is baked into each compile.
      for k, v in {**original, **patch}.items():
        setattr(common, k, v)
      steps[name] = vs_pytorch.Ours(variant, 32, 64, 224, {"train"},
                                    compiler_options=platform.compiler_options())
      steps[name].train_step()
  finally:
    for k, v in original.items():
      setattr(common, k, v)
  times = {name: [] for name in steps}
  print(f"ViT-{variant}/16 train step, batch 32 (trainer's step, AdamW), "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; s per step by round:")
  for r in range(rounds):
    for name, o in steps.items():
      block = [o.train_step() for _ in range(3)]
      times[name] += block[1:]
      print(f"  round {r} {name:20s} " + ", ".join(f"{t:.3f}" for t in block))
  base = statistics.median(times["ours"])
  for name, ts in times.items():
    m = statistics.median(ts)
    print(f"  {name:20s} median {m:.3f} s  ({m / base:.3f}x ours)")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="S", choices=sorted(vs_pytorch.TIMM_NAMES))
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--no-step", dest="step", action="store_false", help="pieces only")
  bench_setup.add_malloc_flag(ap)
  args = ap.parse_args()
  malloc = bench_setup.keep_freed_memory(args.malloc)  # before JAX starts
  print(bench_setup.cpu_line())
  print(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} cores; {malloc}")
  pieces(args.rounds)
  if args.step:
    whole_step(args.variant, args.rounds)


if __name__ == "__main__":
  main()
