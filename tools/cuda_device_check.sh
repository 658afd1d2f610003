#!/usr/bin/env bash
# Every CUDA check in one run on a lent NVIDIA machine (see tools/cuda_device_prepare.sh),
# results under $OUT: the kernel and whole-model tests on the device, kernel bandwidth against
# the device's own stream/copy kernels, and decode speed on a synthetic V3-shaped checkpoint of
# several GB (with and without CUDA graphs, and streaming experts through a 25% cache); then the
# wgpu backend on the same GPU through Vulkan (kernel tests, kernel bandwidth, prefill with the
# GPU shapes and with the CPU adapter's, decode at depth), where the Vulkan loader was carried;
# expert parallelism on the one GPU (one rank through NCCL, where the system has libnccl, and
# through TCP; two ranks in one process; two processes).
# Usage (device tool): carry [".devbin", ".gl"], command `bash tools/cuda_device_check.sh`
# (.gl: the loader packages, as the device tool's README says; without it the wgpu part is skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dsrun-out}"
mkdir -p "$OUT"
log="$OUT/check.log"
exec > >(tee -a "$log") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }

# NVRTC: the toolkit's, wherever it is.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(dirname "$(ldconfig -p | awk '/libnvrtc.so/{print $NF; exit}')" 2>/dev/null); do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export DSRUN_FIXTURES="$PWD/tests/fixtures" RUST_BACKTRACE=1
bin=.devbin

step device
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
ldd $bin/dsrun | grep -i "not found" && echo "missing libraries (glibc too old?)"

step "kernel and whole-model tests (device + emulator)"
timeout 240 $bin/cuda-tests --nocapture --test-threads 1 2>&1 | tee "$OUT/tests.log" | grep -E "test |NOT RUN|relative error|panicked|result"

step "host allocations per decode step (0 expected; graphs replay the step)"
timeout 120 $bin/hot-path-tests a_cuda --nocapture --test-threads 1 2>&1 | tee "$OUT/hot_path.log" | grep -E "test |allocations|panicked|result"

step "kernel bandwidth"
timeout 120 $bin/cuda-kernels | tee "$OUT/kernels.txt"

# DSRUN_CHECK_SYNTH="--preset small" for a quick run of the script itself.
synth_args="${DSRUN_CHECK_SYNTH:---preset deepseek-v3 --layers 4 --experts 32 --dtype fp8 --mtp}"
step "synthetic checkpoint: $synth_args (default: V3-shaped FP8, 3 dense layers + 1 MoE layer of 32 experts)"
synth=/tmp/dsrun-synth
rm -rf $synth
timeout 120 $bin/dsrun synth --out $synth $synth_args && du -sh $synth

step "the plan the CUDA backend runs"
timeout 60 $bin/dsrun inspect --model $synth --plan --gpu cuda --ctx 4096 > "$OUT/plan.txt" 2>&1; head -20 "$OUT/plan.txt"

step "decode speed"
for args in "--gpu cuda" "--gpu cuda --gpu-mem 25%"; do
    timeout 120 $bin/dsrun bench --model $synth $args -p 128 -n 64 -r 3 --json | tee -a "$OUT/bench.jsonl"
done
step "latent cache formats at depth 1024 (f16 default, bf16, f32)"
for c in f16 bf16 f32; do
    timeout 120 $bin/dsrun bench --model $synth --gpu cuda -p 0 -n 32 -d 1024 -r 2 --kv-cache $c --json | tee -a "$OUT/bench.jsonl"
done
step "batched decode (continuous batching: 1, 4 and 8 sequences per step, aggregate tok/s)"
timeout 120 $bin/dsrun bench --model $synth --gpu cuda -p 0 -n 32 -r 2 --parallel 1,4,8 --json | tee -a "$OUT/bench.jsonl"
DSRUN_CUDA_GRAPHS=0 timeout 120 $bin/dsrun bench --model $synth --gpu cuda -p 16 -n 64 -r 3 --json | tee -a "$OUT/bench.jsonl"
echo "(the line above: CUDA graphs off)"
DSRUN_CUDA_GROUPED=0 timeout 120 $bin/dsrun bench --model $synth --gpu cuda -p 128 -n 1 -r 3 --json | tee -a "$OUT/bench.jsonl"
echo "(the line above: prefill experts one slot per block, not grouped)"

step "expert parallelism: one rank through NCCL (the whole path; its all-reduce per MoE layer in the counters), 2 ranks of one process on the GPU, 2 processes over TCP"
# The system's NCCL (CUDA images ship libnccl2): cudarc opens libnccl.so, the package has libnccl.so.2.
nccl=$(ldconfig -p | awk '/libnccl\.so/{print $NF; exit}')
if [ -n "$nccl" ]; then
    mkdir -p /tmp/nccl-link && ln -sf "$nccl" /tmp/nccl-link/libnccl.so && export LD_LIBRARY_PATH="/tmp/nccl-link:$LD_LIBRARY_PATH"
fi
timeout 60 $bin/dsrun devices | grep -E "^(cuda|nccl)"
for env in "WORLD_SIZE=1" "WORLD_SIZE=1 DSRUN_COMM=nccl" "WORLD_SIZE=1 DSRUN_COMM=tcp"; do
    echo "($env)"
    env $env timeout 120 $bin/dsrun bench --model $synth --gpu cuda -p 128 -n 32 -r 2 --json | tee -a "$OUT/ep_bench.jsonl"
done
echo "(--devices 0,0: two ranks in one process on the one GPU)"
timeout 120 $bin/dsrun bench --model $synth --gpu cuda --devices 0,0 -p 128 -n 32 -r 2 --json | tee -a "$OUT/ep_bench.jsonl"
echo "(two processes over TCP on the one GPU)"
port=29611
(RANK=1 LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port DSRUN_COMM=tcp timeout 120 $bin/dsrun bench --model $synth --gpu cuda --devices 0,0 -p 128 -n 32 -r 2 --json > "$OUT/ep_rank1.txt" 2>&1 &)
RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port DSRUN_COMM=tcp timeout 120 $bin/dsrun bench --model $synth --gpu cuda --devices 0,0 -p 128 -n 32 -r 2 --json | tee -a "$OUT/ep_bench.jsonl"

step "DeepSeek-V3.2 sparse attention: decode at depth 0 / 4096 / 16384, index_topk 2048 (V3.2's own), against dense V3"
for preset in deepseek-v32 deepseek-v3; do
    rm -rf /tmp/dsrun-$preset
    timeout 120 $bin/dsrun synth --out /tmp/dsrun-$preset --preset $preset --layers 2 --experts 16 --dtype fp8 >/dev/null
    for d in 0 4096 16384; do
        timeout 120 $bin/dsrun bench --model /tmp/dsrun-$preset --gpu cuda -p 0 -n 16 -d $d -r 1 --json | tee -a "$OUT/v32_bench.jsonl"
    done
done

step "wgpu through Vulkan"
if ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f $icd ] && export VK_DRIVER_FILES=$icd
if ldconfig -p | grep -q libvulkan; then
    timeout 200 $bin/wgpu-kernel-tests --test-threads 1 2>&1 | tee "$OUT/wgpu_tests.log" | grep -E "test |panicked|result"
    timeout 120 $bin/wgpu-kernels --quick | tee "$OUT/wgpu_kernels.txt"
    for args in "" "DSRUN_F16_MATH=1" "DSRUN_PREFILL_GEMM=0" "DSRUN_CPU_SHAPES=1 DSRUN_PREFILL_GEMM=0" "DSRUN_GROUP_EXPERTS=0"; do
        echo "($args)"
        env $args timeout 120 $bin/dsrun bench --model $synth --gpu vulkan -p 512 -n 32 -r 2 --json | tee -a "$OUT/wgpu_bench.jsonl"
    done
    timeout 120 $bin/dsrun bench --model $synth --gpu vulkan -p 0 -n 32 -d 4096 -r 2 --json | tee -a "$OUT/wgpu_bench.jsonl"
else
    echo "no Vulkan loader (carry .gl): wgpu not run"
fi
