#!/usr/bin/env bash
# MM-DiT forward on the CPU backend vs diffusers on the same machine (issue 3's speed target: ratio <= 1.25).
# SD3-medium width (1536, 24 heads x 64), LAYERS blocks, RES x RES image (latent RES/8), batch 2, f32, THREADS threads.
#   scripts/bench_mmdit_cpu.sh [LAYERS=2] [RES=512] [THREADS=2]
# Env: PYTHON (a python with torch + diffusers, default python3), SD3_ANCHOR_CPU (diffusers timing script,
# default /work/shared/tools/anchor_cpu.py: same model config, random weights, median of runs 2-4).
# Results go to docs/performance.md ("MM-DiT on CPU").
set -euo pipefail
LAYERS=${1:-2}
RES=${2:-512}
THREADS=${3:-2}
PYTHON=${PYTHON:-python3}
ANCHOR=${SD3_ANCHOR_CPU:-/work/shared/tools/anchor_cpu.py}
cd "$(dirname "$0")/.."

cargo build --release --example bench_mmdit >&2
ours_line=$(SD3_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS target/release/examples/bench_mmdit "$LAYERS" "$RES" 2)
echo "sd3:       $ours_line"
ours=$(sed -n 's/.*median_of_3=\([0-9.]*\).*/\1/p' <<<"$ours_line")

if [[ ! -f "$ANCHOR" ]]; then
  echo "diffusers anchor $ANCHOR not found (set SD3_ANCHOR_CPU); no ratio" >&2
  exit 1
fi
theirs_line=$(OMP_NUM_THREADS=$THREADS "$PYTHON" "$ANCHOR" "$LAYERS" "$RES" "$THREADS")
echo "diffusers: $theirs_line"
theirs=$(sed -n 's/.*median_of_3=\([0-9.]*\).*/\1/p' <<<"$theirs_line")

ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')
echo "ratio sd3/diffusers = $ours / $theirs = ${ratio}x (target <= 1.25x)"
