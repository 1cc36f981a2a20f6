#!/bin/bash
# The Vulkan backend on a lent NVIDIA machine (the `run` tool), as used for the figures in docs/vulkan.md and
# docs/performance.md: devices, conformance, tests, the MM-DiT forward (f16, 1024², batch 2) with a per-op profile,
# the VAE decoder at 1024², and diffusers' anchor in the same call.
#
# Prepare here, once (x86-64 builds; see docs/vulkan.md "NVIDIA without a display"):
#   echo /.gl/ >> .git/info/exclude; mkdir -p .gl /tmp/amd64/partial
#   o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'; apt-get $o update
#   (cd .gl && apt-get $o download libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libopengl0 libgles2)
#   cargo build --release -p sd3-backend-vulkan -p sd3 && cargo build --release -p sd3 --example bench_mmdit_gpu \
#     --example vae_decode && cargo build --release -p sd3-backend-vulkan --example vulkan_kernels \
#     && cargo test --release -p sd3-backend-vulkan --no-run
#   C=carry-vulkan; mkdir -p $C; cp target/release/{sd3,libsd3_backend_vulkan.so} \
#     target/release/examples/{bench_mmdit_gpu,vae_decode,vulkan_kernels} ../shared/tools/anchor_diffusers.py \
#     scripts/bench_vulkan_gpu.sh $C/
#   for t in ops paths device conv_im2col pipeline_on_vulkan; do cp $(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1) $C/test_$t; done
#   strip $C/sd3 $C/*.so $C/test_* $C/bench_mmdit_gpu $C/vae_decode $C/vulkan_kernels
# Then run `bash carry-vulkan/bench_vulkan_gpu.sh` with carry [carry-vulkan, .gl, .whl] and timeout_s 420.
# MODES (default "0 1") lists the SD3_VULKAN_HOST_VISIBLE settings to time the MM-DiT forward with.
C=$PWD/carry-vulkan
START=$(date +%s); BUDGET=${BUDGET:-400}; LOG=$OUT/log.txt
# run NAME SECONDS TAIL CMD...: timeout kept inside the call's budget; full output in log.txt, tail on stdout.
run() { local name=$1 want=$2 tl=$3; shift 3; local left=$((BUDGET - ($(date +%s) - START) - 8))
  [ $left -lt 12 ] && { echo "=== $name: skipped (budget)" | tee -a $LOG; return; }
  [ $want -gt $left ] && want=$left
  echo "=== $name (timeout $want s)" | tee -a $LOG; local s=$(date +%s)
  timeout $want "$@" > /tmp/$name.txt 2>&1; local rc=$?
  cat /tmp/$name.txt >> $LOG; echo "rc=$rc in $(( $(date +%s) - s )) s" | tee -a $LOG; tail -$tl /tmp/$name.txt; }
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json SD3_PLUGIN_PATH=$C
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
run devices 30 4 $C/sd3 devices
run conformance 90 5 $C/sd3 conformance --backend vulkan --json $OUT/conformance.json
# Per-kernel device time (timestamp markers) and the driver's register/spill statistics of each pipeline.
run kernels 40 30 env SD3_VULKAN_PIPELINE_STATS=1 $C/vulkan_kernels --iters 20
for m in ${MODES:-0 1}; do
  run bench2_hv$m 60 30 env SD3_VULKAN_HOST_VISIBLE=$m $C/bench_mmdit_gpu --backend vulkan --dtype f16 --res 1024 \
    --batch 2 --layers 2 --iters 3 --profile
  run bench24_hv$m 90 14 env SD3_VULKAN_HOST_VISIBLE=$m $C/bench_mmdit_gpu --backend vulkan --dtype f16 --res 1024 \
    --batch 2 --iters 5
done
# The test binaries find fixtures/ through the source path they were built in ($TREE).
T=${TREE:-/work/wt/vulkan}; mkdir -p $T/backends/vulkan && ln -sfn $PWD/fixtures $T/fixtures
for t in ops paths device conv_im2col pipeline_on_vulkan; do run test_$t 60 4 $C/test_$t; done
run cli_benchmark 40 16 $C/sd3 --backend vulkan --prompt "a cat" --benchmark --out /tmp/cat.png
run vae1024 90 8 $C/vae_decode vulkan 1024 f16
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
run anchor 150 12 env PYTHONUNBUFFERED=1 python3 $C/anchor_diffusers.py
date -u
