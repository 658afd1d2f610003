#!/usr/bin/env bash
# `dsrun quantize` against llama.cpp, by hand (CI never runs it): dsrun writes a Q4_K_M from a
# bf16 GGUF that llama.cpp's converter made; its tensors are compared with llama-quantize's
# Q4_K_M of the same file (gguf-py: equal bytes wherever both chose one format); llama.cpp's
# prebuilt `llama-server` loads dsrun's file and decodes 16 tokens greedily, and dsrun's logits
# on the same file rank each of llama.cpp's tokens (0: its own top choice).
#
#   tools/llama_cpp_reads_dsrun_quantize.sh NAME [WORK_DIR]
#
# NAME: the stem of WORK_DIR/NAME-bf16.gguf and NAME-Q4_K_M.gguf (tools/llama_cpp_side_by_side.sh
# makes them); python3 with gguf-py (pip install "$LLAMA/gguf-py") as PYTHON.
set -euo pipefail
name=${1:?usage: $0 NAME [WORK_DIR]}
work=${2:-/tmp/llama}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
dsrun="$here/target/release/dsrun"
# shellcheck source=tools/llama_server_timings.sh
source "$here/tools/llama_server_timings.sh"
ours="$work/$name-dsrun-Q4_K_M.gguf"

"$dsrun" quantize --model "$work/$name-bf16.gguf" "$ours" Q4_K_M
"$python" - "$ours" "$work/$name-Q4_K_M.gguf" <<'PY'
import sys, collections, numpy as np, gguf
a, b = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in sys.argv[1:3])
counts = collections.Counter()
for n, y in b.items():
    x = a[n]
    if x.tensor_type != y.tensor_type:
        counts[f"dsrun {x.tensor_type.name}, llama-quantize {y.tensor_type.name}"] += 1
    else:
        same = np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8))
        counts[f"{x.tensor_type.name}: {'equal bytes' if same else 'BYTES DIFFER'}"] += 1
for k, v in sorted(counts.items()):
    print(f"{v:4} tensors  {k}")
PY
LD_LIBRARY_PATH="$server_dir" "$server_dir/llama-server" -m "$ours" --port "$port" -ngl 0 -t "$(nproc)" -c 256 --no-warmup > "$work/llama-server.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 1; done
prompt="1 11 12 13 14 15 16 17"
tokens=$(curl -s "localhost:$port/completion" -d "{\"prompt\": [${prompt// /, }], \"n_predict\": 16, \"temperature\": 0, \"ignore_eos\": true, \"return_tokens\": true}" | "$python" -c "import json, sys; print(' '.join(map(str, json.load(sys.stdin)['tokens'])))")
kill "$pid"
echo "llama.cpp on dsrun's file: $tokens"
"$dsrun" logits --model "$ours" --gpu cpu --tokens $prompt $tokens --out "$work/dsrun-logits.npy" > /dev/null
"$python" -c "
import numpy as np
l = np.load('$work/dsrun-logits.npy'); want = [int(t) for t in '$tokens'.split()]
print('rank of each in dsrun logits:', [int((l[7 + i] > l[7 + i][w]).sum()) for i, w in enumerate(want)])"
