#!/usr/bin/env bash
# Builds glslang 15.3 (glslangValidator) into .tools/glslang/, where the Vulkan backend's build.rs looks for it: it
# compiles the `*_cm2*.comp` shaders (GL_NV_cooperative_matrix2), which the distributions' glslc (shaderc 2023,
# Debian 12) does not know. The sources are those the `shaderc-sys` crate vendors, fetched by cargo from the crate
# registry (no other network access needed). Needs cmake, ninja and a C++ compiler (scripts/setup-system.sh
# installs them). About a minute on two cores; does nothing when the tool is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=$ROOT/.tools/glslang
VERSION=0.10.1 # shaderc-sys, vendoring glslang 15.3.0
if [ -x "$DEST/bin/glslangValidator" ] && [ "$(cat "$DEST/source" 2>/dev/null)" = "shaderc-sys-$VERSION" ]; then
    echo "build-glslang: $DEST/bin/glslangValidator present"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/fetch/src"
cat > "$WORK/fetch/Cargo.toml" <<TOML
[package]
name = "glslang-sources"
version = "0.0.0"
edition = "2021"
[dependencies]
shaderc-sys = "=$VERSION"
[workspace]
TOML
echo 'fn main() {}' > "$WORK/fetch/src/main.rs"
cargo fetch --quiet --manifest-path "$WORK/fetch/Cargo.toml"
SRC=$(cargo metadata --format-version 1 --manifest-path "$WORK/fetch/Cargo.toml" |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "shaderc-sys"))')
SRC=$(dirname "$SRC")/build/glslang
[ -f "$SRC/CMakeLists.txt" ] || { echo "build-glslang: no glslang sources at $SRC" >&2; exit 1; }
echo "build-glslang: building glslangValidator from $SRC"
cmake -G Ninja -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DENABLE_OPT=OFF -DGLSLANG_TESTS=OFF \
    -DENABLE_HLSL=OFF -DENABLE_GLSLANG_BINARIES=ON -DBUILD_EXTERNAL=OFF -DCMAKE_INSTALL_PREFIX="$DEST" > "$WORK/cmake.log" ||
    { cat "$WORK/cmake.log" >&2; exit 1; }
ninja -C "$WORK/build" glslang-standalone > "$WORK/ninja.log" || { tail -50 "$WORK/ninja.log" >&2; exit 1; }
mkdir -p "$DEST/bin"
cp "$WORK/build/StandAlone/glslangValidator" "$DEST/bin/"
echo "shaderc-sys-$VERSION" > "$DEST/source"
"$DEST/bin/glslangValidator" --version | head -1
