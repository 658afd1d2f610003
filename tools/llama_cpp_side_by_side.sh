#!/usr/bin/env bash
# dsrun's CPU backend and llama.cpp's CPU backend on the same checkpoint, in one sitting, taking
# turns (this machine's bandwidth drifts by tens of percent over minutes: alternating runs is the
# only fair comparison). Run by hand; CI never runs it.
#
#   tools/llama_cpp_side_by_side.sh CHECKPOINT_DIR [WORK_DIR]
#
# CHECKPOINT_DIR: a DeepSeek-V3-shaped safetensors checkpoint (e.g. `dsrun synth --preset ...`).
# WORK_DIR (default /tmp/llama): llama.cpp's source, its build and the GGUF files go there.
#
# What it does, each step skipped when its output exists:
# 1. llama.cpp's source from the PyPI sdist of llama-cpp-python (it vendors llama.cpp), and
#    `llama-bench` and `llama-quantize` built from it (CMake, CPU only, -march=native).
# 2. The checkpoint converted by llama.cpp's own convert_hf_to_gguf.py to BF16 (gguf-py from the
#    same tree), then Q8_0 and Q4_0 by llama-quantize. Two adjustments for a synthetic
#    checkpoint, in a copy: its WordLevel tokenizer gets one BPE merge (llama.cpp's loader wants
#    merges), and the converter's unknown-pre-tokenizer error falls back to "deepseek-v3"
#    (GGUF_PRE_FALLBACK). Neither touches the weights; the benchmark feeds token ids.
# 3. Pairs, each llama.cpp then dsrun, same thread count: BF16 / keep, Q8_0 / q8, Q4_0 / q4 at
#    pp512 and tg64 (q8 and q4 exact, then with --math fast: int8 activations, as llama.cpp's
#    Q8_0 and Q4_0 kernels multiply); then BF16 decode at depth 0 and 4000 (both with their
#    default f16 caches).
#
# Needs: python3 with torch and transformers (PYTHONPATH), cmake, a C++ compiler, and a release
# build of dsrun (cargo build --release).
set -euo pipefail

ckpt=${1:?usage: $0 CHECKPOINT_DIR [WORK_DIR]}
work=${2:-/tmp/llama}
threads=${THREADS:-$(nproc)}
here=$(cd "$(dirname "$0")/.." && pwd)
dsrun="$here/target/release/dsrun"
version=0.3.36
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
bin="$src/build/bin"
name=$(basename "$ckpt")
mkdir -p "$work"

if [ ! -d "$src" ]; then
  (cd "$work" && pip download --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$version" -d . \
    || curl -sL -o "llama_cpp_python-$version.tar.gz" "https://files.pythonhosted.org/packages/source/l/llama-cpp-python/llama_cpp_python-$version.tar.gz")
  tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
fi
if [ ! -x "$bin/llama-bench" ]; then
  cmake -S "$src" -B "$src/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
  cmake --build "$src/build" -j "$(nproc)" --target llama-bench llama-quantize
fi
if [ ! -d "$work/gguf-py" ]; then
  pip install --target "$work/gguf-py" "$src/gguf-py"
fi
if ! grep -q GGUF_PRE_FALLBACK "$src/conversion/base.py"; then
  sed -i 's/^        if res is None:$/        if res is None and os.environ.get("GGUF_PRE_FALLBACK"):\n            res = os.environ["GGUF_PRE_FALLBACK"]\n        if res is None:/' "$src/conversion/base.py"
fi

bf16="$work/$name-bf16.gguf"
if [ ! -f "$bf16" ]; then
  copy="$work/$name-src"
  mkdir -p "$copy"
  for f in "$ckpt"/*; do ln -sf "$f" "$copy/"; done
  rm -f "$copy/tokenizer.json"
  python3 - "$ckpt/tokenizer.json" "$copy/tokenizer.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
if not t["model"].get("merges"):
    vocab = list(t["model"]["vocab"])
    t["model"]["merges"] = [f"{vocab[3]} {vocab[4]}"]
json.dump(t, open(sys.argv[2], "w"))
PY
  GGUF_PRE_FALLBACK=deepseek-v3 PYTHONPATH="$work/gguf-py:${PYTHONPATH:-}" python3 "$src/convert_hf_to_gguf.py" "$copy" --outtype bf16 --outfile "$bf16"
fi
for q in Q8_0 Q4_0; do
  [ -f "$work/$name-$q.gguf" ] || "$bin/llama-quantize" "$bf16" "$work/$name-$q.gguf" "$q" "$threads"
done

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x$threads threads"
for pair in "bf16 keep" "Q8_0 q8" "Q4_0 q4"; do
  set -- $pair
  echo "== llama.cpp $1"
  "$bin/llama-bench" -m "$work/$name-$1.gguf" -t "$threads" -p 512 -n 64 -r 3 2>&1 | grep -E "pp512|tg64"
  echo "== dsrun --quant $2"
  "$dsrun" bench --model "$ckpt" --gpu cpu -t "$threads" --quant "$2" -p 512 -n 64 --speculative off 2>&1 | grep -E "pp512|tg64"
  # llama.cpp's Q8_0 and Q4_0 multiply int8 activations and its BF16 rounds them to bf16:
  # dsrun's --math fast does too (bf16 dots where the CPU has AVX512-BF16).
  echo "== dsrun --quant $2 --math fast"
  "$dsrun" bench --model "$ckpt" --gpu cpu -t "$threads" --quant "$2" --math fast -p 512 -n 64 --speculative off 2>&1 | grep -E "pp512|tg64"
done
echo "== llama.cpp BF16 at depth"
"$bin/llama-bench" -m "$bf16" -t "$threads" -p 0 -n 32 -d 0,4000 -r 3 2>&1 | grep tg32
echo "== dsrun bf16 at depth"
for depth in 0 4000; do
  "$dsrun" bench --model "$ckpt" --gpu cpu -t "$threads" -p 0 -n 32 -d "$depth" --speculative off 2>&1 | grep "tg32 "
done
