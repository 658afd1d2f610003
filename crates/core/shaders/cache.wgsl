// The latent cache's storage, prepended to the kernels that read or write it. `cache` (declared
// by each kernel, read or read_write) holds 32-bit words: CACHE 0 is one f32 per word, 1 two f16,
// 2 two bf16, value i in the low half of word i / 2 when i is even.
override CACHE: u32 = 0u;

fn cache_at(i: u32) -> f32 {
    if (CACHE == 0u) {
        return bitcast<f32>(cache[i]);
    }
    let w = cache[i >> 1u];
    if (CACHE == 1u) {
        return unpack2x16float(w)[i & 1u];
    }
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));
}

// Values i and i + 1: one word when a 16-bit pair starts at an even i.
fn cache_pair(i: u32) -> vec2<f32> {
    if (CACHE != 0u && (i & 1u) == 0u) {
        let w = cache[i >> 1u];
        if (CACHE == 1u) {
            return unpack2x16float(w);
        }
        return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
    }
    return vec2<f32>(cache_at(i), cache_at(i + 1u));
}
