//! Sixteen f32 lanes as each SIMD level holds them, for kernels that keep many accumulators
//! in registers (the multi-token matmul's micro-kernel). LLVM does not keep arrays of
//! accumulators in vector registers on its own (it spills them and works lane by lane), so
//! these name the registers explicitly: one AVX-512 register, two AVX2 ones, four NEON ones,
//! or a plain array for the portable fallback.
//!
//! The methods are `unsafe`: they run the level's instructions, so a caller must be compiled
//! for the level (`#[target_feature]`) on a CPU that has it (`Simd::available`). Each is
//! `#[inline(always)]`, so the intrinsics land in that caller and take its features.

/// Lanes per vector.
pub const LANES: usize = 16;

/// The instruction sets the kernels are compiled for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    Portable,
    Avx2,
    Avx512,
}

impl Simd {
    /// Every level this machine runs, lowest first.
    pub fn available() -> Vec<Simd> {
        #[allow(unused_mut)] // only x86-64 has more levels
        let mut levels = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                levels.push(Simd::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("fma") {
                levels.push(Simd::Avx512);
            }
        }
        levels
    }

    /// The highest level available, or `DSRUN_CPU_SIMD` (portable, avx2, avx512) where it names
    /// one this machine runs.
    pub fn detect() -> Simd {
        let available = Simd::available();
        let best = *available.last().expect("portable is always available");
        match std::env::var("DSRUN_CPU_SIMD").ok().as_deref().and_then(Simd::parse) {
            Some(level) if available.contains(&level) => level,
            Some(level) => {
                log::warn!("DSRUN_CPU_SIMD={}: this CPU does not run it; using {}", level.name(), best.name());
                best
            }
            None => best,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    fn parse(name: &str) -> Option<Simd> {
        [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().find(|s| s.name() == name)
    }
}

/// A kernel body generic over the level's vector, run at a level by [`dispatch`].
pub trait AtLevel {
    type Output;
    /// Implementations are `#[inline(always)]`, so the body is compiled inside [`dispatch`]'s
    /// per-level function, for that level.
    ///
    /// # Safety
    /// The CPU runs `V`'s level.
    unsafe fn run<V: Vector>(self) -> Self::Output;
}

/// Runs `kernel` at `simd`'s level.
pub fn dispatch<K: AtLevel>(simd: Simd, kernel: K) -> K::Output {
    match simd {
        // SAFETY: `simd` comes from `Simd::detect` or `Simd::available`: the CPU runs it.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { at_avx512(kernel) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { at_avx2(kernel) },
        // SAFETY: the portable level is the baseline (NEON on aarch64).
        _ => unsafe { kernel.run::<Native>() },
    }
}

/// # Safety
/// The CPU runs AVX-512 (F, BW, VL) and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn at_avx512<K: AtLevel>(kernel: K) -> K::Output {
    // SAFETY: the caller's contract.
    unsafe { kernel.run::<Avx512>() }
}

/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn at_avx2<K: AtLevel>(kernel: K) -> K::Output {
    // SAFETY: the caller's contract.
    unsafe { kernel.run::<Avx2>() }
}

pub trait Vector: Copy {
    /// Vector registers of this kind the level has (how many accumulators a kernel may keep).
    const REGISTERS: usize;
    /// # Safety
    /// The CPU runs the level's instructions.
    unsafe fn zero() -> Self;
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `LANES` readable values.
    unsafe fn load(p: *const f32) -> Self;
    /// `LANES` f16 values from `p`, widened exactly (F16C's conversion on x86).
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `LANES` readable values.
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        // SAFETY: the caller's contract.
        let halves = unsafe { std::slice::from_raw_parts(p, LANES) };
        let lanes: [f32; LANES] = std::array::from_fn(|i| half::f16::from_bits(halves[i]).to_f32());
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// `LANES` bf16 values (little-endian) from `p`, widened exactly.
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `2 * LANES` readable bytes.
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> Self {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(p, 2 * LANES) };
        let lanes: [f32; LANES] = std::array::from_fn(|i| f32::from_bits((u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32) << 16));
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// `2 * LANES` bf16 values (little-endian) from `p`, widened exactly: (the even-indexed
    /// ones, the odd-indexed ones). Each 32-bit word holds a pair, so a mask and a shift widen
    /// them without unpacking: dotted with an input stored evens-then-odds per 32 values.
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `4 * LANES` readable bytes.
    #[inline(always)]
    unsafe fn load_bf16_pairs(p: *const u8) -> (Self, Self) {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(p, 4 * LANES) };
        let value = |i: usize| f32::from_bits((u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32) << 16);
        let (even, odd): ([f32; LANES], [f32; LANES]) = (std::array::from_fn(|i| value(2 * i)), std::array::from_fn(|i| value(2 * i + 1)));
        // SAFETY: each holds `LANES` values.
        unsafe { (Self::load(even.as_ptr()), Self::load(odd.as_ptr())) }
    }
    /// `LANES` signed bytes from `p` as f32.
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `LANES` readable bytes.
    #[inline(always)]
    unsafe fn load_i8(p: *const u8) -> Self {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(p, LANES) };
        let lanes: [f32; LANES] = std::array::from_fn(|i| bytes[i] as i8 as f32);
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// `LANES` FP8 e4m3 values from `p`, exactly as `table` (e4m3's 256 values) decodes them.
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `LANES` readable bytes.
    #[inline(always)]
    unsafe fn load_e4m3(p: *const u8, table: &[f32; 256]) -> Self {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(p, LANES) };
        let lanes: [f32; LANES] = std::array::from_fn(|i| table[bytes[i] as usize]);
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// `LANES` bytes at `p`, each byte's low nibble (`high` false) or high nibble, as f32 (the
    /// codes of GGUF's 4-bit formats: a block's first half from the low nibbles).
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `LANES` readable bytes.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8, high: bool) -> Self {
        // SAFETY: the caller's contract.
        unsafe { Self::map_bytes(p, |b| if high { b >> 4 } else { b & 0xf } as f32) }
    }
    /// Sixteen signed bytes held in two u64 (`low`'s first, little-endian) as f32 lanes: codes
    /// built in registers, never stored and reloaded (a 16-byte load of two 8-byte stores
    /// stalls on store forwarding).
    ///
    /// # Safety
    /// As [`Vector::zero`].
    #[inline(always)]
    unsafe fn i8_pair(low: u64, high: u64) -> Self {
        let bytes: [u8; 16] = std::array::from_fn(|i| if i < 8 { low.to_le_bytes()[i] } else { high.to_le_bytes()[i - 8] });
        // SAFETY: 16 bytes.
        unsafe { Self::map_bytes(bytes.as_ptr(), |b| b as i8 as f32) }
    }
    /// `LANES` bytes at `p`, each byte's low nibble (`high` false) or high nibble looked up in
    /// `table` (IQ4_NL's and IQ4_XS's 16 levels), as f32.
    ///
    /// # Safety
    /// As [`Vector::nibbles`].
    #[inline(always)]
    unsafe fn levels(p: *const u8, high: bool, table: &[i8; 16]) -> Self {
        // SAFETY: the caller's contract.
        unsafe { Self::map_bytes(p, |b| table[(if high { b >> 4 } else { b & 0xf }) as usize] as f32) }
    }
    /// `LANES` bytes at `p`, each as `f` makes it a lane (the portable form of the byte loads).
    ///
    /// # Safety
    /// As [`Vector::nibbles`].
    #[inline(always)]
    unsafe fn map_bytes(p: *const u8, f: impl Fn(u8) -> f32) -> Self {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(p, LANES) };
        let lanes: [f32; LANES] = std::array::from_fn(|i| f(bytes[i]));
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// `LANES` bytes at `p`, the two bits of each from bit `shift` on, as f32 (Q6_K's high bits).
    ///
    /// # Safety
    /// As [`Vector::nibbles`].
    #[inline(always)]
    unsafe fn crumbs(p: *const u8, shift: u32) -> Self {
        // SAFETY: the caller's contract.
        unsafe { Self::map_bytes(p, |b| ((b >> shift) & 3) as f32) }
    }
    /// 1.0 in lane i where bit i of `mask` is set, else 0.0 (Q5_0's fifth bits).
    ///
    /// # Safety
    /// As [`Vector::zero`].
    #[inline(always)]
    unsafe fn bits(mask: u16) -> Self {
        let lanes: [f32; LANES] = std::array::from_fn(|i| ((mask >> i) & 1) as f32);
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// 1.0 in lane i where byte i at `p` has bit `bit` set, else 0.0 (Q5_K's fifth bits).
    ///
    /// # Safety
    /// As [`Vector::nibbles`].
    #[inline(always)]
    unsafe fn byte_bits(p: *const u8, bit: u32) -> Self {
        // SAFETY: the caller's contract.
        unsafe { Self::map_bytes(p, |b| ((b >> bit) & 1) as f32) }
    }
    /// `LANES` 4-bit codes from `LANES / 2` bytes at `p` (the low nibble first) as f32.
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `LANES / 2` readable bytes.
    #[inline(always)]
    unsafe fn load_u4(p: *const u8) -> Self {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(p, LANES / 2) };
        let lanes: [f32; LANES] = std::array::from_fn(|i| ((bytes[i / 2] >> (4 * (i % 2))) & 0xf) as f32);
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// Integer dot products of 64 signed bytes of weights `w` and activations `x`, four bytes
    /// a lane: lane `l` is `Σ_{j<4} w[4l+j] x[4l+j]` (exact: at most 4 * 127 * 128), as f32.
    /// Lanes 0..8 cover bytes 0..32, lanes 8..16 bytes 32..64.
    ///
    /// # Safety
    /// As [`Vector::zero`], and `w`, `x` point at 64 readable bytes; `x` holds no -128 (the
    /// x86 kernels negate it).
    #[inline(always)]
    unsafe fn dot_i8(w: *const u8, x: *const i8) -> Self {
        // SAFETY: the caller's contract.
        let (w, x) = unsafe { (std::slice::from_raw_parts(w, 4 * LANES), std::slice::from_raw_parts(x, 4 * LANES)) };
        let lanes: [f32; LANES] = std::array::from_fn(|l| (0..4).map(|j| w[4 * l + j] as i8 as i32 * x[4 * l + j] as i32).sum::<i32>() as f32);
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// As [`Vector::dot_i8`] for 4-bit weight codes (0..15): 32 bytes `w` of two groups of 32,
    /// each group's 16 bytes unpacked low nibbles then high nibbles, so lanes 0..8 cover the
    /// first group (its even-indexed values, then its odd ones) and 8..16 the second; `x` holds
    /// each group's activations in that order.
    ///
    /// # Safety
    /// As [`Vector::zero`], and `w` points at 32 readable bytes, `x` at 64.
    #[inline(always)]
    unsafe fn dot_u4(w: *const u8, x: *const i8) -> Self {
        // SAFETY: the caller's contract.
        let (w, x) = unsafe { (std::slice::from_raw_parts(w, 2 * LANES), std::slice::from_raw_parts(x, 4 * LANES)) };
        let code = |i: usize| {
            let (group, k) = (i / 32, i % 32);
            let byte = w[16 * group + k % 16];
            (if k < 16 { byte & 0xf } else { byte >> 4 }) as i32
        };
        let lanes: [f32; LANES] = std::array::from_fn(|l| (0..4).map(|j| code(4 * l + j) * x[4 * l + j] as i32).sum::<i32>() as f32);
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// [`Vector::dot_i8`] of 32 bytes of each into lanes 0..8; lanes 8..16 are zero (a row's
    /// last group when it has an odd number).
    ///
    /// # Safety
    /// As [`Vector::dot_i8`], with 32 readable bytes at each.
    #[inline(always)]
    unsafe fn dot_i8_half(w: *const u8, x: *const i8) -> Self {
        let (mut w64, mut x64) = ([0u8; 64], [0i8; 64]);
        // SAFETY: the caller's contract: 32 bytes each.
        unsafe {
            std::ptr::copy_nonoverlapping(w, w64.as_mut_ptr(), 32);
            std::ptr::copy_nonoverlapping(x, x64.as_mut_ptr(), 32);
            Self::dot_i8(w64.as_ptr(), x64.as_ptr())
        }
    }
    /// [`Vector::dot_i8`] of two runs of 32 signed weight bytes, `w0` (lanes 0..8) and `w1`
    /// (lanes 8..16), against 64 activations (GGUF's Q8_0: a block's codes follow its scale).
    ///
    /// # Safety
    /// As [`Vector::dot_i8`], with 32 readable bytes at each of `w0` and `w1`.
    #[inline(always)]
    unsafe fn dot_i8_two(w0: *const u8, w1: *const u8, x: *const i8) -> Self {
        let mut w = [0u8; 64];
        // SAFETY: the caller's contract: 32 bytes each.
        unsafe {
            std::ptr::copy_nonoverlapping(w0, w.as_mut_ptr(), 32);
            std::ptr::copy_nonoverlapping(w1, w.as_mut_ptr().add(32), 32);
            Self::dot_i8(w.as_ptr(), x)
        }
    }
    /// [`Vector::dot_i8`] of 32 bytes of 4-bit codes, their low nibbles against activations
    /// 0..32 (lanes 0..8) and their high nibbles against 32..64 (lanes 8..16): a pair of
    /// GGUF Q4_K groups.
    ///
    /// # Safety
    /// As [`Vector::dot_i8`], with 32 readable bytes at `q` and 64 at `x`.
    #[inline(always)]
    unsafe fn dot_nibble_pair(q: *const u8, x: *const i8) -> Self {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(q, 32) };
        let w: [u8; 64] = std::array::from_fn(|i| if i < 32 { bytes[i] & 0xf } else { bytes[i - 32] >> 4 });
        // SAFETY: 64 bytes each.
        unsafe { Self::dot_i8(w.as_ptr(), x) }
    }
    /// [`Vector::dot_nibble_pair`] with fifth bits (GGUF Q5_K): bit `2j` of each `qh` byte tops
    /// the low nibbles' codes, bit `2j + 1` the high ones'.
    ///
    /// # Safety
    /// As [`Vector::dot_i8`], with 32 readable bytes at `q` and at `qh`, 64 at `x`.
    #[inline(always)]
    unsafe fn dot_q5k_pair(q: *const u8, qh: *const u8, j: u32, x: *const i8) -> Self {
        // SAFETY: the caller's contract.
        let (q, h) = unsafe { (std::slice::from_raw_parts(q, 32), std::slice::from_raw_parts(qh, 32)) };
        let w: [u8; 64] = std::array::from_fn(|i| if i < 32 { (q[i] & 0xf) | (((h[i] >> (2 * j)) & 1) << 4) } else { (q[i - 32] >> 4) | (((h[i - 32] >> (2 * j + 1)) & 1) << 4) });
        // SAFETY: 64 bytes each.
        unsafe { Self::dot_i8(w.as_ptr(), x) }
    }
    /// [`Vector::dot_i8`] of two GGUF Q5_0 blocks' codes (`(nibble | fifth bit << 4) - 16`;
    /// `b0`, `b1` point at whole 22-byte blocks) against 64 activations: lanes 0..8 the first.
    ///
    /// # Safety
    /// As [`Vector::dot_i8`], with 22 readable bytes at each of `b0` and `b1`.
    #[inline(always)]
    unsafe fn dot_q5_0_pair(b0: *const u8, b1: *const u8, x: *const i8) -> Self {
        let mut w = [0u8; 64];
        for (half, b) in [b0, b1].into_iter().enumerate() {
            // SAFETY: the caller's contract: a whole block.
            let b = unsafe { std::slice::from_raw_parts(b, 22) };
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..32 {
                let nibble = if j < 16 { b[6 + j] & 0xf } else { b[6 + j - 16] >> 4 };
                w[32 * half + j] = ((nibble | (((qh >> j) & 1) << 4) as u8) as i8 - 16) as u8;
            }
        }
        // SAFETY: 64 bytes each.
        unsafe { Self::dot_i8(w.as_ptr(), x) }
    }
    /// [`Vector::dot_i8`] of 64 GGUF Q6_K codes (`(nibble | crumb << 4) - 32`): the first 32
    /// from `ql_a`'s bytes and `qh`'s bits `shift..shift + 2`, the next 32 from `ql_b`'s and
    /// bits `shift + 2..shift + 4`; nibbles high or low as `high` says.
    ///
    /// # Safety
    /// As [`Vector::dot_i8`], with 32 readable bytes at each of `ql_a`, `ql_b` and `qh`.
    #[inline(always)]
    unsafe fn dot_q6_pair(ql_a: *const u8, ql_b: *const u8, qh: *const u8, high: bool, shift: u32, x: *const i8) -> Self {
        // SAFETY: the caller's contract.
        let (a, b, h) = unsafe { (std::slice::from_raw_parts(ql_a, 32), std::slice::from_raw_parts(ql_b, 32), std::slice::from_raw_parts(qh, 32)) };
        let nibble = |v: u8| if high { v >> 4 } else { v & 0xf };
        let w: [u8; 64] = std::array::from_fn(|i| {
            let (l, (q, s)) = if i < 32 { (i, (a, shift)) } else { (i - 32, (b, shift + 2)) };
            ((nibble(q[l]) | (((h[l] >> s) & 3) << 4)) as i8 - 32) as u8
        });
        // SAFETY: 64 bytes each.
        unsafe { Self::dot_i8(w.as_ptr(), x) }
    }
    /// [`Vector::dot_u4`] of one group (16 bytes of `w`, 32 of `x`) into lanes 0..8; lanes
    /// 8..16 are zero.
    ///
    /// # Safety
    /// As [`Vector::dot_u4`], with 16 readable bytes at `w` and 32 at `x`.
    #[inline(always)]
    unsafe fn dot_u4_half(w: *const u8, x: *const i8) -> Self {
        let (mut w32, mut x64) = ([0u8; 32], [0i8; 64]);
        // SAFETY: the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(w, w32.as_mut_ptr(), 16);
            std::ptr::copy_nonoverlapping(x, x64.as_mut_ptr(), 32);
            Self::dot_u4(w32.as_ptr(), x64.as_ptr())
        }
    }
    /// `p[0]` in lanes 0..8 and `p[stride]` in lanes 8..16 (two groups' scales, matching the
    /// int8 dots' lanes).
    ///
    /// # Safety
    /// As [`Vector::zero`], and `p[0]`, `p[stride]` are readable.
    #[inline(always)]
    unsafe fn expand_pair(p: *const f32, stride: usize) -> Self {
        // SAFETY: the caller's contract.
        let (a, b) = unsafe { (*p, *p.add(stride)) };
        let lanes: [f32; LANES] = std::array::from_fn(|l| if l < LANES / 2 { a } else { b });
        // SAFETY: `lanes` holds `LANES` values.
        unsafe { Self::load(lanes.as_ptr()) }
    }
    /// `a * b`, lane by lane.
    ///
    /// # Safety
    /// As [`Vector::zero`].
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        // SAFETY: the caller's contract.
        unsafe { Self::mul_add(a, b, Self::zero()) }
    }
    /// # Safety
    /// As [`Vector::zero`], and `p` points at `LANES` writable values.
    unsafe fn store(self, p: *mut f32);
    /// # Safety
    /// As [`Vector::zero`].
    unsafe fn splat(x: f32) -> Self;
    /// `a * b + c`, lane by lane.
    ///
    /// # Safety
    /// As [`Vector::zero`].
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// The lanes' sum.
    ///
    /// # Safety
    /// As [`Vector::zero`].
    unsafe fn sum(self) -> f32;
    /// Four vectors' sums (one reduction tree for the four where the level has one).
    ///
    /// # Safety
    /// As [`Vector::zero`].
    #[inline(always)]
    unsafe fn sum4(v: [Self; 4]) -> [f32; 4] {
        // SAFETY: the caller's contract.
        v.map(|v| unsafe { v.sum() })
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    /// The 16 codes of 8 bytes (the low nibble first), a byte each.
    ///
    /// # Safety
    /// SSE2 (baseline on x86-64); `p` points at 8 readable bytes.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m128i {
        // SAFETY: the caller's contract.
        let bytes = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        let mask = _mm_set1_epi8(0x0f);
        _mm_unpacklo_epi8(_mm_and_si128(bytes, mask), _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask))
    }

    /// 16 code bytes (0..255) as two vectors of 8 f32 lanes.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn widen16(codes: __m128i) -> (__m256, __m256) {
        (_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(codes))))
    }

    /// Sums of four products of signed weight bytes `w` and activation bytes `x` per 32-bit
    /// lane, as f32 (`|w|` against `x` with `w`'s sign: maddubs takes unsigned by signed).
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn dot32(w: __m256i, x: __m256i) -> __m256 {
        let products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(products, _mm256_set1_epi16(1)))
    }

    /// `(byte >> shift) & mask` of 16 bytes at `p`, as f32 lanes (Q6_K's crumbs, Q5_K's bits).
    ///
    /// # Safety
    /// AVX2; `p` points at 16 readable bytes.
    #[inline(always)]
    unsafe fn bit_field(p: *const u8, shift: u32, mask: i8) -> Avx2 {
        // SAFETY: the caller's contract.
        let bytes = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let codes = _mm_and_si128(_mm_srl_epi16(bytes, _mm_cvtsi32_si128(shift as i32)), _mm_set1_epi8(mask));
        let (a, b) = unsafe { widen16(codes) };
        Avx2(a, b)
    }

    /// 1.0 in lane i where bit `i` of `mask / first` is set (`first`: 1 or 1 << 8), else 0.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn bit_lanes(mask: u16, first: i32) -> __m256 {
        let select = _mm256_setr_epi32(first, first << 1, first << 2, first << 3, first << 4, first << 5, first << 6, first << 7);
        let set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(mask as i32), select), select);
        _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_set1_ps(1.0))
    }

    /// A GGUF Q5_0 block's 32 codes, `(nibble | fifth bit << 4) - 16`, a byte each.
    ///
    /// # Safety
    /// AVX2; `b` points at a whole 22-byte block.
    #[inline(always)]
    unsafe fn q5_0_codes(b: *const u8) -> __m256i {
        // SAFETY: the caller's contract.
        let (qs, qh) = unsafe { (_mm_loadu_si128(b.add(6) as *const __m128i), (b.add(2) as *const u32).read_unaligned()) };
        let mask = _mm_set1_epi8(0x0f);
        let nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(qs), mask), _mm_and_si128(qs, mask));
        let fifth = _mm256_and_si256(unsafe { bit_bytes(qh) }, _mm256_set1_epi8(16));
        _mm256_sub_epi8(_mm256_or_si256(nibbles, fifth), _mm256_set1_epi8(16))
    }

    /// 32 GGUF Q6_K codes, `(nibble | crumb << 4) - 32`: nibbles of `ql` (high or low), crumbs
    /// of `qh` from bit `shift`.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn q6_codes(ql: __m256i, qh: __m256i, high: bool, shift: u32) -> __m256i {
        let low4 = _mm256_set1_epi8(0x0f);
        let nibble = if high { _mm256_and_si256(_mm256_srli_epi16::<4>(ql), low4) } else { _mm256_and_si256(ql, low4) };
        let crumb = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift as i32)), _mm256_set1_epi8(3)));
        _mm256_sub_epi8(_mm256_or_si256(nibble, crumb), _mm256_set1_epi8(32))
    }

    /// A GGUF Q5_K group pair's 64 codes (0..31): the low nibbles of `q` topped by bit `2j` of
    /// `qh`'s bytes, the high nibbles by bit `2j + 1`.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn q5k_codes(q: __m256i, qh: __m256i, j: u32) -> (__m256i, __m256i) {
        let low4 = _mm256_set1_epi8(0x0f);
        // SAFETY: AVX2, the caller's contract.
        let (b0, b1) = unsafe { (sixteens(qh, 2 * j), sixteens(qh, 2 * j + 1)) };
        let lo = _mm256_or_si256(_mm256_and_si256(q, low4), b0);
        let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), low4), b1);
        (lo, hi)
    }

    /// 16 in each byte of `qh` whose bit `s` is set, else 0.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn sixteens(qh: __m256i, s: u32) -> __m256i {
        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s as i32)), _mm256_set1_epi8(1)))
    }

    /// Byte i is 0xff where bit i of `bits` is set, else 0.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn bit_bytes(bits: u32) -> __m256i {
        // Byte i takes byte i / 8 of `bits` (each 128-bit half holds the whole word), then its bit.
        let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0));
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
    }

    /// Sums of four products of unsigned bytes `u` and signed bytes `s` per 32-bit lane (the
    /// pairs' 16-bit sums cannot saturate: `u` <= 128 and `|s|` <= 127).
    ///
    /// # Safety
    /// AVX-512 BW.
    #[inline(always)]
    unsafe fn sum_bytes(u: __m512i, s: __m512i) -> __m512i {
        _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1))
    }

    #[derive(Clone, Copy)]
    pub struct Avx512(pub __m512);

    impl Vector for Avx512 {
        const REGISTERS: usize = 32;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract.
            Avx512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: the caller's contract: 16 values from `p`.
            Avx512(_mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) }))
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from `p`.
            let halves = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves))))
        }
        #[inline(always)]
        unsafe fn load_bf16_pairs(p: *const u8) -> (Self, Self) {
            // SAFETY: the caller's contract: 64 bytes from `p`.
            let pairs = unsafe { _mm512_loadu_si512(p as *const _) };
            let even = _mm512_slli_epi32::<16>(pairs);
            let odd = _mm512_and_si512(pairs, _mm512_set1_epi32(0xffff_0000u32 as i32));
            (Avx512(_mm512_castsi512_ps(even)), Avx512(_mm512_castsi512_ps(odd)))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = unsafe { _mm_loadu_si128(p as *const __m128i) };
            Avx512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
        }
        #[inline(always)]
        unsafe fn dot_i8(w: *const u8, x: *const i8) -> Self {
            // |w| times x with w's sign (u8 x i8 is what the byte multiply-add takes).
            // SAFETY: the caller's contract: 64 bytes from each.
            let (w, x) = unsafe { (_mm512_loadu_si512(w as *const _), _mm512_loadu_si512(x as *const _)) };
            let signed = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
            Avx512(_mm512_cvtepi32_ps(sum_bytes(_mm512_abs_epi8(w), signed)))
        }
        #[inline(always)]
        unsafe fn dot_u4(w: *const u8, x: *const i8) -> Self {
            // The 32 bytes as 128-bit lanes (first 16, first 16, last 16, last 16), lanes 1 and
            // 3 shifted to their high nibbles.
            // SAFETY: the caller's contract: 32 bytes from `w`, 64 from `x`.
            let (bytes, x) = unsafe { (_mm256_loadu_si256(w as *const __m256i), _mm512_loadu_si512(x as *const _)) };
            let wide = _mm512_castsi256_si512(bytes);
            let doubled = _mm512_shuffle_i64x2::<0b01_01_00_00>(wide, wide);
            let shifted = _mm512_mask_srli_epi16::<4>(doubled, 0xff00_ff00, doubled);
            let codes = _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f));
            Avx512(_mm512_cvtepi32_ps(sum_bytes(codes, x)))
        }
        #[inline(always)]
        unsafe fn dot_i8_half(w: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from each.
            let (w, x) = unsafe { (_mm256_loadu_si256(w as *const __m256i), _mm256_loadu_si256(x as *const __m256i)) };
            let (w, x) = (_mm512_zextsi256_si512(w), _mm512_zextsi256_si512(x));
            let signed = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
            Avx512(_mm512_cvtepi32_ps(sum_bytes(_mm512_abs_epi8(w), signed)))
        }
        #[inline(always)]
        unsafe fn dot_i8_two(w0: *const u8, w1: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from each of `w0`, `w1`, 64 from `x`.
            let (a, b, x) = unsafe { (_mm256_loadu_si256(w0 as *const __m256i), _mm256_loadu_si256(w1 as *const __m256i), _mm512_loadu_si512(x as *const _)) };
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
            let signed = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
            Avx512(_mm512_cvtepi32_ps(sum_bytes(_mm512_abs_epi8(w), signed)))
        }
        #[inline(always)]
        unsafe fn dot_q5k_pair(q: *const u8, qh: *const u8, j: u32, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes at `q` and `qh`, 64 at `x`; the level
            // (AVX2 within AVX-512's).
            unsafe {
                let (lo, hi) = q5k_codes(_mm256_loadu_si256(q as *const __m256i), _mm256_loadu_si256(qh as *const __m256i), j);
                let codes = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                Avx512(_mm512_cvtepi32_ps(sum_bytes(codes, _mm512_loadu_si512(x as *const _))))
            }
        }
        #[inline(always)]
        unsafe fn dot_q5_0_pair(b0: *const u8, b1: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: whole blocks at `b0`, `b1`.
            let w = unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q5_0_codes(b0)), q5_0_codes(b1)) };
            // SAFETY: the caller's contract: 64 bytes at `x`.
            let x = unsafe { _mm512_loadu_si512(x as *const _) };
            let signed = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
            Avx512(_mm512_cvtepi32_ps(sum_bytes(_mm512_abs_epi8(w), signed)))
        }
        #[inline(always)]
        unsafe fn dot_q6_pair(ql_a: *const u8, ql_b: *const u8, qh: *const u8, high: bool, shift: u32, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes at each of `ql_a`, `ql_b`, `qh`.
            let (a, b, h) = unsafe { (_mm256_loadu_si256(ql_a as *const __m256i), _mm256_loadu_si256(ql_b as *const __m256i), _mm256_loadu_si256(qh as *const __m256i)) };
            // SAFETY: the level (AVX2 within AVX-512's) is the caller's contract.
            let (ca, cb) = unsafe { (q6_codes(a, h, high, shift), q6_codes(b, h, high, shift + 2)) };
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ca), cb);
            // SAFETY: the caller's contract: 64 bytes at `x`.
            let x = unsafe { _mm512_loadu_si512(x as *const _) };
            let signed = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
            Avx512(_mm512_cvtepi32_ps(sum_bytes(_mm512_abs_epi8(w), signed)))
        }
        #[inline(always)]
        unsafe fn dot_nibble_pair(q: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from `q`, 64 from `x`.
            let (bytes, x) = unsafe { (_mm256_loadu_si256(q as *const __m256i), _mm512_loadu_si512(x as *const _)) };
            let mask = _mm256_set1_epi8(0x0f);
            let (lo, hi) = (_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), mask));
            let codes = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            Avx512(_mm512_cvtepi32_ps(sum_bytes(codes, x)))
        }
        #[inline(always)]
        unsafe fn dot_u4_half(w: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `w`, 32 from `x`.
            let (bytes, x) = unsafe { (_mm_loadu_si128(w as *const __m128i), _mm256_loadu_si256(x as *const __m256i)) };
            let codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes), _mm256_set1_epi8(0x0f));
            Avx512(_mm512_cvtepi32_ps(sum_bytes(_mm512_zextsi256_si512(codes), _mm512_zextsi256_si512(x))))
        }
        #[inline(always)]
        unsafe fn expand_pair(p: *const f32, stride: usize) -> Self {
            // SAFETY: the caller's contract.
            let (a, b) = unsafe { (_mm512_set1_ps(*p), _mm512_set1_ps(*p.add(stride))) };
            Avx512(_mm512_mask_blend_ps(0xff00, a, b))
        }
        #[inline(always)]
        unsafe fn levels(p: *const u8, high: bool, table: &[i8; 16]) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`; the table is 16 bytes.
            let (bytes, lut) = unsafe { (_mm_loadu_si128(p as *const __m128i), _mm_loadu_si128(table.as_ptr() as *const __m128i)) };
            let index = _mm_and_si128(if high { _mm_srli_epi16::<4>(bytes) } else { bytes }, _mm_set1_epi8(0x0f));
            Avx512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(lut, index))))
        }
        #[inline(always)]
        unsafe fn i8_pair(low: u64, high: u64) -> Self {
            Avx512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_set_epi64x(high as i64, low as i64))))
        }
        #[inline(always)]
        unsafe fn nibbles(p: *const u8, high: bool) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
            let codes = if high { _mm512_srli_epi32::<4>(bytes) } else { _mm512_and_si512(bytes, _mm512_set1_epi32(0xf)) };
            Avx512(_mm512_cvtepi32_ps(codes))
        }
        #[inline(always)]
        unsafe fn crumbs(p: *const u8, shift: u32) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
            let codes = _mm512_and_si512(_mm512_srlv_epi32(bytes, _mm512_set1_epi32(shift as i32)), _mm512_set1_epi32(3));
            Avx512(_mm512_cvtepi32_ps(codes))
        }
        #[inline(always)]
        unsafe fn bits(mask: u16) -> Self {
            Avx512(_mm512_maskz_mov_ps(mask, _mm512_set1_ps(1.0)))
        }
        #[inline(always)]
        unsafe fn byte_bits(p: *const u8, bit: u32) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let mask = _mm_test_epi8_mask(bytes, _mm_set1_epi8((1u8 << bit) as i8));
            Avx512(_mm512_maskz_mov_ps(mask, _mm512_set1_ps(1.0)))
        }
        #[inline(always)]
        unsafe fn load_u4(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 8 bytes from `p`.
            let codes = unsafe { nibbles(p) };
            Avx512(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)))
        }
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8, _: &[f32; 256]) -> Self {
            // e4m3 (sign, 4 exponent bits of bias 7, 3 mantissa bits) moved into f16's fields:
            // a byte in a u16's high half has its sign at bit 15 and the rest at 14..8; an
            // arithmetic shift by one moves the rest to 13..7 (the low four bits of f16's
            // exponent, the top three of its mantissa) and copies the sign into bit 14, which
            // is cleared. That f16 is the e4m3 value times 2^-8 exactly, subnormals included
            // (f16's exponent is wider), so vcvtph2ps and a multiply by 2^8 give it. Mostly
            // 256-bit integer work: half the cycles of widening to 32-bit lanes first.
            // 0x7f and 0xff (NaN) would read as +-480: masked.
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let words = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(bytes));
            let half = _mm256_and_si256(_mm256_srai_epi16::<1>(words), _mm256_set1_epi16(!0x4000));
            let value = _mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.0));
            let nan = _mm_cmpeq_epi8_mask(_mm_and_si128(bytes, _mm_set1_epi8(0x7f)), _mm_set1_epi8(0x7f));
            Avx512(_mm512_mask_blend_ps(nan, value, _mm512_set1_ps(f32::NAN)))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller's contract.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx512(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            Self::sum4([self, Self::zero(), Self::zero(), Self::zero()])[0]
        }
        #[inline(always)]
        unsafe fn sum4(v: [Self; 4]) -> [f32; 4] {
            // Interleave a, b and c, d and add: each 128-bit lane holds partial sums of the
            // four; then add the four lanes.
            let [a, b, c, d] = v.map(|v| v.0);
            let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
            let abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
            let halves = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
            let sums = _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
            let mut out = [0f32; 4];
            // SAFETY: four values into `out`.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
            out
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2(__m256, __m256);

    impl Vector for Avx2 {
        const REGISTERS: usize = 8;
        #[inline(always)]
        unsafe fn nibbles(p: *const u8, high: bool) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let codes = _mm_and_si128(if high { _mm_srli_epi16::<4>(bytes) } else { bytes }, _mm_set1_epi8(0x0f));
            let (a, b) = unsafe { widen16(codes) };
            Avx2(a, b)
        }
        #[inline(always)]
        unsafe fn levels(p: *const u8, high: bool, table: &[i8; 16]) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`; the table is 16 bytes.
            let (bytes, lut) = unsafe { (_mm_loadu_si128(p as *const __m128i), _mm_loadu_si128(table.as_ptr() as *const __m128i)) };
            let index = _mm_and_si128(if high { _mm_srli_epi16::<4>(bytes) } else { bytes }, _mm_set1_epi8(0x0f));
            let levels = _mm_shuffle_epi8(lut, index);
            Avx2(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(levels)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(levels))))
        }
        #[inline(always)]
        unsafe fn i8_pair(low: u64, high: u64) -> Self {
            let (a, b) = (_mm_cvtsi64_si128(low as i64), _mm_cvtsi64_si128(high as i64));
            Avx2(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)))
        }
        #[inline(always)]
        unsafe fn crumbs(p: *const u8, shift: u32) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            unsafe { bit_field(p, shift, 3) }
        }
        #[inline(always)]
        unsafe fn bits(mask: u16) -> Self {
            // SAFETY: the level is the caller's contract.
            unsafe { Avx2(bit_lanes(mask, 1), bit_lanes(mask, 1 << 8)) }
        }
        #[inline(always)]
        unsafe fn byte_bits(p: *const u8, bit: u32) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            unsafe { bit_field(p, bit, 1) }
        }
        #[inline(always)]
        unsafe fn dot_i8_two(w0: *const u8, w1: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from each of `w0`, `w1`, 64 from `x`.
            unsafe {
                let (x0, x1) = (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(32) as *const __m256i));
                Avx2(dot32(_mm256_loadu_si256(w0 as *const __m256i), x0), dot32(_mm256_loadu_si256(w1 as *const __m256i), x1))
            }
        }
        #[inline(always)]
        unsafe fn dot_nibble_pair(q: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from `q`, 64 from `x`.
            unsafe {
                let (bytes, mask) = (_mm256_loadu_si256(q as *const __m256i), _mm256_set1_epi8(0x0f));
                let (lo, hi) = (_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), mask));
                let (x0, x1) = (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(32) as *const __m256i));
                Avx2(dot32(lo, x0), dot32(hi, x1))
            }
        }
        #[inline(always)]
        unsafe fn dot_q5k_pair(q: *const u8, qh: *const u8, j: u32, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes at `q` and `qh`, 64 at `x`.
            unsafe {
                let (lo, hi) = q5k_codes(_mm256_loadu_si256(q as *const __m256i), _mm256_loadu_si256(qh as *const __m256i), j);
                let (x0, x1) = (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(32) as *const __m256i));
                Avx2(dot32(lo, x0), dot32(hi, x1))
            }
        }
        #[inline(always)]
        unsafe fn dot_q5_0_pair(b0: *const u8, b1: *const u8, x: *const i8) -> Self {
            // SAFETY: the caller's contract: whole blocks at `b0`, `b1`, 64 bytes from `x`.
            unsafe {
                let (x0, x1) = (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(32) as *const __m256i));
                Avx2(dot32(q5_0_codes(b0), x0), dot32(q5_0_codes(b1), x1))
            }
        }
        #[inline(always)]
        unsafe fn dot_q6_pair(ql_a: *const u8, ql_b: *const u8, qh: *const u8, high: bool, shift: u32, x: *const i8) -> Self {
            // SAFETY: the caller's contract: 32 bytes at each of `ql_a`, `ql_b`, `qh`, 64 at `x`.
            unsafe {
                let (a, b, h) = (_mm256_loadu_si256(ql_a as *const __m256i), _mm256_loadu_si256(ql_b as *const __m256i), _mm256_loadu_si256(qh as *const __m256i));
                let (ca, cb) = (q6_codes(a, h, high, shift), q6_codes(b, h, high, shift + 2));
                let (x0, x1) = (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(32) as *const __m256i));
                Avx2(dot32(ca, x0), dot32(cb, x1))
            }
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract: 16 values from `p`.
            unsafe { Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: the caller's contract: 16 values from `p`.
            let (a, b) = unsafe { (_mm_loadu_si128(p as *const __m128i), _mm_loadu_si128(p.add(8) as *const __m128i)) };
            Avx2(_mm256_cvtph_ps(a), _mm256_cvtph_ps(b))
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from `p`.
            let (a, b) = unsafe { (_mm_loadu_si128(p as *const __m128i), _mm_loadu_si128(p.add(16) as *const __m128i)) };
            let widen = |h| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            Avx2(widen(a), widen(b))
        }
        #[inline(always)]
        unsafe fn load_bf16_pairs(p: *const u8) -> (Self, Self) {
            // SAFETY: the caller's contract: 64 bytes from `p`.
            let (a, b) = unsafe { (_mm256_loadu_si256(p as *const __m256i), _mm256_loadu_si256(p.add(32) as *const __m256i)) };
            let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
            let even = |w| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
            let odd = |w| _mm256_castsi256_ps(_mm256_and_si256(w, high));
            (Avx2(even(a), even(b)), Avx2(odd(a), odd(b)))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let (a, b) = unsafe { (_mm_loadl_epi64(p as *const __m128i), _mm_loadl_epi64(p.add(8) as *const __m128i)) };
            let widen = |q| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            Avx2(widen(a), widen(b))
        }
        #[inline(always)]
        unsafe fn dot_i8(w: *const u8, x: *const i8) -> Self {
            // As AVX-512's, 32 bytes at a time.
            let dot = |w: __m256i, x: __m256i| {
                let products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                _mm256_cvtepi32_ps(_mm256_madd_epi16(products, _mm256_set1_epi16(1)))
            };
            // SAFETY: the caller's contract: 64 bytes from each.
            unsafe {
                let (w0, w1) = (_mm256_loadu_si256(w as *const __m256i), _mm256_loadu_si256(w.add(32) as *const __m256i));
                let (x0, x1) = (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(32) as *const __m256i));
                Avx2(dot(w0, x0), dot(w1, x1))
            }
        }
        #[inline(always)]
        unsafe fn dot_u4(w: *const u8, x: *const i8) -> Self {
            // A group's 16 bytes: low nibbles then high nibbles, 32 codes against 32 bytes of x.
            let dot = |bytes: __m128i, x: __m256i| {
                let codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes), _mm256_set1_epi8(0x0f));
                let products = _mm256_maddubs_epi16(codes, x);
                _mm256_cvtepi32_ps(_mm256_madd_epi16(products, _mm256_set1_epi16(1)))
            };
            // SAFETY: the caller's contract: 32 bytes from `w`, 64 from `x`.
            unsafe {
                let (b0, b1) = (_mm_loadu_si128(w as *const __m128i), _mm_loadu_si128(w.add(16) as *const __m128i));
                let (x0, x1) = (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(32) as *const __m256i));
                Avx2(dot(b0, x0), dot(b1, x1))
            }
        }
        #[inline(always)]
        unsafe fn expand_pair(p: *const f32, stride: usize) -> Self {
            // SAFETY: the caller's contract.
            unsafe { Avx2(_mm256_set1_ps(*p), _mm256_set1_ps(*p.add(stride))) }
        }
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8, _: &[f32; 256]) -> Self {
            // As AVX-512's (through f16), eight lanes at a time.
            let decode = |bytes: __m128i| {
                let words = _mm_slli_epi16::<8>(_mm_cvtepu8_epi16(bytes));
                let half = _mm_and_si128(_mm_srai_epi16::<1>(words), _mm_set1_epi16(!0x4000));
                let value = _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.0));
                let magnitude = _mm_and_si128(bytes, _mm_set1_epi8(0x7f));
                let is_nan = _mm256_cvtepi8_epi32(_mm_cmpeq_epi8(magnitude, _mm_set1_epi8(0x7f)));
                _mm256_blendv_ps(value, _mm256_set1_ps(f32::NAN), _mm256_castsi256_ps(is_nan))
            };
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let (a, b) = unsafe { (_mm_loadl_epi64(p as *const __m128i), _mm_loadl_epi64(p.add(8) as *const __m128i)) };
            Avx2(decode(a), decode(b))
        }
        #[inline(always)]
        unsafe fn load_u4(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 8 bytes from `p`.
            let codes = unsafe { nibbles(p) };
            Avx2(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(codes))))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller's contract: 16 values from `p`.
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(8), self.1);
            }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx2(_mm256_set1_ps(x), _mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            Avx2(_mm256_fmadd_ps(a.0, b.0, c.0), _mm256_fmadd_ps(a.1, b.1, c.1))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let v = _mm256_add_ps(self.0, self.1);
            let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            let v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
            _mm_cvtss_f32(v)
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub use arm::Neon as Native;

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::Vector;
    use std::arch::aarch64::*;

    /// NEON is baseline on aarch64: the portable level.
    #[derive(Clone, Copy)]
    pub struct Neon([float32x4_t; 4]);

    impl Vector for Neon {
        const REGISTERS: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Neon([vdupq_n_f32(0.0); 4])
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract: 16 values from `p`.
            unsafe { Neon([vld1q_f32(p), vld1q_f32(p.add(4)), vld1q_f32(p.add(8)), vld1q_f32(p.add(12))]) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller's contract: 16 values from `p`.
            unsafe {
                for (i, v) in self.0.into_iter().enumerate() {
                    vst1q_f32(p.add(4 * i), v);
                }
            }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Neon([vdupq_n_f32(x); 4])
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            Neon(std::array::from_fn(|i| vfmaq_f32(c.0[i], a.0[i], b.0[i])))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            vaddvq_f32(vaddq_f32(vaddq_f32(self.0[0], self.0[1]), vaddq_f32(self.0[2], self.0[3])))
        }
    }
}

#[cfg(not(target_arch = "aarch64"))]
pub use plain::Plain as Native;

#[cfg(not(target_arch = "aarch64"))]
mod plain {
    use super::{Vector, LANES};

    /// The portable fallback's lanes: a multiply and an add (baseline x86-64 has no FMA, and a
    /// software `fma` would be far slower).
    #[derive(Clone, Copy)]
    pub struct Plain([f32; LANES]);

    impl Vector for Plain {
        const REGISTERS: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Plain([0.0; LANES])
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract.
            Plain(unsafe { std::ptr::read_unaligned(p as *const [f32; LANES]) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller's contract.
            unsafe { std::ptr::write_unaligned(p as *mut [f32; LANES], self.0) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Plain([x; LANES])
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            Plain(std::array::from_fn(|i| a.0[i] * b.0[i] + c.0[i]))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let (low, high) = self.0.split_at(LANES / 2);
            low.iter().zip(high).map(|(a, b)| a + b).sum()
        }
    }
}

/// Bytes ahead of the loads a row's dot prefetches. The hardware prefetcher alone left decode
/// at ~115 tok/s on the 0.58B synth (2 threads); 256 bytes ahead reached ~135, while 640 and
/// more fell below 120 (rows are 0.7-2 KiB: far prefetches land in rows another thread reads).
pub(super) const PREFETCH_AHEAD: usize = 256;

/// Prefetches the `bytes` from `PREFETCH_AHEAD` bytes past `p` on (a GGUF block's worth).
#[inline(always)]
pub(super) fn prefetch_ahead(p: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        prefetch_line(p.wrapping_add(PREFETCH_AHEAD + line));
    }
}

/// Prefetches the cache line at `p` (x86-64; a hint elsewhere left to the hardware).
#[inline(always)]
pub(super) fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sixteen bytes decoded as e4m3 at a level, stored back as f32.
    struct E4m3([u8; LANES]);

    impl AtLevel for E4m3 {
        type Output = [f32; LANES];
        #[inline(always)]
        unsafe fn run<V: Vector>(self) -> [f32; LANES] {
            let mut out = [0f32; LANES];
            // SAFETY: the level is dispatch's; 16 bytes in, 16 values out.
            unsafe { V::load_e4m3(self.0.as_ptr(), crate::quant::fp8_table()).store(out.as_mut_ptr()) };
            out
        }
    }

    /// Sixteen f16 values widened at a level.
    struct F16s([u16; LANES]);

    impl AtLevel for F16s {
        type Output = [f32; LANES];
        #[inline(always)]
        unsafe fn run<V: Vector>(self) -> [f32; LANES] {
            let mut out = [0f32; LANES];
            // SAFETY: the level is dispatch's; 16 values in, 16 out.
            unsafe { V::load_f16(self.0.as_ptr()).store(out.as_mut_ptr()) };
            out
        }
    }

    /// Every f16 (zeros, subnormals, normals, infinities, NaN, both signs) widens at every level
    /// this CPU runs exactly as `half` does.
    #[test]
    fn f16_widens_as_half_at_every_level() {
        for simd in Simd::available() {
            for first in (0..=u16::MAX as usize).step_by(LANES) {
                let halves: [u16; LANES] = std::array::from_fn(|i| (first + i) as u16);
                let got = dispatch(simd, F16s(halves));
                for (h, v) in halves.iter().zip(got) {
                    let want = half::f16::from_bits(*h).to_f32();
                    assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "{}: {h:#06x} gave {v}, half {want}", simd.name());
                }
            }
        }
    }

    /// Every e4m3 byte (zeros, subnormals, normals, NaN, both signs) decodes at every level this
    /// CPU runs exactly as the table does.
    #[test]
    fn e4m3_decodes_as_the_table_at_every_level() {
        let table = crate::quant::fp8_table();
        for simd in Simd::available() {
            for first in (0..256).step_by(LANES) {
                let bytes: [u8; LANES] = std::array::from_fn(|i| (first + i) as u8);
                let got = dispatch(simd, E4m3(bytes));
                for (b, v) in bytes.iter().zip(got) {
                    let want = table[*b as usize];
                    assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "{}: byte {b:#04x} gave {v}, the table {want}", simd.name());
                }
            }
        }
    }
}
