#!/usr/bin/env bash
# JAX (benchmarks/train_step.py) vs PyTorch (benchmarks/peer_torch.py) SimCLR step on CPU.
#
#   bash benchmarks/compare.sh [BATCH=256] [ROUNDS=3] [CPU_CONV=auto] [STEPS=5] [WIDTHS=16,64]
#
# For each ResNet-18 base width in WIDTHS (64 is the standard ResNet-18; CIFAR stem), runs the
# two back to back, alternating, ROUNDS times (so background load hits both alike), both pinned
# to 2 CPUs (train_step.py --threads=2 sets the affinity before jax starts;
# torch.set_num_threads(2) and the same affinity), and prints per width the median images/s of
# each and the ratio JAX/torch, then the CPU model (lscpu) the figures belong to.
# Environment: PYTHON (default: the python on PATH, i.e. the active environment), OUT (JSON dir),
# TORCH_MALLOC: 'default' (PyTorch as it installs: the environment as given) or 'policy'
# (PyTorch with the glibc malloc settings our side sets, simclr_jax.cpu.host_memory, appended to
# GLIBC_TUNABLES: the like-for-like comparison). Our side takes SIMCLR_CPU_MALLOC (0: glibc's
# default) as usual; malloc tunables already in GLIBC_TUNABLES turn our policy off, so 'policy'
# refuses them.
set -euo pipefail

BATCH="${1:-256}"
ROUNDS="${2:-3}"
CPU_CONV="${3:-auto}"
STEPS="${4:-5}"
WIDTHS="${5:-16,64}"
# The Python of the active environment, or $PYTHON (e.g. PYTHON=venv/bin/python).
PYTHON="${PYTHON:-python}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
TORCH_MALLOC="${TORCH_MALLOC:-default}"
USER_TUNABLES="${GLIBC_TUNABLES:-}"
case "$TORCH_MALLOC" in
  default)
    TORCH_TUNABLES="$USER_TUNABLES"
    if [[ "$USER_TUNABLES" == *glibc.malloc.* ]]; then TORCH_LABEL="GLIBC_TUNABLES=$USER_TUNABLES"; else TORCH_LABEL=default; fi ;;
  policy)
    if [[ "$USER_TUNABLES" == *glibc.malloc.* ]]; then
      echo "TORCH_MALLOC=policy: GLIBC_TUNABLES already sets glibc.malloc tunables ($USER_TUNABLES), which turn our side's policy off; unset them" >&2
      exit 2
    fi
    TORCH_TUNABLES="${USER_TUNABLES:+$USER_TUNABLES:}$("$PYTHON" -c 'from simclr_jax.cpu import host_memory; print(host_memory.glibc_tunables())')"
    TORCH_LABEL=policy ;;
  *) echo "TORCH_MALLOC must be 'default' or 'policy', got '$TORCH_MALLOC'" >&2; exit 2 ;;
esac

for width in ${WIDTHS//,/ }; do
  for round in $(seq 1 "$ROUNDS"); do
    "$PYTHON" benchmarks/train_step.py --config=configs/cifar10.py --batch="$BATCH" \
      --base_width="$width" --cpu_conv="$CPU_CONV" --threads=2 --steps="$STEPS" --warmup=1 \
      --json="$OUT/jax_w${width}_$round.json" > "$OUT/jax_w${width}_$round.log"
    GLIBC_TUNABLES="$TORCH_TUNABLES" taskset -c "$("$PYTHON" -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0))[:2])))')" \
      "$PYTHON" benchmarks/peer_torch.py --batch="$BATCH" --width="$width" --threads=2 \
      --steps="$STEPS" --warmup=1 --json="$OUT/torch_w${width}_$round.json" \
      > "$OUT/torch_w${width}_$round.log"
    echo "width $width: round $round done"
  done
done

"$PYTHON" - "$OUT" "$ROUNDS" "$WIDTHS" "$TORCH_LABEL" <<'PY'
import json, statistics, subprocess, sys
out, rounds, widths, torch_malloc = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
def load(name):
    return [json.load(open(f"{out}/{name}_{r}.json"))["images_per_s"] for r in range(1, rounds + 1)]
for width in widths:
    jax_ips, torch_ips = load(f"jax_w{width}"), load(f"torch_w{width}")
    runs = [json.load(open(f"{out}/jax_w{width}_{r}.json")) for r in range(1, rounds + 1)]
    # Per round: 'over budget' marks a round where the watchdog restored glibc's defaults.
    impl = f"{runs[0]['cpu_conv']}, malloc {[run.get('host_malloc', 'default') for run in runs]}"
    mj, mt = statistics.median(jax_ips), statistics.median(torch_ips)
    mem = {name: max(json.load(open(f"{out}/{name}_w{width}_{r}.json"))["peak_memory_mib"]
                     for r in range(1, rounds + 1)) for name in ("jax", "torch")}
    print(f"width {width}: jax ({impl}) img/s median {mj:.1f} rounds {[round(v, 1) for v in jax_ips]}, peak RSS max {mem['jax']:.0f} MiB")
    print(f"width {width}: torch (malloc {torch_malloc}) img/s median {mt:.1f} rounds {[round(v, 1) for v in torch_ips]}, peak RSS max {mem['torch']:.0f} MiB")
    print(f"width {width}: ratio jax/torch {mj / mt:.2f}")
model = [l for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
         if l.startswith("Model name")]
print(f"CPU: {model[0].split(':', 1)[1].strip() if model else 'unknown'} (JSON in {out})")
PY
