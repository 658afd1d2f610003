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
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
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
/// The CPU runs AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
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

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

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
        unsafe fn load_bf16(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from `p`.
            let halves = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves))))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = unsafe { _mm_loadu_si128(p as *const __m128i) };
            Avx512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
        }
        #[inline(always)]
        unsafe fn load_u4(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 8 bytes from `p`.
            let codes = unsafe { nibbles(p) };
            Avx512(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)))
        }
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8, _: &[f32; 256]) -> Self {
            // e4m3: sign, 4 exponent bits (bias 7), 3 mantissa bits. Normal values move their
            // exponent and mantissa into f32's fields and rebias (+120); subnormals (exponent
            // 0) are m * 2^-9, computed from the integer (no f32 denormal is formed); 0x7f and
            // 0xff are NaN.
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let bytes = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
            let magnitude = _mm512_and_si512(bytes, _mm512_set1_epi32(0x7f));
            let normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32::<20>(magnitude), _mm512_set1_epi32(120 << 23)));
            let subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(1.0 / 512.0));
            let value = _mm512_mask_blend_ps(_mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(8)), normal, subnormal);
            let value = _mm512_mask_blend_ps(_mm512_cmpeq_epu32_mask(magnitude, _mm512_set1_epi32(0x7f)), value, _mm512_set1_ps(f32::NAN));
            let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(bytes, _mm512_set1_epi32(0x80)));
            Avx512(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign)))
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
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract: 16 values from `p`.
            unsafe { Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 32 bytes from `p`.
            let (a, b) = unsafe { (_mm_loadu_si128(p as *const __m128i), _mm_loadu_si128(p.add(16) as *const __m128i)) };
            let widen = |h| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            Avx2(widen(a), widen(b))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const u8) -> Self {
            // SAFETY: the caller's contract: 16 bytes from `p`.
            let (a, b) = unsafe { (_mm_loadl_epi64(p as *const __m128i), _mm_loadl_epi64(p.add(8) as *const __m128i)) };
            let widen = |q| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            Avx2(widen(a), widen(b))
        }
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8, _: &[f32; 256]) -> Self {
            // As AVX-512's, eight lanes at a time.
            let decode = |bytes: __m128i| {
                let bytes = _mm256_cvtepu8_epi32(bytes);
                let magnitude = _mm256_and_si256(bytes, _mm256_set1_epi32(0x7f));
                let normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32::<20>(magnitude), _mm256_set1_epi32(120 << 23)));
                let subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(1.0 / 512.0));
                let is_subnormal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude));
                let value = _mm256_blendv_ps(normal, subnormal, is_subnormal);
                let is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7f)));
                let value = _mm256_blendv_ps(value, _mm256_set1_ps(f32::NAN), is_nan);
                let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(bytes, _mm256_set1_epi32(0x80)));
                _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(value), sign))
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
