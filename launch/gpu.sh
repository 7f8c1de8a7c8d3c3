#!/usr/bin/env bash
# One process on the local GPU(s), for debugging before a cluster run.
#
#   launch/gpu.sh --config configs/vit_shapes.py --workdir runs/vit_gpu [--config.key=value ...]
#
# XLA_PYTHON_CLIENT_MEM_FRACTION: share of GPU memory JAX preallocates (default here 0.9;
#   set XLA_PYTHON_CLIENT_PREALLOCATE=false to allocate on demand when sharing a GPU).
# XLA_FLAGS: the config's config.platform.xla_flags_preset (default gpu_default: MaxText's
#   latency-hiding scheduler and collective settings; none: nothing added), from
#   big_vision_lite/platform/gpu/xla_flags.py; a flag already in XLA_FLAGS wins over the preset's.
# CUDA_VISIBLE_DEVICES picks the GPUs; all visible GPUs form one mesh in one process.
# Needs jax with CUDA: pip install -e ".[cuda]" (checked before training). DRY_RUN=1 prints the command.
set -euo pipefail
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# XLA reads XLA_FLAGS when its backend starts, so the preset is exported before the trainer runs.
XLA_FLAGS="$("${PYTHON:-python}" -m big_vision_lite.platform.gpu.xla_flags "$@")" || exit 2
export XLA_FLAGS
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
unset BVL_DISTRIBUTED
CMD=("${PYTHON:-python}" -m big_vision_lite.train "$@")
echo "+ XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS='$XLA_FLAGS' JAX_PLATFORMS=$JAX_PLATFORMS$(printf ' %q' "${CMD[@]}")"
if [[ "${DRY_RUN:-0}" == 1 ]]; then exit 0; fi
# One line, not an AssertionError deep in JAX, when this jax has no CUDA backend or sees no GPU.
if ! "${PYTHON:-python}" -c "import jax, sys; sys.exit(0 if jax.devices('gpu') else 1)" >/dev/null 2>&1; then
  echo "error: jax finds no GPU here: install the CUDA build with pip install -e \".[cuda]\" (or check CUDA_VISIBLE_DEVICES / nvidia-smi)" >&2
  exit 2
fi
exec "${CMD[@]}"
