#!/usr/bin/env bash
# SimCLR pretraining on one multi-GPU machine.
#
#   launch/gpu.sh --config=configs/imagenet.py --workdir=workdirs/r50 [-- main.py args]
#   launch/gpu.sh --per-gpu --config=configs/imagenet.py --workdir=workdirs/r50
#
# Default: one process drives every local GPU (the simplest and usually fastest
# on one machine). --per-gpu: one process per GPU (CUDA_VISIBLE_DEVICES=i,
# rank i) with the JAX coordinator on localhost:--port, i.e. the same code path
# as a multi-node cluster; handy to test a multi-process setup on one box.
# --num-gpus defaults to the count nvidia-smi reports. --dry-run prints the
# commands. Arguments after `--` go to main.py unchanged.
set -euo pipefail

PER_GPU=0
NUM_GPUS=""
PORT=12355
CONFIG=""
WORKDIR=""
DRY_RUN=0
PYTHON="${PYTHON:-python3}"
EXTRA_ARGS=()

die() {
    echo "gpu.sh: $*" >&2
    exit 2
}

while (($#)); do
    case "$1" in
        --per-gpu) PER_GPU=1 ;;
        --num-gpus=*) NUM_GPUS="${1#*=}" ;;
        --port=*) PORT="${1#*=}" ;;
        --config=*) CONFIG="${1#*=}" ;;
        --workdir=*) WORKDIR="${1#*=}" ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MAIN=("$PYTHON" main.py --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")

if ((!PER_GPU)); then
    if ((DRY_RUN)); then
        printf '[dry-run]'; printf ' %q' "${MAIN[@]}"; printf '\n'
        exit 0
    fi
    exec "${MAIN[@]}"
fi

if [[ -z "$NUM_GPUS" ]]; then
    NUM_GPUS="$(nvidia-smi --list-gpus | wc -l)" || die "nvidia-smi failed; pass --num-gpus"
fi
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "--num-gpus='$NUM_GPUS' must be a positive integer"

PIDS=()
# shellcheck disable=SC2317,SC2329  # invoked by the trap
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM

for ((rank = 0; rank < NUM_GPUS; rank++)); do
    CMD=(env CUDA_VISIBLE_DEVICES="$rank" "${MAIN[@]}" --coordinator_address="localhost:$PORT"
        --num_processes="$NUM_GPUS" --process_id="$rank")
    if ((DRY_RUN)); then
        printf '[dry-run]'; printf ' %q' "${CMD[@]}"; printf '\n'
        continue
    fi
    if ((rank == 0)); then
        "${CMD[@]}" &
    else
        "${CMD[@]}" > "$WORKDIR.rank$rank.log" 2>&1 &
    fi
    PIDS+=("$!")
done

STATUS=0
for pid in "${PIDS[@]}"; do
    wait "$pid" || STATUS=1
done
trap - EXIT INT TERM
if ((STATUS)); then
    echo "gpu.sh: at least one rank failed (rank logs: $WORKDIR.rank*.log)" >&2
fi
exit "$STATUS"
