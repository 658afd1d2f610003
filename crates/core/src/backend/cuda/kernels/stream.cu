// Bandwidth references for benchmarks: a streaming read (every byte read once, consecutive
// threads reading consecutive 16-byte words) and a copy (read + write).

extern "C" __global__ void stream_read(const float4* __restrict__ src, float* __restrict__ sums, u32 words) {
    float acc = 0.0f;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
        const float4 v = src[i];
        acc += v.x + v.y + v.z + v.w;
    }
    sums[blockIdx.x * blockDim.x + threadIdx.x] = acc; // keeps the reads
}

extern "C" __global__ void copy(const float4* __restrict__ src, float4* __restrict__ dst, u32 words) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) dst[i] = src[i];
}
