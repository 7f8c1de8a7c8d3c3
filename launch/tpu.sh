#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create -> install on every worker -> train on all
# workers -> stream logs -> delete. Every gcloud command is echoed; --dry-run only prints them.
#
#   launch/tpu.sh --name bvl-v5e --zone us-west4-a --type v5litepod-16 [--spot] [--queued] \
#       [--version v2-alpha-tpuv5-lite] [--project P] [--keep] [--dry-run] \
#       -- --config configs/vit_i1k.py:data_dir=gs://bucket/tfds --workdir gs://bucket/runs/vit
#
# Steps (each can be run alone with --only STEP, e.g. to re-run training on a live VM):
#   create  gcloud compute tpus tpu-vm create (or queued-resources create with --queued)
#   copy    tar this checkout, scp it to every worker, pip install -e '.[tpu,gcs]' there into a
#           Python 3.11 venv (~/bvl-venv; the images' system Python is older)
#   train   ssh --worker=all: python -m big_vision_lite.train ... on every host at once;
#           BVL_DISTRIBUTED=1 makes each call jax.distributed.initialize() (TPU auto-detect)
#   delete  gcloud compute tpus tpu-vm delete (skipped with --keep)
# Logs of all workers stream to this terminal (gcloud prefixes them by worker) and to
# logs/<name>.log. A preempted run exits 75; run the same command again to resume from
# the workdir (use a gs:// workdir: VM disks go away with the VM).
set -euo pipefail

NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" SPOT=0 QUEUED=0 KEEP=0 DRY=0 ONLY=""
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type|--accelerator-type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (trainer arguments go after --)" >&2; exit 2 ;;
  esac
done
TRAIN_ARGS=("$@")
for v in NAME ZONE TYPE; do
  if [[ -z "${!v}" ]]; then echo "error: --$(echo "$v" | tr A-Z a-z) is required" >&2; exit 2; fi
done
if [[ -n "$ONLY" && ! "$ONLY" =~ ^(create|copy|train|delete)$ ]]; then
  echo "error: --only takes create, copy, train or delete, got '$ONLY'" >&2; exit 2
fi
if [[ ( -z "$ONLY" || "$ONLY" == train ) && ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  echo "error: trainer arguments missing: add -- --config FILE --workdir gs://..." >&2; exit 2
fi
if [[ -z "$VERSION" ]]; then  # the runtime image that matches the chip generation
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) echo "error: no default --version for accelerator type '$TYPE'; pass --version" >&2; exit 2 ;;
  esac
fi

COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")
REMOTE_DIR="big_vision_lite"
TARBALL="/tmp/${NAME}-src.tar.gz"

run() {  # echo a command (shell-quoted), then run it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY -eq 0 ]]; then "$@"; fi
}

step_create() {
  if [[ $QUEUED -eq 1 ]]; then
    local extra=()
    [[ $SPOT -eq 1 ]] && extra+=(--spot)
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${COMMON[@]}" "${extra[@]}"
    # Wait until the queued resource is granted and the node is ACTIVE.
    run gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" --format='value(state.state)'
    if [[ $DRY -eq 0 ]]; then
      until [[ "$(gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" \
                 --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
    fi
  else
    local extra=()
    [[ $SPOT -eq 1 ]] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" --accelerator-type="$TYPE" \
      --version="$VERSION" "${COMMON[@]}" "${extra[@]}"
  fi
}

# TPU VM images ship an older system Python (Ubuntu 22.04: 3.10) than the project needs (>= 3.11),
# and their system pip would install into the image: a venv of Python 3.11, apt-installed if missing.
VENV='~/bvl-venv'
VENV_SETUP="(command -v python3.11 >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv)) && (test -x $VENV/bin/python || python3.11 -m venv $VENV)"

step_copy() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  run tar -czf "$TARBALL" -C "$root" --exclude=.git --exclude=runs --exclude='*.egg-info' \
    --exclude=__pycache__ big_vision_lite configs launch pyproject.toml README.md
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:/tmp/bvl-src.tar.gz" --worker=all "${COMMON[@]}"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command \
    "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/bvl-src.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && $VENV_SETUP && $VENV/bin/pip install -q -e '.[tpu,gcs]'"
}

step_train() {
  local cmd
  cmd="cd ~/$REMOTE_DIR && BVL_DISTRIBUTED=1 $VENV/bin/python -m big_vision_lite.train"
  cmd+="$(printf ' %q' "${TRAIN_ARGS[@]}")"
  printf '+'; printf ' %q' gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command "$cmd"
  printf ' 2>&1 | tee logs/%s.log\n' "$NAME"
  if [[ $DRY -eq 0 ]]; then
    mkdir -p logs
    set +e
    gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command "$cmd" 2>&1 \
      | tee "logs/$NAME.log"
    TRAIN_STATUS=${PIPESTATUS[0]}
    set -e
  fi
}

step_delete() {
  if [[ $QUEUED -eq 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" --force --quiet "${COMMON[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --quiet "${COMMON[@]}"
  fi
}

TRAIN_STATUS=0
case "$ONLY" in
  create) step_create ;;
  copy) step_copy ;;
  train) step_train ;;
  delete) step_delete ;;
  "")
    step_create
    step_copy
    step_train
    if [[ $KEEP -eq 0 ]]; then step_delete; else echo "# --keep: $NAME left running" ; fi
    ;;
esac
exit "$TRAIN_STATUS"
