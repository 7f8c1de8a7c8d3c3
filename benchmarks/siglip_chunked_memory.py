"""Chunked (ring) vs full-matrix SigLIP loss: compiled peak temp memory and CPU step time.

    python benchmarks/siglip_chunked_memory.py [--batch 4096] [--dim 768]

Compiles value_and_grad of each loss on 8 fake CPU devices with the batch
sharded over them and prints memory_analysis().temp_size_in_bytes side by side.
Two full-matrix baselines: "naive" is sigmoid_loss left to XLA's partitioner
(it shards the logit rows, so each device holds a (B/8, B) slab and all of the
text embeddings); "replicated" is the big_vision reference, which all-gathers
both embeddings and builds the whole (B, B) matrix on every device.
"""

import argparse
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any device is touched

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from big_vision_lite import contrastive_loss as cl  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  mesh = jax.make_mesh((8, 1, 1, 1), ("data", "fsdp", "tensor", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  sh = NamedSharding(mesh, P(cl.BATCH_AXES))
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, args.batch, args.dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  t, b = jnp.float32(np.log(10.0)), jnp.float32(-10.0)
  rows = {}
  with jax.set_mesh(mesh):
    zi, zt = jax.device_put(z[0], sh), jax.device_put(z[1], sh)
    def replicated(zi, zt, t, b):
      zi, zt = (jax.lax.with_sharding_constraint(z, P()) for z in (zi, zt))
      return cl.sigmoid_loss(zi, zt, t, b)

    for name, fn in (("naive", cl.sigmoid_loss), ("replicated", replicated),
                     ("chunked", cl.chunked_sigmoid_loss)):
      step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
      compiled = step.lower(zi, zt, t, b).compile()
      mem = compiled.memory_analysis()
      jax.block_until_ready(compiled(zi, zt, t, b))
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(zi, zt, t, b))
        times.append(time.perf_counter() - start)
      rows[name] = (mem.temp_size_in_bytes, min(times), float(compiled(zi, zt, t, b)[0]))
  print(f"global batch {args.batch}, dim {args.dim}, 8 fake CPU devices (value_and_grad of the loss)")
  print(f"{'loss':<10} {'peak temp MiB':>14} {'step s':>8} {'value':>10}")
  for name, (temp, sec, val) in rows.items():
    print(f"{name:<10} {temp / 2**20:>14.1f} {sec:>8.3f} {val:>10.4f}")
  (tn, sn, _), (tr, sr, _), (tc, sc, _) = rows["naive"], rows["replicated"], rows["chunked"]
  print(f"chunked / naive (XLA-sharded) peak temp memory:   {tc / tn:.4f} (goal <= 0.25)")
  print(f"chunked / replicated (big_vision) peak temp memory: {tc / tr:.4f}")
  print(f"chunked / naive step time (CPU):  {sc / sn:.2f};  chunked / replicated: {sc / sr:.2f}")


if __name__ == "__main__":
  main()
