#!/usr/bin/env bash
# Installs the system packages the tests need on a fresh Debian/Ubuntu machine (idempotent).
#   C compiler        - the tests compile the C example plugin against plugins/include/sd3_plugin.h
#   OpenCL (PoCL)     - the OpenCL backend's tests run on PoCL's CPU device
#   Vulkan (lavapipe) - the Vulkan backend's tests run on Mesa's software device; glslc builds its shaders
#   cmake, ninja, g++ - scripts/build-glslang.sh builds glslang 15 for the cooperative-matrix-2 shaders
set -euo pipefail

packages=(gcc pkg-config ocl-icd-opencl-dev ocl-icd-libopencl1 pocl-opencl-icd clinfo
          libvulkan1 libvulkan-dev mesa-vulkan-drivers glslc cmake ninja-build g++)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-system: all packages present"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup-system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
