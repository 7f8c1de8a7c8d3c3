#!/usr/bin/env bash
# Runs the trainer on a CPU host with glibc keeping the memory XLA:CPU frees (one arena, no
# mmap, no trimming) and big_vision_lite/platform/cpu/block_cache.c preloaded, so a step reuses
# the previous step's pages instead of faulting them in again. Neither changes a result.
#
#   launch/cpu.sh --config configs/vit_shapes.py --workdir runs/shapes
#
# The cost: the process keeps its peak resident memory. What it pays on which CPU:
# benchmarks/RESULTS.md ("Issue 25"). PYTHON picks the interpreter (default: python).
# The cache reads BVL_BLOCK_CACHE_MIN_BYTES, BVL_BLOCK_CACHE_WAIT_MS and
# BVL_BLOCK_CACHE_WAIT_MIN_BYTES (allocator tuning only; see block_cache.py).
set -euo pipefail
PY=${PYTHON:-python}
lib=$("$PY" -c "from big_vision_lite.platform.cpu import block_cache; print(block_cache.library())") \
  || { echo "launch/cpu.sh: no block cache (no C compiler?); glibc settings only" >&2; lib=""; }
eval "$("$PY" - "$lib" <<'PYEOF'
import os, shlex, sys
from big_vision_lite.platform.cpu import memory
env = memory.keep_heap_env(os.environ, sys.argv[1] or None)
for k in ("GLIBC_TUNABLES", "LD_PRELOAD"):
  if k in env:
    print(f"export {k}={shlex.quote(env[k])}")
PYEOF
)"
exec "$PY" -m big_vision_lite.train "$@"
