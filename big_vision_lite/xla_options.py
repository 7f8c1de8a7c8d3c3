"""XLA compiler options for the trainer's and evaluators' jitted steps, chosen per backend."""

from __future__ import annotations

import os

import jax

# jax 0.10 hands CPU matmuls to YNNPACK by default; for ViT shapes that ran ~1.45x slower
# than XLA's Eigen dot (and torch), e.g. (12608, 384) x (384, 1536): 201-214 ms vs 143-147 ms
# on the 2-core machine (benchmarks/RESULTS.md, "Issue 9, round 2"). Outputs move by ~1e-6.
CPU_EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> dict[str, str] | None:
  """Options for jax.jit(..., compiler_options=...): Eigen dots on CPU, nothing elsewhere.

  BVL_CPU_DOTS=default keeps jax's own CPU setting (for comparisons).
  """
  if jax.default_backend() != "cpu" or os.environ.get("BVL_CPU_DOTS") == "default":
    return None
  return dict(CPU_EIGEN_DOTS)
