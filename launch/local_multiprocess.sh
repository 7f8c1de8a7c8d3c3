#!/usr/bin/env bash
# Runs the trainer as N processes on this machine, each with its own fake CPU devices, joined by
# jax.distributed.initialize on localhost: the same code path as a TPU pod or a SLURM job.
#
#   launch/local_multiprocess.sh 2 --config configs/vit_shapes.py:batch=16 --workdir runs/mp
#
# BVL_DEVICES_PER_PROCESS (default 4) sets the devices per process. Each process gets
# GLIBC_TUNABLES=glibc.malloc.hugetlb=1 added (faster CPU steps; BVL_HUGEPAGES=0: not). Exit code: 0, 75 when
# preempted (SIGTERM: every process saved the same step), else the first failure's code.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 N --config FILE[:ARGS] --workdir DIR [--config.key=value ...]" >&2
  exit 2
fi
N="$1"; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
exec "$PY" "$HERE/local_multiprocess.py" "$N" -- "$@"
