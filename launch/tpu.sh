#!/usr/bin/env bash
# Runs SimCLR pretraining on a Cloud TPU VM (single host such as v3-8, or a pod
# slice such as v4-32) from a workstation with gcloud:
#
#   launch/tpu.sh --name=simclr --zone=us-central2-b --project=my-proj \
#       --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot \
#       --config=configs/imagenet.py --workdir=gs://my-bucket/simclr/r50 --delete \
#       -- --config.train.batch_size=4096
#
# Steps: create the VM (or a queued resource with --queued), put the code on
# every worker (git clone of --repo at --ref, or --copy of this tree), install
# (pip install -e . and jax[tpu]), run main.py on all workers at once (JAX finds
# the pod's workers itself, see simclr_jax/distributed.py), stream worker 0's
# log, and delete the VM with --delete. --dry-run prints every command instead.
# Multi-host workdirs must be on storage every worker sees (a gs:// bucket).
# Arguments after `--` go to main.py unchanged.
set -euo pipefail

NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE="v3-8"
VERSION="tpu-ubuntu2204-base"
CAPACITY=""     # --spot | --preemptible
QUEUED=0
REPO_URL=""
REF="main"
COPY=0
CONFIG=""
WORKDIR=""
DELETE=0
DRY_RUN=0
SKIP_CREATE=0
REMOTE_DIR="simclr_jax"
EXTRA_ARGS=()

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Flags: --name --zone --project --accelerator-type --version --spot|--preemptible
       --queued --repo=URL --ref=REF | --copy  --config --workdir --delete
       --skip-create --dry-run --help  [-- extra main.py args]
EOF
}

die() {
    echo "tpu.sh: $*" >&2
    exit 2
}

while (($#)); do
    case "$1" in
        --name=*) NAME="${1#*=}" ;;
        --zone=*) ZONE="${1#*=}" ;;
        --project=*) PROJECT="${1#*=}" ;;
        --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
        --version=*) VERSION="${1#*=}" ;;
        --spot) CAPACITY="--spot" ;;
        --preemptible) CAPACITY="--preemptible" ;;
        --queued) QUEUED=1 ;;
        --repo=*) REPO_URL="${1#*=}" ;;
        --ref=*) REF="${1#*=}" ;;
        --copy) COPY=1 ;;
        --config=*) CONFIG="${1#*=}" ;;
        --workdir=*) WORKDIR="${1#*=}" ;;
        --delete) DELETE=1 ;;
        --skip-create) SKIP_CREATE=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$CONFIG" ]] || die "--config is required (e.g. configs/imagenet.py)"
[[ -n "$WORKDIR" ]] || die "--workdir is required (a gs:// path for pod slices)"
[[ "$ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "--accelerator-type='$ACCELERATOR_TYPE' is not like v3-8, v4-32 or v5litepod-16"
if ((COPY)) && [[ -n "$REPO_URL" ]]; then
    die "use either --copy or --repo, not both"
fi
if ((!COPY)) && [[ -z "$REPO_URL" ]]; then
    die "say where the code comes from: --repo=URL [--ref=REF] or --copy"
fi

COMMON=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
    COMMON+=(--project="$PROJECT")
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEP=""

# Runs (or with --dry-run prints) one command; a failure names the step and stops.
# Packs the source tree: in a git checkout only what git tracks plus untracked
# files it does not ignore (never virtualenvs, caches or workdirs, which can be
# gigabytes); elsewhere everything but the usual large directories.
pack_tree() {
    local src="$1" out="$2"
    if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$src" ls-files -z --cached --others --exclude-standard |
            tar -C "$src" --null -T - -czf "$out"
    else
        tar -C "$src" --exclude=.git --exclude=workdirs --exclude=.jax_cache \
            --exclude=venv --exclude=.venv --exclude=.ci-venv -czf "$out" .
    fi
}

run() {
    STEP="$1"
    shift
    if ((DRY_RUN)); then
        printf '[dry-run] %s:' "$STEP"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    echo "==> $STEP" >&2
    if ! "$@"; then
        echo "tpu.sh: step '$STEP' failed: $*" >&2
        exit 1
    fi
}

tpu_ssh() {
    local step="$1" command="$2"
    run "$step" gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all \
        --command="$command"
}

# 1. Create the VM (or queue it) and wait until it is READY.
if ((!SKIP_CREATE)); then
    if ((QUEUED)); then
        QUEUE_ARGS=()
        if [[ "$CAPACITY" == "--spot" ]]; then
            QUEUE_ARGS+=(--spot)
        elif [[ "$CAPACITY" == "--preemptible" ]]; then
            QUEUE_ARGS+=(--best-effort)
        fi
        run "create (queued resource)" gcloud compute tpus queued-resources create "$NAME" \
            "${COMMON[@]}" --node-id="$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
            --runtime-version="$VERSION" "${QUEUE_ARGS[@]}"
        if ((!DRY_RUN)); then
            echo "==> waiting for queued resource $NAME to become ACTIVE" >&2
            until [[ "$(gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" \
                --format='value(state.state)')" == "ACTIVE" ]]; do
                sleep 30
            done
        fi
    else
        CREATE_ARGS=()
        if [[ -n "$CAPACITY" ]]; then
            CREATE_ARGS+=("$CAPACITY")
        fi
        run "create" gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" \
            --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${CREATE_ARGS[@]}"
    fi
fi

# 2. Code on every worker.
if ((COPY)); then
    ARCHIVE="$(mktemp -d)/simclr_jax.tar.gz"
    run "pack local tree" pack_tree "$HERE" "$ARCHIVE"
    run "copy code" gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:~/simclr_jax.tar.gz" \
        "${COMMON[@]}" --worker=all
    tpu_ssh "unpack code" "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && \
tar -C ~/$REMOTE_DIR -xzf ~/simclr_jax.tar.gz"
else
    tpu_ssh "clone code" "rm -rf ~/$REMOTE_DIR && git clone $(printf '%q' "$REPO_URL") \
~/$REMOTE_DIR && git -C ~/$REMOTE_DIR checkout $(printf '%q' "$REF")"
fi

# 3. Install on every worker.
tpu_ssh "install" "cd ~/$REMOTE_DIR && python3 -m pip install -q -U pip && \
python3 -m pip install -q -e . 'jax[tpu]' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# 4. Train on every worker at once; each worker logs to a file, worker 0's is streamed.
MAIN_ARGS=(--config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")
printf -v QUOTED_ARGS ' %q' "${MAIN_ARGS[@]}"
# Worker 0 is found from the metadata server (agent-worker-number), the documented way.
WORKER_ID_CMD="curl -s -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
tpu_ssh "train" "cd ~/$REMOTE_DIR && WORKER=\$($WORKER_ID_CMD || echo 0) && \
if [ \"\$WORKER\" = 0 ]; then python3 main.py${QUOTED_ARGS} 2>&1 | tee ~/train.log; \
else python3 main.py${QUOTED_ARGS} > ~/train.log 2>&1; fi"

# 5. Delete on request (also meant for spot VMs that must not linger).
if ((DELETE)); then
    if ((QUEUED)); then
        run "delete" gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" \
            --force --quiet
    else
        run "delete" gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
    fi
fi
echo "tpu.sh: done (${STEP:-nothing to do})" >&2
