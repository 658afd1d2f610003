// CUDA's execution model on the CPU, for testing dsrun's kernels where there is no NVIDIA GPU.
//
// The emulator compiles a kernel source with the host C++ compiler after this header. Each GPU
// thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another. A fiber
// runs until it returns or waits at __syncthreads (all live threads of the block) or a warp
// shuffle (all live lanes of its warp), so barriers and shuffles have CUDA's meaning and a kernel
// that breaks their rules (a barrier some threads never reach) is reported, not hidden.
// `__shared__` variables are static: one block runs at a time. Not emulated: dynamic shared
// memory, atomics across concurrently running blocks (blocks are sequential), inline PTX
// (sources fall back to portable code when __CUDA_ARCH__ is undefined), timing.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <csetjmp>
#include <ucontext.h>
#include <utility>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned x, y, z, w;
};
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

static dim3 threadIdx, blockIdx, blockDim, gridDim;
static const int warpSize = 32;

static inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
static inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline float __fdividef(float a, float b) { return a / b; }
using std::ceil; using std::cos; using std::exp; using std::fabs; using std::floor; using std::fmax; using std::fmin;
using std::ldexp; using std::sin; using std::sqrt; using std::log;
template <typename T> static inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> static inline T max(T a, T b) { return a > b ? a : b; }
// IEEE half to float (f16 weights), as the hardware converts.
static inline float __half2float_bits(unsigned short h) {
    unsigned sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = std::ldexp((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// f32 to f16 bits, round to nearest even (cvt.rn.f16.f32 on the device).
static inline unsigned __float2half_bits(float f) {
    unsigned x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, e = (x >> 23) & 0xffu, m = x & 0x7fffffu;
    if (e == 0xffu) return sign | 0x7c00u | (m ? 0x200u : 0u);
    int exp = (int)e - 112;
    if (exp >= 31) return sign | 0x7c00u;
    if (exp <= 0) {
        if (exp < -10) return sign;
        m |= 0x800000u;
        unsigned shift = (unsigned)(14 - exp), half = m >> shift, rem = m & ((1u << shift) - 1u), mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return sign | half;
    }
    unsigned half = sign | ((unsigned)exp << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;
    return half;
}

namespace dsrun_emu {

enum State { RUNNABLE, WAIT_BLOCK, WAIT_WARP, DONE };

const unsigned MAX_THREADS = 1024;
const size_t STACK_BYTES = 256 * 1024;

// A fiber starts once through its ucontext (a signal-mask system call) and afterwards switches
// with _setjmp/_longjmp, which leave the signal mask alone (no system call per switch).
struct Fiber {
    ucontext_t context;
    jmp_buf jump;
    bool started;
    char* stack;
    State state;
    unsigned shuffles; // shuffles this lane took part in (picks the exchange buffer)
};

static jmp_buf scheduler;
static Fiber fibers[MAX_THREADS];
static unsigned current, threads;
static void (*body)(void*);
static void* body_arg;
// Two exchange buffers per warp: a lane writes one only after every lane has read it
// (they all passed the next shuffle's barrier first).
static unsigned long long exchange[2][MAX_THREADS];
static const char* failure;

// A fiber's life: run the kernel for the thread it is given, report done, and wait to be given
// the next thread (of this block or a later one), so stacks start once and are reused.
static void trampoline() {
    for (;;) {
        body(body_arg);
        fibers[current].state = DONE;
        if (!_setjmp(fibers[current].jump)) _longjmp(scheduler, 1);
    }
}

static inline void wait(State s) {
    fibers[current].state = s;
    if (!_setjmp(fibers[current].jump)) _longjmp(scheduler, 1);
}

// Runs fiber i until it waits or returns.
static inline void resume(unsigned i) {
    if (_setjmp(scheduler)) return;
    if (fibers[i].started) _longjmp(fibers[i].jump, 1);
    fibers[i].started = true;
    setcontext(&fibers[i].context);
}

template <typename T> static inline T shuffle(T v, unsigned source_lane) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    Fiber& f = fibers[current];
    unsigned buffer = f.shuffles++ & 1u;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    exchange[buffer][current] = bits;
    wait(WAIT_WARP);
    unsigned warp0 = current / 32u * 32u;
    unsigned src = warp0 + (source_lane & 31u);
    if (src >= threads) src = current;
    T out;
    std::memcpy(&out, &exchange[buffer][src], sizeof(T));
    return out;
}

// Runs one block: every fiber until all are done, releasing barriers as they fill.
static void run_block() {
    static ucontext_t blank;
    static bool have_blank = getcontext(&blank) == 0;
    (void)have_blank;
    for (unsigned i = 0; i < threads; i++) {
        Fiber& f = fibers[i];
        if (!f.stack) {
            f.stack = (char*)std::malloc(STACK_BYTES);
            f.started = false;
        }
        if (!f.started) {
            f.context = blank;
            f.context.uc_stack.ss_sp = f.stack;
            f.context.uc_stack.ss_size = STACK_BYTES;
            f.context.uc_link = nullptr;
            makecontext(&f.context, trampoline, 0);
        }
        f.state = RUNNABLE;
        f.shuffles = 0;
    }
    for (;;) {
        // Odd blocks run their threads last to first, so a kernel that reads shared memory
        // another thread writes without a barrier between sees stale data in one order or the
        // other (the GPU promises no order).
        const bool reverse = (blockIdx.x + blockIdx.y + blockIdx.z) & 1u;
        for (unsigned n = 0; n < threads; n++) {
            const unsigned i = reverse ? threads - 1 - n : n;
            if (fibers[i].state != RUNNABLE) continue;
            current = i;
            threadIdx.x = i % blockDim.x;
            threadIdx.y = i / blockDim.x % blockDim.y;
            threadIdx.z = i / (blockDim.x * blockDim.y);
            resume(i);
        }
        bool live = false, released = false, all_at_barrier = true;
        for (unsigned w = 0; w * 32 < threads; w++) {
            bool warp_ready = true, any = false;
            for (unsigned i = w * 32; i < threads && i < w * 32 + 32; i++) {
                State s = fibers[i].state;
                if (s == DONE) continue;
                any = live = true;
                if (s != WAIT_WARP) warp_ready = false;
                if (s != WAIT_BLOCK) all_at_barrier = false;
            }
            if (any && warp_ready) {
                for (unsigned i = w * 32; i < threads && i < w * 32 + 32; i++)
                    if (fibers[i].state == WAIT_WARP) fibers[i].state = RUNNABLE;
                released = true;
            }
        }
        if (!live) return;
        if (released) continue;
        if (all_at_barrier) {
            for (unsigned i = 0; i < threads; i++)
                if (fibers[i].state == WAIT_BLOCK) fibers[i].state = RUNNABLE;
            continue;
        }
        failure = "deadlock: threads of a block wait at different barriers (a __syncthreads or shuffle not reached by all)";
        return;
    }
}

template <typename... A, size_t... I>
static void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A> struct Launch {
    void (*kernel)(A...);
    void** args;
    static void run(void* self) {
        Launch* l = static_cast<Launch*>(self);
        call(l->kernel, l->args, std::index_sequence_for<A...>{});
    }
};

// Returns null, or what went wrong.
template <typename... A>
static const char* launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, void** args) {
    unsigned n = block[0] * block[1] * block[2];
    if (n == 0 || n > MAX_THREADS) return "block size must be 1..1024 threads";
    Launch<A...> l{kernel, args};
    body = &Launch<A...>::run;
    body_arg = &l;
    threads = n;
    failure = nullptr;
    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};
    for (unsigned z = 0; z < grid[2]; z++)
        for (unsigned y = 0; y < grid[1]; y++)
            for (unsigned x = 0; x < grid[0]; x++) {
                blockIdx = dim3{x, y, z};
                run_block();
                if (failure) {
                    // Fibers stopped inside the failed kernel start afresh next time.
                    for (unsigned i = 0; i < MAX_THREADS; i++) fibers[i].started = false;
                    return failure;
                }
            }
    return nullptr;
}

} // namespace dsrun_emu

static inline void __syncthreads() { dsrun_emu::wait(dsrun_emu::WAIT_BLOCK); }
template <typename T> static inline T __shfl_sync(unsigned, T v, int lane, int = 32) {
    return dsrun_emu::shuffle(v, (unsigned)lane);
}
template <typename T> static inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return dsrun_emu::shuffle(v, (dsrun_emu::current % 32u) ^ (unsigned)mask);
}
template <typename T> static inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    unsigned lane = dsrun_emu::current % 32u;
    // Out-of-range sources return the caller's own value, as on the GPU.
    return dsrun_emu::shuffle(v, lane + delta < 32u ? lane + delta : lane);
}

// One exported entry point per kernel the host asks for (appended by the emulator).
#define DSRUN_EXPORT(name)                                                                             \
    extern "C" const char* dsrun_launch_##name(const unsigned* grid, const unsigned* block, void** args) { \
        return dsrun_emu::launch(name, grid, block, args);                                             \
    }
