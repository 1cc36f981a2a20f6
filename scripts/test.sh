#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need, builds every crate
# (plugins included, so the loader tests find them beside the executable), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-system.sh
scripts/build-glslang.sh
export CARGO_TERM_COLOR=never
# No incremental caches: a from-scratch build gains nothing from them and they cost a gigabyte of disk.
export CARGO_INCREMENTAL=0
df -h . | sed 's/^/disk: /'
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
df -h . | sed 's/^/disk: /'
du -sh target | sed 's/^/build size: /'
