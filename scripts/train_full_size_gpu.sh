#!/bin/bash
# `sd3 train-lora` and `sd3 train-dreambooth` end to end on a lent CUDA machine (the `run` tool), with SD3-medium
# shapes: a random-weight pipeline made on the card by scripts/make_random_sd3_medium.py (T5 with 2 layers), the
# golden images as instance images, 1024², bf16 (docs/performance.md, "`sd3 train-lora` and `sd3 train-dreambooth`
# end to end"). SD3_PROFILE=1 adds a per-op profile to each command; the commands' closing line prints the
# device's counters (peak, cached bytes, driver allocations).
#
# Prepare here (the .whl folder as in scripts/bench_vulkan_gpu.sh: diffusers' wheel and its small dependencies):
#   cargo build --release -p sd3 -p sd3-backend-cuda
#   C=carry-train; mkdir -p $C; cp target/release/{sd3,libsd3_backend_cuda.so} scripts/train_full_size_gpu.sh $C/
#   strip $C/sd3 $C/*.so
# Then run `bash carry-train/train_full_size_gpu.sh [STEPS]` with carry [carry-train, .whl], timeout_s ~500.
C=$PWD/carry-train; export SD3_PLUGIN_PATH=$C; STEPS=${1:-6}
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site timeout 240 python3 scripts/make_random_sd3_medium.py /tmp/sd3m --t5-layers 2 --device cuda 2>&1 | tail -1
mkdir -p /tmp/inst; i=0; for f in fixtures/golden/*/image.png; do cp $f /tmp/inst/$i.png; i=$((i+1)); done
A="--backend cuda --model /tmp/sd3m --instance-data-dir /tmp/inst --instance-prompt sks --resolution 1024 --dtype bf16 --lr-warmup-steps 0"
timeout 240 $C/sd3 train-dreambooth $A --learning-rate 1e-5 --max-train-steps $STEPS --output-dir /tmp/full 2>&1 | tail -20
timeout 200 $C/sd3 train-lora $A --max-train-steps 20 --cache-latents --output-dir /tmp/lora 2>&1 | grep -E "step (1|10|20)/|trained|rror"
date -u
