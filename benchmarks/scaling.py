"""How a ViT train step's time and compiled memory scale: batch, resolution, depth, scan, remat.

    python benchmarks/scaling.py [--variant Ti/16] [--steps 3]

Each row jits value_and_grad of a softmax-xent loss through our ViT (fp32, one
device), reports compile time, median step time over `--steps` runs after one
warm-up, and XLA's compiled memory analysis (temp = activations kept for the
backward + scratch; args = params + batch). Small sizes so it runs in minutes on
a laptop CPU, with the trainer's CPU settings (glibc keeps freed memory, `--malloc
default` turns it off; XLA's Eigen dots); the trends (linear in batch and depth, ~quadratic attention share
in tokens, scan compiles in constant time, remat trades time for temp memory)
are what to read, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_setup  # noqa: E402

from big_vision_lite import platform  # noqa: E402
from big_vision_lite.models import vit as vit_lib  # noqa: E402


def measure(variant: str, *, batch: int, res: int, depth: int | None = None, scan: bool = False,
            remat: str = "none", steps: int = 3) -> dict[str, float]:
  """Compile time, median step time and compiled memory (MiB) of one fwd+bwd step."""
  # The variant's sizes, with the depth replaced where asked (a variant and a clashing size is refused).
  kw = dict(vit_lib.decode_variant(variant), num_classes=10, scan=scan, remat_policy=remat)
  if depth is not None:
    kw["depth"] = depth
  model = vit_lib.vit(**kw)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, res, res, 3)).astype(np.float32))
  y = jax.nn.one_hot(rng.integers(0, 10, batch), 10)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x[:1]))["params"]

  def loss(p):
    logits, _ = model.apply({"params": p}, x, train=True)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, -1))

  t0 = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss)).lower(params).compile(
      compiler_options=platform.compiler_options())
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(step(params))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params))
    times.append(time.perf_counter() - t0)
  mem = step.memory_analysis()
  mib = lambda n: float(n) / 2**20
  return dict(compile_s=compile_s, step_s=statistics.median(times),
              temp_mib=mib(getattr(mem, "temp_size_in_bytes", 0)) if mem else float("nan"),
              args_mib=mib(getattr(mem, "argument_size_in_bytes", 0)) if mem else float("nan"))


def _row(label: str, r: dict[str, float], batch: int) -> str:
  return (f"| {label:28s} | {r['compile_s']:7.2f} | {r['step_s'] * 1e3:8.1f} | "
          f"{batch / r['step_s']:7.1f} | {r['temp_mib']:8.1f} | {r['args_mib']:7.1f} |")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="Ti/16")
  ap.add_argument("--batch", type=int, default=16, help="batch for the non-batch sweeps")
  ap.add_argument("--res", type=int, default=64, help="resolution for the non-resolution sweeps")
  ap.add_argument("--depth", type=int, default=4, help="depth for the non-depth sweeps")
  ap.add_argument("--steps", type=int, default=3)
  bench_setup.add_malloc_flag(ap)
  args = ap.parse_args()
  malloc = bench_setup.keep_freed_memory(args.malloc)
  b, r, d = args.batch, args.res, args.depth
  print(bench_setup.cpu_line())
  print(f"ViT-{args.variant} fwd+bwd (value_and_grad), fp32, {jax.devices()[0].platform} x1, "
        f"median of {args.steps} steps; defaults batch {b}, res {r}, depth {d}")
  print(f"{malloc}; compiler_options {platform.compiler_options()}")
  print("| setting                      | compile s | step ms | img/s | temp MiB | args MiB |")
  print("|------------------------------|---------:|--------:|------:|---------:|---------:|")
  run = lambda label, batch=b, **kw: print(_row(label, measure(
      args.variant, batch=batch, steps=args.steps, **{"res": r, "depth": d, **kw}), batch), flush=True)
  for batch in (b // 2, b, 2 * b):
    run(f"batch {batch}", batch=batch)
  for res in (r // 2, r, 2 * r):
    run(f"res {res} ({(res // 16) ** 2} tokens)", res=res)
  for depth in (d // 2, d, 2 * d):
    run(f"depth {depth} unrolled", depth=depth)
    run(f"depth {depth} scan", depth=depth, scan=True)
  for policy in ("none", "dots_saveable", "nothing_saveable"):
    run(f"remat {policy}", remat=policy)
    run(f"remat {policy} + scan", remat=policy, scan=True)


if __name__ == "__main__":
  main()
