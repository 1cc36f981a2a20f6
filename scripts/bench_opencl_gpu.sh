#!/usr/bin/env bash
# The OpenCL backend on an NVIDIA GPU against diffusers on the same card, in one run (issue 6: MM-DiT at 1024²,
# batch 2, at most 6x diffusers' eager time). Needs, in folder DIR (default carry-opencl): stripped release builds
# of `sd3`, `libsd3_backend_opencl.so`, `examples/bench_mmdit_gpu` and `examples/vae_decode`, and
# `anchor_diffusers.py` (../shared/tools); an OpenCL ICD loader (libOpenCL.so.1) and, for the anchor, torch and
# diffusers importable by python3. Writes each step's output to $OUT (default /tmp/opencl-gpu) and prints a summary.
#   scripts/bench_opencl_gpu.sh [DIR]
# Results go to docs/performance.md ("MM-DiT on OpenCL") and docs/opencl.md (conformance, perf mode).
set -u
C=${1:-carry-opencl}
OUT=${OUT:-/tmp/opencl-gpu}
mkdir -p "$OUT"
export SD3_OPENCL_PLATFORM=${SD3_OPENCL_PLATFORM:-nvidia} # PoCL may be installed too: device 0 must be the GPU
export SD3_PLUGIN_PATH=$PWD/$C SD3_OPENCL_CACHE_DIR=${SD3_OPENCL_CACHE_DIR:-/tmp/clcache}
$C/sd3 devices 2>&1 | grep -A2 "^opencl" | grep -q "^  0 .*GPU" || { echo "no OpenCL GPU as device 0"; exit 1; }
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout "$lim" "$@" >"$OUT/$name.txt" 2>&1; echo "rc=$?" >>"$OUT/$name.txt"; }
B="$C/bench_mmdit_gpu --backend opencl --res 1024 --batch 2 --layers 24 --iters 10 --strict"
run conformance 120 $C/sd3 conformance --backend opencl
grep -E "passed|rc=" "$OUT/conformance.txt" | tail -2
for dt in f16 bf16; do
  run bench_$dt 90 $B --dtype $dt --profile
  grep -E "median|fallback|opencl\.(mma|half)|rc=" "$OUT/bench_$dt.txt"
done
run anchor 150 python3 $C/anchor_diffusers.py
grep -E "^mmdit.*1024|vae|rc=" "$OUT/anchor.txt"
run perf 60 $C/sd3 conformance --backend opencl --perf
grep -E "^(matmul|attention|conv2d|modulate|gated|binary.add)" "$OUT/perf.txt"
# The profiling queue's cost (timing markers need it) and the tuning shapes (docs/opencl.md).
run bench_f16_noprof 90 env SD3_OPENCL_QUEUE_PROFILING=0 $B --dtype f16
grep -E "median" "$OUT/bench_f16_noprof.txt"
for v in SD3_OPENCL_MMA_WARPS=4x2 SD3_OPENCL_MMA_WARPS=2x4 SD3_OPENCL_MMA_BK=64 SD3_OPENCL_ATTN_WARPS=8; do
  env $v timeout 30 $C/sd3 conformance --backend opencl --perf --filter "$([[ $v == *ATTN* ]] && echo attention || echo matmul)" \
    | grep -E "^(matmul|attention) +(f16|bf16) " | sed "s/^/$v: /"
done
run vae_f16 60 $C/vae_decode opencl 1024 f16
tail -3 "$OUT/vae_f16.txt"
run benchmark 60 $C/sd3 --backend opencl --strict --benchmark --prompt "a red cube" --out "$OUT/tiny.png"
grep -E "total|denoise|rc=" "$OUT/benchmark.txt"
