#!/bin/bash
# The cooperative matmuls in VK_KHR_cooperative_matrix's form (the default, SD3_VULKAN_KHR=1) against the NV form
# (SD3_VULKAN_KHR=0), on a lent NVIDIA machine (the `run` tool), in one call: correctness first, then kernels,
# forwards, diffusers (docs/performance.md, "The KHR form").
#
# Prepare here (see scripts/bench_vulkan_gpu.sh for the .gl and .whl folders):
#   cargo build --release -p sd3 -p sd3-backend-vulkan && cargo build --release -p sd3 --example bench_mmdit_gpu \
#     && cargo build --release -p sd3-backend-vulkan --example vulkan_kernels \
#     && cargo test --release -p sd3-backend-vulkan --no-run
#   C=carry-khr; mkdir -p $C; cp target/release/{sd3,libsd3_backend_vulkan.so} \
#     target/release/examples/{bench_mmdit_gpu,vulkan_kernels} scripts/{bench_vulkan_khr.sh,anchor_mmdit_f16.py} $C/
#   for t in ops paths; do cp $(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1) $C/test_$t; done
#   strip $C/sd3 $C/*.so $C/test_* $C/bench_mmdit_gpu $C/vulkan_kernels
# Then run `bash carry-khr/bench_vulkan_khr.sh` with carry [carry-khr, .gl, .whl] and timeout_s 540; and
# `bash carry-khr/bench_vulkan_khr.sh tiles VARIANT:RxC...` (a second call) for variants of the KHR whole-tile
# kernel with other subgroup grids (shaders/matmul_khr_tiles16_VARIANT.comp, setting WGM, WGN, WM, WN, BK; none is
# kept once measured), each with its workgroup tile RxC; `... fused` checks and times the fused gated residual.
C=$PWD/carry-khr; LOG=$OUT/log.txt
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json SD3_PLUGIN_PATH=$C
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# quiet NAME TIMEOUT CMD...: full output to log.txt, the verdict line on stdout.
quiet() { local name=$1 t=$2; shift 2; timeout $t "$@" > /tmp/$name.txt 2>&1; local rc=$?
  cat /tmp/$name.txt >> $LOG; echo "$name rc=$rc $(grep -E 'test result|passed,' /tmp/$name.txt | tail -1)"; }
B="bench_mmdit_gpu --backend vulkan --dtype f16 --res 1024 --batch 2 --iters 5"
if [ "${1:-}" = fused ]; then
  # The gated residual as the whole-tile matmul's epilogue (SD3_VULKAN_FUSED_RESIDUAL=1, off by default until this
  # has passed): correctness on the card, then the forward with and without it, and diffusers.
  export SD3_VULKAN_FUSED_RESIDUAL=1
  quiet paths_fused 90 $C/test_paths
  quiet conformance_fused 150 $C/sd3 conformance --backend vulkan
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
  for r in 1 2; do
    echo "forward, fused: $(timeout 90 $C/$B 2>&1 | grep -o 'median.*' | head -1)"
    echo "forward, unfused: $(SD3_VULKAN_FUSED_RESIDUAL=0 timeout 90 $C/$B 2>&1 | grep -o 'median.*' | head -1)"
    echo "diffusers: $(PYTHONPATH=/tmp/site timeout 150 python3 $C/anchor_mmdit_f16.py 2>&1 | tail -1)"
  done
  exit 0
fi
if [ "${1:-}" = tiles ]; then
  # matmul_khr_tiles16 variants: (variant, tile) pairs, each checked by `paths` before it is timed.
  export SD3_VULKAN_KHR=1; shift
  for vt in "$@"; do
    v=${vt%%:*}; t=${vt##*:}; export SD3_VULKAN_VARIANT=matmul_khr_tiles16:$v SD3_VULKAN_TILES=$t
    quiet paths_$v 90 $C/test_paths
    SD3_VULKAN_PIPELINE_STATS=1 $C/vulkan_kernels --iters 20 --repeat 3 --ops linear > /tmp/k.txt 2>&1
    cat /tmp/k.txt >> $LOG; grep "khr_tiles16" /tmp/k.txt | grep -o "Register Count=[0-9]*" | head -1
    sed -n "/round 3/,\$p" /tmp/k.txt | grep linear
    echo "forward $v: $(timeout 90 $C/$B 2>&1 | grep -o 'median.*' | head -1)"
  done
  exit 0
fi
for khr in 1 0; do
  export SD3_VULKAN_KHR=$khr
  quiet paths_khr$khr 90 $C/test_paths
  quiet ops_khr$khr 90 $C/test_ops
  quiet conformance_khr$khr 150 $C/sd3 conformance --backend vulkan
  $C/vulkan_kernels --iters 20 --repeat 2 --ops linear 2>&1 | sed -n '/round 2/,$p' | grep -E "linear|cooperative"
done
# The subgroup-scope attention in the KHR form against the workgroup-scope one (attention_cm2).
export SD3_VULKAN_KHR=1
KA="SD3_VULKAN_CM2=0 SD3_VULKAN_VARIANT=attention_coop16:khr"
quiet paths_khr_attention 90 env $KA $C/test_paths
for v in "" "$KA"; do echo "attention ${v:-cm2}: $(env $v $C/vulkan_kernels --iters 20 --repeat 2 --ops attention 2>&1 \
  | sed -n '/round 2/,$p' | grep attention)"; done
for r in 1 2; do
  echo "forward NV: $(SD3_VULKAN_KHR=0 timeout 90 $C/$B 2>&1 | grep -o 'median.*' | head -1)"
  echo "forward KHR matmuls: $(SD3_VULKAN_KHR=1 timeout 90 $C/$B 2>&1 | grep -o 'median.*' | head -1)"
  echo "forward KHR matmuls and attention: $(env $KA timeout 90 $C/$B 2>&1 | grep -o 'median.*' | head -1)"
done
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
echo "diffusers: $(PYTHONPATH=/tmp/site timeout 150 python3 $C/anchor_mmdit_f16.py 2>&1 | tail -1)"
date -u
