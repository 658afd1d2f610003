#!/usr/bin/env bash
# Builds what tools/cuda_device_check.sh runs on a lent NVIDIA machine (which has no Rust
# toolchain) into .devbin/ (git-ignored locally), to be carried: `carry: [".devbin"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.devbin/' .git/info/exclude 2>/dev/null || echo '/.devbin/' >> .git/info/exclude
cargo build --release --features cuda --bins --benches
cargo test --release --features cuda --test cuda --test hot_path --test gpu_kernels --no-run
rm -rf .devbin && mkdir -p .devbin
newest() { ls -t $1 | grep -v '\.d$' | head -1; }
cp target/release/dsrun .devbin/dsrun
cp "$(newest 'target/release/deps/cuda-*')" .devbin/cuda-tests
cp "$(newest 'target/release/deps/hot_path-*')" .devbin/hot-path-tests
cp "$(newest 'target/release/deps/cuda_kernels-*')" .devbin/cuda-kernels
cp "$(newest 'target/release/deps/gpu_kernels-*')" .devbin/wgpu-kernel-tests
cp "$(newest 'target/release/deps/kernels-*')" .devbin/wgpu-kernels
strip --strip-debug .devbin/* 2>/dev/null || true
du -sh .devbin
