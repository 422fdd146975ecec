#!/usr/bin/env bash
# JAX (benchmarks/train_step.py) vs PyTorch (benchmarks/peer_torch.py) SimCLR step on CPU.
#
#   bash benchmarks/compare.sh [BATCH=256] [ROUNDS=3] [CPU_CONV=auto] [STEPS=5]
#
# Runs the two back to back, alternating, ROUNDS times (so background load hits both alike),
# both pinned to 2 CPUs (train_step.py --threads=2 sets the affinity before jax starts;
# torch.set_num_threads(2)), and prints the median images/s of each and the ratio JAX/torch.
# Environment: PYTHON (default: the python on PATH, i.e. the active environment), OUT (JSON dir).
set -euo pipefail

BATCH="${1:-256}"
ROUNDS="${2:-3}"
CPU_CONV="${3:-auto}"
STEPS="${4:-5}"
# The Python of the active environment, or $PYTHON (e.g. PYTHON=venv/bin/python).
PYTHON="${PYTHON:-python}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

for round in $(seq 1 "$ROUNDS"); do
  "$PYTHON" benchmarks/train_step.py --config=configs/cifar10.py --batch="$BATCH" \
    --cpu_conv="$CPU_CONV" --threads=2 --steps="$STEPS" --warmup=1 \
    --json="$OUT/jax_$round.json" > "$OUT/jax_$round.log"
  "$PYTHON" benchmarks/peer_torch.py --batch="$BATCH" --threads=2 --steps="$STEPS" \
    --warmup=1 --json="$OUT/torch_$round.json" > "$OUT/torch_$round.log"
  echo "round $round done"
done

"$PYTHON" - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(name):
    return [json.load(open(f"{out}/{name}_{r}.json"))["images_per_s"] for r in range(1, rounds + 1)]
jax_ips, torch_ips = load("jax"), load("torch")
impl = json.load(open(f"{out}/jax_1.json"))["cpu_conv"]
mj, mt = statistics.median(jax_ips), statistics.median(torch_ips)
print(f"jax ({impl}) img/s: median {mj:.2f}  rounds {[round(v, 2) for v in jax_ips]}")
print(f"torch      img/s: median {mt:.2f}  rounds {[round(v, 2) for v in torch_ips]}")
print(f"ratio jax/torch: {mj / mt:.2f}   (JSON in {out})")
EOF
