"""MoE-ViT-S/16 (E=8, k=2, every 2nd block) vs dense ViT-S/16: train-step time ratio and FLOPs.

    python benchmarks/moe_vs_dense.py [--batch 8] [--steps 3] [--res 224]

Both steps are built with the trainer's own build/make_train_step on one CPU
device, with the trainer's malloc settings (`--malloc`), compiled, warmed up,
then timed alternately (dense, moe, dense, ...) so background load hits both alike; the median
step times give the ratio. FLOPs per image come from XLA's cost analysis of each compiled step
(forward+backward, so ~3x the forward) and from the analytic forward formulas in flops.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_setup  # noqa: E402

from big_vision_lite import build, config as config_lib, flops, sharding, train_step  # noqa: E402


def _config(model_name: str, res: int, batch: int, group_images: int = 1) -> config_lib.ConfigDict:
  c = config_lib.defaults()
  c.input.batch_size = batch
  c.total_steps = 100
  c.model_name = model_name
  c.model = config_lib.ConfigDict(dict(variant="S/16", num_classes=1000, pool_type="gap"))
  if model_name == "vmoe":
    c.model.update(num_experts=8, num_selected_experts=2, moe_every=2, capacity_factor=1.05,
                   group_size=res * res // 256 * group_images)
  c.task = config_lib.ConfigDict(dict(name="classification", loss="softmax_xent"))
  c.optax_name = "adamw"
  c.schedule = config_lib.ConfigDict(dict(warmup_steps=10, decay_type="cosine"))
  c.mesh = config_lib.ConfigDict(dict(data=1, fsdp=1, tensor=1, expert=1))
  return c


def _prepare(model_name: str, res: int, batch: int, group_images: int):
  c = _config(model_name, res, batch, group_images)
  example = {"image": np.zeros((1, res, res, 3), np.float32), "labels": np.zeros((1, 1000), np.float32)}
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  setup = build.build(c, mesh=mesh, example=example)
  rng = np.random.default_rng(0)
  batch_np = {"image": rng.normal(size=(batch, res, res, 3)).astype(np.float32),
              "labels": np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, batch)]}
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state = setup.init_state(jax.random.PRNGKey(0))
    gb = sharding.global_batch(batch_np, mesh)
    compiled = train_step.make_train_step(setup, 1).lower(state, gb).compile()
  analytic = flops.model_forward_flops(setup.model, example)
  return dict(mesh=mesh, rules=setup.rules, state=state, batch=gb, step=compiled,
              xla_flops=flops.compiled_flops(compiled), analytic=analytic)


def _time_one(p) -> float:
  with jax.set_mesh(p["mesh"]), nn.logical_axis_rules(p["rules"]):
    t0 = time.perf_counter()
    p["state"], m = p["step"](p["state"], p["batch"])
    jax.block_until_ready(m)
    return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--res", type=int, default=224)
  ap.add_argument("--group-images", type=int, default=1,
                  help="images per routing group (V-MoE groups whole images; capacity is per group)")
  bench_setup.add_malloc_flag(ap)
  args = ap.parse_args()
  malloc = bench_setup.keep_freed_memory(args.malloc)  # before JAX starts
  print(bench_setup.cpu_line())
  runs = {name: _prepare(name, args.res, args.batch, args.group_images) for name in ("vit", "vmoe")}
  for p in runs.values():  # warm-up
    _time_one(p)
  times = {name: [] for name in runs}
  for _ in range(args.steps):
    for name, p in runs.items():
      times[name].append(_time_one(p))
  med = {name: statistics.median(t) for name, t in times.items()}
  print(f"{jax.devices()[0].platform} x1, batch {args.batch}, res {args.res}, "
        f"{args.group_images} image(s) per routing group, {args.steps} timed steps each; {malloc}")
  for name, label in (("vit", "dense ViT-S/16"), ("vmoe", "MoE-ViT-S/16 E=8 k=2 every 2nd")):
    p = runs[name]
    xla = p["xla_flops"] / args.batch if p["xla_flops"] else float("nan")
    print(f"  {label:34s} step {med[name]:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times[name])})  "
          f"train GFLOPs/img (XLA) {xla / 1e9:.2f}  fwd GFLOPs/img (analytic) {p['analytic'] / 1e9:.2f}")
  print(f"step-time ratio MoE/dense = {med['vmoe'] / med['vit']:.3f} (goal <= 1.3)")


if __name__ == "__main__":
  main()
