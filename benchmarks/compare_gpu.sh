#!/usr/bin/env bash
# JAX (benchmarks/train_step.py) vs PyTorch (benchmarks/peer_torch.py) SimCLR step on one GPU.
#
#   bash benchmarks/compare_gpu.sh [BATCH=512] [ROUNDS=2] [STEPS=20] [DTYPES=float32,bfloat16] [WIDTH=64]
#
# ResNet-18 with the CIFAR stem at base width WIDTH, random data already on the GPU. For each
# dtype in DTYPES the two run back to back, alternating, ROUNDS times; printed per dtype: the
# median images/s of each, the ratio JAX/torch and the utilisation of the vendor's dense peak
# (analytic FLOPs: 6 x forward MACs per view), then the GPU model (nvidia-smi). float32: both
# sides may use TF32 (XLA's default precision; torch with allow_tf32), so utilisation is
# against the float32 (non-tensor-core) peak and can exceed 1. bfloat16: flax dtype=bfloat16
# vs torch.autocast, parameters float32 on both sides. JAX's persistent compilation cache
# (JAX_COMPILATION_CACHE_DIR, default a fresh temporary folder) spares later rounds the compile.
# Environment: PYTHON (default: python), OUT (JSON dir).
set -euo pipefail

BATCH="${1:-512}"
ROUNDS="${2:-2}"
STEPS="${3:-20}"
DTYPES="${4:-float32,bfloat16}"
WIDTH="${5:-64}"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-$(mktemp -d)}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"
mkdir -p "$OUT" "$JAX_COMPILATION_CACHE_DIR"
OUT="$(cd "$OUT" && pwd)"  # absolute: the loop runs from the repository root
JAX_COMPILATION_CACHE_DIR="$(cd "$JAX_COMPILATION_CACHE_DIR" && pwd)"
cd "$(dirname "$0")/.."

for dtype in ${DTYPES//,/ }; do
  for round in $(seq 1 "$ROUNDS"); do
    "$PYTHON" benchmarks/train_step.py --config=configs/cifar10.py --batch="$BATCH" \
      --base_width="$WIDTH" --dtype="$dtype" --steps="$STEPS" --warmup=3 \
      --json="$OUT/jax_${dtype}_$round.json" > "$OUT/jax_${dtype}_$round.log" 2>&1
    "$PYTHON" benchmarks/peer_torch.py --device=cuda --batch="$BATCH" --width="$WIDTH" \
      --dtype="$dtype" --steps="$STEPS" --warmup=3 --json="$OUT/torch_${dtype}_$round.json" \
      > "$OUT/torch_${dtype}_$round.log" 2>&1
    echo "$dtype: round $round done"
  done
done

"$PYTHON" - "$OUT" "$ROUNDS" "$DTYPES" <<'PY'
import json, statistics, subprocess, sys
out, rounds, dtypes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
def load(name):
    return [json.load(open(f"{out}/{name}_{r}.json")) for r in range(1, rounds + 1)]
for dtype in dtypes:
    for side in ("jax", "torch"):
        runs = load(f"{side}_{dtype}")
        ips = [r["images_per_s"] for r in runs]
        utils = [r["utilisation_vs_vendor_peak"] for r in runs]
        util = (f"{statistics.median(utils):.3f}" if all(isinstance(u, float) for u in utils)
                else "n/a (GPU not in train_step.VENDOR_PEAK_TFLOPS)")
        print(f"{dtype}: {side:5s} img/s median {statistics.median(ips):.0f} "
              f"rounds {[round(v) for v in ips]}, utilisation of vendor peak {util}")
    ratio = statistics.median(r["images_per_s"] for r in load(f"jax_{dtype}")) / statistics.median(
        r["images_per_s"] for r in load(f"torch_{dtype}"))
    print(f"{dtype}: ratio jax/torch {ratio:.2f}")
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(f"GPU: {gpu or 'unknown'} (JSON in {out})")
PY
