#!/usr/bin/env bash
# GGUF block formats on wgpu, side by side: llama.cpp's Vulkan backend and `dsrun --gpu vulkan`
# on the same GGUF files (llama.cpp's converter and llama-quantize; tools/llama_cpp_side_by_side.sh
# makes them), all on the GPU, in turns. Run by hand; CI never runs it.
#
#   tools/llama_cpp_gguf_vulkan_side_by_side.sh NAME [WORK_DIR] [ROUNDS] [TYPES...]
#
# NAME: the files' stem in WORK_DIR (`synth058` for synth058-Q4_K_M.gguf); TYPES default to
# Q8_0 and Q4_K_M. dsrun: `bench -p 8 -n 32` (its prompt and decode rates); llama.cpp: its own
# /completion timings of 8 prompt tokens and 32 decoded (tools/llama_server_timings.sh).
set -euo pipefail

name=${1:?usage: $0 NAME [WORK_DIR] [ROUNDS] [TYPES...]}
work=${2:-/tmp/llama}
rounds=${3:-2}
shift $(($# < 3 ? $# : 3))
types=("${@:-Q8_0 Q4_K_M}")
here=$(cd "$(dirname "$0")/.." && pwd)
dsrun="$here/target/release/dsrun"
# shellcheck source=tools/llama_server_timings.sh
source "$here/tools/llama_server_timings.sh"

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x$(nproc); $(llama_device)"
for round in $(seq 1 "$rounds"); do
  for type in ${types[*]}; do
    file="$work/$name-$type.gguf"
    echo "## round $round, $type"
    echo "-- llama.cpp vulkan"
    llama "$file" -ngl 99
    echo "-- dsrun vulkan"
    "$dsrun" bench --model "$file" --gpu vulkan -p 8 -n 32 -r 2 --speculative off 2>&1 | grep -E "^(pp|tg)[0-9]"
  done
done
